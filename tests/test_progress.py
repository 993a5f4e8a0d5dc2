"""Progress display: a bar with samples/s and ETA on a terminal, log lines otherwise, nothing off rank 0."""

from __future__ import annotations

import logging
import re

from meme_scale.progress import Progress


def test_bar_shows_fill_rate_and_eta(capsys, monkeypatch):
    clock = iter([100.0, 110.0, 130.0])  # 5 steps in 10 s, then 10 in 30 s: 195/0.5 and 190/(1/3) s left
    monkeypatch.setattr("meme_scale.progress.time.perf_counter", lambda: next(clock))
    progress = Progress(total=200, start=0, mode="bar")
    progress.update(5, 1234.0, {"loss": 3.14159})
    progress.update(10, 987.0, {"loss": 2.5})
    progress.close()
    err = capsys.readouterr().err
    frames = err.split("\r")[1:]
    assert frames[0].startswith("[" + "." * 30 + "] step 5/200 loss 3.14 1,234 samples/s ETA 0:06:30")
    assert frames[1].startswith("[#" + "." * 29 + "] step 10/200 loss 2.50 987 samples/s ETA 0:09:30")
    assert err.endswith("\n")


def test_lines_mode_logs_and_disabled_ranks_stay_silent(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="meme_scale"):
        Progress(total=10, start=4, mode="lines").update(6, 50.0, {"loss": 1.0})
        Progress(total=10, start=4, mode="bar", enabled=False).update(6, 50.0, {"loss": 1.0})
    (line,) = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"step 6/10 loss 1\.00 50 samples/s ETA \d+:\d\d:\d\d", line)
    assert capsys.readouterr().err == ""
