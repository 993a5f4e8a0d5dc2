"""MEME trains on converted MNIST-SVHN-, CUB- and custom-shaped fixture shards through the real entry
(``deepspeed meme_scale/train.py --config configs/<name>.yaml``, 2 CPU ranks), paired only and with
``data.observed_fraction=0.25``; caption rows of the picture grid are decoded back to text.

Fixtures are tiny (40 MNIST-SVHN pairs, 18 CUB images x 10 captions), written in the original raw
formats and converted by the real converters into >= 2 train shards per rank.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import launch, summary, train_args
from PIL import Image

from meme_scale.config import load_config
from meme_scale.data.shards import eval_batches, read_meta
from meme_scale.data.sources import cub, custom, fakeraw, mnist_svhn
from meme_scale.evaluate import picture_grid
from meme_scale.models import build_model, modality_specs
from meme_scale.pictures import caption_texts

SMALL_CUB = [
    "model.modalities.0.hidden=[8,16,32,32,64]",
    "model.modalities.1.hidden=[8,16,32,64]",
    "model.modalities.1.embedding_dim=32",
    "model.latent_dim=16",
]
# fp32: the configs' auto would pick bf16 or fp32 by the CPU the tests run on (tests/test_hardware.py covers that)
COMMON = [
    "train.micro_batch_size=8",
    "train.max_steps=4",
    "train.precision=fp32",
    "model.pseudo_samples=8",
    "model.k=3",
    "data.num_workers=0",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("datasets")
    fakeraw.mnist_files(str(root / "mnist"), {"train": 4, "test": 2})
    fakeraw.svhn_files(str(root / "svhn"), {"train": 5, "test": 2})
    mnist_svhn.build(str(root / "ms"), str(root / "mnist"), str(root / "svhn"), shard_size=10)
    fakeraw.cub_tree(str(root / "CUB_200_2011"))
    cub.build(str(root / "cub"), str(root / "CUB_200_2011"), shard_size=30)
    fakeraw.arrays_folder(str(root / "arrays"), n=60)
    custom.build_from_arrays(str(root / "custom"), str(root / "arrays"), shard_size=16, test_fraction=0.2)
    return {"mnist_svhn": root / "ms", "cub": root / "cub", "custom": root / "custom"}


def _check_run(run_dir, fraction: float, names: tuple[str, str], world_size: int = 2) -> dict:
    info = summary(run_dir)
    assert info["step"] == 4 and info["world_size"] == world_size
    assert len(set(info["parameter_digest_per_rank"])) == 1, "ranks stay in sync"
    final = info["final"]
    s, t = names
    assert all(math.isfinite(v) for v in final.values()) and f"log_p_{t}" in final
    if fraction == 1.0:
        assert final["paired_fraction"] == 1.0
    else:
        assert final["paired_fraction"] < 0.6 and {f"J_{s}", f"J_{t}"} <= set(final), "unpaired terms trained"
    report = json.loads((run_dir / "eval_report.json").read_text())
    assert math.isfinite(report["eval/loss"])
    assert (run_dir / "pictures" / "step_00000004.png").is_file()
    return info


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [1.0, 0.25])
@pytest.mark.parametrize("dataset, extra", [("mnist_svhn", []), ("cub", SMALL_CUB)])
def test_meme_trains_on_converted_shards(shards, tmp_path, dataset: str, extra: list[str], fraction: float) -> None:
    run_dir = tmp_path / "run"
    args = train_args(
        shards[dataset],
        run_dir,
        *COMMON,
        *extra,
        f"data.observed_fraction={fraction}",
        config=f"configs/{dataset}.yaml",
    )
    launch("deepspeed", args)
    names = ("mnist", "svhn") if dataset == "mnist_svhn" else ("image", "caption")
    _check_run(run_dir, fraction, names)


@pytest.mark.slow
def test_custom_config_needs_only_data_root(shards, tmp_path) -> None:
    """configs/custom.yaml with data.root (plus run length): networks from meta.json (MLP + caption CNN).
    One plain process: what this checks is the config, the launchers are covered above."""
    run_dir = tmp_path / "run"
    args = [
        "--config",
        "configs/custom.yaml",
        f"data.root={shards['custom']}",
        f"run.dir={run_dir}",
        "train.max_steps=4",
        "train.micro_batch_size=8",
        "run.progress=lines",
        "data.observed_fraction=0.25",
        "model.k=2",
        "model.pseudo_samples=8",
    ]  # speed only: the default caption CNN costs ~1 s/step on CPU
    launch("python", args, nproc=1)
    _check_run(run_dir, 0.25, ("pic", "text"), world_size=1)


def test_picture_grid_shows_caption_rows_as_text(shards, tmp_path) -> None:
    root = str(shards["cub"])
    cfg = load_config("configs/cub.yaml", [f"data.root={root}", *SMALL_CUB])
    model = build_model(cfg.model, modality_specs(cfg.model, read_meta(root)))
    batch = next(eval_batches(root, "test", 6, modalities=model.names, rank=0, world_size=1))
    texts = caption_texts(batch["tokenizers"])
    assert texts["caption"](batch["caption"])[0].startswith("this bird has a")
    with_text = picture_grid(model, batch, tmp_path / "with_text.png", torch.device("cpu"), n=6)
    without = picture_grid(
        model, {k: v for k, v in batch.items() if k != "tokenizers"}, tmp_path / "plain.png", torch.device("cpu"), n=6
    )
    w_text, h_text = Image.open(with_text).size
    w_plain, h_plain = Image.open(without).size
    assert h_text > h_plain and w_text > w_plain, "caption rows (data, recon, image->caption, prior) were added"
    # the caption data row holds the decoded captions: dark text pixels inside light grey cells
    pixels = np.asarray(Image.open(with_text).convert("L"))
    assert (pixels < 100).mean() > 0.01
