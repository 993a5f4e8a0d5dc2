"""Pieces every converter shares: bad-input policy (error or counted skip), image loading, splits.

The policy (issue 4): a problem with a raw file is an error naming the file, unless the user asked
for ``--skip-bad``; then the sample is skipped and counted per reason, and the counts go into
meta.json's ``source.skipped`` and the converter's summary line. Problems that make the whole
input unusable (a missing or truncated file, counts that disagree) are errors either way.
"""
from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Iterable

import numpy as np
from PIL import Image

IMAGE_MODES = ("L", "RGB")


class BadInput(ValueError):
    """One sample's raw data is unusable; the message names the file (and row or line)."""


class Skips:
    """Raise BadInput, or count it when skipping was asked for."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def bad(self, reason: str, message: str) -> None:
        """Report one bad sample: raises unless ``skip_bad``; ``reason`` is the counter's key."""
        if not self.skip_bad:
            raise BadInput(f"{message} (pass --skip-bad to skip such samples and count them)")
        self.counts[reason] += 1
        self.examples.setdefault(reason, message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self) -> dict:
        """meta.json ``source.skipped``: counts per reason and the first message of each."""
        return {"total": self.total, "counts": dict(self.counts), "first": dict(self.examples)}

    def summary(self) -> str:
        return f"; skipped {self.total} bad ({', '.join(f'{k}: {v}' for k, v in sorted(self.counts.items()))})" \
            if self.total else ""


def add_common_arguments(parser: argparse.ArgumentParser, shard_size: int) -> None:
    """--out, --shard-size, --seed, --skip-bad, --overwrite: the same meaning in every converter."""
    parser.add_argument("--out", required=True, help="output folder (created; must not exist unless --overwrite)")
    parser.add_argument("--shard-size", type=int, default=shard_size, help=f"samples per shard (default {shard_size})")
    parser.add_argument("--seed", type=int, default=0, help="seed of pairing, split and shuffle (default 0)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip samples whose raw data is unusable (undecodable image, empty caption ...) and "
                             "count them, instead of stopping with an error")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def require_files(paths: Iterable[str], what: str) -> None:
    """One FileNotFoundError listing every missing path (not just the first)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{what}: missing {', '.join(missing)}")


def load_image(path: str, size: int | None, mode: str = "RGB") -> np.ndarray:
    """uint8 [C, S, S] (C = 3 for RGB, 1 for L); raises BadInput naming the file if it will not decode.

    Resized to S x S (aspect ratio not kept) with PIL's antialiasing bilinear filter; JPEG draft
    mode lets the decoder scale down by powers of two first (much faster, same size or larger).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} not found")
    try:
        with Image.open(path) as im:
            if size is not None and im.format == "JPEG":
                im.draft(mode, (size, size))
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadInput(f"image {path} will not decode: {e}") from e
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy()


def split_indices(n: int, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices of a seeded random split with round(test_fraction * n) test items (>= 1)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    if n < 2:
        raise ValueError(f"cannot split {n} item(s) into train and test")
    n_test = min(n - 1, max(1, int(round(test_fraction * n))))
    order = rng.permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])
