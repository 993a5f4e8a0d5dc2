"""MNIST-SVHN (MMVAE / MEME): MNIST and SVHN digits paired by class, from the original files.

Inputs (nothing is downloaded):

- ``--mnist DIR``: the four idx files, gzipped or not: ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (optional
  ``.gz``; the ``train-images.idx3-ubyte`` spelling is accepted too).
- ``--svhn DIR``: ``train_32x32.mat`` and ``test_32x32.mat`` (format 2, cropped digits): ``X`` is
  uint8 [32, 32, 3, N], ``y`` is [N, 1] with label 10 meaning digit 0.

Pairing, per split and per digit class c (MMVAE's ``rand_match_on_idx``): take the first
n_c = min(#MNIST_c, #SVHN_c, --max-per-class) instances of each, then ``--pairings`` times append
an independent random permutation of each side, so every used image appears ``pairings`` times
with random partners of its class (1: one-to-one as in the MEME code; 20/30 as in MMVAE). All
pairs are then shuffled (seeded) so every shard mixes classes. Modalities: ``mnist`` [1,28,28]
and ``svhn`` [3,32,32]; the label written is the shared class.
"""
from __future__ import annotations

import argparse
import gzip
import os
import struct
from collections.abc import Iterator

import numpy as np

from ..writer import ShardWriter, check_output
from .common import Skips, add_common_arguments, require_files

HELP = "MNIST idx files + SVHN .mat files, paired by digit class (MMVAE/MEME MNIST-SVHN)"
NAME = "mnist_svhn"
CLASSES = [str(c) for c in range(10)]
MNIST_PREFIX = {"train": "train", "test": "t10k"}
SVHN_FILE = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``make_shards.py mnist-svhn``."""
    parser.add_argument("--mnist", required=True, help="folder with the MNIST idx files (gzipped or not)")
    parser.add_argument("--svhn", required=True, help="folder with train_32x32.mat and test_32x32.mat")
    parser.add_argument("--pairings", type=int, default=1,
                        help="times every image is paired, with fresh random partners of its class "
                             "(1 = one-to-one as in MEME; 20 or 30 as in MMVAE; default 1)")
    parser.add_argument("--max-per-class", type=int, default=10000,
                        help="instances per class and side used for pairing (MMVAE's max_d; default 10000)")
    add_common_arguments(parser, shard_size=1000)


# -- MNIST idx --------------------------------------------------------------------------------
def find_idx(folder: str, prefix: str, kind: str) -> str:
    """Path of ``{prefix}-{kind}-idx{3|1}-ubyte[.gz]`` (or the dotted spelling) in folder."""
    dims = 3 if kind == "images" else 1
    names = [f"{prefix}-{kind}-idx{dims}-ubyte", f"{prefix}-{kind}.idx{dims}-ubyte"]
    candidates = [os.path.join(folder, n + ext) for n in names for ext in ("", ".gz")]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(f"MNIST {kind} file {names[0]}[.gz] not found in {folder} "
                            f"(tried {', '.join(os.path.basename(c) for c in candidates)})")


def read_idx(path: str) -> np.ndarray:
    """An idx file (optionally gzip) as an array; truncated or malformed files raise naming the path."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip: "Compressed file ended before the end-of-stream marker"
        raise ValueError(f"{path}: cannot read ({e}); the file is truncated or not gzip") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number {data[:4].hex() or 'none'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(data) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != need:
        raise ValueError(f"{path}: truncated or padded: header says shape {list(shape)} ({need} data bytes), "
                         f"file has {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def load_mnist(folder: str, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(uint8 [N,1,H,W], int64 labels [N], source file names) of one split."""
    img_path = find_idx(folder, MNIST_PREFIX[split], "images")
    lab_path = find_idx(folder, MNIST_PREFIX[split], "labels")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{img_path}: expected uint8 images [N, H, W], got {images.dtype} {list(images.shape)}")
    if labels.ndim != 1:
        raise ValueError(f"{lab_path}: expected labels [N], got shape {list(labels.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"MNIST {split}: {img_path} holds {len(images)} images but {lab_path} "
                         f"holds {len(labels)} labels")
    return images[:, None], labels.astype(np.int64), {"images": os.path.basename(img_path),
                                                      "labels": os.path.basename(lab_path)}


# -- SVHN .mat --------------------------------------------------------------------------------
def load_svhn(folder: str, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(uint8 [N,3,32,32], int64 labels [N] with 10 -> 0, source file name) of one split."""
    import scipy.io

    path = os.path.join(folder, SVHN_FILE[split])
    require_files([path], f"SVHN {split}")
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # scipy raises ValueError/OSError/zlib errors on truncated files
        raise ValueError(f"{path}: cannot read as a MATLAB .mat file ({type(e).__name__}: {e}); "
                         "the file is truncated or not SVHN format 2") from e
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path}: expected variables X and y, found {sorted(k for k in mat if not k.startswith('__'))}")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise ValueError(f"{path}: expected X uint8 [H, W, 3, N], got {x.dtype} {list(x.shape)}")
    if x.shape[3] != len(y):
        raise ValueError(f"{path}: X holds {x.shape[3]} images but y holds {len(y)} labels")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y.astype(np.int64), {"file": os.path.basename(path)}


# -- pairing ----------------------------------------------------------------------------------
def valid_labels(labels: np.ndarray, where: str, skips: Skips, low: int, high: int) -> np.ndarray:
    """Indices whose label is in [low, high]; others are errors (or counted skips)."""
    bad = np.flatnonzero((labels < low) | (labels > high))
    for i in bad[:1] if not skips.skip_bad else bad:
        skips.bad("label", f"{where}: row {i} has label {labels[i]}, expected {low}..{high}")
    return np.setdiff1d(np.arange(len(labels)), bad)


def rand_match_on_idx(a_labels: np.ndarray, a_idx: np.ndarray, b_labels: np.ndarray, b_idx: np.ndarray,
                      pairings: int, max_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """MMVAE's pairing by class: per class n = min(#a, #b, max); ``pairings`` random permutations of each."""
    out_a, out_b = [], []
    for c in np.unique(a_labels[a_idx]):
        la, lb = a_idx[a_labels[a_idx] == c], b_idx[b_labels[b_idx] == c]
        n = min(len(la), len(lb), max_per_class)
        if n == 0:
            raise ValueError(f"class {c}: no partner of this class on the other side to pair with")
        la, lb = la[:n], lb[:n]
        for _ in range(pairings):
            out_a.append(la[rng.permutation(n)])
            out_b.append(lb[rng.permutation(n)])
    return np.concatenate(out_a), np.concatenate(out_b)


def build(out: str, mnist_dir: str, svhn_dir: str, *, pairings: int = 1, seed: int = 0, shard_size: int = 1000,
          max_per_class: int = 10000, skip_bad: bool = False, overwrite: bool = False) -> tuple[dict, Skips]:
    """Convert and write the MNIST-SVHN shards; returns (meta.json content, skip counts)."""
    if pairings < 1 or max_per_class < 1:
        raise ValueError(f"--pairings and --max-per-class must be >= 1, got {pairings} and {max_per_class}")
    check_output(out, overwrite)
    for folder, flag in ((mnist_dir, "--mnist"), (svhn_dir, "--svhn")):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag} {folder}: folder not found")
    skips = Skips(skip_bad)
    data, files, counts = {}, {"mnist": {}, "svhn": {}}, {}
    for split in ("train", "test"):
        m_x, m_y, files["mnist"][split] = load_mnist(mnist_dir, split)
        s_x, s_y, files["svhn"][split] = load_svhn(svhn_dir, split)
        s_y = np.where(s_y == 10, 0, s_y)
        m_ok = valid_labels(m_y, f"MNIST {split} labels {files['mnist'][split]['labels']}", skips, 0, 9)
        s_ok = valid_labels(s_y, f"SVHN {os.path.join(svhn_dir, SVHN_FILE[split])} y", skips, 0, 9)
        data[split] = (m_x, m_y, m_ok, s_x, s_y, s_ok)
        counts[split] = {"mnist": int(len(m_x)), "svhn": int(len(s_x))}
    shapes = {"mnist": list(data["train"][0].shape[1:]), "svhn": list(data["train"][3].shape[1:])}
    for split in ("test",):
        for name, arr in (("mnist", data[split][0]), ("svhn", data[split][3])):
            if list(arr.shape[1:]) != shapes[name]:
                raise ValueError(f"{name}: train images are {shapes[name]} but {split} images are {list(arr.shape[1:])}")
    source = {
        "kind": NAME, "files": files, "source_counts": counts, "pairings": pairings, "seed": seed,
        "max_per_class": max_per_class,
        "pairing": "per split and class: first n=min(#mnist, #svhn, max_per_class) of each, `pairings` independent "
                   "random permutations of both sides (MMVAE rand_match_on_idx); pairs shuffled",
        "svhn_labels": "y == 10 written as class 0",
    }
    modalities = {"mnist": {"kind": "image", "shape": shapes["mnist"]}, "svhn": {"kind": "image", "shape": shapes["svhn"]}}
    writer = ShardWriter(out, NAME, modalities, CLASSES, samples_per_shard=shard_size, source=source, overwrite=overwrite)
    with writer:
        for k, split in enumerate(("train", "test")):
            m_x, m_y, m_ok, s_x, s_y, s_ok = data[split]
            rng = np.random.default_rng([seed, k])
            a, b = rand_match_on_idx(m_y, m_ok, s_y, s_ok, pairings, max_per_class, rng)
            order = rng.permutation(len(a))
            writer.write_split(split, _samples(m_x, s_x, m_y, a[order], b[order]))
        writer.source["skipped"] = skips.record()
    return writer.meta(), skips


def _samples(m_x: np.ndarray, s_x: np.ndarray, labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> Iterator[dict]:
    for i, j in zip(a, b):
        yield {"mnist": m_x[i], "svhn": s_x[j], "label": int(labels[i])}


def run(args: argparse.Namespace) -> str:
    """CLI entry: convert and return the one-line summary."""
    meta, skips = build(args.out, args.mnist, args.svhn, pairings=args.pairings, seed=args.seed,
                        shard_size=args.shard_size, max_per_class=args.max_per_class, skip_bad=args.skip_bad,
                        overwrite=args.overwrite)
    s = meta["splits"]
    return f"mnist-svhn: {s['train']} train + {s['test']} test pairs (pairings {args.pairings}){skips.summary()} -> {args.out}"
