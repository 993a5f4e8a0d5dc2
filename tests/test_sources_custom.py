"""custom converter: aligned arrays (kinds inferred or declared) and an image folder + captions file;
configs/custom.yaml picks networks from meta.json."""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sources_cli import assert_nothing_left, cli, cli_subprocess

from meme_scale.config import load_config
from meme_scale.data import tokenizer as tok
from meme_scale.data.shards import eval_batches, iter_shard, read_meta, shard_paths
from meme_scale.data.sources import custom, fakeraw
from meme_scale.data.writer import validate_dataset
from meme_scale.models import build_model, modality_specs


def rows(out: str) -> list[dict]:
    return [raw for split in ("train", "test") for p in shard_paths(out, split) for raw in iter_shard(p)]


def test_arrays_with_captions_via_cli(tmp_path) -> None:
    written = fakeraw.arrays_folder(str(tmp_path / "arr"), n=60)
    out = str(tmp_path / "out")
    res = cli_subprocess("custom", "--arrays", str(tmp_path / "arr"), "--out", out, "--shard-size", "20")
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(
        r"custom: 54 train \+ 6 test samples; pic \(image \[1, 28, 28\]\), text \(caption \[32\]\) "
        r"-> .+ in [\d.]+ s\n",
        res.stdout,
    )
    meta = read_meta(out)
    assert list(meta["modalities"]) == ["pic", "text"] and meta["label"]["names"] == ["0", "1", "2", "3", "4"]
    assert meta["modalities"]["text"]["tokenizer"] == "text.spm.model"
    lookup = {
        img.tobytes(): (int(y), tok.normalise(t))
        for img, y, t in zip(written["pic"], written["label"], written["text"])
    }
    got = rows(out)
    assert len(got) == 60
    for raw in got:  # every row keeps its own pixels, label and caption together
        pixels = np.asarray(Image.open(io.BytesIO(raw["pic.png"])))
        assert lookup[pixels.tobytes()] == (int(raw["label.cls"]), raw["text.txt"].decode())
    assert validate_dataset(out) == {"train": 54, "test": 6}

    # configs/custom.yaml: data.root is the only override; networks come from meta.json
    cfg = load_config("configs/custom.yaml", [f"data.root={out}"])
    specs = modality_specs(cfg.model, read_meta(out))
    assert [(s.name, s.kind, s.net, s.shape) for s in specs] == [
        ("pic", "image", "mnist_mlp", (1, 28, 28)),
        ("text", "caption", "caption_cnn", (32,)),
    ]
    assert specs[1].vocab_size == meta["modalities"]["text"]["vocab_size"] and specs[1].pad_id == 0
    model = build_model(cfg.model, specs)
    batch = next(eval_batches(out, "train", 4, modalities=["pic", "text"], rank=0, world_size=1))
    loss, _ = model.loss({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
    assert torch.isfinite(loss)


def test_vectors_declared_kinds_and_given_splits(tmp_path, capsys) -> None:
    base = tmp_path / "arr"
    for split, n in (("train", 30), ("test", 10)):
        d = base / split
        os.makedirs(d)
        rng = np.random.default_rng(n)
        np.save(d / "a.npy", rng.random((n, 8, 8)).astype(np.float32))  # floats in [0, 1]: an image
        np.save(d / "b.npy", rng.normal(size=(n, 2, 3)).astype(np.float32))  # declared vector: flattened
        np.save(d / "caps.npy", np.array([f"sample {i} of {split}" for i in range(n)]))  # unicode array: captions
        np.save(d / "label.npy", np.arange(n) % 3)
        open(d / "label_names.txt", "w").write("x\ny\nz\n")
    res = cli(
        capsys,
        "custom",
        "--arrays",
        str(base),
        "--out",
        str(tmp_path / "out"),
        "--kind",
        "b=vector",
        "--modalities",
        "b,a,caps",
        "--shard-size",
        "16",
        "--vocab-size",
        "300",
    )
    assert res.returncode == 0, res.stderr
    meta = read_meta(str(tmp_path / "out"))
    assert [(m, v["kind"], v["shape"]) for m, v in meta["modalities"].items()] == [
        ("b", "vector", [6]),
        ("a", "image", [1, 8, 8]),
        ("caps", "caption", [32]),
    ]
    assert meta["splits"] == {"train": 30, "test": 10} and meta["label"]["names"] == ["x", "y", "z"]
    b = np.load(base / "test" / "b.npy").reshape(10, 6)
    a = np.rint(np.load(base / "test" / "a.npy") * 255).astype(np.uint8)
    for raw in (r for p in shard_paths(str(tmp_path / "out"), "test") for r in iter_shard(p)):
        i = int(raw["caps.txt"].decode().split()[1])
        assert raw["caps.txt"].decode() == f"sample {i} of test" and int(raw["label.cls"]) == i % 3
        np.testing.assert_array_equal(np.load(io.BytesIO(raw["b.npy"])), b[i])
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(raw["a.png"]))), a[i])


def test_image_folder_and_captions_file(tmp_path, capsys) -> None:
    images = tmp_path / "imgs"
    lines = ["# path<TAB>caption"]
    for c, cls in enumerate(("cats", "dogs")):
        os.makedirs(images / cls)
        for i in range(5):
            Image.fromarray(np.full((20, 30, 3), 100 * c + 10 * i, np.uint8)).save(images / cls / f"{i}.png")
            lines += [f"{cls}/{i}.png\ta {cls[:-1]} number {i}", f"{cls}/{i}.png\tanother {cls[:-1]} picture"]
    open(tmp_path / "caps.tsv", "w").write("\n".join(lines) + "\n")
    res = cli(
        capsys,
        "custom",
        "--images",
        str(images),
        "--captions",
        str(tmp_path / "caps.tsv"),
        "--out",
        str(tmp_path / "out"),
        "--image-size",
        "16",
        "--test-fraction",
        "0.2",
        "--shard-size",
        "8",
    )
    assert res.returncode == 0, res.stderr
    meta = read_meta(str(tmp_path / "out"))
    assert meta["modalities"]["image"]["shape"] == [3, 16, 16] and meta["label"]["names"] == ["cats", "dogs"]
    assert meta["splits"] == {"train": 16, "test": 4}, "split by image: both captions of an image stay together"
    by_image: dict[bytes, set] = {}
    for split in ("train", "test"):
        for p in shard_paths(str(tmp_path / "out"), split):
            for raw in iter_shard(p):
                px = np.asarray(Image.open(io.BytesIO(raw["image.png"])))
                by_image.setdefault(px.tobytes(), set()).add((split, raw["caption.txt"].decode(), raw["label.cls"]))
    assert len(by_image) == 10 and all(len(v) == 2 and len({s for s, _, _ in v}) == 1 for v in by_image.values())


def test_bad_inputs_name_the_file(tmp_path, capsys) -> None:
    def fails(*args: str) -> str:
        res = cli(capsys, "custom", *args, "--out", str(tmp_path / "out"))
        assert res.returncode == 1 and res.stderr.startswith("make_shards.py custom: error: "), res
        assert_nothing_left(tmp_path)
        return res.stderr

    arr = tmp_path / "arr"
    fakeraw.arrays_folder(str(arr), n=20)
    np.save(arr / "label.npy", np.zeros(19, dtype=np.int64))
    err = fails("--arrays", str(arr))
    assert "arrays are not aligned, row counts differ" in err and "label.npy: 19" in err and "pic.npy: 20" in err
    np.save(arr / "label.npy", np.zeros(20, dtype=np.int64))
    np.save(arr / "obj.npy", np.array([{"a": 1}] * 20, dtype=object), allow_pickle=True)
    assert f"{arr / 'obj.npy'} holds Python objects" in fails("--arrays", str(arr))
    os.remove(arr / "obj.npy")
    data = open(arr / "pic.npy", "rb").read()
    open(arr / "pic.npy", "wb").write(data[: len(data) // 2])
    assert f"{arr / 'pic.npy'}: cannot read as .npy" in fails("--arrays", str(arr))
    fakeraw.arrays_folder(str(arr), n=20)
    text = open(arr / "text.txt").read().splitlines()
    text[4] = "   "
    open(arr / "text.txt", "w").write("\n".join(text) + "\n")
    assert f"{arr / 'text.txt'}, row 4: empty caption (pass --skip-bad" in fails(
        "--arrays", str(arr), "--test-fraction", "0.01"
    )
    assert "--kind 'pic=sound'" in fails("--arrays", str(arr), "--kind", "pic=sound")
    np.save(arr / "pic.npy", np.random.default_rng(0).normal(size=(20, 28, 28)))
    assert "declare --kind pic=vector" in fails("--arrays", str(arr))

    images = tmp_path / "imgs"
    os.makedirs(images)
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / f"{i}.png")
    open(images / "broken.png", "wb").write(b"\x89PNG not really")
    caps = tmp_path / "caps.tsv"
    open(caps, "w").write("0.png\tone\n1.png\ttwo\n2.png\tthree\nbroken.png\tfour\n")
    assert f"image {images / 'broken.png'} will not decode" in fails("--images", str(images), "--captions", str(caps))
    res = cli(
        capsys,
        "custom",
        "--images",
        str(images),
        "--captions",
        str(caps),
        "--out",
        str(tmp_path / "ok"),
        "--skip-bad",
        "--test-fraction",
        "0.3",
    )
    assert res.returncode == 0 and "skipped 1 bad (image: 1)" in res.stdout
    open(caps, "w").write("0.png one\n")
    assert f"{caps}, line 1: expected '<image path>\\t<caption>'" in fails(
        "--images", str(images), "--captions", str(caps)
    )
    open(caps, "w").write("0.png\tone\n9.png\tnine\n")
    assert f"image {images / '9.png'} not found (listed in {caps})" in fails(
        "--images", str(images), "--captions", str(caps)
    )
    assert "--images needs --captions" in fails("--images", str(images))


def test_infer_kind_rules() -> None:
    assert custom.infer_kind("x", np.zeros((4, 3, 32, 32), np.uint8), "x.npy") == "image"
    assert custom.infer_kind("x", np.zeros((4, 32, 32, 3), np.uint8), "x.npy") == "image"
    assert custom.infer_kind("x", np.zeros((4, 10)), "x.npy") == "vector"
    assert custom.infer_kind("x", np.array(["a", "b"]), "x.npy") == "caption"
    spec, img = custom._as_modality("x", "image", np.zeros((4, 32, 32, 3), np.uint8), "x.npy")
    assert spec == {"kind": "image", "shape": [3, 32, 32]} and img.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="not an image"):
        custom.infer_kind("x", np.zeros((4, 5, 6, 7), np.uint8), "x.npy")


def test_too_small_vocab_size_is_a_clear_error_and_leaves_nothing(tmp_path, capsys) -> None:
    fakeraw.arrays_folder(str(tmp_path / "arr"), n=20)
    res = cli(
        capsys, "custom", "--arrays", str(tmp_path / "arr"), "--out", str(tmp_path / "out"), "--vocab-size", "100"
    )
    assert res.returncode == 1 and res.stderr.startswith("make_shards.py custom: error: --vocab-size"), res
    assert re.search(r"--vocab-size \(meta.json vocab_size\) 100 is too small.* at least \d+ ", res.stderr), res
    assert "Traceback" not in res.stderr
    assert_nothing_left(tmp_path)


def bytes_captions_folder(folder, captions: list[bytes]) -> str:
    """An arrays folder whose captions are a bytes array (numpy dtype kind 'S'), beside a vector."""
    os.makedirs(folder)
    np.save(folder / "caps.npy", np.array(captions))
    np.save(folder / "vec.npy", np.arange(len(captions) * 4, dtype=np.float32).reshape(-1, 4))
    return str(folder)


def test_bytes_caption_array_is_decoded_as_utf8(tmp_path, capsys) -> None:
    texts = [f"a red bird number {i} in the café" for i in range(20)]
    folder = bytes_captions_folder(tmp_path / "arr", [t.encode("utf-8") for t in texts])
    assert np.load(os.path.join(folder, "caps.npy")).dtype.kind == "S"
    out = str(tmp_path / "out")
    res = cli(capsys, "custom", "--arrays", folder, "--out", out, "--kind", "vec=vector")
    assert res.returncode == 0, res.stderr
    got = {raw["vec.npy"]: raw["caps.txt"].decode() for raw in rows(out)}
    assert len(got) == 20
    for raw_vec, caption in got.items():  # the stored text is the original, not "b'a red bird ...'"
        i = int(np.load(io.BytesIO(raw_vec))[0]) // 4
        assert caption == texts[i]
    tk = tok.Tokenizer.load(os.path.join(out, read_meta(out)["modalities"]["caps"]["tokenizer"]))
    assert tk.decode(tk.encode(texts[0])) == texts[0]
    assert "b'" not in "".join(tk.sp.id_to_piece(i) for i in range(tk.vocab_size))  # trained on the text


def test_bytes_caption_that_is_not_utf8_names_file_and_row(tmp_path, capsys) -> None:
    caps = [f"a red bird number {i}".encode() for i in range(20)]
    caps[3] = b"a \xff\xfe bird"
    folder = bytes_captions_folder(tmp_path / "arr", caps)
    res = cli(capsys, "custom", "--arrays", folder, "--out", str(tmp_path / "out"))
    assert res.returncode == 1, res
    assert f"{os.path.join(folder, 'caps.npy')}, row 3: caption is not UTF-8 (pass --skip-bad" in res.stderr
    assert_nothing_left(tmp_path)
    res = cli(capsys, "custom", "--arrays", folder, "--out", str(tmp_path / "ok"), "--skip-bad")
    assert res.returncode == 0 and "skipped 1 bad (caption is not UTF-8: 1)" in res.stdout, res
