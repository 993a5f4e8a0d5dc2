"""MLflow tracking (the only module that imports mlflow). Rank 0 owns the run; other ranks get a no-op.

Default store: ``sqlite:///<run.dir>/mlflow.db`` with artifacts in ``<run.dir>/mlartifacts`` (a
``file:`` store needs an opt-in in MLflow 3, and without an explicit artifact location artifacts
would land in the current directory). Any tracking URI, a real ``mlflow server`` included, by config.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def default_tracking_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


class NullTracker:
    """What non-zero ranks (and tracking-free tools) get: every call does nothing."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict_text(self, text: str, name: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    def __init__(self, tracking_uri: str, experiment: str, run_name: str = "", run_id: str | None = None,
                 artifact_root: str | Path | None = None, tags: dict[str, str] | None = None):  # fmt: skip
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        if run_id:  # resume: continue the run the checkpoint names
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            location = None
            if artifact_root is not None:
                location = Path(artifact_root).resolve().as_uri()
            experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        run = self.client.create_run(experiment_id, run_name=run_name or None, tags=tags or {})
        self.run_id = run.info.run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _metric_key(name: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / only; our term names use "|" for "given".
    return name.replace("|", "_given_")


def open_tracker(is_main: bool, tracking_uri: str, run_dir: str | Path, experiment: str, run_name: str = "",
                 run_id: str | None = None, tags: dict[str, Any] | None = None) -> NullTracker:  # fmt: skip
    if not is_main:
        return NullTracker()
    uri = tracking_uri or default_tracking_uri(run_dir)
    artifact_root = None
    if uri.startswith("sqlite:///"):
        artifact_root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    return MlflowTracker(uri, experiment, run_name, run_id, artifact_root, {k: str(v) for k, v in (tags or {}).items()})


def update_run(tracking_uri: str, run_id: str, tags: dict[str, Any] | None = None, status: str | None = None,
               text: dict[str, str] | None = None) -> None:  # fmt: skip
    """Tags, text artifacts ({name: text}) and/or the terminal status of an existing run (sweep summaries)."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, str(v)[:5000])
    for name, body in (text or {}).items():
        client.log_text(run_id, body, name)
    if status is not None:
        client.set_terminated(run_id, status=status)


def delete_run(tracking_uri: str, run_id: str) -> None:
    """Marks a run deleted (MLflow's soft delete: ``mlflow runs restore`` brings it back)."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).delete_run(run_id)
