"""Training survives its tracking server: real `mlflow server` processes on 127.0.0.1, stopped and
restarted under a real training run (issue 14, part 3)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port, start_ranks, summary, train_args
from mlflow.tracking import MlflowClient

from meme_scale.tracking import TrackingUnavailable, sync_queue

pytestmark = pytest.mark.slow


class Server:
    """A real MLflow tracking server (SQLite store, proxied artifacts) that a test can stop and restart."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = root, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> Server:
        cmd = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'srv.db'}",
            "--artifacts-destination",
            str(self.root / "art"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        with open(self.root / "server.log", "a") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.root,
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            )
        return self

    def wait_healthy(self, timeout: float = 90) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"mlflow server {self.uri} not healthy after {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The run's server, and a second one for deliveries after the fact (it starts while the first tests run)."""
    first, second = Server(tmp_path_factory.mktemp("server")).start(), Server(tmp_path_factory.mktemp("new")).start()
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture
def server(servers):
    """The run's server, answering (a test before may have stopped it)."""
    if servers[0].proc.poll() is not None:
        servers[0].start()
    return servers[0].wait_healthy()


@pytest.fixture
def new_server(servers):
    return servers[1]


def _train(shards: Path, run_dir: Path, uri: str, *overrides: str) -> subprocess.Popen:
    args = train_args(
        shards, run_dir, f"run.tracking_uri={uri}", "run.log_every=1", "run.checkpoint_every=1000", *overrides
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    return start_ranks(args, nproc=1, log_dir=run_dir)[0]


def _wait_for_step(proc: subprocess.Popen, log: Path, step: int, timeout: float = 120) -> int:
    """Waits until the run's progress lines reach ``step``; returns the newest step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(s) for s in re.findall(r"step (\d+)/", log.read_text())] if log.is_file() else []
        if steps and steps[-1] >= step:
            return steps[-1]
        assert proc.poll() is None, f"the run ended before step {step}:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 180) -> str:
    proc.wait(timeout)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def _steps(client: MlflowClient, run_id: str, key: str = "loss") -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_server_stopped_mid_run_and_restarted(quickstart_shards, tmp_path, server):
    run_dir = tmp_path / "run"
    steps = 300
    proc = _train(quickstart_shards, run_dir, server.uri, f"train.max_steps={steps}")
    log = run_dir / "rank0.log"
    _wait_for_step(proc, log, 10)
    server.stop()
    away_from = _wait_for_step(proc, log, 0) + 1
    server.start()  # same port, same store; the run keeps training while it starts
    away_until = _wait_for_step(proc, log, away_from + 5)
    text = _finish(proc, log)

    info = summary(run_dir)
    assert info["status"] == "finished" and info["tracking_queue"]["pending"] == 0
    assert "does not answer" in text and "answers again" in text  # it really was away, and came back
    client = MlflowClient(server.uri)
    run = client.get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id) == list(range(1, steps + 1))  # every step, the outage's included
    assert set(range(away_from, away_until + 1)) <= set(_steps(client, run.info.run_id, "samples_per_s"))
    assert run.data.params["train.max_steps"] == str(steps)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "model", "pictures"}
    assert info["final"]["loss"] == run.data.metrics["loss"]  # summary.json's "final" is what was logged


def test_server_gone_for_good_then_sync_delivers_to_a_new_server(quickstart_shards, tmp_path, server, new_server):
    run_dir = tmp_path / "run"
    proc = _train(quickstart_shards, run_dir, server.uri, "train.max_steps=40")
    log = run_dir / "rank0.log"
    _wait_for_step(proc, log, 5)
    server.stop()
    _finish(proc, log)

    info = summary(run_dir)
    assert info["status"] == "finished" and info["final"]["loss"] > 0
    assert info["tracking_queue"]["pending"] > 0 and (run_dir / "tracking_queue" / "journal.jsonl").is_file()
    with pytest.raises(TrackingUnavailable, match=re.escape(server.uri)):  # its own server is still away
        sync_queue(run_dir)

    new_server.wait_healthy()
    cli = [sys.executable, "-m", "meme_scale.cli", "sync", str(run_dir), "--tracking-uri", new_server.uri]
    done = subprocess.run(
        cli,
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(new_server.uri)
    copies = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.`meme_scale.copied_from` LIKE '%{info['mlflow_run_id']}'",
    )
    assert len(copies) == 1
    copy = copies[0]
    assert copy.info.status == "FINISHED" and copy.data.params["train.max_steps"] == "40"
    assert _steps(client, copy.info.run_id) == list(range(1, 41))  # the whole run, the part after the outage included
    assert sync_queue(run_dir, new_server.uri)["delivered"] == 0  # nothing twice, and no second run
    assert len(client.search_runs([copy.info.experiment_id])) == 1


def test_unreachable_at_start_is_a_clear_error_unless_not_required(quickstart_shards, tmp_path, new_server):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    proc = _train(quickstart_shards, run_dir, dead, "train.max_steps=4")
    proc.wait(120)
    elapsed = time.monotonic() - t0
    text = (run_dir / "rank0.log").read_text()
    assert proc.returncode == 2 and elapsed < 30, (elapsed, text[-3000:])
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: ") and dead in last and "run.tracking_required=false" in last
    assert "Traceback" not in text and not (run_dir / "checkpoints").exists()

    # not required: the run trains and queues; a resume once a server answers creates the MLflow run
    # from the queue and continues it, so both sessions are one run
    proc = _train(quickstart_shards, run_dir, dead, "train.max_steps=4", "run.tracking_required=false")
    _finish(proc, run_dir / "rank0.log")
    first = summary(run_dir)
    assert first["status"] == "finished" and first["mlflow_run_id"] is None and first["tracking_queue"]["pending"] > 0
    assert first["final"]["loss"] > 0

    new_server.wait_healthy()
    proc = _train(quickstart_shards, run_dir, new_server.uri, "train.max_steps=8", "--resume", "auto")
    _finish(proc, run_dir / "rank0.log")
    second = summary(run_dir)
    assert second["mlflow_run_id"] and second["tracking_queue"]["pending"] == 0
    client = MlflowClient(new_server.uri)
    run = client.get_run(second["mlflow_run_id"])
    assert run.info.status == "FINISHED" and _steps(client, run.info.run_id) == list(range(1, 9))
