"""End-to-end training under real launchers, real DeepSpeed engines (gloo), real shards and MLflow."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch
from conftest import ROOT, launch, run_group, summary, train_args
from mlflow.tracking import MlflowClient

from meme_scale.checkpoint import complete_tags, export
from meme_scale.config import load_config
from meme_scale.hardware import available_cores
from meme_scale.tracking import default_tracking_uri

pytestmark = pytest.mark.slow


def _weights(run_dir):
    return torch.load(run_dir / "final" / "model.pt", weights_only=True)["state_dict"]


@pytest.mark.parametrize("zero_stage", [1, 2])  # bf16 at stage 1 is DeepSpeed's BF16_Optimizer, at 2 its ZeRO optimizer
def test_deepspeed_zero_bf16_ranks_stay_in_sync_and_resume(quickstart_shards, tmp_path, zero_stage):
    run_dir = tmp_path / "run"
    args = train_args(
        quickstart_shards, run_dir, f"train.zero_stage={zero_stage}", "train.precision=bf16", "train.max_steps=6"
    )
    launch("deepspeed", args)
    first = summary(run_dir)
    digests = first["parameter_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    ckpt = run_dir / "checkpoints" / "step_00000006"
    assert {"mp_rank_00_model_states.pt", "meme_scale.json", "rank_00000.pt", "rank_00001.pt"} <= {
        p.name for p in ckpt.iterdir()
    }
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"

    launch("deepspeed", args[:-1] + ["train.max_steps=9", "--resume", "auto"])
    second = summary(run_dir)
    assert second["step"] == 9 and second["mlflow_run_id"] == first["mlflow_run_id"]
    assert second["parameter_digest_per_rank"][0] == second["parameter_digest_per_rank"][1]

    # another world size resumes too, and says that the data order changed
    proc = launch("python", args[:-1] + ["train.max_steps=11", "--resume", "auto"], nproc=1)
    assert "data order" in proc.stderr and summary(run_dir)["step"] == 11


def test_run_records_the_precision_and_threads_it_chose(quickstart_shards, tmp_path):
    """2 ranks on this machine's cores, no OMP_NUM_THREADS, precision auto: each rank takes its share of the
    cores, and the run says what it chose and why in summary.json and its MLflow params."""
    run_dir = tmp_path / "run"
    launch(
        "deepspeed",
        train_args(quickstart_shards, run_dir, "train.precision=auto", "train.max_steps=2"),
        env={"OMP_NUM_THREADS": ""},
    )
    s = summary(run_dir)
    assert s["hardware"]["threads"] == max(1, available_cores() // 2)
    assert "shared by 2 rank(s)" in s["hardware"]["threads_reason"]
    assert s["precision"]["requested"] == "auto" and s["precision"]["precision"] == s["hardware"]["precision"]
    assert s["precision"]["probe"]["bf16_speedup"] > 0 and s["precision"]["precision"] in s["precision"]["reason"]
    params = MlflowClient(default_tracking_uri(run_dir)).get_run(s["mlflow_run_id"]).data.params
    assert params["resolved.precision"] == s["precision"]["precision"] and params["train.precision"] == "auto"


def test_stop_and_resume_equals_uninterrupted(quickstart_shards, tmp_path):
    """fp32, ZeRO-2, 2 ranks, one data worker: stopped three times == never stopped, parameter for parameter."""
    common = ["train.zero_stage=2", "data.num_workers=1", "run.checkpoint_every=100"]
    straight = tmp_path / "straight"
    launch("torchrun", train_args(quickstart_shards, straight, *common, "train.max_steps=8"))
    resumed = tmp_path / "resumed"
    for steps in (2, 4, 6, 8):
        resume = ["--resume", "auto"] if steps > 2 else []
        launch("torchrun", train_args(quickstart_shards, resumed, *common, f"train.max_steps={steps}") + resume)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert summary(resumed)["step"] == 8
    runs = MlflowClient(summary(resumed)["tracking_uri"]).search_runs(["1"])
    assert len(runs) == 1  # every resume continued the same MLflow run


def test_plain_python_trains_and_mlflow_holds_the_run(quickstart_shards, tmp_path):
    run_dir = tmp_path / "run"
    launch(
        "python",
        train_args(quickstart_shards, run_dir, "train.max_steps=40", "run.eval_every=20", "train.micro_batch_size=64"),
        nproc=1,
    )
    info = summary(run_dir)
    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "40" and run.data.params["model.name"] == "meme"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 20 and losses[-1] < 0.9 * losses[0]  # the loss falls
    assert {
        "samples_per_s",
        "data_wait_share",
        "lr",
        "eval/loss",
        "grad_norm",
        "log_p_mnist",
        "kl_mnist_given_digits",
    } <= set(run.data.metrics)  # fp32 without ZeRO: DeepSpeed has no grad norm
    assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, "grad_norm"))
    pictures = [f.path for f in client.list_artifacts(run.info.run_id, "pictures") if "step_" in f.path]
    assert pictures == ["pictures/step_00000020.png", "pictures/step_00000040.png"]
    local = client.download_artifacts(run.info.run_id, pictures[-1], str(tmp_path))
    assert open(local, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert [f.path for f in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]


def test_accelerate_launch_runs_two_ranks(quickstart_shards, tmp_path):
    run_dir = tmp_path / "run"
    launch("accelerate", train_args(quickstart_shards, run_dir, "train.max_steps=3"))
    info = summary(run_dir)
    assert info["world_size"] == 2 and info["step"] == 3


def test_observation_ratio_reaches_the_loss(quickstart_shards, tmp_path):
    run_dir = tmp_path / "run"
    launch(
        "torchrun",
        train_args(
            quickstart_shards,
            run_dir,
            "train.max_steps=20",
            "data.observed_fraction=0.125",
            "data.missing=t",
            "train.micro_batch_size=64",
        ),
    )
    metrics = summary(run_dir)["final"]
    assert abs(metrics["paired_fraction"] - 0.125) < 0.05
    assert "J_mnist" in metrics and "J_digits" not in metrics  # missing=t: only s-only unpaired samples


def test_bad_inputs_fail_clearly(quickstart_shards, tmp_path):
    proc = launch("python", ["--config", "configs/quickstart.yaml", "train.max_stepz=3"], nproc=1, check=False)
    assert proc.returncode == 2 and "unknown key 'train.max_stepz'" in proc.stderr

    broken = tmp_path / "broken"
    shutil.copytree(quickstart_shards, broken)
    victim = sorted(broken.glob("*-train-*.tar"))[1]
    victim.unlink()
    proc = launch("python", train_args(broken, tmp_path / "run", "train.max_steps=2"), nproc=1, check=False)
    assert proc.returncode != 0 and victim.name in proc.stderr


def test_refuses_to_overwrite_a_run_without_resume(quickstart_shards, tmp_path):
    run_dir = tmp_path / "run"
    launch("python", train_args(quickstart_shards, run_dir, "train.max_steps=2"), nproc=1)
    proc = launch("python", train_args(quickstart_shards, run_dir, "train.max_steps=4"), nproc=1, check=False)
    assert proc.returncode != 0 and "--resume auto" in proc.stderr
    assert summary(run_dir)["step"] == 2


def test_non_finite_losses_are_skipped_then_stop_the_run(quickstart_shards, tmp_path):
    """A diverging run (lr 1e30): NaN steps are skipped and counted; after 3 in a row the run stops."""
    run_dir = tmp_path / "run"
    proc = launch(
        "python",
        train_args(
            quickstart_shards,
            run_dir,
            "train.max_steps=50",
            "optim.lr=1e30",
            "run.checkpoint_every=1",
            "train.max_consecutive_nan=3",
            "run.log_every=1",
        ),
        nproc=1,
        check=False,
    )
    assert proc.returncode != 0
    assert "3 consecutive non-finite losses" in proc.stderr and proc.stderr.count("non-finite loss at step") == 3
    tags = complete_tags(run_dir / "checkpoints")
    assert tags == ["step_00000001"]  # the last good step, complete and exportable
    out = export(run_dir / "checkpoints", tmp_path / "good.pt")
    assert torch.load(out, weights_only=True)["step"] == 1
    runs = MlflowClient(default_tracking_uri(run_dir)).search_runs(["1"])
    assert [r.info.status for r in runs] == ["FAILED"]
    record = summary(run_dir)  # the run says why it ended and which checkpoint is left
    assert record["status"] == "failed" and "non-finite" in record["error"]
    assert record["last_checkpoint"] == "step_00000001" and record["nan_skipped"] == 3


def test_resume_keeps_the_saved_learning_rate_unless_told_otherwise(quickstart_shards, tmp_path):
    """DeepSpeed restores the optimizer's lr with its moments; ``optim_from_config`` (Tune's PBT) overrides it."""
    base = tmp_path / "base"
    launch("python", train_args(quickstart_shards, base, "train.max_steps=2"), nproc=1)
    script = (
        "import sys; from meme_scale.config import load_config; from meme_scale.loop import run; "
        "run(load_config('configs/quickstart.yaml', sys.argv[2:]), resume='auto', "
        "optim_from_config=sys.argv[1] == 'yes')"
    )
    lrs = {}
    for flag in ("yes", "no"):
        run_dir = tmp_path / flag
        shutil.copytree(base, run_dir)
        args = train_args(quickstart_shards, run_dir, "train.max_steps=4", "optim.lr=0.0125")[2:]
        proc = run_group(
            [sys.executable, "-c", script, flag, *args], 300, cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"}
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        info = summary(run_dir)
        lrs[flag] = MlflowClient(info["tracking_uri"]).get_metric_history(info["mlflow_run_id"], "lr")[-1].value
    default_lr = load_config(ROOT / "configs" / "quickstart.yaml").optim.lr
    assert lrs == {"yes": 0.0125, "no": default_lr} and default_lr != 0.0125
