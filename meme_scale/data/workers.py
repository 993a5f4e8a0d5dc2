"""DataLoader worker processes for the shard reader: where they come from, and how they end.

The reader (``shards.py``) only says what a worker produces; this module owns the plumbing that
keeps worker processes safe inside a training rank: they are forked from a forkserver started
early (not from the threaded rank), they ignore the signals Slurm sends to every process of a
step, and they exit when their rank does, however it ended.
"""
from __future__ import annotations

import functools
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import torch

# The forkserver imports the reader once, so each worker starts with torch and the reader loaded.
PRELOAD = "meme_scale.data.shards"


def _identity(x: Any) -> Any:
    return x


def worker_batches(producer: torch.utils.data.IterableDataset, num_workers: int) -> Iterator[Any]:
    """Items of ``producer`` from ``num_workers`` worker processes, in the DataLoader's round-robin order."""
    start_worker_server()
    # A private generator: the DataLoader would otherwise draw its worker seed from the global torch
    # RNG, shifting the training noise of a resumed run (which creates its loader after restoring RNG).
    # Workers come from a forkserver, not a fork of this process: by now it runs gloo, MLflow and
    # OpenMP threads, and a fork taken while one of them holds a lock leaves the worker deadlocked
    # (seen: a rank waiting forever on a worker stuck right after fork).
    loader = iter(torch.utils.data.DataLoader(producer, batch_size=None, num_workers=num_workers,
                                              collate_fn=_identity, generator=torch.Generator().manual_seed(0),
                                              multiprocessing_context="forkserver",
                                              worker_init_fn=functools.partial(_exit_with, os.getpid())))
    try:
        yield from loader
    finally:
        # Stop workers now: left to garbage collection after a worker error, torch waits 5 s.
        getattr(loader, "_shutdown_workers", lambda: None)()


def _exit_with(rank_pid: int, _worker_id: int) -> None:
    """A data worker ends when its rank does, however the rank ended (SIGKILL included).

    Its parent is the forkserver, not the rank, so torch's own watchdog (which watches the parent)
    never sees the rank die; and the worker holds the forkserver's lifeline, so both would live on.
    """

    def watch() -> None:
        while _alive(rank_pid):
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="rank-watchdog", daemon=True).start()


def _alive(pid: int) -> bool:
    try:  # a killed rank stays a zombie until its launcher reaps it
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def start_worker_server() -> None:
    """Starts the forkserver that data workers come from, and multiprocessing's resource tracker.

    Idempotent and quick: the server imports torch and the reader in the background (~2 s on a
    small CPU machine), so call it early in a run. Both are started with SIGUSR1 and SIGTERM ignored,
    which they and the workers keep: Slurm signals every process of a job step (USR1 before the
    time limit, TERM on scancel), a fresh process dies of USR1, and a dead worker or tracker would
    bring the rank down before it could checkpoint. The rank stops on those signals itself
    (preemption.StopFlag) and shuts its workers down.
    """
    import multiprocessing.forkserver as forkserver
    import multiprocessing.resource_tracker as resource_tracker

    forkserver.set_forkserver_preload([PRELOAD])
    if threading.current_thread() is not threading.main_thread():  # signal dispositions: main thread only
        forkserver.ensure_running()
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:  # an ignored signal stays ignored across exec: the helpers inherit the disposition
        resource_tracker.ensure_running()
        forkserver.ensure_running()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
