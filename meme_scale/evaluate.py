"""Evaluation during and after training (DESIGN 4): held-out loss terms, cross and joint coherence,
latent accuracy, relatedness (W2) and the pictures of a model."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from . import metrics
from .cca_features import CCAScorer, load_word_vectors
from .classifiers import load_classifier, rng_devices
from .data.shards import eval_batches, load_tokenizer, read_meta
from .engine import all_reduce_sum, broadcast_object
from .models import MultimodalVAE
from .pictures import caption_texts, save_grid

log = logging.getLogger("meme_scale")


def to_device(batch: dict, device: torch.device, float_dtype: torch.dtype = torch.float32) -> dict:
    """Moves tensors to the device; float data takes the engine's dtype (bf16 weights need bf16 inputs)."""
    out = {}
    if (
        isinstance(batch.get("observed"), torch.Tensor) and "observed_host" not in batch
    ):  # the mask stays on the host too: no device sync to read it
        out["observed_host"] = batch["observed"]
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point():
                value = value.to(float_dtype)
        out[key] = value
    return out


def classifier_paths(cfg, modalities) -> dict[str, Path]:
    folder = Path(cfg.eval.classifiers or Path(cfg.data.root) / "classifiers")
    return {m: folder / f"{m}.pt" for m in modalities}


def word_vectors_path(cfg) -> Path:
    return Path(cfg.eval.cca_word_vectors or Path(cfg.data.root) / "word_vectors.txt")


def cca_pair(kinds: dict[str, str]) -> tuple[str, str] | None:
    """(image-like, caption) modality names when exactly one of two modalities is a caption."""
    captions = [m for m, k in kinds.items() if k == "caption"]
    if len(kinds) != 2 or len(captions) != 1:
        return None
    return next(m for m in kinds if m != captions[0]), captions[0]


def metric_names(cfg, meta: dict, kinds: dict[str, str]) -> set[str]:
    """The ``eval/*`` names an Evaluator of this config reports besides the loss terms.

    Sweeps check their metric against this before any trial starts; a test holds it equal to what
    evaluation really returns. Relatedness always; latent accuracy with labels; coherence when every
    modality's classifier exists; CCA coherence for an image-caption pair with word vectors.
    """
    s, t = kinds
    names = {"eval/w2_paired", "eval/w2_mismatched", "eval/complete_pairs"}
    if meta.get("label"):
        names |= {f"eval/latent_accuracy_{m}" for m in kinds}
        if all(p.is_file() for p in classifier_paths(cfg, kinds).values()):
            names |= {
                "eval/cross_coherence",
                f"eval/coherence_{s}_to_{t}",
                f"eval/coherence_{t}_to_{s}",
                "eval/coherence_joint",
                *(f"eval/classifier_accuracy_{m}" for m in kinds),
            }
    pair = cca_pair(kinds)
    if pair is not None and word_vectors_path(cfg).is_file():
        image, caption = pair
        names |= {f"eval/cca_{image}_to_{caption}", f"eval/cca_{caption}_to_{image}", "eval/cca_joint", "eval/cca_data"}
    return names


class Evaluator:
    """All of DESIGN 4 on a held-out split, the same numbers for any number of ranks.

    The split is cut into global chunks of ``batch_size`` samples; chunk ``j`` goes to rank
    ``j % world_size`` and its random draws are seeded by ``(eval.seed, j)``. Counts and sums are
    all-reduced once; rows needed whole (latents, W2 values) are gathered with their global index
    and sorted, so the linear probe sees the same data in the same order on any world size.
    Every rank reads the whole split but decodes it only to skip: cheap for eval-sized splits.
    """

    def __init__(
        self,
        model: MultimodalVAE,
        cfg,
        rank: int,
        world_size: int,
        device: torch.device,
        float_dtype: torch.dtype = torch.float32,
    ):
        self.model, self.cfg = model, cfg
        self.rank, self.world_size, self.device, self.dtype = rank, world_size, device, float_dtype
        self.meta = read_meta(cfg.data.root)
        self.has_labels = bool(self.meta.get("label"))
        self.classifiers = self._load_classifiers()
        self.cca = self._fit_cca()

    # -- setup ----------------------------------------------------------------------------------
    def _load_classifiers(self) -> dict | None:
        paths = classifier_paths(self.cfg, self.model.names)
        if not self.has_labels or not all(p.is_file() for p in paths.values()):
            if self.rank == 0:
                log.info(
                    "no classifiers for %s in %s: coherence is skipped (tools/train_classifiers.py --shards %s)",
                    "+".join(self.model.names),
                    next(iter(paths.values())).parent,
                    self.cfg.data.root,
                )
            return None
        return {m: load_classifier(p, map_location=self.device) for m, p in paths.items()}

    def _fit_cca(self) -> CCAScorer | None:
        """For one image-like and one caption modality with word vectors at hand; else None."""
        kinds = {m: self.model.specs[m].kind for m in self.model.names}
        pair = cca_pair(kinds)
        if pair is None:
            return None
        image, caption = pair
        path = word_vectors_path(self.cfg)
        if not path.is_file():
            if self.cfg.eval.cca_word_vectors:
                raise FileNotFoundError(f"eval.cca_word_vectors: {path} does not exist")
            if self.rank == 0:
                log.info(
                    "no word vectors at %s: CCA coherence is skipped (tools/word_vectors.py --shards %s)",
                    path,
                    self.cfg.data.root,
                )
            return None
        batches = eval_batches(
            self.cfg.data.root,
            self.cfg.data.train_split,
            self.cfg.train.micro_batch_size,
            modalities=[image, caption],
            rank=0,
            world_size=1,
        )
        tokenizer = load_tokenizer(self.cfg.data.root, self.meta, caption)
        return CCAScorer.fit(
            batches,
            image,
            kinds[image],
            caption,
            tokenizer,
            load_word_vectors(path),
            self.cfg.eval.cca_train_samples,
            self.cfg.eval.cca_components,
        )

    def _chunks(self, split: str, max_chunks: int = 0) -> Iterator[tuple[int, dict]]:
        batches = eval_batches(
            self.cfg.data.root,
            split,
            self.cfg.train.micro_batch_size,
            modalities=self.model.names,
            rank=0,
            world_size=1,
        )
        for j, batch in enumerate(batches):
            if max_chunks and j >= max_chunks:
                return
            if j % self.world_size == self.rank:
                yield j, to_device(batch, self.device, self.dtype)

    def _global_index(self, j: int, n: int) -> torch.Tensor:
        """``[n, 1]`` global row numbers of chunk ``j``: it starts at ``j * batch`` whatever its own size ``n``
        (a short last chunk numbered from ``j * n`` would share numbers with another chunk, and the order
        of tied rows after the gather depends on which ranks hold them)."""
        start = j * self.cfg.train.micro_batch_size
        return torch.arange(start, start + n, device=self.device, dtype=torch.float32)[:, None]

    def _seeded(self, stream: str, j: int) -> None:
        """Chunk ``j`` of pass ``stream`` draws from its own seed, whichever rank evaluates it."""
        torch.manual_seed(hash((self.cfg.eval.seed, *STREAMS[stream], j)) % (2**31))

    # -- the pass over the eval split -----------------------------------------------------------
    @torch.no_grad()
    def __call__(self, max_batches: int = 0, histogram: str | Path | None = None) -> dict[str, float]:
        # evaluation never shifts the training run's random stream (on GPU its CUDA stream too)
        with torch.random.fork_rng(devices=rng_devices(self.device)):
            was_training = self.model.training
            self.model.eval()
            try:
                return self._evaluate(max_batches, histogram)
            finally:
                self.model.train(was_training)

    def _evaluate(self, max_batches: int, histogram) -> dict[str, float]:
        model, (s, t), cca = self.model, self.model.names, self.cca
        coherence = [f"coherence_{s}_to_{t}", f"coherence_{t}_to_{s}", "coherence_joint"] if self.classifiers else []
        cca_names = list(self._cca_names().values())
        tally = _Tally(["loss", *model.term_names, *coherence, *cca_names], self.device)
        w2 = _Rows(paired=1, mismatched=1)
        latents = {m: _Rows(label=1, z=model.latent_dim) for m in (s, t)}
        for j, batch in self._chunks(self.cfg.data.eval_split, max_batches):
            n = batch["observed"].shape[0]
            self._seeded("test", j)
            loss, terms = model.loss(batch)
            tally.add("loss", torch.stack([loss.float() * n, loss.new_tensor(float(n)).float()]))
            for name, pair in terms.items():
                tally.add(name, pair.float())
            index = self._global_index(j, n)
            if self.classifiers is not None:
                for x, y in ((s, t), (t, s)):
                    tally.add(
                        f"coherence_{x}_to_{y}",
                        metrics.cross_coherence_counts(model, x, y, batch[x], batch["label"], self.classifiers[y]),
                    )
            if cca is not None:
                for name, pair in self._cca_pairs(cca, batch).items():
                    tally.add(name, pair)
            paired, mismatched = metrics.relatedness(model, batch[s], batch[t], torch.Generator().manual_seed(j))
            w2.add(index, paired=paired, mismatched=mismatched)
            for m in (s, t):
                latents[m].add(index, label=batch["label"], z=metrics.sample_latents(model, m, batch[m]))
        if self.classifiers is not None:
            tally.add("coherence_joint", self._joint_counts())
        if cca is not None:
            tally.add(self._cca_names()["joint"], self._cca_joint(cca))
        totals = tally.reduce()

        out = {f"eval/{k}": a / c for k, (a, c) in totals.items() if c > 0 and k not in coherence + cca_names}
        out["eval/complete_pairs"] = totals["loss"][
            1
        ]  # eval_batches yields complete pairs only: how many were evaluated
        for key in coherence + cca_names:
            out[f"eval/{key}"] = totals[key][0] / max(totals[key][1], 1)
        if self.classifiers is not None:
            out["eval/cross_coherence"] = (out[f"eval/coherence_{s}_to_{t}"] + out[f"eval/coherence_{t}_to_{s}"]) / 2
            for m, clf in self.classifiers.items():
                out[f"eval/classifier_accuracy_{m}"] = float(clf.test_accuracy)
        relatedness = self._gather(w2)
        if len(relatedness["index"]):
            paired, mismatched = relatedness["paired"][:, 0], relatedness["mismatched"][:, 0]
            out["eval/w2_paired"], out["eval/w2_mismatched"] = paired.mean().item(), mismatched.mean().item()
            if histogram is not None and self.rank == 0:
                metrics.relatedness_histogram_png(
                    paired, mismatched, histogram, title=f"W2 between q(z|{s}) and q(z|{t})"
                )
        if self.has_labels:
            out.update(self._latent_accuracy(latents))
        return broadcast_object(out)

    def _joint_counts(self) -> torch.Tensor:
        counts = torch.zeros(2, device=self.device)
        size = self.cfg.train.micro_batch_size
        n_chunks = -(-self.cfg.eval.joint_samples // size)
        for j in range(self.rank, n_chunks, self.world_size):
            self._seeded("joint", j)
            n = min(size, self.cfg.eval.joint_samples - j * size)
            counts += metrics.joint_coherence_counts(self.model, n, self.classifiers)
        return counts

    def _cca_names(self) -> dict[str, str]:
        """What each CCA score is called: image->caption, caption->image, joint generations, the real pairs."""
        if self.cca is None:
            return {}
        image, caption = self.cca.image, self.cca.caption
        return {
            "image_to_caption": f"cca_{image}_to_{caption}",
            "caption_to_image": f"cca_{caption}_to_{image}",
            "joint": "cca_joint",
            "data": "cca_data",
        }

    def _cca_pairs(self, cca: CCAScorer, batch: dict) -> dict[str, torch.Tensor]:
        """[sum, count] of the image with its generated caption, the generated image with its caption, and the
        real pair: the reference the generations are read against."""
        image, caption = cca.image, cca.caption
        x_img, x_cap = batch[image], batch[caption]
        names = self._cca_names()
        return {
            names["image_to_caption"]: cca.score(x_img, self.model.cross_generate(image, caption, x_img)),
            names["caption_to_image"]: cca.score(self.model.cross_generate(caption, image, x_cap), x_cap),
            names["data"]: cca.score(x_img, x_cap),
        }

    def _cca_joint(self, cca: CCAScorer) -> torch.Tensor:
        """Prior samples decoded into both modalities, as [sum, count]."""
        out = torch.zeros(2, device=self.device)
        size = self.cfg.train.micro_batch_size
        for j in range(self.rank, -(-self.cfg.eval.joint_samples // size), self.world_size):
            self._seeded("cca_joint", j)
            generated = self.model.sample_prior(min(size, self.cfg.eval.joint_samples - j * size))
            out += cca.score(generated[cca.image], generated[cca.caption])
        return out

    def _gather(self, rows: _Rows) -> dict[str, torch.Tensor]:
        """Every rank's rows, ordered by their global index, as {column name: [N, width]} (and "index")."""
        local = torch.cat(rows.chunks) if rows.chunks else torch.zeros(0, rows.width, device=self.device)
        cap = int(all_reduce_sum(torch.tensor([float(len(local))])).item())  # an upper bound per rank
        packed = all_reduce_sum(metrics.pack_rows(local, self.rank, self.world_size, max(cap, 1)))
        gathered = metrics.unpack_rows(packed)
        return rows.split(gathered[gathered[:, 0].argsort()])

    def _latent_accuracy(self, test: dict[str, _Rows]) -> dict[str, float]:
        limit = -(-self.cfg.eval.latent_train_samples // self.cfg.train.micro_batch_size)
        train = {m: _Rows(label=1, z=self.model.latent_dim) for m in self.model.names}
        for j, batch in self._chunks(self.cfg.data.train_split, limit):
            self._seeded("latent_train", j)
            index = self._global_index(j, batch["observed"].shape[0])
            for m in self.model.names:
                train[m].add(index, label=batch["label"], z=metrics.sample_latents(self.model, m, batch[m]))
        out = {}
        for m in self.model.names:
            fit, held_out = self._gather(train[m]), self._gather(test[m])
            if len(fit["index"]) and len(held_out["index"]) and self.rank == 0:
                out[f"eval/latent_accuracy_{m}"] = metrics.latent_accuracy(
                    fit["z"],
                    fit["label"][:, 0].long(),
                    held_out["z"],
                    held_out["label"][:, 0].long(),
                    epochs=self.cfg.eval.latent_epochs,
                    seed=self.cfg.eval.seed,
                )
        return out


# The evaluation's random streams: chunk j of each pass seeds (eval.seed, *stream, j).
STREAMS = {"test": (), "joint": (1,), "latent_train": (2,), "cca_joint": (3,)}


class _Tally:
    """[sum, count] pairs under fixed names (the same on every rank), added up over ranks in one all-reduce."""

    def __init__(self, names: list[str], device: torch.device):
        self.sums = {name: torch.zeros(2, device=device) for name in names}

    def add(self, name: str, pair: torch.Tensor) -> None:
        self.sums[name] += pair

    def reduce(self) -> dict[str, tuple[float, float]]:
        total = all_reduce_sum(torch.stack(list(self.sums.values()))).tolist()
        return dict(zip(self.sums, map(tuple, total)))


class _Rows:
    """Per-sample rows with named columns ({name: width}), kept with their global index for the gather."""

    def __init__(self, **columns: int):
        self.columns = columns
        self.width = 1 + sum(columns.values())
        self.chunks: list[torch.Tensor] = []

    def add(self, index: torch.Tensor, **values: torch.Tensor) -> None:
        n = len(index)
        self.chunks.append(torch.cat([index, *(values[c].reshape(n, -1).float() for c in self.columns)], 1))

    def split(self, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
        out, at = {"index": matrix[:, 0]}, 1
        for name, width in self.columns.items():
            out[name], at = matrix[:, at : at + width], at + width
        return out


@torch.no_grad()
def picture_grid(
    model: MultimodalVAE,
    batch: dict,
    path: str | Path,
    device: torch.device,
    float_dtype: torch.dtype = torch.float32,
    n: int = 10,
) -> Path | None:
    """Data, reconstructions, cross-generations and prior samples for image modalities (captions as text)."""
    texts = caption_texts(batch.get("tokenizers"))  # caption modality -> ids to strings
    images = [name for name in model.names if model.specs[name].kind == "image" or name in texts]
    if not images:
        return None
    was_training = model.training
    model.eval()
    batch = to_device({k: v[:n] for k, v in batch.items() if isinstance(v, torch.Tensor)}, device, float_dtype)
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(0)
        rows = _rows(model, batch, images, n, lambda name, x: texts[name](x) if name in texts else x)
    model.train(was_training)
    text_rows = [(label, cells) for label, cells in rows if isinstance(cells, list)]
    if text_rows:  # generated captions, readable in the logs and MLflow without opening the picture
        lines = [f"{label}\t{i}\t{text}" for label, cells in text_rows for i, text in enumerate(cells)]
        Path(path).with_suffix(".txt").parent.mkdir(parents=True, exist_ok=True)
        Path(path).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return save_grid(rows, path)


def _rows(model: MultimodalVAE, batch: dict, images: list[str], n: int, show=lambda name, x: x) -> list:
    rows = []
    s, t = model.names
    for x, y in ((s, t), (t, s)):
        if x not in images:
            continue
        rows.append((f"{x} data", show(x, batch[x])))
        rows.append((f"{x} recon", show(x, model.reconstruct(x, batch[x]))))
        rows.append((f"{y}->{x}", show(x, model.cross_generate(y, x, batch[y]))))
    joint = model.sample_prior(n)
    return rows + [(f"prior {name}", show(name, joint[name])) for name in images]


def load_weights(path: str | Path) -> tuple[dict, int | None]:
    """(state_dict, step) from an exported ``.pt`` file or a checkpoint directory (newest complete tag)."""
    from .checkpoint import consolidated_state_dict, resolve
    from .checkpoint import read_meta as read_checkpoint_meta

    path = Path(path)
    if path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or "state_dict" not in payload:
            raise ValueError(f"{path}: not an export of tools/export.py (no 'state_dict')")
        return payload["state_dict"], payload.get("step")
    ckpt_dir, tag = resolve(path)
    return consolidated_state_dict(ckpt_dir, tag), read_checkpoint_meta(ckpt_dir, tag)["step"]


def evaluate_checkpoint(cfg, checkpoint: str | Path, out: str | Path | None = None) -> dict:
    """``meme-scale eval``: the full evaluation of a checkpoint or export, on however many ranks run it."""
    import json

    from .engine import init_distributed
    from .models import build_model, modality_specs

    info = init_distributed()
    model = build_model(cfg.model, modality_specs(cfg.model, read_meta(cfg.data.root)))
    state, step = load_weights(checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint} does not fit model {cfg.model.name!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.to(info.device)
    out = Path(out or Path(cfg.run.dir) / "eval_report.json")
    report = {
        "checkpoint": str(checkpoint),
        "step": step,
        "world_size": info.world_size,
        **Evaluator(model, cfg, info.rank, info.world_size, info.device)(
            histogram=out.with_name(out.stem + "_relatedness.png")
        ),
    }
    if info.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
    return report
