"""Preemption: signals only set a flag; the loop acts on it at a step boundary, on all ranks together."""

from __future__ import annotations

import logging
import os
import signal
import subprocess

log = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGUSR1 (Slurm's warning before the time limit) or SIGTERM (preemption, scancel)."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.signum: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signum = signum  # nothing else is safe in a handler that can interrupt a collective

    @property
    def is_set(self) -> bool:
        return self.signum is not None


def requeue_slurm_job() -> bool:
    """Asks Slurm to requeue this job (rank 0 only); True when a requeue was requested."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
        return False
    log.info("requeued Slurm job %s", job)
    return True
