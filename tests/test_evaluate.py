"""Evaluation end to end: classifiers, 1 rank == 2 ranks, export == checkpoint, and during training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import BIN, ROOT, free_port, launch, summary, train_args

pytestmark = pytest.mark.slow


# Chunks of 64 leave short last chunks in both splits (test 1000 = 15 * 64 + 40, train 4000 = 62 * 64 + 32),
# and 4000 probe samples take the whole train split, short chunk included: rows must keep their global index
# (chunk j starts at j * 64, whatever its own size) or the latent probe's training order changes with the ranks.
EVAL_ARGS = ["train.micro_batch_size=64", "eval.joint_samples=200", "eval.latent_train_samples=4000"]


@pytest.fixture(scope="module")
def trained(quickstart_shards, tmp_path_factory):
    """Classifiers (a short schedule) and a briefly trained MEME with evaluation at its last step."""
    work = tmp_path_factory.mktemp("eval")
    classifiers = work / "classifiers"  # not beside the shared shards: other tests expect none there
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "train_classifiers.py"),
            "--shards",
            str(quickstart_shards),
            "--epochs",
            "2",
            "--out",
            str(classifiers),
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    run_dir = work / "run"
    launch(
        "python",
        train_args(
            quickstart_shards,
            run_dir,
            "train.max_steps=30",
            "run.eval_max_batches=0",
            *EVAL_ARGS,
            f"eval.classifiers={classifiers}",
        ),
        nproc=1,
    )
    return quickstart_shards, run_dir, classifiers


def _eval(launcher: list[str], data, classifiers, checkpoint, out) -> dict:
    cmd = [
        *launcher,
        "-m",
        "meme_scale.cli",
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--config",
        "configs/quickstart.yaml",
        "--out",
        str(out),
        f"data.root={data}",
        *EVAL_ARGS,
        f"eval.classifiers={classifiers}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_classifiers_are_saved_with_their_accuracy(trained):
    _, _, classifiers = trained
    for name in ("mnist", "digits"):
        from meme_scale.classifiers import load_classifier

        assert load_classifier(classifiers / f"{name}.pt").test_accuracy > 0.8


def test_two_ranks_equal_one_rank_and_export_equals_checkpoint(trained, tmp_path):
    """Splits whose sizes are not multiples of the chunk (EVAL_ARGS): every number equal on 1 and 2 ranks."""
    data, run_dir, classifiers = trained
    exported = tmp_path / "exported.pt"  # the user's command: tools/export.py CHECKPOINT OUT.pt
    subprocess.run(
        [sys.executable, "tools/export.py", str(run_dir / "checkpoints"), str(exported)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    one = _eval([sys.executable], data, classifiers, exported, tmp_path / "one.json")
    two = _eval(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())],
        data,
        classifiers,
        run_dir / "checkpoints",
        tmp_path / "two.json",
    )
    assert (one["world_size"], two["world_size"]) == (1, 2)
    keys = [k for k in one if k.startswith("eval/")]
    assert {"eval/cross_coherence", "eval/coherence_joint", "eval/latent_accuracy_mnist", "eval/w2_paired"} <= set(keys)
    for key in keys:  # counts are exact; sums differ only by float summation order
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    assert (tmp_path / "one_relatedness.png").read_bytes()[:4] == b"\x89PNG"

    # the numbers logged during training at the last step are the checkpoint's numbers
    during = json.loads((run_dir / "eval_report.json").read_text())
    from meme_scale.config import load_config
    from meme_scale.tune.plan import reported_metrics

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"data.root={data}", f"eval.classifiers={classifiers}"])
    assert set(during) == reported_metrics(cfg)  # what a sweep may name as its metric is what evaluation reports
    for key in keys:
        assert during[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


def test_training_logs_metrics_and_pictures(trained):
    _, run_dir, _ = trained
    info = summary(run_dir)
    assert 0.0 <= info["final"]["eval/cross_coherence"] <= 1.0
    assert info["final"]["eval/w2_mismatched"] > 0
    assert (run_dir / "pictures" / "relatedness_00000030.png").is_file()
