"""Shared fixtures: the real quickstart shards (built once per session) and launchers for real runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from meme_scale.engine import free_port  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def quickstart_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "quickstart"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_shards.py"), "quickstart", "--out", str(out)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    return out


def launch(
    launcher: str, args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Runs meme_scale/train.py under a real launcher; ``args`` are train.py's own arguments."""
    script = str(ROOT / "meme_scale" / "train.py")
    port = str(free_port())
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, script]
    elif launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port, script]
    elif launcher == "accelerate":
        cmd = [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(nproc),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            port,
            script,
        ]
    elif launcher == "python":
        cmd = [sys.executable, script]
    else:
        raise ValueError(launcher)
    full_env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "ACCELERATE_USE_CPU": "true",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
        **(env or {}),
    }
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(var, None)
    proc = run_group(cmd + args, timeout, cwd=ROOT, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{launcher} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def run_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` that kills the whole process group on timeout: a launcher's ranks are its
    grandchildren, and left running they would eat the CPUs of every later test."""
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"{cmd[0]} timed out after {timeout} s:\n{out[-3000:]}\n{err[-6000:]}") from None
        finally:
            try:  # ranks outliving their launcher (a crash) go too
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def train_args(data: Path, run_dir: Path, *overrides: str, config: str = "configs/quickstart.yaml") -> list[str]:
    """train.py arguments for a short quickstart run (small batches so CPU tests stay quick). fp32 unless a test
    says otherwise: `auto` would pick by the CPU the tests run on (tests/test_hardware.py covers it)."""
    return [
        "--config",
        config,
        f"data.root={data}",
        f"run.dir={run_dir}",
        "train.micro_batch_size=32",
        "train.precision=fp32",
        "run.log_every=2",
        "run.eval_every=1000",
        "run.eval_max_batches=2",
        "run.progress=lines",
        *overrides,
    ]


def start_ranks(args: list[str], nproc: int = 2, log_dir: Path | None = None) -> list[subprocess.Popen]:
    """One plain process per rank with RANK/WORLD_SIZE set, the way srun starts them (signals reach each)."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_RANK": str(rank),
            "LOCAL_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        out = open(log_dir / f"rank{rank}.log", "w") if log_dir else subprocess.DEVNULL
        procs.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "meme_scale" / "train.py"), *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    _STARTED.extend(procs)
    return procs


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_rank_outlives_its_test():
    """A failed test must not leave ranks running (they would slow every later test to a crawl)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
