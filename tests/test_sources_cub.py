"""CUB converter on a CUB_200_2011-shaped fixture tree (JPEGs written by PIL, images.txt,
image_class_labels.txt, classes.txt, text/<class>/<image>.txt with 10 captions, class lists)."""

from __future__ import annotations

import io
import os
import re
import sys
import types
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from sources_cli import assert_nothing_left, cli, cli_subprocess

from meme_scale.data import tokenizer as tok
from meme_scale.data.shards import TrainStream, eval_batches, iter_shard, read_meta, shard_paths
from meme_scale.data.sources import cub, fakeraw
from meme_scale.data.sources.common import load_image
from meme_scale.data.writer import validate_dataset

TEST_ONLY_WORD = "zyzzyva"


def make_tree(root) -> dict:
    info = fakeraw.cub_tree(str(root))
    for _, folder, rel, _ in info["images"]:  # a word that only test captions use
        if folder in info["test"]:
            path = os.path.join(str(root), "text", os.path.splitext(rel)[0] + ".txt")
            lines = open(path).read().splitlines()
            open(path, "w").write("\n".join(f"{line} {TEST_ONLY_WORD}" for line in lines) + "\n")
            info["captions"][rel] = [f"{line} {TEST_ONLY_WORD}" for line in lines]
    return info


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[str, str, dict]:
    root = tmp_path_factory.mktemp("cub")
    info = make_tree(root / "CUB_200_2011")
    out = str(root / "shards")
    res = cli_subprocess("cub", "--root", str(root / "CUB_200_2011"), "--out", out, "--shard-size", "30")
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(
        r"cub: 120 train \+ 60 test \(image, caption\) pairs, vocab \d+, 2 caption\(s\) truncated "
        r"to 32 tokens -> .+ in [\d.]+ s\n",
        res.stdout,
    )
    return out, str(root / "CUB_200_2011"), info


def samples(out: str, split: str) -> list[dict]:
    rows = []
    for path in shard_paths(out, split):
        for raw in iter_shard(path):
            img = np.asarray(Image.open(io.BytesIO(raw["image.png"]))).transpose(2, 0, 1)
            rows.append({"image": img, "caption": raw["caption.txt"].decode(), "label": int(raw["label.cls"])})
    return rows


def test_meta_tokenizer_and_validation(converted) -> None:
    out, _, info = converted
    meta = read_meta(out)
    cap = meta["modalities"]["caption"]
    assert meta["modalities"]["image"] == {"kind": "image", "field": "image.png", "shape": [3, 64, 64]}
    assert {k: cap[k] for k in ("kind", "field", "shape", "tokenizer", "pad_id", "eos_id", "unk_id")} == {
        "kind": "caption",
        "field": "caption.txt",
        "shape": [32],
        "tokenizer": "caption.spm.model",
        "pad_id": 0,
        "eos_id": 2,
        "unk_id": 1,
    }
    tk = tok.Tokenizer.load(os.path.join(out, "caption.spm.model"))
    assert cap["vocab_size"] == tk.vocab_size <= 1000
    assert sum(cap["truncated"].values()) == 2  # two fixture captions are far longer than 32 tokens
    assert meta["label"]["names"] == info["classes"] and meta["splits"] == {"train": 120, "test": 60}
    assert meta["source"]["captions_per_image"] == {"10": 18} and meta["source"]["skipped"]["total"] == 0
    assert validate_dataset(out) == {"train": 120, "test": 60}
    # trained on the training captions only: a word of test captions is no piece of the vocabulary
    assert tk.sp.piece_to_id("▁" + TEST_ONLY_WORD) == tk.unk_id
    assert tk.sp.piece_to_id("▁bird") not in (tk.unk_id,)


def test_split_by_class_and_every_image_with_each_caption(converted) -> None:
    out, root, info = converted
    names = info["classes"]
    expected = {}  # pixels as converted from the original JPEG -> (split, label, captions)
    for _, folder, rel, label in info["images"]:
        pixels = load_image(os.path.join(root, "images", rel), 64)
        split = "train" if folder in info["train"] else "test"
        expected[pixels.tobytes()] = (split, label, Counter(tok.normalise(c) for c in info["captions"][rel]))
    assert len(expected) == 18
    seen: dict[bytes, Counter] = {}
    labels = {"train": set(), "test": set()}
    for split in ("train", "test"):
        for row in samples(out, split):
            key = row["image"].tobytes()
            assert key in expected, "stored pixels are the resized JPEG"
            want_split, want_label, _ = expected[key]
            assert (split, row["label"]) == (want_split, want_label)
            seen.setdefault(key, Counter())[row["caption"]] += 1
            labels[split].add(names[row["label"]])
    assert labels["train"] == set(info["train"]) and labels["test"] == set(info["test"])
    assert not labels["train"] & labels["test"], "no class in both splits"
    for key, (_, _, captions) in expected.items():
        assert seen[key] == captions, "each image appears exactly once with each of its captions"


def test_reader_tokenises_captions_and_truncates_long_ones(converted) -> None:
    out, _, _ = converted
    tk = tok.Tokenizer.load(os.path.join(out, "caption.spm.model"))
    texts, long_rows = [], 0
    for batch in eval_batches(out, "train", 16, modalities=["image", "caption"], rank=0, world_size=1):
        assert batch["caption"].dtype == torch.int64 and batch["caption"].shape[1:] == (32,)
        assert batch["tokenizers"] == {"caption": os.path.join(out, "caption.spm.model")}
        for ids, text in zip(batch["caption"].numpy(), tk.decode_batch(batch["caption"])):
            assert (ids == tk.eos_id).sum() == 1
            if ids[-1] == tk.eos_id and ids[30] != tk.pad_id:
                long_rows += 1
            texts.append(text)
    assert len(texts) == 120 and long_rows >= 1
    stored = {r["caption"] for r in samples(out, "train")}
    assert sum(t in stored for t in texts) == 120 - long_rows, "short captions round-trip exactly"
    stream = TrainStream(
        out,
        "train",
        8,
        modalities=["image", "caption"],
        rank=1,
        world_size=2,
        seed=0,
        observed_fraction=0.25,
        missing="either",
        num_workers=1,
    )
    _, _, b = next(iter(stream))
    hidden = ~b["observed"][:, 1]
    assert hidden.any() and (b["caption"][hidden] == tk.pad_id).all(), "hidden captions are all pad"
    assert (b["image"][~b["observed"][:, 0]] == 0).all()


def test_image_size_and_deterministic_output(converted, tmp_path) -> None:
    out, root, _ = converted
    meta, _ = cub.build(str(tmp_path / "a"), root, image_size=32, vocab_size=300, shard_size=40, seed=0)
    assert meta["modalities"]["image"]["shape"] == [3, 32, 32] and meta["modalities"]["caption"]["vocab_size"] <= 300
    cub.build(str(tmp_path / "b"), root, image_size=32, vocab_size=300, shard_size=40, seed=0)
    for name in sorted(os.listdir(tmp_path / "a")):
        assert open(tmp_path / "a" / name, "rb").read() == open(tmp_path / "b" / name, "rb").read(), name


# ---- image features (ResNet-101): clear failures without weights or torchvision; stubbed run ----


def test_features_need_weights_and_torchvision(converted, tmp_path, capsys) -> None:
    _, root, _ = converted
    res = cli(capsys, "cub", "--root", root, "--out", str(tmp_path / "out"), "--features", "resnet101")
    assert res.returncode == 1 and "--features resnet101 needs --weights FILE" in res.stderr
    weights = tmp_path / "resnet101.pth"
    torch.save({"w": torch.zeros(1)}, weights)
    res = cli(
        capsys,
        "cub",
        "--root",
        root,
        "--out",
        str(tmp_path / "out"),
        "--features",
        "resnet101",
        "--weights",
        str(tmp_path / "missing.pth"),
    )
    assert res.returncode == 1 and "missing.pth: file not found" in res.stderr
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except ImportError:
            res = cli(
                capsys,
                "cub",
                "--root",
                root,
                "--out",
                str(tmp_path / "out"),
                "--features",
                "resnet101",
                "--weights",
                str(weights),
            )
            assert res.returncode == 1 and "needs the torchvision package" in res.stderr
    assert_nothing_left(tmp_path)


class _FakeResNet(torch.nn.Module):
    """What torchvision.models.resnet101 returns, reduced: a trunk to 2048 features and an fc head."""

    def __init__(self, weights=None):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 2048))
        self.fc = torch.nn.Linear(2048, 1000)

    def forward(self, x):
        return self.fc(self.trunk(x))


def test_feature_modality_with_stubbed_torchvision(converted, tmp_path, monkeypatch) -> None:
    _, root, _ = converted
    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(resnet101=_FakeResNet)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    weights = tmp_path / "resnet101.pth"
    torch.manual_seed(0)
    torch.save(_FakeResNet().state_dict(), weights)
    meta, _ = cub.build(str(tmp_path / "feat"), root, features="resnet101", weights=str(weights), shard_size=40)
    assert meta["modalities"]["feat"] == {"kind": "vector", "field": "feat.npy", "shape": [2048]}
    assert "image" not in meta["modalities"]
    batch = next(eval_batches(str(tmp_path / "feat"), "test", 4, modalities=["feat", "caption"], rank=0, world_size=1))
    assert batch["feat"].shape == (4, 2048) and batch["feat"].dtype == torch.float32 and batch["feat"].abs().sum() > 0
    torch.save({"bogus": torch.zeros(2)}, weights)
    with pytest.raises(ValueError, match="not a torchvision ResNet-101 state_dict"):
        cub.build(str(tmp_path / "feat2"), root, features="resnet101", weights=str(weights))


# ---- bad input: a clear error naming the file, or a counted skip with --skip-bad ----


@pytest.fixture
def tree(tmp_path) -> tuple[str, dict]:
    root = tmp_path / "CUB_200_2011"
    return str(root), fakeraw.cub_tree(str(root), n_train_classes=2, n_test_classes=1, images_per_class=2)


def _run(capsys, tmp_path, root: str, *extra: str):
    return cli(capsys, "cub", "--root", root, "--out", str(tmp_path / "out"), "--shard-size", "10", *extra)


def _fails(capsys, tmp_path, root: str, *extra: str) -> str:
    res = _run(capsys, tmp_path, root, *extra)
    assert res.returncode == 1 and res.stderr.startswith("make_shards.py cub: error: "), res
    assert_nothing_left(tmp_path)
    return res.stderr


def test_missing_class_lists_and_metadata(tree, tmp_path, capsys) -> None:
    root, info = tree
    os.remove(os.path.join(root, "testclasses.txt"))
    err = _fails(capsys, tmp_path, root)
    assert f"class list {os.path.join(root, 'testclasses.txt')} not found: pass --test-classes FILE" in err
    assert "class list" in _fails(capsys, tmp_path, root, "--test-classes", str(tmp_path / "nope.txt"))
    open(os.path.join(root, "testclasses.txt"), "w").write("999.Nobody\n")
    assert "test class list names classes with no image in images.txt: ['999.Nobody']" in _fails(capsys, tmp_path, root)
    open(os.path.join(root, "testclasses.txt"), "w").write("\n".join(info["test"]) + "\n")
    err = _fails(capsys, tmp_path, root, "--text", str(tmp_path / "captions"))
    assert "caption folder" in err and "captions not found" in err
    os.remove(os.path.join(root, "image_class_labels.txt"))
    assert f"missing {os.path.join(root, 'image_class_labels.txt')}" in _fails(capsys, tmp_path, root)


def test_overlapping_class_lists(tree, tmp_path, capsys) -> None:
    root, info = tree
    open(os.path.join(root, "testclasses.txt"), "a").write(info["train"][0] + "\n")
    assert f"classes in both the train and the test list: ['{info['train'][0]}']" in _fails(capsys, tmp_path, root)


def test_mismatched_and_truncated_metadata(tree, tmp_path, capsys) -> None:
    root, _ = tree
    path = os.path.join(root, "image_class_labels.txt")
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(lines[:-1]) + "\n")
    err = _fails(capsys, tmp_path, root)
    assert "images.txt lists 6 images but" in err and "image_class_labels.txt labels 5" in err
    open(path, "w").write("\n".join(lines[:-1]) + "\n" + lines[-1].split()[0] + "\n")  # last line cut short
    assert re.search(
        r"image_class_labels.txt, line 6: expected 2 fields, got '6' \(truncated file\?\)",
        _fails(capsys, tmp_path, root),
    )


def test_undecodable_and_truncated_images(tree, tmp_path, capsys) -> None:
    root, info = tree
    bad_rel, cut_rel = info["images"][1][2], info["images"][4][2]
    open(os.path.join(root, "images", bad_rel), "wb").write(b"this is not a jpeg")
    data = open(os.path.join(root, "images", cut_rel), "rb").read()
    open(os.path.join(root, "images", cut_rel), "wb").write(data[: len(data) // 2])
    err = _fails(capsys, tmp_path, root)
    assert f"image {os.path.join(root, 'images', bad_rel)} will not decode" in err and "--skip-bad" in err
    res = _run(capsys, tmp_path, root, "--skip-bad")
    assert res.returncode == 0, res.stderr
    assert "skipped 2 bad (image: 2)" in res.stdout
    meta = read_meta(str(tmp_path / "out"))
    assert meta["source"]["skipped"]["counts"] == {"image": 2}
    assert sum(meta["splits"].values()) == (6 - 2) * 10, "a skipped image takes none of its captions along"


def test_empty_or_missing_caption_files(tree, tmp_path, capsys) -> None:
    root, info = tree
    empty = os.path.join(root, "text", os.path.splitext(info["images"][0][2])[0] + ".txt")
    open(empty, "w").write("\n  \n")
    assert f"caption file {empty} is empty" in _fails(capsys, tmp_path, root)
    missing = os.path.join(root, "text", os.path.splitext(info["images"][2][2])[0] + ".txt")
    os.remove(missing)
    res = _run(capsys, tmp_path, root, "--skip-bad")
    assert res.returncode == 0 and "skipped 2 bad (caption file: 1, missing caption file: 1)" in res.stdout
    open(empty, "w").write("a red bird\n")
    res = _run(capsys, tmp_path, root, "--overwrite")
    assert res.returncode == 1 and f"caption file {missing} not found" in res.stderr
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("out")) == ["out"], (
        "a failed --overwrite leaves the previous shard set as it was, and no temporary folder"
    )
    assert read_meta(str(tmp_path / "out"))["source"]["skipped"]["total"] == 2
