"""Preemption: signals only set a flag; the loop acts on it at a step boundary, on all ranks together."""

from __future__ import annotations

import logging
import os
import signal
import subprocess

log = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGUSR1 (Slurm's warning before the time limit) or SIGTERM (scancel, preemption, shutdown).

    Both stop the run with a checkpoint; only SIGUSR1 asks for a requeue (``wants_requeue``): a
    SIGTERM is also what a user's plain ``scancel`` sends, and a cancelled job must stay cancelled
    (a preemption under PreemptMode=REQUEUE is requeued by Slurm itself).
    """

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.signum: int | None = None  # the last signal received
        self.received: set[int] = set()
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        # nothing else is safe in a handler that can interrupt a collective
        self.signum = signum
        self.received.add(signum)

    @property
    def is_set(self) -> bool:
        return self.signum is not None

    def received_flags(self) -> tuple[float, float]:
        """(SIGUSR1 seen, SIGTERM seen) as floats, for the all-reduce that lets every rank agree."""
        return float(signal.SIGUSR1 in self.received), float(signal.SIGTERM in self.received)

    @property
    def wants_requeue(self) -> bool:
        return requeue_wanted(*self.received_flags())


def requeue_wanted(usr1_seen: float, term_seen: float) -> bool:
    """SIGUSR1 (the time-limit warning) and no SIGTERM: a scancel, even after the warning, wins.

    Takes counts, so the loop can pass the flags all-reduced over ranks and every rank agrees.
    """
    return usr1_seen > 0 and term_seen == 0


def requeue_slurm_job(stop: StopFlag | None = None) -> bool:
    """Asks Slurm to requeue this job (rank 0 only); True when a requeue was requested.

    With ``stop``, only when that flag wants a requeue (SIGUSR1), so a scancel'd job is not requeued.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    if stop is not None and not stop.wants_requeue:
        log.info(
            "stopped by %s: not requeueing Slurm job %s",
            signal.Signals(stop.signum).name if stop.signum else "the other ranks' signal",
            job,
        )
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
        return False
    log.info("requeued Slurm job %s", job)
    return True
