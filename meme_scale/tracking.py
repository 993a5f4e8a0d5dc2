"""MLflow tracking (this module and its queue, tracking_queue.py, are the only ones that import mlflow).

Rank 0 owns the run; other ranks get a no-op. Two kinds of store:

- Local (the default ``sqlite:///<run.dir>/mlflow.db`` with artifacts in ``<run.dir>/mlartifacts``, or
  any other non-HTTP URI): ``MlflowTracker``, every call reaches the store before it returns. (A
  ``file:`` store needs an opt-in in MLflow 3, and without an explicit artifact location artifacts
  would land in the current directory.)
- An MLflow server (``http://``, ``https://``): ``QueuedTracker``. A call appends a record to the
  on-disk queue ``<run.dir>/tracking_queue`` and returns at once; a sender thread delivers it, retrying
  with backoff while the server is away, and the run's end waits a few seconds for it. What is still
  queued then stays on disk: the next session of the run delivers it, or ``meme-scale sync RUN_DIR``.

Start-up with a server: one probe with MLflow's own client at 0 retries and a 5 s timeout
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT``, which MLflow reads on every
request). No answer: ``TrackingUnavailable``, one line naming the URI, unless ``required`` is false
(``run.tracking_required``): then the run trains and queues, and its MLflow run is created when the
server answers. Until then ``run_id`` is None and ``run_ref`` is ``"queued:<key>"``: the loop stores
``run_ref`` in checkpoints (it becomes the MLflow id in the first checkpoint after the creation), a
resume passes it back, and the queue's state.json maps the key to the run once it exists, so every
session logs to one MLflow run. summary.json holds the MLflow id, or null and the queue's count.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from .tracking_queue import (
    Delivery,
    Journal,
    Sender,
    TransientError,
    artifact_location,
    is_transient,
    short_reason,
)

log = logging.getLogger(__name__)
QUEUED = "queued:"  # run_ref of a run the server has not created yet
PROBE_TIMEOUT_S = 5  # start-up: one try, so an unreachable server is an error within seconds
SEND_TIMEOUT_S = "30"  # the sender's requests (the queue retries; MLflow's own retries are off)
_RETRIES, _TIMEOUT = "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer (at start-up, or to ``meme-scale sync``)."""


def default_tracking_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def is_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


class NullTracker:
    """What non-zero ranks (and tracking-free tools) get: every call does nothing."""

    run_id: str | None = None
    tracking_uri: str | None = None

    @property
    def run_ref(self) -> str | None:
        """What a checkpoint stores to find this run again: the MLflow id, or the queue's key for it."""
        return self.run_id

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict_text(self, text: str, name: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...

    def final_metrics(self) -> dict[str, float]:
        return {}

    def summary_fields(self) -> dict[str, Any]:
        return {}


class _Recording(NullTracker):
    """Keeps the newest value of each metric this process logged: summary.json's "final" comes from
    here, not from the server (which may be away)."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[int, float]] = {}

    def _remember(self, metrics: dict[str, float], step: int) -> dict[str, float]:
        values = {_metric_key(k): float(v) for k, v in metrics.items()}
        for k, v in values.items():
            if k not in self._latest or step >= self._latest[k][0]:
                self._latest[k] = (step, v)
        return values

    def final_metrics(self) -> dict[str, float]:
        return {k: v for k, (_, v) in self._latest.items()}

    def summary_fields(self) -> dict[str, Any]:
        return {"mlflow_run_id": self.run_id}


class MlflowTracker(_Recording):
    """A local store: each call is done when it returns."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str = "",
        run_id: str | None = None,
        artifact_root: str | Path | None = None,
        tags: dict[str, str] | None = None,
    ):
        super().__init__()
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        from mlflow.tracking import MlflowClient

        if run_id and run_id.startswith(QUEUED):
            raise ValueError(
                f"the checkpoint's MLflow run ({run_id}) is still queued for a tracking server; "
                f"resume with that run.tracking_uri, not {tracking_uri}"
            )
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
            location = (
                Path(artifact_root).resolve().as_uri() if artifact_root is not None else artifact_location(tracking_uri)
            )
            experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        run = self.client.create_run(experiment_id, run_name=run_name or None, tags=tags or {})
        self.run_id = run.info.run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        items = [Metric(k, v, now, step) for k, v in self._remember(metrics, step).items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class QueuedTracker(_Recording):
    """An MLflow server: each call is a record in ``<run.dir>/tracking_queue``; a thread sends them."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_dir: str | Path,
        run_name: str = "",
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        required: bool = True,
    ):
        super().__init__()
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        os.environ.setdefault(_RETRIES, "0")  # the queue retries, with backoff, without holding anyone up
        os.environ.setdefault(_TIMEOUT, SEND_TIMEOUT_S)
        self.tracking_uri = tracking_uri
        self.run_dir = Path(run_dir)
        self.journal = Journal(run_dir)
        self.delivery = Delivery(self.journal, tracking_uri)
        away = _probe(self.delivery.client, run_id)
        if away and required:
            raise _unavailable(tracking_uri, away, self.journal.dir)
        if away:
            log.warning(
                "MLflow tracking server %s does not answer (%s): training anyway; tracking is queued in %s "
                "and sent when the server answers (or by: meme-scale sync %s)",
                tracking_uri,
                away,
                self.journal.dir,
                self.run_dir,
            )
        self.journal.open(tracking_uri)
        runs = self.journal.load_state()["targets"].get(tracking_uri.rstrip("/"), {}).get("runs", {})
        self.delivery.runs = dict(runs)  # a resumed queued run may have been created since
        self._known_id = None
        spec = {"experiment": experiment, "run_name": run_name, "tags": tags or {}, "time": _now_ms()}
        if run_id and run_id.startswith(QUEUED):  # a resume of a run created through the queue (or still to be)
            self._key = run_id.removeprefix(QUEUED)
        elif run_id:  # a resume (or a sweep's child run): the run exists on this server
            self._key = next((k for k, v in runs.items() if v == run_id), run_id)
            self._known_id = run_id
            self._append({"op": "open", "run_id": run_id, "uri": tracking_uri, **spec})
        else:
            self._key = uuid.uuid4().hex[:16]
            self._append({"op": "create", **spec})
        if run_id:
            self._append({"op": "status", "status": "RUNNING", "time": _now_ms()})
        if not away and not run_id:  # create the run now: its id belongs in the logs (and a sweep's record)
            try:
                with _fast_http():
                    self.delivery.deliver()
            except TransientError as e:
                log.warning("MLflow tracking server %s stopped answering (%s): the run is queued", tracking_uri, e)
        self._sender = Sender(self.delivery)
        self._closed = False
        atexit.register(self.close)  # a tracker nobody finishes (a sweep's) still sends what it has

    @property
    def run_id(self) -> str | None:
        return self.delivery.runs.get(self._key) or self._known_id

    @property
    def run_ref(self) -> str:
        return self.run_id or QUEUED + self._key

    def _append(self, record: dict) -> None:
        self.journal.append({**record, "run": self._key})
        sender = getattr(self, "_sender", None)
        if sender is not None:
            sender.wake.set()

    def log_params(self, params: dict) -> None:
        self._append({"op": "params", "params": {k: str(v)[:6000] for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._append({"op": "metrics", "step": int(step), "time": _now_ms(), "metrics": self._remember(metrics, step)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._append({"op": "artifact", "path": self.journal.keep_file(path), "artifact_path": artifact_path})

    def log_dict_text(self, text: str, name: str) -> None:
        self._append({"op": "text", "text": text, "name": name})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._append({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def finish(self, status: str = "FINISHED") -> None:
        self._append({"op": "status", "status": status, "time": _now_ms()})
        self.close()

    def close(self) -> None:
        """Sends what is queued, giving up after FINAL_WAIT_S without progress; says what stays queued."""
        if self._closed:
            return
        self._closed = True
        self._sender.stop(join_timeout=float(os.environ.get(_TIMEOUT, SEND_TIMEOUT_S)))
        self.journal.sync_to_disk()
        left = self.journal.pending(self.tracking_uri)
        if left:
            log.warning(
                "%d tracking record(s) of MLflow run %s not delivered to %s (%s); they are kept in %s: "
                "deliver them with: meme-scale sync %s",
                left,
                self.run_id or "(not created yet)",
                self.tracking_uri,
                self._sender.last_error or "not sent yet",
                self.journal.dir,
                self.run_dir,
            )

    def summary_fields(self) -> dict[str, Any]:
        return {
            "mlflow_run_id": self.run_id,
            "tracking_queue": {"dir": str(self.journal.dir), "pending": self.journal.pending(self.tracking_uri)},
        }


def tracking_problem(tracking_uri: str, required: bool, run_dir: str | Path) -> str | None:
    """Why a run cannot start (a required tracking server that does not answer), or None. A run asks
    first, so a wrong URL costs seconds, not the minutes of setting up a model before open_tracker."""
    if required and is_server(tracking_uri or ""):
        from mlflow.tracking import MlflowClient

        away = _probe(MlflowClient(tracking_uri=tracking_uri), None)
        if away:
            return str(_unavailable(tracking_uri, away, Journal(run_dir).dir))
    return None


def _probe(client, run_id: str | None) -> str | None:
    """None when the server answers, else why not. A server that answers "no" raises (a wrong run id)."""
    try:
        with _fast_http():
            if run_id and not run_id.startswith(QUEUED):
                client.get_run(run_id)
            else:
                client.search_experiments(max_results=1)
    except Exception as e:
        if is_transient(e):
            return short_reason(e)
        raise
    return None


def _unavailable(tracking_uri: str, why: str, queue_dir: Path) -> TrackingUnavailable:
    return TrackingUnavailable(
        f"MLflow tracking server {tracking_uri} does not answer ({why}): start it, correct "
        "run.tracking_uri, or set run.tracking_required=false to train anyway and queue the "
        f"tracking in {queue_dir}"
    )


def _fast_http():
    """MLflow requests made inside: one try, a short timeout (MLflow reads both variables per request)."""
    return _http_limits({_RETRIES: "0", _TIMEOUT: str(PROBE_TIMEOUT_S)})


@contextlib.contextmanager
def _http_limits(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _now_ms() -> int:
    return int(time.time() * 1000)


def _metric_key(name: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / only; our term names use "|" for "given".
    return name.replace("|", "_given_")


def open_tracker(
    is_main: bool,
    tracking_uri: str,
    run_dir: str | Path,
    experiment: str,
    run_name: str = "",
    run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    required: bool = True,
) -> NullTracker:
    """The tracker of a run: a no-op off rank 0; queued for a server; direct for a local store.
    ``run_id``: a run to continue (an MLflow id or a checkpoint's ``run_ref``). ``required``: False lets
    a run start while its server is away (run.tracking_required)."""
    if not is_main:
        return NullTracker()
    uri = tracking_uri or default_tracking_uri(run_dir)
    tags = {k: str(v) for k, v in (tags or {}).items()}
    if is_server(uri):
        return QueuedTracker(uri, experiment, run_dir, run_name, run_id, tags, required)
    return MlflowTracker(uri, experiment, run_name, run_id, tags=tags)


def sync_queue(run_dir: str | Path, tracking_uri: str | None = None) -> dict:
    """Delivers a run dir's tracking queue: to the server it was for, or to ``tracking_uri`` (a new run
    there with the queue's whole history). Raises TrackingUnavailable (with what is left) if the server
    stops answering; running it again continues."""
    journal = Journal(run_dir)
    if not journal.exists():
        raise FileNotFoundError(f"no tracking queue in {run_dir} ({journal.path} does not exist)")
    uri = tracking_uri or journal.info().get("tracking_uri")
    if not uri:
        raise ValueError(f"{journal.dir / 'queue.json'} names no tracking URI: pass --tracking-uri")
    delivery = Delivery(journal, uri)
    try:
        with _http_limits(
            {_RETRIES: os.environ.get(_RETRIES, "0"), _TIMEOUT: os.environ.get(_TIMEOUT, SEND_TIMEOUT_S)}
        ):
            delivery.deliver()
    except TransientError as e:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} does not answer ({e}): "
            f"{journal.pending(uri)} record(s) still queued in {journal.dir}"
        ) from e
    return {
        "tracking_uri": uri,
        "delivered": delivery.delivered,
        "rejected": delivery.rejected,
        "runs": dict(delivery.runs),
    }


def update_run(
    tracking_uri: str,
    run_id: str,
    tags: dict[str, Any] | None = None,
    status: str | None = None,
    text: dict[str, str] | None = None,
) -> None:
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
