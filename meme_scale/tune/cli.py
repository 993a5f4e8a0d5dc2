"""``meme-scale tune`` and the trial process entry (``python -m meme_scale.tune --trial-process ...``)."""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from .driver import run_sweep
from .process import trial_process
from .sweep import SweepError, load_sweep


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--trial-process"]:
        p = argparse.ArgumentParser(prog="meme_scale.tune --trial-process")
        p.add_argument("--trial-process", required=True)
        p.add_argument("--report-fd", type=int, required=True)
        p.add_argument("--parent-pid", type=int, required=True)
        a = p.parse_args(argv)
        return trial_process(a.trial_process, a.report_fd, a.parent_pid)
    from . import __doc__ as sweep_format  # the package docstring documents the sweep file

    parser = argparse.ArgumentParser(
        prog="meme-scale tune", description=sweep_format, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="sweep file (see configs/sweeps/)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep (finished and failed trials are not run again)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training keys fixed for every trial")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.config, args.overrides)
        summary = run_sweep(sweep, resume=args.resume)
    except (SweepError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["interrupted"]:
        return 3
    if summary["rows"] and all(r["status"] == "failed" for r in summary["rows"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
