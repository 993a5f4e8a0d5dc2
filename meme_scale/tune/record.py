"""A trial's record on disk (``<run_dir>/tune_trial.json``) and its MLflow child run across restarts."""

from __future__ import annotations

import json
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, flatten
from .sweep import TRIAL_RECORD


@dataclass
class TrialRecord:
    """``<run_dir>/tune_trial.json``: the trial's MLflow child run, attempts and errors across restarts."""

    path: Path
    trial_id: str = ""
    sweep: str = ""
    parent_run_id: str = ""
    tracking_uri: str = ""
    experiment: str = ""
    world_size: int = 1
    mlflow_run_id: str | None = None
    attempts: int = 0
    errors: list = field(default_factory=list)
    exploits: list = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: Path, trial_id: str = "") -> TrialRecord:
        path = Path(run_dir) / TRIAL_RECORD
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.setdefault("trial_id", trial_id)
        return cls(path, **{k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "path"})

    def save(self) -> None:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "path"}
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path)


def ensure_child_run(cfg: Config, record: TrialRecord) -> str:
    """The trial's MLflow child run: created on its first attempt (with the trial's params), continued after."""
    from ..tracking import open_tracker

    if record.mlflow_run_id:
        return record.mlflow_run_id
    tags = {
        "mlflow.parentRunId": record.parent_run_id,
        "meme_scale.sweep": record.sweep,
        "meme_scale.trial_id": record.trial_id,
        "model": cfg.model.name,
        "world_size": record.world_size,
    }
    tracker = open_tracker(True, record.tracking_uri, cfg.run.dir, record.experiment, cfg.run.run_name, tags=tags)
    tracker.log_params(flatten(cfg))  # the same strings loop.run logs, so its own log_params agrees
    record.mlflow_run_id = tracker.run_id
    record.save()
    return tracker.run_id


def mark_failed(record: TrialRecord, message: str, tb: str, run_dir: Path) -> None:
    """The child run of a failed attempt: status FAILED, the error as a tag and a text artifact, the log."""
    if not record.mlflow_run_id:
        return
    try:
        from ..tracking import update_run

        text = {f"errors/attempt_{record.attempts}.txt": f"{message}\n\n{tb}"}
        log = run_dir / "train.log"
        if log.is_file():
            text["logs/train.log"] = log.read_text(errors="replace")[-200_000:]
        first = message.strip().splitlines()[0] if message.strip() else "unknown error"
        update_run(
            record.tracking_uri,
            record.mlflow_run_id,
            status="FAILED",
            text=text,
            tags={"tune.error": first, "tune.attempts": record.attempts},
        )
    except Exception:  # tracking trouble must not hide the training error
        traceback.print_exc()
