"""MNIST-SVHN converter on fixtures in the original formats: idx files (gzipped and plain, headers
packed with struct) and SVHN .mat files written by scipy (X [32,32,3,N], y with 10 for digit 0)."""

from __future__ import annotations

import gzip
import io
import os
import re
from collections import Counter

import numpy as np
import pytest
import scipy.io
from PIL import Image
from sources_cli import assert_nothing_left, cli, cli_subprocess

from meme_scale.data.shards import iter_shard, read_meta, shard_paths
from meme_scale.data.sources import fakeraw, mnist_svhn
from meme_scale.data.writer import validate_dataset

PER_CLASS = {"mnist": {"train": 4, "test": 2}, "svhn": {"train": 5, "test": 2}}


def make_raw(root, gz: bool = True) -> tuple[str, str, dict, dict]:
    m, s = str(root / "mnist"), str(root / "svhn")
    return m, s, fakeraw.mnist_files(m, PER_CLASS["mnist"], gz=gz), fakeraw.svhn_files(s, PER_CLASS["svhn"])


def decoded(root: str, split: str) -> list[tuple[np.ndarray, np.ndarray, int, str]]:
    out = []
    for path in shard_paths(root, split):
        for raw in iter_shard(path):
            m = np.asarray(Image.open(io.BytesIO(raw["mnist.png"])))
            s = np.asarray(Image.open(io.BytesIO(raw["svhn.png"]))).transpose(2, 0, 1)
            out.append((m, s, int(raw["label.cls"]), os.path.basename(path)))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[str, dict, dict]:
    root = tmp_path_factory.mktemp("ms")
    m, s, mnist, svhn = make_raw(root, gz=True)
    out = str(root / "shards")
    res = cli_subprocess("mnist-svhn", "--mnist", m, "--svhn", s, "--out", out, "--shard-size", "10", "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"mnist-svhn: 40 train \+ 20 test pairs \(pairings 1\) -> .+ in [\d.]+ s\n", res.stdout)
    return out, mnist, svhn


def test_meta_shapes_counts_and_validation(converted) -> None:
    out, _, _ = converted
    meta = read_meta(out)
    assert meta["modalities"] == {
        "mnist": {"kind": "image", "field": "mnist.png", "shape": [1, 28, 28]},
        "svhn": {"kind": "image", "field": "svhn.png", "shape": [3, 32, 32]},
    }
    assert meta["label"]["names"] == [str(c) for c in range(10)]
    assert meta["splits"] == {"train": 40, "test": 20} and len(shard_paths(out, "train")) == 4
    src = meta["source"]
    assert src["pairings"] == 1 and src["seed"] == 3 and src["skipped"]["total"] == 0
    assert src["files"]["mnist"]["train"]["images"] == "train-images-idx3-ubyte.gz"
    assert validate_dataset(out) == {"train": 40, "test": 20}


def test_pixels_labels_and_pairs_share_a_class(converted) -> None:
    out, mnist, svhn = converted
    for split in ("train", "test"):
        m_lookup = {img.tobytes(): int(y) for img, y in zip(*mnist[split])}
        s_lookup = {img.tobytes(): int(y) for img, y in zip(*svhn[split])}
        rows = decoded(out, split)
        used_m = Counter()
        for m, s, label, _ in rows:
            assert m_lookup[m.tobytes()] == label, "MNIST pixels decode exactly and carry the written label"
            assert s_lookup[s.tobytes()] == label, "the SVHN partner has the same class (SVHN 10 -> 0)"
            used_m[m.tobytes()] += 1
        # pairings 1, n_c = min(#mnist_c, #svhn_c) = #mnist_c: every MNIST image exactly once
        assert len(used_m) == len(mnist[split][0]) and set(used_m.values()) == {1}
    shard_labels = [
        {lab for *_, lab, shard in decoded(out, "train") if shard == name}
        for name in sorted({r[3] for r in decoded(out, "train")})
    ]
    assert all(len(labels) > 3 for labels in shard_labels), "pairs are shuffled: shards mix classes"


def test_pairings_multiplier_plain_idx_and_seed(tmp_path) -> None:
    m, s, mnist, _ = make_raw(tmp_path, gz=False)
    meta, _ = mnist_svhn.build(str(tmp_path / "p3"), m, s, pairings=3, seed=1, shard_size=50)
    assert meta["splits"] == {"train": 120, "test": 60}
    rows = decoded(str(tmp_path / "p3"), "train")
    counts = Counter(r[0].tobytes() for r in rows)
    assert set(counts.values()) == {3}, "every MNIST image appears `pairings` times"
    partners = {}
    for mpx, spx, *_ in rows:
        partners.setdefault(mpx.tobytes(), set()).add(spx.tobytes())
    assert any(len(p) > 1 for p in partners.values()), "with fresh partners of its class"
    mnist_svhn.build(str(tmp_path / "p3b"), m, s, pairings=3, seed=1, shard_size=50)
    mnist_svhn.build(str(tmp_path / "p3c"), m, s, pairings=3, seed=2, shard_size=50)
    same = [r[:3] for r in decoded(str(tmp_path / "p3b"), "train")]
    other = [r[:3] for r in decoded(str(tmp_path / "p3c"), "train")]
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(same, [r[:3] for r in rows]))
    assert any((a[1] != b[1]).any() for a, b in zip(same, other)), "another seed pairs differently"


def test_rand_match_on_idx_caps_per_class() -> None:
    la, lb = np.repeat(np.arange(3), 6), np.repeat(np.arange(3), 4)
    a, b = mnist_svhn.rand_match_on_idx(la, np.arange(18), lb, np.arange(12), 2, 3, np.random.default_rng(0))
    assert len(a) == 3 * 3 * 2 and (la[a] == lb[b]).all()


# ---- bad input: a clear error naming the file; nothing that looks like a shard set is left ----


@pytest.fixture
def _fails(tmp_path, capsys):
    def run(where, m: str, s: str, *extra: str) -> str:
        res = cli(capsys, "mnist-svhn", "--mnist", m, "--svhn", s, "--out", str(where / "out"), *extra)
        assert res.returncode == 1 and res.stderr.startswith("make_shards.py mnist-svhn: error: "), res
        assert_nothing_left(where)
        return res.stderr

    return run


def test_missing_files_are_named(tmp_path, _fails, capsys) -> None:
    m, s, _, _ = make_raw(tmp_path)
    os.remove(os.path.join(m, "t10k-labels-idx1-ubyte.gz"))
    assert "t10k-labels-idx1-ubyte[.gz] not found in" in _fails(tmp_path, m, s)
    make_raw(tmp_path)
    os.remove(os.path.join(s, "test_32x32.mat"))
    assert f"missing {os.path.join(s, 'test_32x32.mat')}" in _fails(tmp_path, m, s)
    assert "--mnist" in _fails(tmp_path, str(tmp_path / "nope"), s)


def test_truncated_files_are_named(tmp_path, _fails, capsys) -> None:
    m, s, _, _ = make_raw(tmp_path, gz=True)
    path = os.path.join(m, "train-images-idx3-ubyte.gz")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    assert re.search(r"train-images-idx3-ubyte.gz: cannot read .*truncated", _fails(tmp_path, m, s))
    m, s, _, _ = make_raw(tmp_path / "plain", gz=False)
    path = os.path.join(m, "train-images-idx3-ubyte")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-100])
    assert re.search(
        r"train-images-idx3-ubyte: truncated or padded: header says shape \[40, 28, 28\]",
        _fails(tmp_path / "plain", m, s),
    )
    m, s, _, _ = make_raw(tmp_path / "mat")
    path = os.path.join(s, "train_32x32.mat")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])
    assert "train_32x32.mat: cannot read as a MATLAB .mat file" in _fails(tmp_path / "mat", m, s)


def test_mismatched_counts_are_named(tmp_path, _fails, capsys) -> None:
    m, s, mnist, _ = make_raw(tmp_path)
    fakeraw.write_idx(os.path.join(m, "train-labels-idx1-ubyte.gz"), mnist["train"][1][:-3].astype(np.uint8))
    err = _fails(tmp_path, m, s)
    assert "train-images-idx3-ubyte.gz holds 40 images but" in err and "train-labels-idx1-ubyte.gz holds 37" in err
    m, s, _, _ = make_raw(tmp_path / "svhn")
    mat = scipy.io.loadmat(os.path.join(s, "test_32x32.mat"))
    scipy.io.savemat(os.path.join(s, "test_32x32.mat"), {"X": mat["X"], "y": mat["y"][:-1]})
    assert "test_32x32.mat: X holds 20 images but y holds 19 labels" in _fails(tmp_path / "svhn", m, s)


def test_bad_labels_error_or_counted_skip(tmp_path, _fails, capsys) -> None:
    m, s, _, svhn = make_raw(tmp_path)
    mat = scipy.io.loadmat(os.path.join(s, "train_32x32.mat"))
    y = mat["y"].copy()
    y[[3, 8]] = 11
    scipy.io.savemat(os.path.join(s, "train_32x32.mat"), {"X": mat["X"], "y": y})
    assert re.search(r"train_32x32.mat y: row 3 has label 11, expected 0..9 \(pass --skip-bad", _fails(tmp_path, m, s))
    out = tmp_path / "skipped"
    res = cli(capsys, "mnist-svhn", "--mnist", m, "--svhn", s, "--out", str(out), "--skip-bad", "--shard-size", "10")
    assert res.returncode == 0, res.stderr
    assert "skipped 2 bad (label: 2)" in res.stdout
    assert read_meta(str(out))["source"]["skipped"]["counts"] == {"label": 2}


def test_gzip_not_idx(tmp_path, _fails, capsys) -> None:
    m, s, _, _ = make_raw(tmp_path)
    with gzip.open(os.path.join(m, "t10k-images-idx3-ubyte.gz"), "wb") as f:
        f.write(b"PK\x03\x04 not an idx file")
    assert "t10k-images-idx3-ubyte.gz: not an idx file (bad magic number" in _fails(tmp_path, m, s)
