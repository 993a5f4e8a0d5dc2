"""Preemption and crashes: signals stop all ranks together; SIGKILL anywhere leaves a loadable checkpoint."""

from __future__ import annotations

import os
import random
import shutil
import signal
import time

import pytest
import torch
from conftest import launch, start_ranks, summary, train_args

from meme_scale import checkpoint, preemption
from meme_scale.checkpoint import MARKER, complete_tags, latest_tag, remove_tag_dir

# slow marks the multi-process tests one by one; the pure tests below them run in the quick suite
CHECKPOINT_FILES = {"mp_rank_00_model_states.pt", "rank_00000.pt", "rank_00001.pt", MARKER}


def _wait_for(predicate, timeout: float, poll: float = 0.005):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


@pytest.mark.slow
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
    """A checkpoint is being written right now: a step directory newer than the newest complete one."""
    newest = latest_tag(ckpt_dir) or ""
    return ckpt_dir.is_dir() and any(
        p.name.startswith("step_") and p.name > newest and not (p / MARKER).exists() for p in ckpt_dir.iterdir()
    )


def _mid_prune(ckpt_dir, keep):
    """Between a new marker and the end of pruning: more than ``keep`` complete tags, or an old tag half-deleted."""
    tags = complete_tags(ckpt_dir)
    if len(tags) > keep:
        return True
    return bool(tags) and any(
        p.name.startswith("step_") and p.name < tags[-1] and not (p / MARKER).exists() for p in ckpt_dir.iterdir()
    )


@pytest.mark.slow
def test_sigkill_anywhere_always_resumes_from_last_complete_checkpoint(quickstart_shards, tmp_path):
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    keep = 2
    args = train_args(
        quickstart_shards,
        run_dir,
        "run.checkpoint_every=1",
        f"run.keep_checkpoints={keep}",
        "train.max_steps=100000",
        "run.log_every=1",
    )
    rng = random.Random(0)
    kills = ["during a checkpoint write", "during a prune", "at a random point"]
    aimed = []
    for i, when in enumerate(kills):
        # Each start must write a checkpoint of its own before it dies: wait for a tag newer than the one
        # it resumes from (counting tags would not do: keep_checkpoints caps their number).
        before = latest_tag(ckpt_dir) or ""
        # Plain rank processes (as srun starts them): torchrun puts its workers in sessions of their own,
        # so killing the launcher would leave them running.
        procs = start_ranks(args + (["--resume", "auto"] if i else []), log_dir=tmp_path)
        assert _wait_for(lambda before=before: (latest_tag(ckpt_dir) or "") > before, 180, poll=0.05), (
            f"attempt {i}: no checkpoint newer than {before!r}:\n" + (tmp_path / "rank0.log").read_text()[-3000:]
        )
        if when == "during a checkpoint write":
            aimed.append(_wait_for(lambda: _mid_write(ckpt_dir), 60, poll=0.001))
        elif when == "during a prune":  # a window of milliseconds: aimed at, not guaranteed to be hit
            aimed.append(_wait_for(lambda: _mid_prune(ckpt_dir, keep), 20, poll=0.001))
        else:
            time.sleep(rng.uniform(0.0, 2.0))
        for proc in procs:  # the whole job dies at once, like a node failure
            os.kill(proc.pid, signal.SIGKILL)
        for proc in procs:
            proc.wait()
        tags = complete_tags(ckpt_dir)
        assert tags and tags[-1] > before, f"attempt {i} ({when}): no new complete checkpoint left: {tags}"
        for tag in tags:  # every tag that counts as complete is loadable, also one that was being pruned
            assert CHECKPOINT_FILES <= {p.name for p in (ckpt_dir / tag).iterdir()}, (when, tag)
    assert aimed[0], "never caught a checkpoint being written"

    # The last resume must pick the newest complete checkpoint and load it.
    newest = complete_tags(ckpt_dir)[-1]
    step = int(newest.split("_")[1])
    proc = launch("torchrun", args[:-2] + [f"train.max_steps={step + 2}", "--resume", "auto"])
    assert f"resumed from {ckpt_dir / newest}" in proc.stderr + proc.stdout
    assert summary(run_dir)["step"] == step + 2
    # keep-last-k: the finished run pruned everything but the newest `keep`, leftovers of the kills included
    assert complete_tags(ckpt_dir) == [f"step_{s:08d}" for s in (step + 1, step + 2)]
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("step_")) == complete_tags(ckpt_dir)


# -- pure tests (no DeepSpeed, no processes) -------------------------------------------------------------------
def _fake_checkpoint(ckpt_dir, step):
    tag = ckpt_dir / checkpoint.tag_for(step)
    tag.mkdir(parents=True)
    for name in sorted(CHECKPOINT_FILES - {MARKER}):
        (tag / name).write_bytes(b"x" * 16)
    (tag / MARKER).write_text("{}")
    return tag.name


def _rmtree_interrupted(path, ignore_errors=False, **_):
    """shutil.rmtree cut short at the worst moment: every file but the marker is gone, the directory stays."""
    for p in path.iterdir():
        if p.name != MARKER:
            p.unlink()
    if not ignore_errors:
        raise OSError(f"simulated failure while removing {path}")


def test_removing_a_checkpoint_never_leaves_a_complete_looking_remnant(tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "checkpoints"
    tags = [_fake_checkpoint(ckpt_dir, step) for step in (1, 2, 3, 4)]
    monkeypatch.setattr(shutil, "rmtree", _rmtree_interrupted)

    with pytest.raises(OSError):  # save's removal of an old target tag: the error surfaces...
        remove_tag_dir(ckpt_dir / tags[3])
    assert tags[3] not in complete_tags(ckpt_dir)  # ...but the half-deleted tag no longer counts
    checkpoint._prune(ckpt_dir, keep=1)  # pruning ignores errors: tags 1 and 2 are left half-deleted
    assert complete_tags(ckpt_dir) == [tags[2]] and latest_tag(ckpt_dir) == tags[2]
    assert CHECKPOINT_FILES <= {p.name for p in (ckpt_dir / tags[2]).iterdir()}

    monkeypatch.undo()  # the real rmtree clears the remnants at the next prune
    checkpoint._prune(ckpt_dir, keep=1)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [tags[2], tags[3]]  # newer than the newest: kept
    remove_tag_dir(ckpt_dir / tags[3])
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [tags[2]]


def test_only_sigusr1_requeues(tmp_path, monkeypatch):
    """scancel's SIGTERM stops the run with a checkpoint but must not requeue; Slurm's USR1 warning does."""
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        for signals, requeue in [
            ((signal.SIGUSR1,), True),
            ((signal.SIGTERM,), False),
            ((signal.SIGUSR1, signal.SIGTERM), False),
        ]:
            stop = preemption.StopFlag()
            for sig in signals:
                os.kill(os.getpid(), sig)
            assert stop.is_set and stop.wants_requeue is requeue
            assert preemption.requeue_slurm_job(stop) is requeue
        assert preemption.requeue_slurm_job(preemption.StopFlag()) is False  # no signal here: no requeue
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert (tmp_path / "calls").read_text() == "requeue 42\n"  # once: for the USR1 alone
