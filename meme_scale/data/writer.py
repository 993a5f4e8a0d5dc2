"""The one shard writer every converter uses, so every dataset obeys the same format (DESIGN 2).

Output folder: ``{name}-{split}-{index:06d}.tar`` shards (webdataset TarWriter), ``sizes.json``
({shard file name: samples}) and ``meta.json`` (format_version, name, modalities, label, splits,
source). Sample keys are the index within the split, zero-padded to 9 digits; images are PNG
(uint8, [1,H,W] grayscale or [3,H,W] RGB), vectors float32 ``.npy`` of shape [D], captions
UTF-8 text ``.txt`` (normalised; shape [T] = the token length the reader pads/cuts to, 32), labels
ASCII. A caption modality carries its sentencepiece tokenizer (``tokenizer.train`` on the training
captions), saved beside the shards as ``<modality>.spm.model``; meta.json's entry records the file
name, ``vocab_size``, ``pad_id``, ``eos_id``, ``unk_id`` and how many captions per split were longer
than T-1 pieces (the reader truncates those, keeping eos; none is dropped).

A sample of a two-modality dataset may lack one modality (its value is None): the shard holds only
the fields that exist, and meta.json's ``patterns`` counts each split's samples per pattern (both,
s_only, t_only; see patterns.py). A sample with no modality at all is an error.

Why the temporary folder: a crashed or interrupted conversion must never leave a shard set that
looks complete. Everything is written into ``OUT.tmp-<pid>``, read back with the reader's own tar
iteration (counts against sizes.json and the pattern counts, every field present, unique keys),
and only then renamed to OUT. An OUT that is a URL (storage.py) is written and validated in a
local temporary folder, then uploaded with meta.json last, so a reader never sees a half-written
dataset. Replacing an existing OUT needs ``overwrite=True``.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from . import storage as st
from .patterns import PATTERNS, pattern_name, present_mask
from .shards import (FORMAT_VERSION, SPLITS, _Decoder, iter_shard, load_tokenizer, modality_fields, read_meta,
                     required_fields, shard_paths)
from .tokenizer import Tokenizer, normalise

EXTENSIONS = {"image": "png", "vector": "npy", "caption": "txt"}
LABEL_FIELD = "label.cls"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # webdataset lower-cases field suffixes: keep names lower-case


def modality_spec(name: str, kind: str, shape: Iterable[int], tokenizer: Tokenizer | None = None) -> dict:
    """meta.json entry for a modality: {"kind", "field", "shape"} (+ tokenizer info for captions)."""
    if not _NAME.match(name) or name == "label":
        raise ValueError(f"modality name {name!r} must match {_NAME.pattern} and not be 'label'")
    if kind not in EXTENSIONS:
        raise ValueError(f"modality {name!r}: kind {kind!r} is not supported (supported: {sorted(EXTENSIONS)})")
    if kind == "caption" and tokenizer is None:
        raise ValueError(f"modality {name!r}: kind 'caption' is not supported without a tokenizer: declare "
                         "{'kind': 'caption', 'shape': [32], 'tokenizer': Tokenizer or path of a .model file}")
    shape = [int(d) for d in shape]
    if kind == "image" and (len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1):
        raise ValueError(f"image modality {name!r}: shape must be [1|3, H, W], got {shape}")
    if kind == "vector" and (len(shape) != 1 or shape[0] < 1):
        raise ValueError(f"vector modality {name!r}: shape must be [D], got {shape}")
    if kind == "caption" and (len(shape) != 1 or shape[0] < 2):
        raise ValueError(f"caption modality {name!r}: shape must be [T] (tokens, T >= 2), got {shape}")
    spec = {"kind": kind, "field": f"{name}.{EXTENSIONS[kind]}", "shape": shape}
    if kind == "caption":
        spec.update({"tokenizer": f"{name}.spm.model", **tokenizer.info()})
    return spec


def _as_tokenizer(name: str, value: Any) -> Tokenizer | None:
    if value is None or isinstance(value, Tokenizer):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Tokenizer.load(os.fspath(value))
    raise ValueError(f"modality {name!r}: 'tokenizer' must be a Tokenizer or a path, got {type(value).__name__}")


def check_output(out_dir: str, overwrite: bool, storage: st.Storage | None = None) -> None:
    """Refuse an existing output folder (or a URL holding a dataset) unless overwriting; converters
    call it before slow work."""
    if st.protocol(out_dir) == "pipe":
        raise ValueError(f"--out {out_dir}: a pipe: URL can be read from, not written to")
    if st.is_remote(out_dir):
        exists = (storage or st.Storage()).exists(st.join(out_dir, "meta.json"))
    else:
        exists = os.path.exists(st.local_path(out_dir))
    if exists and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")


def _encode_png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _encode_npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class Encoded:
    """A modality value already validated and encoded by ``ShardWriter.encoded`` (written as is)."""

    modality: str
    data: bytes


class ShardWriter:
    """Write a dataset split by split; publish atomically on ``finish()`` (or a clean ``with`` exit).

    ``modalities`` maps a name to {"kind": "image"|"vector"|"caption", "shape": [...]} (captions
    also {"tokenizer": Tokenizer or path}); ``label_names`` is the class list (None: the dataset
    has no labels). Samples are dicts {modality: array (captions: str), "label": int | None}.
    """

    def __init__(self, out_dir: str, name: str, modalities: Mapping[str, Mapping[str, Any]],
                 label_names: list[str] | None, *, samples_per_shard: int = 1000,
                 source: dict | None = None, overwrite: bool = False, storage: st.Storage | None = None):
        if not re.match(r"^[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*$", name):
            raise ValueError(f"dataset name {name!r} may hold letters, digits, '_', '.', single '-'")
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if not modalities:
            raise ValueError("a dataset needs at least one modality")
        self.remote = st.is_remote(out_dir)
        self.out = out_dir if self.remote else os.path.abspath(st.local_path(out_dir))
        self.overwrite, self.storage = overwrite, storage or st.Storage()
        self._refuse_existing()
        self.name, self.samples_per_shard = name, samples_per_shard
        self.tokenizers = {m: _as_tokenizer(m, s.get("tokenizer")) for m, s in modalities.items()
                           if s.get("kind") == "caption"}
        self.modalities = {m: modality_spec(m, s["kind"], s["shape"], self.tokenizers.get(m))
                           for m, s in modalities.items()}
        self.truncated = {m: {} for m in self.tokenizers}  # {caption modality: {split: captions cut}}
        self.label_names = None if label_names is None else [str(n) for n in label_names]
        self.source = dict(source or {})
        self.sizes: dict[str, int] = {}
        self.splits: dict[str, int] = {}
        self.patterns: dict[str, Counter] = {}
        if self.remote:
            self.tmp = tempfile.mkdtemp(prefix=f"meme_scale-{name}-")
        else:
            self.tmp = f"{self.out}.tmp-{os.getpid()}"
            shutil.rmtree(self.tmp, ignore_errors=True)
            os.makedirs(self.tmp)
        self._done = False

    def _refuse_existing(self) -> None:
        check_output(self.out, self.overwrite, self.storage)

    def meta(self) -> dict:
        """meta.json content for what has been written so far."""
        label = None if self.label_names is None else {"field": LABEL_FIELD, "names": self.label_names}
        modalities = {m: {**spec, "truncated": dict(self.truncated[m])} if m in self.truncated else spec
                      for m, spec in self.modalities.items()}
        meta = {"format_version": FORMAT_VERSION, "name": self.name, "modalities": modalities,
                "label": label, "splits": dict(self.splits), "source": self.source}
        if len(self.modalities) == 2:
            meta["patterns"] = {split: {p: c[p] for p in PATTERNS} for split, c in self.patterns.items()}
        return meta

    def encoded(self, modality: str, value: Any, where: str = "pre-encoded value") -> Encoded:
        """Validate and encode one image/vector once, for a converter that writes it in several samples
        (CUB: each image with each of its 10 captions); pass the result in place of the array."""
        spec = self.modalities.get(modality)
        if spec is None or spec["kind"] == "caption":
            raise ValueError(f"encoded() takes an image or vector modality of {list(self.modalities)}, got {modality!r}")
        return Encoded(modality, self._field(modality, spec, where, value))

    def _field(self, m: str, spec: dict, where: str, value: Any) -> bytes:
        if isinstance(value, Encoded):
            if value.modality != m:
                raise ValueError(f"modality {m!r}, {where}: value was encoded for modality {value.modality!r}")
            return value.data
        a = np.asarray(value)
        if list(a.shape) != spec["shape"]:
            raise ValueError(f"modality {m!r}, {where}: shape {list(a.shape)} does not match "
                             f"declared shape {spec['shape']}")
        if spec["kind"] == "image":
            if a.dtype != np.uint8:
                raise ValueError(f"modality {m!r}, {where}: images are stored as uint8 0..255, got {a.dtype}")
            return _encode_png(a)
        if not np.issubdtype(a.dtype, np.number) or not np.all(np.isfinite(a)):
            raise ValueError(f"modality {m!r}, {where}: vectors must be finite numbers, got {a.dtype}")
        return _encode_npy(a)

    def _encode(self, split: str, index: int, sample: Mapping[str, Any]) -> dict[str, Any]:
        where = f"{split} sample {index}"
        unknown = set(sample) - set(self.modalities) - {"label"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; modalities are {list(self.modalities)}")
        out: dict[str, Any] = {"__key__": f"{index:09d}"}
        present = [sample.get(m) is not None for m in self.modalities]
        if not any(present):
            raise ValueError(f"{where}: every modality is absent (None); a sample needs at least one")
        if not all(present) and len(self.modalities) != 2:
            raise ValueError(f"{where}: absent modalities need a dataset of exactly two modalities (s, t), "
                             f"this one has {list(self.modalities)}")
        for m, spec in self.modalities.items():
            if m not in sample:
                raise ValueError(f"{where}: modality {m!r} is missing (a sample that truly lacks it says None)")
            if sample[m] is None:
                continue  # truly absent: the shard stores only what exists
            if spec["kind"] == "caption":
                out[spec["field"]] = self._caption(m, split, where, sample[m])
            else:
                out[spec["field"]] = self._field(m, spec, where, sample[m])
        label = sample.get("label")
        if self.label_names is None:
            if label is not None:
                raise ValueError(f"{where}: has label {label!r} but the dataset declares no labels")
        else:
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)) \
                    or not 0 <= int(label) < len(self.label_names):
                raise ValueError(f"{where}: label must be an int in [0, {len(self.label_names)}), got {label!r}")
            out[LABEL_FIELD] = str(int(label)).encode("ascii")
        return out

    def _caption(self, m: str, split: str, where: str, text: Any) -> bytes:
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"modality {m!r}, {where}: caption is not UTF-8 ({e})") from None
        if not isinstance(text, str):
            raise ValueError(f"modality {m!r}, {where}: captions are str, got {type(text).__name__}")
        text = normalise(text)
        if not text:
            raise ValueError(f"modality {m!r}, {where}: empty caption")
        _, cut = self.tokenizers[m].encode_counted(text, self.modalities[m]["shape"][0])
        self.truncated[m][split] = self.truncated[m].get(split, 0) + int(cut)
        return text.encode("utf-8")

    def write_split(self, split: str, samples: Iterable[Mapping[str, Any]]) -> int:
        """Write one split's samples into shards of ``samples_per_shard``; returns the count."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split in self.splits:
            raise ValueError(f"split {split!r} was already written")
        if self._done:
            raise RuntimeError("writer already finished")
        count, tar, shard = 0, None, ""
        try:
            for sample in samples:
                if count % self.samples_per_shard == 0:
                    if tar is not None:
                        tar.close()
                    shard = f"{self.name}-{split}-{count // self.samples_per_shard:06d}.tar"
                    tar = wds.TarWriter(os.path.join(self.tmp, shard), encoder=False, mtime=0)  # int: no PAX header
                    self.sizes[shard] = 0
                encoded = self._encode(split, count, sample)
                tar.write(encoded)
                if len(self.modalities) == 2:
                    counts = self.patterns.setdefault(split, Counter())
                    counts[pattern_name([spec["field"] in encoded for spec in self.modalities.values()])] += 1
                self.sizes[shard] += 1
                count += 1
        finally:
            if tar is not None:
                tar.close()
        if count == 0:
            raise ValueError(f"split {split!r} has no samples")
        self.splits[split] = count
        return count

    def finish(self) -> dict:
        """Write sizes.json and meta.json, validate everything, then move the folder into place."""
        if self._done:
            raise RuntimeError("writer already finished")
        if not self.splits:
            raise ValueError("no split was written")
        meta = self.meta()
        for m, tok in self.tokenizers.items():
            tok.save(os.path.join(self.tmp, self.modalities[m]["tokenizer"]))
        for fname, obj in (("sizes.json", self.sizes), ("meta.json", meta)):
            with open(os.path.join(self.tmp, fname), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=1)
                f.write("\n")
        validate_dataset(self.tmp)
        if self.remote:
            try:
                self.storage.publish(self.tmp, self.out, self.overwrite)
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)
            self._done = True
            return meta
        self._refuse_existing()
        old = f"{self.out}.old-{os.getpid()}"
        if os.path.exists(self.out):
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        shutil.rmtree(old, ignore_errors=True)
        self._done = True
        return meta

    def abort(self) -> None:
        """Delete the temporary folder; OUT is left as it was."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._done:
            return
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def validate_dataset(root: str) -> dict[str, int]:
    """Read every shard back; check counts vs sizes.json and meta splits, fields, unique int keys.

    Returns {split: samples}. Caption modalities' tokenizer files must load and agree with
    meta.json; the samples of each pattern (both, s_only, t_only) must match meta.json's counts.
    The first sample of every shard is decoded by the reader's own decoder (shapes,
    tokenisation); the reader checks the others when it decodes them.
    """
    meta = read_meta(root)
    fields, any_of = required_fields(meta, meta["modalities"]), modality_fields(meta)
    for m, spec in meta["modalities"].items():
        if spec["kind"] == "caption":
            load_tokenizer(root, meta, m)
    decoder = _Decoder(meta, list(meta["modalities"]), root)
    listed = set(meta["sizes"])
    on_disk = {n for n in os.listdir(root) if n.endswith(".tar")}
    if on_disk - listed:
        raise ValueError(f"{root}: shard(s) not listed in sizes.json: {sorted(on_disk - listed)}")
    counts: dict[str, int] = {}
    for split, expected in meta["splits"].items():
        keys: set[str] = set()
        patterns: Counter = Counter()
        for path in shard_paths(root, split):
            for i, raw in enumerate(iter_shard(path, meta["sizes"][os.path.basename(path)], fields, any_of=any_of)):
                present = present_mask([raw], decoder.fields)
                if i == 0:
                    decoder([raw], present)
                if len(any_of) == 2:
                    patterns[pattern_name(present[0])] += 1
                key = raw["__key__"]
                if not (key.isascii() and key.isdigit()) or key in keys:
                    raise ValueError(f"shard {os.path.basename(path)}: key {key!r} is not a unique integer key")
                keys.add(key)
        if len(keys) != expected:
            raise ValueError(f"{root}: split {split!r} has {len(keys)} samples, meta.json says {expected}")
        listed_patterns = (meta.get("patterns") or {}).get(split)
        found = {p: patterns[p] for p in PATTERNS}
        if len(any_of) == 2 and found != (listed_patterns or {"both": expected, "s_only": 0, "t_only": 0}):
            raise ValueError(f"{root}: split {split!r} holds samples per pattern {found}, meta.json says "
                             f"{listed_patterns}")
        counts[split] = len(keys)
    unused = listed - {os.path.basename(p) for s in meta["splits"] for p in shard_paths(root, s)}
    if unused:
        raise ValueError(f"{root}: sizes.json lists shards of no split in meta.json: {sorted(unused)}")
    return counts
