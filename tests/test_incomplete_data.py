"""Really incomplete data (issue 14, part 2): samples that truly lack a modality, from real digits.

Two real datasets with gaps, 20% of rows missing s and 10% missing t: (1) the quickstart's MNIST
and UCI digits as aligned arrays, s absent through observed.npy and t through all-NaN rows; (2) an
image folder of MNIST PNGs plus a captions file, some images without a caption line and some
captions naming only a class folder. Both convert, report their real pattern counts in meta.json,
feed the reader (``observed`` = truth AND the simulated mask), evaluate on complete pairs only, and
train MEME through train.py (f = 1.0 and f = 0.5).
"""

from __future__ import annotations

import io
import itertools
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import launch, summary, train_args
from conftest_data import edit_json
from PIL import Image
from sources_cli import cli

from meme_scale.data.masks import observation_for_keys
from meme_scale.data.patterns import pattern_counts
from meme_scale.data.shards import TrainStream, eval_batches, iter_shard, read_meta, shard_paths
from meme_scale.data.sources.quickstart import load_sources, pair_by_class
from meme_scale.data.writer import ShardWriter, validate_dataset

N = 600  # rows: 120 without s (20%), 60 without t (10%), 420 complete
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def digits_arrays(tmp_path_factory) -> dict:
    """Aligned real arrays (MNIST s, UCI digits t as floats in [0, 1]) with truly absent entries."""
    mnist, mnist_y, digits, digits_y = load_sources()
    rng = np.random.default_rng(0)
    a, b = pair_by_class(np.arange(N), mnist_y, np.arange(len(digits)), digits_y, 1, rng)
    folder = tmp_path_factory.mktemp("incomplete") / "arrays"
    os.makedirs(folder)
    rows = rng.permutation(N)
    no_s, no_t = np.sort(rows[:120]), np.sort(rows[120:180])
    observed = np.ones((N, 2), dtype=bool)
    observed[no_s, 0] = False  # s (mnist) absent: observed.npy
    t = digits[b].astype(np.float32)[:, 0] / 255.0
    t[no_t] = np.nan  # t (digits) absent: all-NaN rows
    np.save(folder / "mnist.npy", mnist[a][:, 0])
    np.save(folder / "digits.npy", t)
    np.save(folder / "observed.npy", observed)
    np.save(folder / "label.npy", mnist_y[a])
    return {"folder": folder, "no_s": no_s, "no_t": no_t, "mnist": mnist[a][:, 0], "digits": digits[b][:, 0]}


@pytest.fixture(scope="module")
def arrays_shards(digits_arrays, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("incomplete") / "shards")
    from sources_cli import make_shards

    assert (
        make_shards.main(
            [
                "custom",
                "--arrays",
                str(digits_arrays["folder"]),
                "--modalities",
                "mnist,digits",
                "--out",
                out,
                "--shard-size",
                "100",
            ]
        )
        == 0
    )
    return out


def stored(root: str, split: str) -> list[dict]:
    return [raw for p in shard_paths(root, split) for raw in iter_shard(p)]


def test_arrays_with_gaps_store_only_what_exists_and_count_patterns(arrays_shards, digits_arrays) -> None:
    meta = read_meta(arrays_shards)
    assert list(meta["modalities"]) == ["mnist", "digits"]
    totals = Counter()
    for split in ("train", "test"):
        found = Counter(
            "both" if {"mnist.png", "digits.png"} <= set(r) else "s_only" if "mnist.png" in r else "t_only"
            for r in stored(arrays_shards, split)
        )
        assert meta["patterns"][split] == {p: found[p] for p in ("both", "s_only", "t_only")}
        totals += found
    assert totals == {"both": 420, "t_only": 120, "s_only": 60}  # 20% without s, 10% without t
    assert pattern_counts(meta)["patterns.train.t_only"] == meta["patterns"]["train"]["t_only"]
    # what is stored is the row itself: pixels of each present field match its source row
    kept = {digits_arrays["mnist"][i].tobytes() for i in range(N) if i not in set(digits_arrays["no_s"])}
    for raw in stored(arrays_shards, "test"):
        if "mnist.png" in raw:
            assert np.asarray(Image.open(io.BytesIO(raw["mnist.png"]))).tobytes() in kept


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_reader_observed_is_truth_and_simulated_mask(arrays_shards, fraction: float) -> None:
    s = TrainStream(
        arrays_shards,
        "train",
        64,
        modalities=["mnist", "digits"],
        rank=0,
        world_size=1,
        seed=0,
        observed_fraction=fraction,
        missing="either",
        num_workers=1,
    )
    present = {r["__key__"]: ("mnist.png" in r, "digits.png" in r) for r in stored(arrays_shards, "train")}
    absent_seen = Counter()
    for _, _, b in itertools.islice(s, s.steps_per_epoch(0)):
        truth = np.array([present[k] for k in b["key"]])
        want = observation_for_keys(b["key"], 0, fraction, "either") & truth
        np.testing.assert_array_equal(b["observed"].numpy(), want)
        for col, m in enumerate(("mnist", "digits")):
            hidden = ~b["observed"][:, col]
            assert not b[m][hidden].any(), "an absent or hidden modality is zero-filled"
            absent_seen[m] += int((~torch.from_numpy(truth[:, col])).sum())
    assert absent_seen["mnist"] > 0 and absent_seen["digits"] > 0


def test_evaluation_sees_complete_pairs_only(arrays_shards) -> None:
    meta = read_meta(arrays_shards)
    batches = list(eval_batches(arrays_shards, "test", 16, modalities=["mnist", "digits"], rank=0, world_size=1))
    assert sum(len(b["key"]) for b in batches) == meta["patterns"]["test"]["both"]
    assert all(b["observed"].all() and b["mnist"].flatten(1).any(1).all() for b in batches)
    # one modality: every sample that has it (the classifiers' view)
    only_mnist = sum(
        len(b["key"]) for b in eval_batches(arrays_shards, "test", 16, modalities=["mnist"], rank=0, world_size=1)
    )
    assert only_mnist == meta["patterns"]["test"]["both"] + meta["patterns"]["test"]["s_only"]


def test_rows_without_any_modality_are_named_or_counted(digits_arrays, tmp_path, capsys) -> None:
    folder = tmp_path / "arr"
    os.makedirs(folder)
    for name in ("mnist.npy", "digits.npy", "label.npy"):
        os.symlink(digits_arrays["folder"] / name, folder / name)
    observed = np.load(digits_arrays["folder"] / "observed.npy")
    row = int(digits_arrays["no_t"][0])
    observed[row, 0] = False  # its t is all NaN already
    np.save(folder / "observed.npy", observed)
    res = cli(capsys, "custom", "--arrays", str(folder), "--out", str(tmp_path / "out"), "--modalities", "mnist,digits")
    assert res.returncode == 1 and f"row {row} lacks every modality" in res.stderr, res
    res = cli(
        capsys,
        "custom",
        "--arrays",
        str(folder),
        "--out",
        str(tmp_path / "out"),
        "--modalities",
        "mnist,digits",
        "--skip-bad",
    )
    assert res.returncode == 0 and "skipped 1 bad (no modality: 1)" in res.stdout, res
    np.save(folder / "observed.npy", observed[:, :1])
    res = cli(capsys, "custom", "--arrays", str(folder), "--out", str(tmp_path / "out2"))
    assert res.returncode == 1 and "observed.npy: must be bool [N, 2]" in res.stderr


def test_writer_and_validator_rules_for_absent_modalities(tmp_path) -> None:
    mods = {"a": {"kind": "image", "shape": [1, 4, 4]}, "b": {"kind": "vector", "shape": [3]}}
    img, vec = np.zeros((1, 4, 4), np.uint8), np.zeros(3, np.float32)
    w = ShardWriter(str(tmp_path / "x"), "x", mods, None)
    with pytest.raises(ValueError, match="train sample 1: every modality is absent"):
        w.write_split("train", [{"a": img, "b": None}, {"a": None, "b": None}])
    w.abort()
    three = {**mods, "c": {"kind": "vector", "shape": [2]}}
    w = ShardWriter(str(tmp_path / "y"), "y", three, None)
    with pytest.raises(ValueError, match="absent modalities need a dataset of exactly two modalities"):
        w.write_split("train", [{"a": img, "b": None, "c": np.zeros(2)}])
    w.abort()
    with ShardWriter(str(tmp_path / "z"), "z", mods, None, samples_per_shard=2) as w:
        w.write_split("train", [{"a": img, "b": None}, {"a": None, "b": vec}, {"a": img, "b": vec}])
        w.write_split("test", [{"a": img, "b": vec}])
    assert read_meta(str(tmp_path / "z"))["patterns"]["train"] == {"both": 1, "s_only": 1, "t_only": 1}
    wrong = {"both": 0, "s_only": 2, "t_only": 1}  # the same modalities may be absent, other counts
    edit_json(str(tmp_path / "z"), "meta.json", lambda m: {**m, "patterns": {**m["patterns"], "train": wrong}})
    with pytest.raises(ValueError, match=r"split 'train' holds samples per pattern \{'both': 1, 's_only': 1"):
        validate_dataset(str(tmp_path / "z"))


@pytest.fixture(scope="module")
def captioned_folder(tmp_path_factory) -> dict:
    """320 real MNIST PNGs in class folders: 280 with a caption line, 40 without; 80 caption-only lines
    naming only a class folder. 400 samples: 280 both, 40 s_only, 80 t_only."""
    mnist, labels, _, _ = load_sources()
    base = tmp_path_factory.mktemp("captioned")
    lines = ["# path<TAB>caption"]
    for i in range(320):
        c = int(labels[i])
        os.makedirs(base / "images" / str(c), exist_ok=True)
        Image.fromarray(mnist[i, 0]).save(base / "images" / str(c) / f"{i}.png")
        if i < 280:
            lines.append(f"{c}/{i}.png\ta handwritten {WORDS[c]} number {i % 7}")
    for k in range(80):
        c = k % 10
        lines.append(f"{c}/\tthe digit {WORDS[c]} written by hand {k % 5}")
    (base / "captions.tsv").write_text("\n".join(lines) + "\n")
    return {"images": base / "images", "captions": base / "captions.tsv"}


def test_image_folder_and_captions_with_gaps(captioned_folder, tmp_path, capsys) -> None:
    out = str(tmp_path / "out")
    res = cli(
        capsys,
        "custom",
        "--images",
        str(captioned_folder["images"]),
        "--captions",
        str(captioned_folder["captions"]),
        "--out",
        out,
        "--image-size",
        "28",
        "--vocab-size",
        "320",
    )
    assert res.returncode == 0, res
    meta = read_meta(out)
    assert meta["label"]["names"] == [str(c) for c in range(10)]
    totals = Counter()
    for split in ("train", "test"):
        raws = stored(out, split)
        found = Counter(
            "both" if {"image.png", "caption.txt"} <= set(r) else "s_only" if "image.png" in r else "t_only"
            for r in raws
        )
        assert meta["patterns"][split] == {p: found[p] for p in ("both", "s_only", "t_only")}
        for r in raws:  # a caption-only sample keeps its folder's class
            if "image.png" not in r:
                word = r["caption.txt"].decode().split()[2]
                assert WORDS.index(word) == int(r["label.cls"])
        totals += found
    assert totals == {"both": 280, "s_only": 40, "t_only": 80}


@pytest.mark.slow
def test_meme_trains_on_both_incomplete_datasets(arrays_shards, captioned_folder, tmp_path, capsys) -> None:
    """train.py on the arrays at f = 1.0 and on the image + caption set at f = 0.5: both finish, and
    evaluation reports how many complete pairs it used."""
    captions = str(tmp_path / "captions")
    assert (
        cli(
            capsys,
            "custom",
            "--images",
            str(captioned_folder["images"]),
            "--captions",
            str(captioned_folder["captions"]),
            "--out",
            captions,
            "--image-size",
            "28",
            "--vocab-size",
            "320",
        ).returncode
        == 0
    )
    for root, fraction in ((arrays_shards, "1.0"), (captions, "0.5")):
        run_dir = tmp_path / f"run_{fraction}"
        launch(
            "python",
            train_args(
                root,
                run_dir,
                "train.max_steps=4",
                f"data.observed_fraction={fraction}",
                "model.pseudo_samples=16",
                "data.num_workers=0",
                config="configs/custom.yaml",
            ),
            nproc=1,
        )
        info = summary(run_dir)
        assert info["status"] == "finished" and info["step"] == 4
        assert np.isfinite(info["final"]["loss"])
        assert info["final"]["eval/complete_pairs"] == read_meta(root)["patterns"]["test"]["both"]
        assert json.loads((run_dir / "eval_report.json").read_text())["eval/complete_pairs"] > 0
