"""The tracking queue itself: order across sessions, crash safety, one delivery per target (real
MLflow SQLite stores as targets; the server URI is a free port nothing listens on)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port
from mlflow.tracking import MlflowClient

from meme_scale import tracking_queue
from meme_scale.tracking import QUEUED, TrackingUnavailable, open_tracker, sync_queue


@pytest.fixture
def offline(monkeypatch):
    """A tracking server that is away: its URI refuses connections."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setattr(tracking_queue, "FINAL_WAIT_S", 0.2)  # nothing will answer: no need to wait at the end
    return f"http://127.0.0.1:{free_port()}"


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_an_unreachable_required_server_is_a_one_line_error(offline, tmp_path):
    with pytest.raises(TrackingUnavailable, match=r"^MLflow tracking server .* does not answer") as error:
        open_tracker(True, offline, tmp_path / "run", "exp")
    assert offline in str(error.value) and "run.tracking_required=false" in str(error.value)
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()


def test_records_replay_in_order_across_sessions(offline, tmp_path):
    run_dir = tmp_path / "run"
    first = open_tracker(True, offline, run_dir, "exp", "r", tags={"model": "meme"}, required=False)
    assert first.run_id is None and first.run_ref.startswith(QUEUED)
    first.log_params({"lr": 0.1, "model.name": "meme"})
    first.set_tags({"phase": "a"})
    for step in range(1, 51):
        first.log_metrics({"loss": 100.0 - step, "kl|x": step / 10}, step)
    picture = tmp_path / "grid.png"
    picture.write_bytes(b"picture at step 50")
    first.log_artifact(picture, "pictures")
    picture.write_bytes(b"rewritten later")  # the queue keeps the file as it was when logged
    first.set_tags({"phase": "b"})
    first.finish("KILLED")
    assert first.final_metrics() == {"loss": 50.0, "kl_given_x": 5.0}

    second = open_tracker(True, offline, run_dir, "exp", "r", run_id=first.run_ref, required=False)  # a resume
    assert second.run_ref == first.run_ref
    for step in range(51, 61):
        second.log_metrics({"loss": 100.0 - step}, step)
    second.set_tags({"phase": "c"})
    second.log_dict_text("done", "notes/end.txt")
    second.finish("FINISHED")

    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    result = sync_queue(run_dir, store)
    (run_id,) = set(result["runs"].values())  # both sessions are one run
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # KILLED, RUNNING, FINISHED, in that order
    assert run.data.tags["phase"] == "c" and run.data.tags["model"] == "meme" and run.data.params["lr"] == "0.1"
    assert _history(client, run_id, "loss") == [(s, 100.0 - s) for s in range(1, 61)]
    assert [s for s, _ in _history(client, run_id, "kl_given_x")] == list(range(1, 51))
    assert (
        Path(client.download_artifacts(run_id, "pictures/grid.png", str(tmp_path))).read_bytes()
        == b"picture at step 50"
    )
    assert result["rejected"] == 0
    assert sync_queue(run_dir, store)["delivered"] == 0  # delivered once
    (run_dir / "tracking_queue" / "state.json").unlink()  # as if killed after the calls, before saving the offset
    assert sync_queue(run_dir, store)["runs"] == result["runs"]  # the run is found again, not made twice
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert _history(client, run_id, "loss") == [(s, 100.0 - s) for s in range(1, 61)]  # no metric twice


CHILD = """
import sys
from meme_scale.tracking import open_tracker
tracker = open_tracker(True, sys.argv[1], sys.argv[2], "exp", required=False)
print(tracker.run_ref, flush=True)
step = 0
while True:
    step += 1
    tracker.log_metrics({"loss": float(step)}, step)
    print(step, flush=True)
"""


def test_a_queue_written_by_a_killed_process_replays(offline, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, offline, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env
    ) as child:
        ref = child.stdout.readline().strip()
        for line in child.stdout:
            if int(line) >= 300:
                break
        child.kill()  # SIGKILL: no atexit, no flush, maybe mid-write
    with open(run_dir / "tracking_queue" / "journal.jsonl", "ab") as f:
        f.write(b'{"op":"metrics","run"')  # and a torn last record, as a kill inside write() leaves it

    resumed = open_tracker(True, offline, run_dir, "exp", run_id=ref, required=False)
    for step in range(10_001, 10_006):
        resumed.log_metrics({"loss": float(step)}, step)
    resumed.finish("FINISHED")

    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    result = sync_queue(run_dir, store)
    assert result["rejected"] == 1  # the torn line, skipped; it swallowed nothing after it
    (run_id,) = set(result["runs"].values())
    client = MlflowClient(store)
    steps = [s for s, _ in _history(client, run_id, "loss")]
    before_kill = [s for s in steps if s < 10_001]
    assert len(before_kill) >= 300 and before_kill == list(range(1, len(before_kill) + 1))  # every step, no gap
    assert steps[len(before_kill) :] == list(range(10_001, 10_006))
    assert client.get_run(run_id).info.status == "FINISHED"
