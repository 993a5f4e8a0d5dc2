"""Shard reader (DESIGN 2): one deterministic, exactly resumable pipeline for every dataset.

Epoch ``e`` on rank ``r``: the sorted shard list is shuffled by (seed, e) and rank r takes
``shuffled[r::world_size]`` (node split first, so ranks never share a shard); its shards' tar
members are read in order and passed through a shuffle buffer seeded by (seed, e, r). That
stream of raw (undecoded) samples depends on nothing else, so batch j of the epoch is simply
raw samples [j*B, (j+1)*B). Every rank runs ``steps_per_epoch`` = min over ranks of
floor(n_rank / B) steps, computed from sizes.json without communication; the surplus is dropped.

DataLoader workers all read the raw stream but decode only their own batches
(k+w, k+w+W, ... when starting at batch k), and the DataLoader's round-robin interleaves them
back into k, k+1, ... So the batch sequence is identical for any num_workers and for a run
resumed at any (epoch, batch); skipping to a batch only reads tar members, it never decodes.
Because every worker reads the whole stream, tar reading must be cheap: plain ustar shards (what
ShardWriter writes) are parsed directly, ~4x faster than tarfile; others go through webdataset.
Images cross the worker boundary as uint8 and become float32 in the consumer (4x less IPC).
Captions are stored as text (``caption.txt``) and tokenised here with the sentencepiece model
stored beside the shards (meta.json names it): int64 [B, 32] ids, pad where not observed.
The tar layer itself (members, grouping by key, its errors) lives in ``tario.py``; where the bytes
come from (local folder, http(s), s3, pipe:, with retries and a cache) in ``storage.py``; the
worker processes in ``workers.py``. Samples of an incomplete dataset hold only the modalities
they have (``patterns.py``): ``observed`` is false for an absent one, whose field is zero-filled.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import storage as st
from .masks import check_args, observation_for_keys
from .patterns import absent_modalities, available_samples, present_mask
from .tario import Raw, ShardFormatError, iter_shard  # noqa: F401  (re-exported: the reader's public API)
from .tokenizer import Tokenizer
from .workers import start_worker_server, worker_batches  # noqa: F401  (start_worker_server: the loop's import)

FORMAT_VERSION = 1
SPLITS = ("train", "test")
DECODABLE_KINDS = ("image", "vector", "caption")


def _load_json(root: str, name: str, storage: st.Storage) -> tuple[Any, bytes]:
    url = st.join(root, name)
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name} not found in {root or '.'}: a shard folder needs meta.json and sizes.json "
                                "(write it with tools/make_shards.py)") from None
    try:
        return json.loads(data), data
    except ValueError as e:
        raise ValueError(f"{url}: not valid JSON ({e})") from None


def read_meta(root: str, storage: st.Storage | None = None) -> dict:
    """meta.json with sizes.json attached as meta["sizes"] ({shard file name: samples}).

    ``root`` is a folder or URL (storage.py). meta["digest"] identifies this publication of the
    dataset (it keys the shard cache).
    """
    storage = storage or st.Storage()
    meta, data = _load_json(root, "meta.json", storage)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{root}/meta.json: format_version {meta.get('format_version')!r}, "
                         f"this reader understands {FORMAT_VERSION}")
    meta["sizes"] = _load_json(root, "sizes.json", storage)[0]
    meta["digest"] = hashlib.sha256(data).hexdigest()[:16]
    return meta


def _shard_names(meta: dict, split: str) -> list[str]:
    prefix = f"{meta['name']}-{split}-"
    names = sorted(n for n in meta["sizes"] if n.startswith(prefix) and n.endswith(".tar"))
    if not names:
        raise ValueError(f"sizes.json lists no shards for split {split!r} (expected names {prefix}NNNNNN.tar)")
    return names


def shard_paths(root: str, split: str, storage: st.Storage | None = None, meta: dict | None = None) -> list[str]:
    """Sorted shard paths (URLs for a remote root) of a split, from sizes.json; a listed shard that
    does not exist is an error (a pipe: root cannot be asked: its shards fail when read)."""
    storage = storage or st.Storage()
    paths = [st.join(root, n) for n in _shard_names(meta or read_meta(root, storage), split)]
    # remote: one request per shard, so ask many at once (thousands of shards stay a start-up of seconds)
    with ThreadPoolExecutor(16 if st.is_remote(root) else 1) as pool:
        for p, exists in zip(paths, pool.map(storage.exists, paths)):
            if exists is False:
                raise FileNotFoundError(f"shard {p.rsplit('/', 1)[-1]} is listed in sizes.json but missing from {root}")
    return paths


def required_fields(meta: dict, modalities: Iterable[str]) -> list[str]:
    """Tar fields every sample must carry for these modalities (plus the label field, if any);
    the field of a modality that some samples truly lack is not required."""
    optional = absent_modalities(meta)
    fields = [meta["modalities"][m]["field"] for m in modalities if m not in optional]
    return fields + ([meta["label"]["field"]] if meta.get("label") else [])


def modality_fields(meta: dict) -> list[str]:
    """Every modality's field: a stored sample holds at least one of them."""
    return [spec["field"] for spec in meta["modalities"].values()]


def _derive_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(("meme_scale.shards",) + parts).encode()).digest()[:8], "little")


def _rank_shards(names: list[str], world_size: int, seed: int, epoch: int) -> list[list[str]]:
    """Epoch's shard order shuffled by (seed, epoch), then split by rank before anything else."""
    if len(names) < world_size:
        raise ValueError(f"{len(names)} shards cannot be split over {world_size} ranks: every rank needs at "
                         "least one shard; write more, smaller shards (make_shards.py --shard-size)")
    order = list(names)
    random.Random(_derive_seed("shards", seed, epoch)).shuffle(order)
    return [order[r::world_size] for r in range(world_size)]


def _steps(meta: dict, split: str, batch_size: int, world_size: int, seed: int, epoch: int) -> int:
    per_rank = _rank_shards(_shard_names(meta, split), world_size, seed, epoch)
    return min(sum(meta["sizes"][n] for n in names) for names in per_rank) // batch_size


def steps_per_epoch(root: str, split: str, batch_size: int, world_size: int, seed: int, epoch: int) -> int:
    """Batches every rank runs in this epoch: min over ranks of floor(samples / batch_size)."""
    return _steps(read_meta(root), split, batch_size, world_size, seed, epoch)


def _shuffled(samples: Iterable[Raw], bufsize: int, rng: random.Random) -> Iterator[Raw]:
    """Seeded shuffle buffer: deterministic given the input order and the RNG's seed."""
    buf: list[Raw] = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = s
    rng.shuffle(buf)
    yield from buf


class _Decoder:
    """Raw samples -> batch dict; shape checks name shard, key, modality and both shapes."""

    def __init__(self, meta: dict, modalities: list[str], root: str, storage: st.Storage | None = None):
        self.specs = [(m, meta["modalities"][m]) for m in modalities]
        self.fields = [spec["field"] for _, spec in self.specs]
        self.tokenizers: dict[str, Tokenizer] = {}
        for m, spec in self.specs:
            if spec["kind"] not in DECODABLE_KINDS:
                raise ValueError(f"modality {m!r} has kind {spec['kind']!r}; this reader decodes {DECODABLE_KINDS}")
            if spec["kind"] == "caption":
                self.tokenizers[m] = load_tokenizer(root, meta, m, storage)
        self.label_field = meta["label"]["field"] if meta.get("label") else None

    def _one(self, raw: Raw, name: str, spec: dict) -> np.ndarray:
        where = f"shard {raw['__url__']}, key {raw['__key__']}, modality {name!r}"
        try:
            if spec["kind"] == "image":
                # PNG only (DESIGN 2): skipping PIL's format probing halves the decode of small images
                with Image.open(io.BytesIO(raw[spec["field"]]), formats=("PNG",)) as im:
                    if im.mode not in ("L", "RGB"):
                        raise ValueError(f"PNG mode {im.mode!r}, expected 'L' or 'RGB'")
                    a = np.asarray(im)
                a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
            elif spec["kind"] == "caption":
                a = self.tokenizers[name].encode(raw[spec["field"]].decode("utf-8"), spec["shape"][0])
            else:
                a = np.load(io.BytesIO(raw[spec["field"]]), allow_pickle=False).astype(np.float32, copy=False)
        except Exception as e:
            raise ShardFormatError(f"{where}: cannot decode field {spec['field']!r}: {e}") from e
        if tuple(a.shape) != tuple(spec["shape"]):
            raise ShardFormatError(f"{where}: expected shape {tuple(spec['shape'])}, got {tuple(a.shape)}")
        return a

    def __call__(self, raws: list[Raw], observed: np.ndarray) -> dict:
        """``observed`` [B, M] must already be false where a sample lacks the modality."""
        batch: dict[str, Any] = {}
        for col, (name, spec) in enumerate(self.specs):
            dtype = {"image": np.uint8, "caption": np.int64}.get(spec["kind"], np.float32)
            arr = np.zeros((len(raws), *spec["shape"]), dtype=dtype)
            for i, r in enumerate(raws):
                if spec["field"] in r:  # a truly absent modality stays zero-filled
                    arr[i] = self._one(r, name, spec)
            # hidden data never leaves the reader (captions: all pad, which carries no likelihood)
            arr[~observed[:, col]] = spec.get("pad_id", 0) if spec["kind"] == "caption" else 0
            batch[name] = torch.from_numpy(arr)  # images stay uint8 until to_float (4x less IPC)
        batch["observed"] = torch.from_numpy(np.ascontiguousarray(observed))
        if self.label_field is None:
            batch["label"] = torch.full((len(raws),), -1, dtype=torch.int64)
        else:
            batch["label"] = torch.tensor([int(r[self.label_field]) for r in raws], dtype=torch.int64)
        batch["key"] = [r["__key__"] for r in raws]
        return batch


def load_tokenizer(root: str, meta: dict, modality: str, storage: st.Storage | None = None) -> Tokenizer:
    """The tokenizer of a caption modality, checked against meta.json's ids and vocabulary size."""
    spec = meta["modalities"][modality]
    if not spec.get("tokenizer"):
        raise ValueError(f"{root}/meta.json: caption modality {modality!r} names no tokenizer file")
    url = st.join(root, spec["tokenizer"])
    tok = Tokenizer((storage or st.Storage()).read_bytes(url), source=url) if st.is_remote(url) else Tokenizer.load(url)
    info = tok.info()
    wrong = {k: (spec.get(k), v) for k, v in info.items() if spec.get(k) != v}
    if wrong:
        raise ValueError(f"{root}/meta.json: modality {modality!r} disagrees with {spec['tokenizer']} "
                         f"(meta.json value, tokenizer value): {wrong}")
    return tok


def tokenizer_paths(root: str, meta: dict, modalities: Iterable[str],
                    storage: st.Storage | None = None) -> dict[str, str]:
    """{caption modality: absolute local path of its tokenizer model} (for decoding generated captions;
    a remote model is copied to the cache or a temporary folder first)."""
    storage = storage or st.Storage()
    return {m: os.path.abspath(storage.local_copy(st.join(root, meta["modalities"][m]["tokenizer"]), meta["digest"]))
            for m in modalities if meta["modalities"][m]["kind"] == "caption"}


def _to_float(batch: dict, meta: dict) -> dict:
    """uint8 images -> float32 in [0, 1], in the consumer's process (numpy: no torch thread pool)."""
    for name, t in batch.items():
        if name in meta["modalities"] and t.dtype == torch.uint8:
            batch[name] = torch.from_numpy(np.divide(t.numpy(), np.float32(255.0), dtype=np.float32))
    return batch


def _check_modalities(meta: dict, modalities: list[str]) -> list[str]:
    modalities = list(modalities)
    unknown = [m for m in modalities if m not in meta["modalities"]]
    if not modalities or unknown:
        raise ValueError(f"modalities {modalities} must be a non-empty subset of {list(meta['modalities'])}")
    return modalities


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class _Producer(torch.utils.data.IterableDataset):
    """The per-worker generator; picklable so DataLoader workers can run it."""

    def __init__(self, stream: "TrainStream"):
        super().__init__()
        self.s = stream

    def __iter__(self) -> Iterator[tuple[int, int, dict]]:
        info = torch.utils.data.get_worker_info()
        return self.produce(0, 1) if info is None else self.produce(info.id, info.num_workers)

    def _raw(self, epoch: int) -> Iterator[Raw]:
        s = self.s
        names = _rank_shards(_shard_names(s.meta, s.split), s.world_size, s.seed, epoch)[s.rank]
        urls = [st.join(s.root, n) for n in names]
        openers = s.storage.prefetch(urls, s.meta["digest"])  # lazy: shard k+1 is fetched while k is read
        chain = itertools.chain.from_iterable(
            iter_shard(url, s.meta["sizes"][n], s.fields, any_of=modality_fields(s.meta), opener=opener)
            for n, url, opener in zip(names, urls, openers))
        return _shuffled(chain, s.shuffle_buffer, random.Random(_derive_seed("samples", s.seed, epoch, s.rank)))

    def produce(self, worker: int, num_workers: int) -> Iterator[tuple[int, int, dict]]:
        """Batches (epoch, j) whose position n in the global sequence has n % num_workers == worker."""
        s, B = self.s, self.s.batch_size
        epoch, first, n = s.start_epoch, s.start_batch, 0
        while True:
            steps = s.steps_per_epoch(epoch)
            mine = [j for j in range(first, steps) if (n + j - first) % num_workers == worker]
            if mine:
                raw, pos = self._raw(epoch), 0
                for j in mine:
                    for _ in itertools.islice(raw, (j - pos) * B):
                        pass  # skip other workers' batches without decoding
                    raws = list(itertools.islice(raw, B))
                    if len(raws) < B:
                        raise ShardFormatError(f"epoch {epoch} rank {s.rank}: stream ended at batch {j}")
                    observed = s.mask([r["__key__"] for r in raws]) & present_mask(raws, s.decoder.fields)
                    yield epoch, j, s.decoder(raws, observed)
                    pos = j + 1
            n += steps - first
            epoch, first = epoch + 1, 0


class TrainStream:
    """Infinite training batches ``(epoch, batch_index_in_epoch, batch)`` for one rank.

    ``batch``: {modality: float32 tensor ([B,C,H,W] images in [0,1], [B,D] vectors; zero where
    not observed) or int64 [B, T] caption ids (pad where not observed), "observed": bool [B, M] in
    the order of ``modalities`` (s, t): the simulated mask (DESIGN 1.3) and the sample really
    holding the modality, "label": int64 [B] (-1 without labels), "key": list of str}. Restarting
    with (start_epoch, start_batch) = the position after the last consumed batch reproduces the
    uninterrupted sequence exactly. ``root`` is a folder or URL; ``storage`` (storage.Storage) sets
    retries and the shard cache for a remote one.
    """

    def __init__(self, root: str, split: str, batch_size: int, *, modalities: list[str], rank: int,
                 world_size: int, seed: int, observed_fraction: float, missing: str, num_workers: int = 0,
                 start_epoch: int = 0, start_batch: int = 0, shuffle_buffer: int = 1000, mask_seed: int | None = None,
                 storage: st.Storage | None = None):
        check_args(observed_fraction, missing)
        _check_rank(rank, world_size)
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 1 or start_epoch < 0 or start_batch < 0:
            raise ValueError("batch_size and shuffle_buffer must be >= 1; num_workers, start_epoch, start_batch >= 0")
        self.root, self.split, self.batch_size = root, split, batch_size
        self.storage = storage or st.Storage()
        self.meta = read_meta(root, self.storage)
        self.modalities = _check_modalities(self.meta, modalities)
        if observed_fraction < 1.0 and len(self.modalities) != 2:
            raise ValueError(f"observed_fraction < 1 needs exactly two modalities (s, t), got {self.modalities}")
        shard_paths(root, split, self.storage, self.meta)  # fail now if a listed shard is missing
        self.rank, self.world_size, self.seed = rank, world_size, seed
        # Which samples are paired has its own seed, so runs with different training seeds can share one pattern.
        self.mask_seed = seed if mask_seed is None else mask_seed
        self.observed_fraction, self.missing = float(observed_fraction), missing
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.fields = required_fields(self.meta, self.modalities)
        self.decoder = _Decoder(self.meta, self.modalities, root, self.storage)
        steps = self.steps_per_epoch(start_epoch)
        if start_batch > steps:
            raise ValueError(f"start_batch {start_batch} is past the end of epoch {start_epoch} ({steps} batches)")
        # A position saved after the epoch's last batch means "start of the next epoch".
        self.start_epoch, self.start_batch = (start_epoch + 1, 0) if start_batch == steps else (start_epoch, start_batch)

    def steps_per_epoch(self, epoch: int) -> int:
        """Batches in this epoch (same on every rank); refuses a batch larger than a rank's share."""
        steps = _steps(self.meta, self.split, self.batch_size, self.world_size, self.seed, epoch)
        if steps == 0:
            raise ValueError(f"batch_size {self.batch_size} exceeds the smallest rank's share of split "
                             f"{self.split!r} in epoch {epoch} ({self.world_size} ranks)")
        return steps

    def mask(self, keys: list[str]) -> np.ndarray:
        """Simulated observation mask [B, M] (DESIGN 1.3); all observed for a single modality.
        (A batch's ``observed`` is this AND what the samples really hold.)"""
        if len(self.modalities) != 2:
            return np.ones((len(keys), len(self.modalities)), dtype=bool)
        return observation_for_keys(keys, self.mask_seed, self.observed_fraction, self.missing)

    def __iter__(self) -> Iterator[tuple[int, int, dict]]:
        producer = _Producer(self)
        batches = producer.produce(0, 1) if self.num_workers == 0 else worker_batches(producer, self.num_workers)
        for epoch, j, batch in batches:
            yield epoch, j, _to_float(batch, self.meta)


def eval_batches(root: str, split: str, batch_size: int, *, modalities: list[str], rank: int,
                 world_size: int, storage: st.Storage | None = None) -> Iterator[dict]:
    """Finite, unshuffled batches of the samples that hold every one of ``modalities`` (complete
    pairs: evaluation never sees an incomplete sample); rank r gets those among the contiguous r-th
    1/world_size of the split's samples.

    Every such sample is seen exactly once across ranks and all modalities are observed. Ranks'
    batch counts may differ; the last batch may be short. A split without one such sample is an
    error. Where captions are among ``modalities`` a batch also holds "tokenizers": {modality:
    path of its sentencepiece model}, so pictures and logs can turn generated ids back into text.
    """
    _check_rank(rank, world_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    storage = storage or st.Storage()
    meta = read_meta(root, storage)
    modalities = _check_modalities(meta, modalities)
    if split in meta["splits"] and not available_samples(meta, split, modalities):
        raise ValueError(f"{root}: split {split!r} has no sample holding all of {modalities} "
                         f"(meta.json patterns: {meta['patterns'][split]})")
    decoder = _Decoder(meta, modalities, root, storage)
    fields = required_fields(meta, modalities)
    tokenizers = tokenizer_paths(root, meta, modalities, storage)
    paths = shard_paths(root, split, storage, meta)
    sizes = [meta["sizes"][n] for n in _shard_names(meta, split)]
    total = sum(sizes)
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size

    def samples() -> Iterator[Raw]:
        offset = 0
        for p, n in zip(paths, sizes):
            if offset < hi and offset + n > lo:
                for i, raw in enumerate(iter_shard(p, n, fields, any_of=modality_fields(meta), storage=storage,
                                                   version=meta["digest"]), start=offset):
                    if lo <= i < hi and all(f in raw for f in decoder.fields):
                        yield raw
            offset += n

    it = samples()
    while raws := list(itertools.islice(it, batch_size)):
        batch = _to_float(decoder(raws, np.ones((len(raws), len(modalities)), dtype=bool)), meta)
        if tokenizers:
            batch["tokenizers"] = tokenizers
        yield batch
