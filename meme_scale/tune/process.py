"""The training process of a trial: started and watched by the Ray trial, reporting back through a pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from ..config import load_config
from .record import TrialRecord, ensure_child_run, mark_failed


class TrialFailed(RuntimeError):
    """Training raised (or its process died): the message carries the error and the log's tail."""

    def __init__(self, message: str, tracked: bool = False):
        super().__init__(message)
        self.tracked = tracked  # the training process already marked its MLflow run FAILED


def run_training_process(
    cfg_path: Path,
    run_dir: Path,
    dist_env: dict[str, str],
    on_report: Callable[[dict, int, subprocess.Popen], None],
    final_step: int,
) -> dict:
    """Runs loop.run in a child process and relays its reports; kills it if this trial is stopped.

    The report of the final step waits until the run has finished (export, summary, MLflow status),
    so a scheduler that stops the trial on that report cannot cut the run's last writes short.
    """
    package_root = str(Path(__file__).resolve().parents[2])  # the child imports this very copy of meme_scale
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # never requeue the sweep's job
    env.update(
        dist_env,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p),
    )
    read_fd, write_fd = os.pipe()
    cmd = [
        sys.executable,
        "-m",
        "meme_scale.tune",
        "--trial-process",
        str(cfg_path),
        "--report-fd",
        str(write_fd),
        "--parent-pid",
        str(os.getpid()),
    ]
    with open(run_dir / "train.log", "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} rank {dist_env['RANK']}: {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, env=env, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT, pass_fds=(write_fd,))
    os.close(write_fd)
    outcome: dict = {}
    held: list[tuple[dict, int]] = []
    reported = 0
    try:
        with os.fdopen(read_fd) as reader:
            for line in reader:
                msg = json.loads(line)
                if msg["type"] != "report":
                    outcome = msg
                elif msg["step"] >= final_step:
                    held.append((msg["metrics"], msg["step"]))
                else:
                    on_report(msg["metrics"], msg["step"], proc)
                    reported += 1
        code = proc.wait()
        if outcome.get("type") == "done" and code == 0:
            for metrics, step in held:
                on_report(metrics, step, proc)
            if not reported and not held and outcome["summary"].get("step", 0) >= final_step:
                _report_finished_run(run_dir, proc, on_report)
            return outcome["summary"]
    finally:
        if proc.poll() is None:  # stopped by the scheduler, or an error here: the run must not go on alone
            proc.kill()
            proc.wait()
    log_tail = tail(run_dir / "train.log")
    if outcome.get("type") == "error":
        raise TrialFailed(
            f"{outcome['error']}\n--- end of {run_dir / 'train.log'} ---\n{log_tail}", outcome.get("tracked", False)
        )
    raise TrialFailed(
        f"the training process exited with code {code} without a result\n"
        f"--- end of {run_dir / 'train.log'} ---\n{log_tail}"
    )


def _report_finished_run(run_dir: Path, proc: subprocess.Popen, on_report) -> None:
    """A restart found the run already complete (it ended after Ray's last result): report its final evaluation."""
    path = run_dir / "eval_report.json"  # loop.run's last evaluation, {"step": ..., metrics}
    if path.is_file():
        data = json.loads(path.read_text())
        step = int(data.pop("step"))
        on_report({k: float(v) for k, v in data.items() if isinstance(v, (int, float))}, step, proc)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- the training process (python -m meme_scale.tune --trial-process CONFIG ...) ---------------------
def trial_process(config_path: str, report_fd: int, parent_pid: int) -> int:
    """loop.run on one trial's resolved config, reporting each evaluation as a JSON line on ``report_fd``."""

    def watch_parent() -> None:  # the Ray trial died (stopped by the scheduler, killed): so does this run
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    out = os.fdopen(report_fd, "w", buffering=1)

    def send(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    rank = int(os.environ.get("RANK", "0"))
    record = None
    try:
        cfg = load_config(config_path)
        run_id = None
        if rank == 0:
            from ..tracking import update_run

            record = TrialRecord.load(Path(cfg.run.dir))
            run_id = ensure_child_run(cfg, record)  # loop.run continues this run
            tags = {"tune.attempts": record.attempts}
            if record.exploits and record.exploits[-1]["attempt"] == record.attempts:
                tags["tune.exploited_from"] = f"{record.exploits[-1]['from']} at {record.exploits[-1]['tag']}"
            update_run(record.tracking_uri, record.mlflow_run_id, tags=tags)
        from ..loop import run

        # optim_from_config: PBT's explore changes optim.lr, and the checkpoint would restore the old one
        summary = run(
            cfg,
            resume="auto",
            run_id=run_id,
            optim_from_config=True,
            report=lambda metrics, step: send(
                {"type": "report", "step": int(step), "metrics": {k: float(v) for k, v in metrics.items()}}
            ),
        )
        if record is not None:
            log = Path(cfg.run.dir) / "train.log"
            update_run(record.tracking_uri, record.mlflow_run_id, text={"logs/train.log": tail(log, 5000)})
        from ..engine import shutdown

        shutdown()
        send({"type": "done", "summary": json.loads(json.dumps(summary, default=str))})
        return 0
    except BaseException as e:  # noqa: BLE001 - everything goes back to the trial
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        message = f"{type(e).__name__}: {e}"
        if record is not None and record.mlflow_run_id:
            mark_failed(record, message, tb, Path(record.path).parent)
        send({"type": "error", "error": message, "traceback": tb, "tracked": bool(record and record.mlflow_run_id)})
        return 1
