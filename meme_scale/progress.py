"""Progress for long runs: a one-line bar on a terminal, plain log lines in batch logs."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("meme_scale")


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, start: int, mode: str = "auto", enabled: bool = True):
        self.total, self.start = total, start
        self.t0 = time.perf_counter()
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"

    def update(self, step: int, samples_per_s: float, metrics: dict[str, float]) -> None:
        if self.mode == "none":
            return
        done = step - self.start
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else 0.0
        text = (
            f"step {step}/{self.total} loss {metrics.get('loss', float('nan')):.2f} "
            f"{samples_per_s:,.0f} samples/s ETA {_clock(eta)}"
        )
        if self.mode == "bar":
            filled = int(30 * step / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {text}  ")
            sys.stderr.flush()
        else:
            log.info(text)

    def close(self) -> None:
        if self.mode == "bar":
            sys.stderr.write("\n")
