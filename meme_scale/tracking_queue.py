"""The tracking queue: a run's tracking calls on disk, in order, until an MLflow server has them.

``<run.dir>/tracking_queue/``:

    journal.jsonl  one JSON record per call, appended with a single write() and never rewritten, so a
                   killed process loses at most the record it was writing (a call that never returned)
    state.json     per target URI: the journal offset delivered so far and the MLflow id of each run
    files/         copies of small artifacts, taken when they were logged (the run dir changes later)
    queue.json     the queue's id and the URI it was last opened for (``meme-scale sync``'s default)
    .lock          one deliverer at a time (a training rank's sender thread, ``meme-scale sync``)

Every target URI gets the whole journal once, in order: the server a run started against continues
where it stopped; another server (``meme-scale sync RUN_DIR --tracking-uri URL``) gets the run's full
history as a new run. Delivery is at least once (a crash between a call and the saved offset repeats
that call): MLflow keeps one copy of a repeated metric, param or tag, and a run created from the queue
carries the tag ``meme_scale.queue_run``, so a repeated creation finds its run instead of making a second.

Records (``run`` is the queue's own key for a run, stable across targets):
``open`` (an existing run: run_id on uri), ``create``, ``params``, ``metrics``, ``tags``, ``artifact``,
``text``, ``status``. This module keeps the journal and delivers it; only it and tracking.py import mlflow.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)
QUEUE_DIR = "tracking_queue"
RUN_TAG = "meme_scale.queue_run"
COPY_LIMIT = (
    8 * 2**20
)  # artifacts up to this size are copied when logged (pictures, configs); larger ones are read when sent
METRICS_PER_CALL = 1000  # MLflow's log_batch limits
PARAMS_PER_CALL = 100
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 4.0  # the sender's backoff while the server is away
SEND_EVERY_S = 1.0  # records logged within this go in one request (a request per step slowed steps 1.5-15x here)
FINAL_WAIT_S = 3.0  # at the end of a run: how long to keep trying once nothing gets through


class TransientError(Exception):
    """The server did not answer (down, unreachable, timed out, 5xx, 429): keep the records, retry later."""


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store (else MLflow would use ./mlruns)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None  # a server decides (its --artifacts-destination)


def is_transient(error: BaseException) -> bool:
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):  # connection errors and timeouts arrive as INTERNAL_ERROR (500)
        status = error.get_http_status_code()
        return status >= 500 or status == 429
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return error.response.status_code >= 500 or error.response.status_code == 429
    if isinstance(error, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return False
    return isinstance(error, (requests.RequestException, OSError))


class Journal:
    """The on-disk queue of one run dir: appends from the training process, reads from a deliverer."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / QUEUE_DIR
        self.path = self.dir / "journal.jsonl"
        self._fd: int | None = None

    def exists(self) -> bool:
        return self.path.is_file()

    def info(self) -> dict:
        meta = self.dir / "queue.json"
        return json.loads(meta.read_text()) if meta.is_file() else {}

    def open(self, tracking_uri: str) -> None:
        """Ready for appends; records which URI the queue is for now."""
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.info()
        info.setdefault("id", uuid.uuid4().hex)
        _atomic_write(self.dir / "queue.json", json.dumps({**info, "tracking_uri": tracking_uri}, indent=2))
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(self._fd).st_size
            if size:
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":  # a killed writer's torn last line must not swallow our first record
                        os.write(self._fd, b"\n")

    def append(self, record: dict) -> None:
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        written = os.write(self._fd, data)  # one write: appends from two trackers never interleave
        while written < len(data):  # only on a full disk or a signal
            written += os.write(self._fd, data[written:])

    def keep_file(self, path: str | Path) -> str:
        """The path an artifact record should name: a copy for small files (the original may change)."""
        path = Path(path).resolve()
        if path.stat().st_size > COPY_LIMIT:
            return str(path)
        target = self.dir / "files" / uuid.uuid4().hex[:12] / path.name  # MLflow names the artifact after the file
        target.parent.mkdir(parents=True)
        shutil.copyfile(path, target)
        return str(target)

    def sync_to_disk(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def load_state(self) -> dict:
        path = self.dir / "state.json"
        return json.loads(path.read_text()) if path.is_file() else {"targets": {}}

    def save_state(self, state: dict) -> None:
        _atomic_write(self.dir / "state.json", json.dumps(state, indent=1))

    def records(self, offset: int) -> Iterator[tuple[int, dict | None]]:
        """(offset after the record, record) for each complete line from ``offset``; None for a torn line."""
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(offset)
            for line in f:
                if not line.endswith(b"\n"):
                    return  # being written right now (or torn by a kill: the next writer ends it)
                offset += len(line)
                if line.strip():
                    try:
                        yield offset, json.loads(line)
                    except ValueError:
                        yield offset, None

    def pending(self, tracking_uri: str) -> int:
        offset = self.load_state()["targets"].get(_target(tracking_uri), {}).get("offset", 0)
        return sum(1 for _ in self.records(offset))


class Delivery:
    """Replays a journal into one tracking URI, in order, resuming where that URI's last delivery stopped."""

    def __init__(self, journal: Journal, tracking_uri: str):
        from mlflow.tracking import MlflowClient

        self.journal, self.uri = journal, tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.runs: dict[str, str] = {}  # queue key -> MLflow run id on this URI
        self._elsewhere: dict[str, dict[str, str]] = {}  # the same for the other URIs this queue went to
        self.delivered = 0
        self.rejected = 0

    def deliver(self) -> int:
        """Sends every complete record not yet delivered to this URI. Raises TransientError when the
        server does not answer (what was sent before stays delivered). Returns how many were sent."""
        sent = 0
        with self.journal.locked():
            state = self.journal.load_state()
            target = state["targets"].setdefault(_target(self.uri), {"offset": 0, "runs": {}})
            self.runs = target["runs"]
            self._elsewhere = {uri: t["runs"] for uri, t in state["targets"].items() if uri != _target(self.uri)}
            for end, group in _groups(self.journal.records(target["offset"])):
                self._send_or_reject(group)
                target["offset"] = end
                self.journal.save_state(state)
                sent += len(group)
                self.delivered += len(group)
        return sent

    def _send_or_reject(self, group: list[dict | None]) -> None:
        try:
            self._send(group)
        except Exception as e:
            if is_transient(e):
                raise TransientError(short_reason(e)) from e
            if len(group) > 1:  # find the record the server refuses; deliver the rest
                for record in group:
                    self._send_or_reject([record])
                return
            self.rejected += 1
            log.warning(
                "tracking record refused by %s, skipped (kept in %s): %s",
                self.uri,
                self.journal.dir / "rejected.jsonl",
                e,
            )
            with open(self.journal.dir / "rejected.jsonl", "a") as f:
                f.write(json.dumps({"target": self.uri, "error": str(e)[:2000], "record": group[0]}) + "\n")

    def _send(self, group: list[dict | None]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        first = group[0]
        if first is None:
            raise ValueError("unreadable journal line (torn by a killed writer)")
        op, key = first["op"], first["run"]
        if op in ("open", "create"):
            if key not in self.runs:
                if op == "open" and _target(first["uri"]) == _target(self.uri):
                    self.runs[key] = first["run_id"]
                else:
                    self.runs[key] = self._create(first)
            return
        if key not in self.runs:
            raise ValueError(f"run {key!r} was never created on {self.uri} (its creation was refused)")
        run_id = self.runs[key]
        if op == "metrics":
            items = [Metric(k, v, r["time"], r["step"]) for r in group for k, v in r["metrics"].items()]
            self.client.log_batch(run_id, metrics=items, synchronous=True)
        elif op == "params":
            items = [Param(k, v) for k, v in first["params"].items()]
            for i in range(0, len(items), PARAMS_PER_CALL):
                self.client.log_batch(run_id, params=items[i : i + PARAMS_PER_CALL], synchronous=True)
        elif op == "tags":
            items = [RunTag(k, v) for k, v in first["tags"].items()]
            for i in range(0, len(items), PARAMS_PER_CALL):
                self.client.log_batch(run_id, tags=items[i : i + PARAMS_PER_CALL], synchronous=True)
        elif op == "artifact":
            if not Path(first["path"]).is_file():
                raise FileNotFoundError(f"artifact {first['path']} is gone")
            self.client.log_artifact(run_id, first["path"], first.get("artifact_path"))
        elif op == "text":
            self.client.log_text(run_id, first["text"], first["name"])
        elif op == "status":
            if first["status"] == "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            else:
                self.client.set_terminated(run_id, status=first["status"], end_time=first["time"])
        else:
            raise ValueError(f"unknown tracking record {op!r}")

    def _create(self, record: dict) -> str:
        """The run for ``record`` on this URI: found by its queue tag (a retried creation), else created."""
        marker = f"{self.journal.info().get('id', '')}/{record['run']}"
        found = self.client.get_experiment_by_name(record["experiment"])
        if found is None:
            experiment_id = self.client.create_experiment(record["experiment"], artifact_location(self.uri))
        else:
            experiment_id = found.experiment_id
            runs = self.client.search_runs([experiment_id], f"tags.`{RUN_TAG}` = '{marker}'", max_results=1)
            if runs:
                return runs[0].info.run_id
        tags = {**record.get("tags", {}), RUN_TAG: marker}
        origins = {uri: runs[record["run"]] for uri, runs in self._elsewhere.items() if record["run"] in runs}
        if record["op"] == "open":
            origins[_target(record["uri"])] = record["run_id"]
        if origins:  # a copy of a run that lives on another server
            tags["meme_scale.copied_from"] = "; ".join(f"{uri} run {run_id}" for uri, run_id in sorted(origins.items()))
        run = self.client.create_run(
            experiment_id, start_time=record["time"], tags=tags, run_name=record.get("run_name") or None
        )
        self.runs[record["run"]] = run.info.run_id
        return run.info.run_id


class Sender:
    """The thread that delivers the queue: at once while the server answers, with backoff while it does not."""

    def __init__(self, delivery: Delivery):
        self.delivery, self.journal, self.uri = delivery, delivery.journal, delivery.uri
        self.wake = threading.Event()
        self._stopping = threading.Event()
        self.last_error: str | None = None
        self._stopping_since: float | None = None
        self._last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="mlflow-sender", daemon=True)
        self.wake.set()  # what is queued already (an earlier session's records) goes first
        self._thread.start()

    def stop(self, join_timeout: float) -> None:
        """Sends what is queued; returns once all is sent or FINAL_WAIT_S passed without progress."""
        self._stopping_since = time.monotonic()
        self._stopping.set()
        self.wake.set()
        self._thread.join(FINAL_WAIT_S + join_timeout + 5)  # a hung request must not hang the run's end

    def _loop(self) -> None:
        backoff, down_since, synced = 0.0, None, time.monotonic()
        while True:
            self.wake.wait()  # set at the start, by each record, by stop(), and after a pause below
            self.wake.clear()
            before = self.delivery.delivered
            try:
                self.delivery.deliver()
                failed = None
            except TransientError as e:
                failed = str(e)
            except Exception as e:  # a bug here must not end the delivery of everything after it
                log.exception("tracking sender error")
                failed = f"{type(e).__name__}: {e}"
            now = time.monotonic()
            if self.delivery.delivered > before:
                self._last_progress = now
            if now - synced > 5:  # the journal survives a machine crash too, not only a killed process
                self.journal.sync_to_disk()
                synced = now
            if failed is None:
                if down_since is not None:
                    log.warning(
                        "MLflow tracking server %s answers again after %.0f s: queued tracking delivered",
                        self.uri,
                        now - down_since,
                    )
                backoff, down_since, self.last_error = 0.0, None, None
                if self._stopping_since is not None:
                    return
                self._stopping.wait(SEND_EVERY_S)  # what is logged meanwhile goes in one request
                continue
            if down_since is None:
                down_since = now
                log.warning(
                    "MLflow tracking server %s does not answer (%s): training goes on; tracking is queued "
                    "in %s and retried",
                    self.uri,
                    failed,
                    self.journal.dir,
                )
            self.last_error = failed
            if self._stopping_since is None:  # new records do not cut the backoff short; stop() does
                backoff = min(2 * backoff or RETRY_FIRST_S, RETRY_MAX_S)
                self._stopping.wait(backoff)
            elif now - max(self._stopping_since, self._last_progress) > FINAL_WAIT_S:
                return
            else:
                time.sleep(RETRY_FIRST_S)
            self.wake.set()


def _groups(records: Iterator[tuple[int, dict | None]]) -> Iterator[tuple[int, list]]:
    """Consecutive metric records of one run go in one call (a replay after an outage is fast)."""
    group, end, count = [], 0, 0
    for offset, record in records:
        mergeable = record is not None and record["op"] == "metrics"
        if group and not (
            mergeable
            and group[0] is not None
            and group[0]["op"] == "metrics"
            and group[0]["run"] == record["run"]
            and count + len(record["metrics"]) <= METRICS_PER_CALL
        ):
            yield end, group
            group, count = [], 0
        group.append(record)
        count += len(record["metrics"]) if mergeable else 0
        end = offset
    if group:
        yield end, group


def _target(uri: str) -> str:
    return uri.rstrip("/")


def short_reason(error: BaseException) -> str:
    """One line for a connection failure (MLflow's own message runs to several hundred characters)."""
    import re

    text = str(error)
    for pattern in (
        r"\[Errno -?\d+\] [^'\"\)]+",
        r"[Rr]ead timed out[^'\"\)]*",
        r"timed out",
        r"\d{3} Server Error[^\n]*",
        r"Max retries exceeded[^(]*",
    ):
        match = re.search(pattern, text)
        if match:
            return match.group(0).strip().rstrip(".")
    return text.splitlines()[0][:200] if text else type(error).__name__


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
