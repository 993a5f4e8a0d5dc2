"""cluster/train.sbatch on a real single-node Slurm (slurmctld + slurmd + munge on localhost).

Opt-in: the fixture starts Slurm with cluster/local_slurm.sh (as root: it writes /etc/slurm/slurm.conf
and starts, later stops, slurmctld and slurmd), which would break a real Slurm on a cluster node. So it
runs only with MEME_SCALE_SLURM_TESTS=1 (a user opting in) or MEME_SCALE_REQUIRE_SLURM=1 (set by .ci/run);
otherwise the tests skip. With MEME_SCALE_REQUIRE_SLURM=1 a missing Slurm is a failure, so CI can never
pass by skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, summary
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
SCRIPT = ROOT / "cluster" / "train.sbatch"


_JOBS: list[str] = []  # the jobs these tests submitted: the only ones teardown may cancel


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    required = os.environ.get("MEME_SCALE_REQUIRE_SLURM") == "1"
    if not required and os.environ.get("MEME_SCALE_SLURM_TESTS") != "1":
        # Never by default: on a machine with a real Slurm (a cluster node) the fixture would overwrite
        # /etc/slurm/slurm.conf and stop its daemons.
        pytest.skip(
            "Slurm tests start their own slurmctld/slurmd as root, rewriting /etc/slurm/slurm.conf; "
            "opt in with MEME_SCALE_SLURM_TESTS=1 on a machine without a real Slurm "
            "(set up with: sudo cluster/local_slurm.sh install)"
        )
    missing = [
        b
        for b in ("sbatch", "slurmctld", "slurmd", "munged")
        if shutil.which(b) is None and not Path("/usr/sbin", b).exists()
    ]
    if missing or os.geteuid() != 0:
        why = (
            f"no local Slurm ({'missing ' + ', '.join(missing) if missing else 'not root'}); "
            "install with: sudo cluster/local_slurm.sh install"
        )
        if required:
            pytest.fail(why)
        pytest.skip(why)
    state = tmp_path_factory.mktemp("slurm")
    subprocess.run([str(ROOT / "cluster" / "local_slurm.sh"), "start", str(state)], check=True, timeout=120)
    yield state
    if _JOBS:  # a failed test's job must not run on under later tests
        subprocess.run(["scancel", *_JOBS], check=False)
        deadline = time.time() + 60
        while (
            time.time() < deadline
            and subprocess.run(["squeue", "-h", "-j", ",".join(_JOBS)], capture_output=True, text=True).stdout.strip()
        ):
            time.sleep(1)
    subprocess.run([str(ROOT / "cluster" / "local_slurm.sh"), "stop", str(state)], check=False, timeout=60)


def _env() -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "MEME_SCALE_REPO": str(ROOT),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
    }


def _submit(cwd: Path, name: str, *args: str) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", f"--job-name={name}", str(SCRIPT), *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    job = out.stdout.strip().split(";")[0]
    _JOBS.append(job)
    return job


def _job(job: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def _wait(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        str(ROOT / "configs" / "quickstart.yaml"),
        f"data.root={data}",
        f"run.dir={run_dir}",
        "train.micro_batch_size=32",
        "run.progress=lines",
        "run.eval_max_batches=2",
        *extra,
    ]


def _finished(job: str) -> str | None:
    state = _job(job).get("JobState")
    return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None


def test_sbatch_two_tasks_completes(slurm, quickstart_shards, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(tmp_path, "meme_ok", *_args(quickstart_shards, run_dir, "train.max_steps=6"))
    state = _wait(lambda: _finished(job), 240, f"job {job}")
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert state == "COMPLETED", (tmp_path / f"meme_scale-{job}.out").read_text() + "".join(
        (tmp_path / "logs" / name).read_text()[-2000:] for name in logs
    )
    assert logs == [f"meme_ok-{job}-rank0.out", f"meme_ok-{job}-rank1.out"]  # a log per job and rank
    info = summary(run_dir)
    assert info["world_size"] == 2 and info["step"] == 6
    assert (run_dir / "checkpoints" / "step_00000006" / "meme_scale.json").is_file()
    run = MlflowClient(info["tracking_uri"]).get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED"


def test_usr1_checkpoints_requeues_and_finishes(slurm, quickstart_shards, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(
        tmp_path,
        "meme_usr1",
        *_args(quickstart_shards, run_dir, "train.max_steps=200", "run.log_every=10", "run.checkpoint_every=1000"),
    )
    rank0 = tmp_path / "logs" / f"meme_usr1-{job}-rank0.out"
    _wait(lambda: rank0.is_file() and "step 20/200" in rank0.read_text(), 240, "20 training steps")
    subprocess.run(["scancel", "--signal=USR1", job], check=True)

    # The ranks agree on the stop, checkpoint together, rank 0 requeues: the job goes back to pending.
    _wait(lambda: _job(job).get("Restarts") == "1", 120, "the requeue")
    first = _wait(lambda: (run_dir / "summary.json").is_file() and summary(run_dir), 60, "the first summary")
    assert first["stopped_by"] == "signal" and 20 <= first["step"] < 200
    assert (run_dir / "checkpoints" / "step_{:08d}".format(first["step"]) / "meme_scale.json").is_file()
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)  # skip requeue delay

    state = _wait(lambda: _finished(job), 300, f"requeued job {job}")
    assert state == "COMPLETED", rank0.read_text()[-3000:]
    final = summary(run_dir)
    assert final["step"] == 200 and final["stopped_by"] is None
    assert final["mlflow_run_id"] == first["mlflow_run_id"]  # the same MLflow run continued
    # The requeued job writes to the same per-rank files (same job id): they hold both runs, in order.
    text = rank0.read_text()
    first_done = text.find(f"done: step {first['step']};")
    tag = "step_{:08d}".format(first["step"])
    resumed = text.find(f"resumed from {run_dir / 'checkpoints' / tag}")
    assert 0 <= text.find("step 20/200") < first_done < resumed < text.find("done: step 200;"), text[-3000:]
    history = MlflowClient(final["tracking_uri"]).get_metric_history(final["mlflow_run_id"], "loss")
    assert max(m.step for m in history) == 200
    assert json.loads((run_dir / "checkpoints" / "step_00000200" / "meme_scale.json").read_text())["step"] == 200
