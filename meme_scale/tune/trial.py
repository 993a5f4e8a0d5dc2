"""The Ray Tune trainable: one training run per trial, its reports and checkpoints handed to Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, dump_yaml, flatten, load_config
from ..engine import free_port
from .process import TrialFailed, run_training_process
from .record import TrialRecord, mark_failed
from .sweep import MARKER, override_list, plain


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs from the sweep; pickled into the Ray trainable."""

    sweep_name: str
    base: str
    fixed: dict
    internal: dict
    runs_dir: str
    exp_dir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    metric: str
    ranks: int
    cpus: float
    gpus: float


def trial_config(setup: TrialSetup, values: dict[str, Any], run_dir: Path, trial_id: str) -> Config:
    own = {
        "run.dir": str(run_dir),
        "run.tracking_uri": setup.tracking_uri,
        "run.experiment": setup.experiment,
        "run.run_name": f"{setup.sweep_name}/{trial_id}",
    }
    return load_config(setup.base, override_list({**setup.fixed, **setup.internal, **values, **own}))


def run_trial(config: dict, setup: TrialSetup) -> None:
    """The Ray Tune trainable: one training run, reporting each evaluation (and its checkpoint) to Tune.

    Trains nothing itself: the training process does the work; this relays to Ray and keeps the record.
    """
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(setup.runs_dir) / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    values = {k: plain(v) for k, v in config.items()}
    cfg = trial_config(setup, values, run_dir, trial_id)
    record = TrialRecord.load(run_dir, trial_id)
    record.sweep, record.parent_run_id, record.world_size = setup.sweep_name, setup.parent_run_id, setup.ranks
    record.tracking_uri, record.experiment = setup.tracking_uri, setup.experiment
    record.attempts += 1
    record.save()
    if setup.ranks == 1:
        restore_checkpoint(tune.get_checkpoint(), run_dir, cfg, record)
    cfg_path = run_dir / "trial_config.yaml"
    cfg_path.write_text(dump_yaml(cfg))
    try:
        if setup.ranks == 1:
            _one_process(cfg, cfg_path, run_dir, setup.metric)
        else:
            _ranks(cfg, cfg_path, run_dir, setup, trial_id)
    except Exception as e:
        message = str(e) if isinstance(e, TrialFailed) else f"{type(e).__name__}: {e}"
        record = TrialRecord.load(run_dir, trial_id)  # the training process may have added its MLflow run
        record.errors.append({"attempt": record.attempts, "error": message.split("\n--- end of ")[0][-4000:]})
        record.save()
        if not getattr(e, "tracked", False):
            mark_failed(record, message, traceback.format_exc(), run_dir)
        raise


def _newest_tag(ckpt_dir: Path) -> str | None:
    """checkpoint.latest_tag without importing torch into the Ray worker."""
    if not ckpt_dir.is_dir():
        return None
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("step_") and (p / MARKER).is_file())
    return tags[-1] if tags else None


def restore_checkpoint(ckpt, run_dir: Path, cfg: Config, record: TrialRecord) -> None:
    """Puts the checkpoint Ray hands this trial (a retry, a resumed sweep, PBT's exploit) where loop.run resumes.

    The trial's own checkpoint: its run dir already has it or a newer one, unless the dir was lost.
    Another trial's (PBT exploit): it replaces this trial's checkpoints and keeps this trial's MLflow run.
    """
    if ckpt is None:
        return
    ckpt_dir = run_dir / "checkpoints"
    with ckpt.as_directory() as src:
        src = Path(src)
        meta = json.loads((src / MARKER).read_text())
        tag = meta["tag"]
        donor = meta.get("config", {}).get("run.dir")
        if donor and Path(donor).resolve() != run_dir.resolve():
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            _copy_tag(src, ckpt_dir, tag)
            meta.update(run_id=record.mlflow_run_id, config=flatten(cfg))
            (ckpt_dir / tag / MARKER).write_text(json.dumps(meta, indent=2))
            record.exploits.append({"attempt": record.attempts, "from": Path(donor).name, "tag": tag})
            record.save()
        elif (local := _newest_tag(ckpt_dir)) is None or local < tag:
            _copy_tag(src, ckpt_dir, tag)


def _copy_tag(src: Path, ckpt_dir: Path, tag: str) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".restoring-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".metadata.json"))
    shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    os.replace(tmp, ckpt_dir / tag)


def _one_process(cfg: Config, cfg_path: Path, run_dir: Path, metric: str) -> None:
    from ray import tune

    ckpt_dir = run_dir / "checkpoints"
    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port("")),
    }

    def on_report(metrics: dict, step: int, proc: subprocess.Popen) -> None:
        _check_metric(metrics, metric, step)
        tag = _saved_with_report(ckpt_dir, step, cfg, proc)
        checkpoint = tune.Checkpoint.from_directory(str(ckpt_dir / tag)) if tag else None
        tune.report({**metrics, "step": step}, checkpoint=checkpoint)

    run_training_process(cfg_path, run_dir, env, on_report, cfg.train.max_steps)


def _saved_with_report(ckpt_dir: Path, step: int, cfg: Config, proc: subprocess.Popen) -> str | None:
    """The checkpoint tag loop.run writes right after reporting ``step`` (None if it writes none then).

    Waiting for it makes Ray's copy match the result it is reported with.
    """
    if step % cfg.run.checkpoint_every and step != cfg.train.max_steps:
        return None
    return _wait_for_tag(ckpt_dir, f"step_{step:08d}", proc)


def _wait_for_tag(ckpt_dir: Path, tag: str, proc: subprocess.Popen, timeout: float = 600.0) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (ckpt_dir / tag / MARKER).is_file():
            return tag
        if proc.poll() is not None:
            return tag if (ckpt_dir / tag / MARKER).is_file() else None
        time.sleep(0.05)
    return None


def _check_metric(metrics: dict, metric: str, step: int) -> None:
    if metric != "step" and metric not in metrics:
        raise TrialFailed(f"training reported no {metric!r} at step {step} (it reported: {', '.join(sorted(metrics))})")


def _ranks(cfg: Config, cfg_path: Path, run_dir: Path, setup: TrialSetup, trial_id: str) -> None:
    """A multi-rank trial: a Ray Train TorchTrainer whose workers (one per rank) each start one training process.

    ``run.dir`` must be on a filesystem all nodes share (every rank writes its part of each checkpoint
    there). Rank 0 reports each complete checkpoint to Ray too, so a retried trial whose run dir
    was lost resumes from Ray's copy.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    per_rank = {"CPU": setup.cpus / setup.ranks}
    if setup.gpus:
        per_rank["GPU"] = setup.gpus / setup.ranks
    trainer = TorchTrainer(
        rank_worker,
        train_loop_config={
            "config_path": str(cfg_path),
            "run_dir": str(run_dir),
            "metric": setup.metric,
            "max_steps": cfg.train.max_steps,
        },
        scaling_config=ScalingConfig(num_workers=setup.ranks, use_gpu=setup.gpus > 0, resources_per_worker=per_rank),
        run_config=RunConfig(
            name=trial_id,
            storage_path=str(Path(setup.exp_dir) / "train"),
            callbacks=[TuneReportCallback()],
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    trainer.fit()


def rank_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function: rank r of a multi-rank trial, in its own training process."""
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg_path, run_dir = Path(loop_config["config_path"]), Path(loop_config["run_dir"])
    cfg = load_config(cfg_path)
    if rank == 0:  # before the broadcast below, so no rank starts training before the restore is done
        restore_checkpoint(ray.train.get_checkpoint(), run_dir, cfg, TrialRecord.load(run_dir))
    box = [free_port("") if rank == 0 else None]  # training gets its own process group, beside Ray Train's
    dist.broadcast_object_list(box, src=0)
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(ctx.get_local_rank()),
        "LOCAL_SIZE": str(ctx.get_local_world_size()),
        "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
        "MASTER_PORT": str(box[0]),
    }

    def on_report(metrics: dict, step: int, proc: subprocess.Popen) -> None:
        _check_metric(metrics, loop_config["metric"], step)
        tag = _saved_with_report(run_dir / "checkpoints", step, cfg, proc) if rank == 0 else None
        checkpoint = ray.train.Checkpoint.from_directory(str(run_dir / "checkpoints" / tag)) if tag else None
        ray.train.report({**metrics, "step": step}, checkpoint=checkpoint)  # every rank reports: Ray syncs them

    run_training_process(cfg_path, run_dir, env, on_report, cfg.train.max_steps)
