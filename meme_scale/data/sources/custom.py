"""Your own paired data: a folder of aligned arrays, or an image folder plus a captions file.

``--arrays DIR``: one file per modality, row i of every file is sample i:

- ``<modality>.npy`` (loaded with ``allow_pickle=False``): uint8 [N, H, W], [N, 1|3, H, W] or
  [N, H, W, 1|3] -> image; float arrays of those shapes with values in [0, 1] -> image (scaled to
  uint8); [N, D] numbers -> vector; [N] strings (a unicode array, or a bytes array of UTF-8 text)
  -> caption;
- ``<modality>.txt``: one caption per line -> caption;
- optional ``label.npy`` (integers [N], classes 0..K-1) and ``label_names.txt`` (K lines);
- optional ``observed.npy`` (bool [N, M], columns in modality order): False where sample i truly
  lacks that modality. A float array's all-NaN row means the same. Such samples are kept with the
  modalities they have (two-modality datasets; meta.json counts both / s_only / t_only); a row
  that lacks every modality is an error naming it (a counted skip with ``--skip-bad``).

Kinds are inferred as above or declared with ``--kind NAME=image|vector|caption`` (``vector``
flattens any trailing shape). If ``DIR/train`` and ``DIR/test`` exist they are the splits (same
file names in both); otherwise a seeded ``--test-fraction`` of the rows is the test split. The
modality order (s, t) is ``--modalities a,b`` or the sorted file names.

``--images DIR --captions FILE``: an image folder plus ``<image path><TAB><caption>`` lines, images
without captions and captions without images included (``captioned_images.py``).

Captions are tokenised by a sentencepiece model trained on the training split's captions only.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

import numpy as np

from .. import tokenizer as tok
from ..writer import ShardWriter, check_output
from .captioned_images import build_from_images
from .common import Skips, add_common_arguments, split_indices

HELP = "your own paired data: aligned <modality>.npy/.txt arrays, or an image folder + captions file"
NAME = "custom"
KINDS = ("image", "vector", "caption")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``make_shards.py custom``."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--arrays", help="folder of aligned <modality>.npy / <modality>.txt files (+ label.npy)")
    src.add_argument("--images", help="image folder (with --captions)")
    parser.add_argument("--captions", help="with --images: file of '<relative image path>\\t<caption>' lines")
    parser.add_argument("--kind", action="append", default=[], metavar="NAME=KIND",
                        help="declare a modality's kind (image, vector, caption) instead of inferring it; repeatable")
    parser.add_argument("--modalities", help="comma-separated modality order s,t (default: sorted file names)")
    parser.add_argument("--name", default=NAME, help=f"dataset name used in shard file names (default {NAME})")
    parser.add_argument("--test-fraction", type=float, default=0.1,
                        help="share of rows (arrays) or images (--images) in the test split when no train/ and "
                             "test/ folders are given (default 0.1)")
    parser.add_argument("--image-size", type=int, default=64, help="with --images: side of the stored images (default 64)")
    parser.add_argument("--vocab-size", type=int, default=tok.DEFAULT_VOCAB,
                        help=f"sentencepiece vocabulary size for caption modalities (default {tok.DEFAULT_VOCAB})")
    parser.add_argument("--caption-length", type=int, default=tok.LENGTH, help="tokens per caption (default 32)")
    add_common_arguments(parser, shard_size=1000)


def parse_kinds(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, kind = item.partition("=")
        if not sep or not name or kind not in KINDS:
            raise ValueError(f"--kind {item!r}: expected NAME=KIND with KIND one of {KINDS}")
        out[name] = kind
    return out


# -- arrays -----------------------------------------------------------------------------------
def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e) or "Python objects" in str(e):
            raise ValueError(f"{path} holds Python objects (a pickled object array); save strings as a unicode "
                             "array (np.array(list_of_str)) or as a .txt file with one caption per line") from None
        raise ValueError(f"{path}: cannot read as .npy ({e}); the file is truncated or not an .npy array") from e
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read as .npy ({e}); the file is truncated or not an .npy array") from e


def _load_lines(path: str) -> np.ndarray:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last caption, it does not start an empty one
    return np.array(lines, dtype=object)


def _image_layout(a: np.ndarray) -> str | None:
    """'chw', 'hwc' or 'hw' for image-shaped arrays (per-sample shape), None otherwise."""
    shape = a.shape[1:]
    if len(shape) == 2 and min(shape) > 1:
        return "hw"
    if len(shape) == 3:
        if shape[0] in (1, 3) and shape[2] not in (1, 3):
            return "chw"
        if shape[2] in (1, 3):
            return "hwc"
        if shape[0] in (1, 3):
            return "chw"
    return None


def infer_kind(name: str, a: np.ndarray, path: str) -> str:
    """The kind of a modality array from its shape and dtype; errors say how to declare it."""
    if a.dtype.kind in "USO":
        if a.ndim != 1:
            raise ValueError(f"{path}: caption arrays must be 1-D [N] strings, got shape {list(a.shape)}")
        return "caption"
    if not np.issubdtype(a.dtype, np.number) and a.dtype != np.bool_:
        raise ValueError(f"{path}: dtype {a.dtype} is neither numbers nor strings")
    if a.ndim <= 2:
        return "vector"
    if _image_layout(a) is None:
        raise ValueError(f"{path}: shape {list(a.shape)} is not an image ([N,H,W], [N,1|3,H,W], [N,H,W,1|3]); "
                         f"declare --kind {name}=vector to flatten it")
    if a.dtype == np.uint8:
        return "image"
    lo, hi = float(np.min(a)), float(np.max(a))
    if 0.0 <= lo and hi <= 1.0:
        return "image"
    raise ValueError(f"{path}: {a.dtype} image-shaped values in [{lo:g}, {hi:g}]; images must be uint8 or floats "
                     f"in [0, 1] — rescale them, or declare --kind {name}=vector")


def _as_modality(name: str, kind: str, a: np.ndarray, path: str) -> tuple[dict, np.ndarray]:
    """(writer spec without tokenizer, array in the writer's per-sample layout)."""
    if kind == "caption":
        if a.dtype.kind not in "USO" or a.ndim != 1:
            raise ValueError(f"{path}: --kind {name}=caption needs [N] strings, got {a.dtype} {list(a.shape)}")
        return {"kind": "caption"}, a
    if a.dtype.kind in "USO":
        raise ValueError(f"{path}: strings can only be a caption modality, not {kind}")
    if kind == "vector":
        flat = np.asarray(a, dtype=np.float32).reshape(len(a), -1)
        return {"kind": "vector", "shape": [flat.shape[1]]}, flat
    layout = _image_layout(a)
    if layout is None:
        raise ValueError(f"{path}: --kind {name}=image needs [N,H,W], [N,1|3,H,W] or [N,H,W,1|3], got {list(a.shape)}")
    img = np.asarray(a)
    if img.dtype != np.uint8:
        if img.size and (float(img.min()) < 0.0 or float(img.max()) > 1.0):
            raise ValueError(f"{path}: float images must lie in [0, 1] (or be uint8)")
        img = np.rint(img.astype(np.float32) * 255.0).astype(np.uint8)
    img = img[:, None] if layout == "hw" else img.transpose(0, 3, 1, 2) if layout == "hwc" else img
    img = np.ascontiguousarray(img)
    return {"kind": "image", "shape": list(img.shape[1:])}, img


def _read_array_folder(folder: str, declared: dict[str, str]) -> tuple[dict[str, np.ndarray], dict[str, str],
                                                                        np.ndarray | None, list[str] | None]:
    """({modality: raw array}, {modality: file}, labels or None, label names or None) of one folder."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--arrays {folder}: folder not found")
    arrays, files = {}, {}
    for fname in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(fname)
        path = os.path.join(folder, fname)
        if stem in ("label", "label_names", "observed") or ext not in (".npy", ".txt") or not os.path.isfile(path):
            continue
        if stem in arrays:
            raise ValueError(f"{folder}: both {stem}.npy and {stem}.txt exist; keep one")
        arrays[stem] = _load_npy(path) if ext == ".npy" else _load_lines(path)
        files[stem] = path
    if not arrays:
        raise FileNotFoundError(f"{folder}: no <modality>.npy or <modality>.txt files")
    unknown = sorted(set(declared) - set(arrays))
    if unknown:
        raise ValueError(f"--kind names {unknown}, but {folder} has only {sorted(arrays)}")
    labels = names = None
    label_path = os.path.join(folder, "label.npy")
    if os.path.isfile(label_path):
        labels = np.asarray(_load_npy(label_path))
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
            raise ValueError(f"{label_path}: labels must be non-negative integers [N], got {labels.dtype} "
                             f"{list(labels.shape)}")
        files["label"] = label_path
    names_path = os.path.join(folder, "label_names.txt")
    if os.path.isfile(names_path):
        names = [n for n in _load_lines(names_path).tolist()]
    observed = None
    observed_path = os.path.join(folder, "observed.npy")
    if os.path.isfile(observed_path):
        observed = np.asarray(_load_npy(observed_path))
        integer = np.issubdtype(observed.dtype, np.integer)
        flags = observed.dtype == np.bool_ or (integer and np.isin(observed, (0, 1)).all())
        if observed.ndim != 2 or observed.shape[1] != len(arrays) or not flags:
            raise ValueError(f"{observed_path}: must be bool [N, {len(arrays)}] (one column per modality, in modality "
                             f"order), got {observed.dtype} {list(observed.shape)}")
        files["observed"] = observed_path
    counts = {files[m]: len(a) for m, a in arrays.items()} | ({label_path: len(labels)} if labels is not None else {})
    counts |= {observed_path: len(observed)} if observed is not None else {}
    if len(set(counts.values())) > 1:
        raise ValueError(f"{folder}: arrays are not aligned, row counts differ: "
                         + ", ".join(f"{os.path.basename(p)}: {n}" for p, n in counts.items()))
    return arrays, files, labels, names, observed


def _absent_rows(a: np.ndarray) -> np.ndarray:
    """bool [N]: rows of a float array that are all NaN (a sample without this modality)."""
    if a.dtype.kind != "f" or a.size == 0:
        return np.zeros(len(a), dtype=bool)
    return np.isnan(np.asarray(a).reshape(len(a), -1)).all(1)


def _presence(arrays: dict[str, np.ndarray], order: list[str],
              observed: np.ndarray | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(present bool [N, M] in ``order``, arrays with absent float rows zero-filled so they convert)."""
    n = len(arrays[order[0]])
    present = np.ones((n, len(order)), dtype=bool)
    if observed is not None:  # observed.npy's columns follow the modality order
        present &= observed.astype(bool)
    filled = dict(arrays)
    for col, m in enumerate(order):
        nan_rows = _absent_rows(arrays[m])
        if nan_rows.any():
            present[:, col] &= ~nan_rows
            filled[m] = np.array(arrays[m], copy=True)
            filled[m][nan_rows] = 0
    return present, filled


def _order(names: list[str], requested: str | None) -> list[str]:
    if not requested:
        return sorted(names)
    order = [m.strip() for m in requested.split(",") if m.strip()]
    if sorted(order) != sorted(names):
        raise ValueError(f"--modalities {requested!r} must list each of {sorted(names)} once")
    return order


def caption_text(value) -> str:
    """One caption row as text. Rows of a bytes array (dtype 'S') are np.bytes_, whose str() is
    "b'...'": decode them as UTF-8 instead (UnicodeDecodeError if not UTF-8; _row_problem reports it)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _row_problem(kind: str, value) -> str | None:
    if kind == "caption":
        try:
            text = caption_text(value)
        except UnicodeDecodeError:
            return "caption is not UTF-8"
        return None if tok.normalise(text) else "empty caption"
    if kind == "vector" and not np.all(np.isfinite(value)):
        return "non-finite value"
    return None


def build_from_arrays(out: str, folder: str, *, kinds: dict[str, str] | None = None, modalities: str | None = None,
                      name: str = NAME, test_fraction: float = 0.1, vocab_size: int = tok.DEFAULT_VOCAB,
                      caption_length: int = tok.LENGTH, shard_size: int = 1000, seed: int = 0,
                      skip_bad: bool = False, overwrite: bool = False) -> tuple[dict, Skips]:
    """Convert a folder of aligned arrays; returns (meta.json content, skip counts)."""
    check_output(out, overwrite)
    kinds = dict(kinds or {})
    split_dirs = {s: os.path.join(folder, s) for s in ("train", "test")}
    if all(os.path.isdir(d) for d in split_dirs.values()):
        loaded = {s: _read_array_folder(d, kinds) for s, d in split_dirs.items()}
        if (loaded["train"][4] is None) != (loaded["test"][4] is None):
            raise ValueError(f"{folder}: observed.npy must be in both train/ and test/ or in neither")
        file_rows = {s: np.arange(len(next(iter(v[0].values())))) for s, v in loaded.items()}
        if set(loaded["train"][0]) != set(loaded["test"][0]):
            raise ValueError(f"{folder}: train/ has {sorted(loaded['train'][0])} but test/ has {sorted(loaded['test'][0])}")
        if (loaded["train"][2] is None) != (loaded["test"][2] is None):
            raise ValueError(f"{folder}: label.npy must be in both train/ and test/ or in neither")
        split_note = "given: train/ and test/ folders"
    else:
        arrays, files, labels, names, observed = _read_array_folder(folder, kinds)
        n = len(next(iter(arrays.values())))
        tr, te = split_indices(n, test_fraction, np.random.default_rng([seed, 0]))
        loaded = {s: ({m: a[idx] for m, a in arrays.items()}, files, None if labels is None else labels[idx], names,
                      None if observed is None else observed[idx]) for s, idx in (("train", tr), ("test", te))}
        file_rows = {"train": tr, "test": te}  # row i of a split is row file_rows[split][i] of the files
        split_note = f"seeded random split, test_fraction={test_fraction}"
    arrays_tr, files_tr, labels_tr, names_tr, _ = loaded["train"]
    order = _order(list(arrays_tr), modalities)
    specs, data, present = {}, {}, {}
    for s, (arrays, files, _, _, observed) in loaded.items():
        data[s] = {}
        present[s], arrays = _presence(arrays, order, observed)
        if not present[s].all() and len(order) != 2:
            raise ValueError(f"{folder}: absent modalities (observed.npy, all-NaN rows) need exactly two modalities, "
                             f"found {order}")
        for m in order:
            kind = kinds.get(m) or infer_kind(m, arrays[m], files[m])
            spec, data[s][m] = _as_modality(m, kind, arrays[m], files[m])
            if m in specs and spec != specs[m]:
                raise ValueError(f"modality {m!r}: train is {specs[m]} but test ({files[m]}) is {spec}")
            specs[m] = spec
    label_names = None
    if labels_tr is not None:
        top = max(int(np.max(lab)) for _, _, lab, _, _ in loaded.values() if lab is not None and lab.size)
        label_names = names_tr or [str(c) for c in range(top + 1)]
        if top >= len(label_names):
            raise ValueError(f"label {top} has no name: label_names.txt lists {len(label_names)} classes")
    skips = Skips(skip_bad)
    keep = {}
    for s, (arrays, files, labels, _, _) in loaded.items():
        rows = []
        for i in range(len(next(iter(data[s].values())))):
            if not present[s][i].any():
                skips.bad("no modality", f"{folder}: row {file_rows[s][i]} lacks every modality "
                                         "(observed.npy or all-NaN rows)")
                continue
            problem = next(((m, p) for col, m in enumerate(order) if present[s][i, col]
                            and (p := _row_problem(specs[m]["kind"], data[s][m][i]))), None)
            if problem:
                skips.bad(problem[1], f"{files[problem[0]]}, row {file_rows[s][i]}: {problem[1]}")
                continue
            rows.append(i)
        keep[s] = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            raise ValueError(f"{folder}: the {s} split has no usable row")
    if not present["test"][keep["test"]].all(1).any():
        raise ValueError(f"{folder}: the test split has no row with every modality; evaluation needs complete pairs")
    for m in order:
        if specs[m]["kind"] == "caption":
            col = order.index(m)
            train_caps = [caption_text(data["train"][m][i]) for i in keep["train"] if present["train"][i, col]]
            specs[m] = {"kind": "caption", "shape": [caption_length], "tokenizer": tok.train(train_caps, vocab_size)}
    source = {"kind": NAME, "from": "arrays", "folder": os.path.abspath(folder), "split": split_note, "seed": seed,
              "files": {s: {m: os.path.relpath(p, folder) for m, p in v[1].items()} for s, v in loaded.items()}}
    writer = ShardWriter(out, name, {m: specs[m] for m in order}, label_names, samples_per_shard=shard_size,
                         source=source, overwrite=overwrite)
    with writer:
        for k, s in enumerate(("train", "test")):
            labels = loaded[s][2]
            rows = keep[s][np.random.default_rng([seed, 1, k]).permutation(len(keep[s]))]
            writer.write_split(s, _array_samples(order, data[s], present[s], labels, rows))
        writer.source["skipped"] = skips.record()
    return writer.meta(), skips


def _array_samples(order: list[str], data: dict[str, np.ndarray], present: np.ndarray, labels: np.ndarray | None,
                   rows: np.ndarray) -> Iterator[dict]:
    for i in rows:
        sample = {m: None if not present[i, col] else caption_text(data[m][i]) if data[m].dtype.kind in "USO"
                  else data[m][i] for col, m in enumerate(order)}
        sample["label"] = None if labels is None else int(labels[i])
        yield sample


def run(args: argparse.Namespace) -> str:
    """CLI entry: convert and return the one-line summary."""
    common = dict(name=args.name, test_fraction=args.test_fraction, vocab_size=args.vocab_size,
                  caption_length=args.caption_length, shard_size=args.shard_size, seed=args.seed,
                  skip_bad=args.skip_bad, overwrite=args.overwrite)
    if args.arrays:
        if args.captions:
            raise ValueError("--captions goes with --images, not with --arrays (put <modality>.txt in the arrays folder)")
        meta, skips = build_from_arrays(args.out, args.arrays, kinds=parse_kinds(args.kind),
                                        modalities=args.modalities, **common)
    else:
        if not args.captions:
            raise ValueError("--images needs --captions FILE ('<relative image path>\\t<caption>' per line)")
        if args.kind or args.modalities:
            raise ValueError("--kind and --modalities apply to --arrays; --images writes 'image' and 'caption'")
        meta, skips = build_from_images(args.out, args.images, args.captions, image_size=args.image_size, **common)
    s = meta["splits"]
    mods = ", ".join(f"{m} ({v['kind']} {v['shape']})" for m, v in meta["modalities"].items())
    return f"custom: {s['train']} train + {s['test']} test samples; {mods}{skips.summary()} -> {args.out}"
