"""Preemption and crashes: signals stop all ranks together; SIGKILL anywhere leaves a loadable checkpoint."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

from conftest import launch, start_ranks, summary, train_args
from meme_scale.checkpoint import MARKER, complete_tags

pytestmark = pytest.mark.slow


def _wait_for(predicate, timeout: float, poll: float = 0.005):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def test_signal_on_one_rank_stops_all_and_resume_is_exact(quickstart_shards, tmp_path):
    common = ["data.num_workers=1", "run.checkpoint_every=1000", "train.max_steps=60"]
    straight = tmp_path / "straight"
    launch("torchrun", train_args(quickstart_shards, straight, *common))

    run_dir = tmp_path / "stopped"
    procs = start_ranks(train_args(quickstart_shards, run_dir, *common), log_dir=tmp_path)
    log0 = tmp_path / "rank0.log"
    assert _wait_for(lambda: "step 6/60" in log0.read_text(), 120, poll=0.05), log0.read_text()[-3000:]
    os.kill(procs[1].pid, signal.SIGUSR1)  # only rank 1 hears it: the all-reduced flag stops both
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0], log0.read_text()[-3000:]
    first = summary(run_dir)
    assert first["stopped_by"] == "signal" and 6 <= first["step"] < 60
    assert complete_tags(run_dir / "checkpoints") == [f"step_{first['step']:08d}"]

    launch("torchrun", train_args(quickstart_shards, run_dir, *common) + ["--resume", "auto"])
    a = torch.load(straight / "final" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(run_dir / "final" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary(run_dir)["mlflow_run_id"] == first["mlflow_run_id"]


def _mid_write(ckpt_dir):
    """A step directory that exists but is not complete yet: a checkpoint is being written right now."""
    if not ckpt_dir.is_dir():
        return False
    return any(p.name.startswith("step_") and not (p / MARKER).exists() for p in ckpt_dir.iterdir())


def test_sigkill_anywhere_always_resumes_from_last_complete_checkpoint(quickstart_shards, tmp_path):
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    args = train_args(quickstart_shards, run_dir, "run.checkpoint_every=1", "run.keep_checkpoints=2",
                      "train.max_steps=100000", "run.log_every=1")  # fmt: skip
    rng = random.Random(0)
    kills = ["during a checkpoint write", "at a random point", "at a random point"]
    for i, when in enumerate(kills):
        # Plain rank processes (as srun starts them): torchrun puts its workers in sessions of their own,
        # so killing the launcher would leave them running.
        procs = start_ranks(args + (["--resume", "auto"] if i else []), log_dir=tmp_path)
        assert _wait_for(lambda: len(complete_tags(ckpt_dir)) >= 1 + i, 180, poll=0.05)
        if when == "during a checkpoint write":
            assert _wait_for(lambda: _mid_write(ckpt_dir), 60)
        else:
            time.sleep(rng.uniform(0.0, 2.0))
        for proc in procs:  # the whole job dies at once, like a node failure
            os.kill(proc.pid, signal.SIGKILL)
        for proc in procs:
            proc.wait()
        tags = complete_tags(ckpt_dir)
        assert tags, f"attempt {i}: no complete checkpoint left"
        newest = ckpt_dir / tags[-1]
        assert {"mp_rank_00_model_states.pt", "rank_00000.pt", "rank_00001.pt", MARKER} <= {p.name for p in newest.iterdir()}

    # The last resume must pick the newest complete checkpoint and load it.
    newest = complete_tags(ckpt_dir)[-1]
    step = int(newest.split("_")[1])
    proc = launch("torchrun", args[:-2] + [f"train.max_steps={step + 2}", "--resume", "auto"])
    assert f"resumed from {ckpt_dir / newest}" in proc.stderr + proc.stdout
    assert summary(run_dir)["step"] == step + 2
