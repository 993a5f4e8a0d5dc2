"""Helpers for the data-layer tests: tiny real shard sets whose content follows from the key.

Every sample's pixels are a known function of its index, so a test can check any decoded batch
against what was written without keeping a copy. Imported by tests as ``conftest_data``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import webdataset as wds

from meme_scale.data.writer import ShardWriter

S_SHAPE = (1, 4, 4)
T_SHAPE = (1, 2, 2)
VEC_DIM = 3
N_CLASSES = 5


def s_image(i: int) -> np.ndarray:
    """The 'a' image (s) written for sample index i."""
    y, x = np.mgrid[0:4, 0:4]
    return ((i * 7 + 3 * y + 5 * x) % 256).astype(np.uint8)[None]


def t_image(i: int) -> np.ndarray:
    """The 'b' image (t) written for sample index i."""
    return ((i * 11 + np.arange(4).reshape(2, 2) * 60 + 1) % 256).astype(np.uint8)[None]


def t_vector(i: int) -> np.ndarray:
    """The 'b' vector (t, vector variant) written for sample index i."""
    return np.array([i, i + 0.5, -i], dtype=np.float32)


def label(i: int) -> int:
    return i % N_CLASSES


def make_dataset(
    root: str,
    *,
    n_train: int = 250,
    n_test: int = 61,
    per_shard: int = 40,
    t_kind: str = "image",
    labels: bool = True,
    name: str = "toy",
) -> str:
    """Write a toy dataset with modalities 'a' (image 1x4x4) and 'b' (image 1x2x2 or vector [3])."""
    t_spec = {"kind": "image", "shape": list(T_SHAPE)} if t_kind == "image" else {"kind": "vector", "shape": [VEC_DIM]}
    modalities = {"a": {"kind": "image", "shape": list(S_SHAPE)}, "b": t_spec}
    names = [f"c{k}" for k in range(N_CLASSES)] if labels else None
    t_fn = t_image if t_kind == "image" else t_vector

    def samples(n: int):
        for i in range(n):
            yield {"a": s_image(i), "b": t_fn(i), "label": label(i) if labels else None}

    with ShardWriter(root, name, modalities, names, samples_per_shard=per_shard, source={"toy": True}) as w:
        w.write_split("train", samples(n_train))
        w.write_split("test", samples(n_test))
    return root


def expected_batch(keys: list[str], observed: np.ndarray, t_kind: str = "image") -> dict[str, np.ndarray]:
    """What a reader batch must hold for these keys and this mask (hidden entries zero)."""
    idx = [int(k) for k in keys]
    a = np.stack([s_image(i) for i in idx]).astype(np.float32) / 255.0
    if t_kind == "image":
        b = np.stack([t_image(i) for i in idx]).astype(np.float32) / 255.0
    else:
        b = np.stack([t_vector(i) for i in idx])
    a[~observed[:, 0]] = 0
    b[~observed[:, 1]] = 0
    return {"a": a, "b": b}


def write_raw_shard(path: str, samples: list[dict], pax_from: int | None = None) -> None:
    """Write arbitrary (possibly broken) samples with webdataset's TarWriter; values are bytes.

    From sample ``pax_from`` on, members get a float mtime, which makes tarfile emit PAX headers
    (webdataset's default), exercising the reader's fallback from its plain-ustar fast path.
    """
    with wds.TarWriter(path, encoder=False, mtime=0) as tar:
        for i, sample in enumerate(samples):
            if i == pax_from:
                tar.mtime = 0.5
            tar.write(sample)


def edit_json(root: str, name: str, fn) -> None:
    """Rewrite root/name (meta.json or sizes.json) through fn(obj) -> obj."""
    path = os.path.join(root, name)
    with open(path) as f:
        obj = json.load(f)
    with open(path, "w") as f:
        json.dump(fn(obj), f)
