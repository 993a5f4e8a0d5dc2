"""Entry point: ``deepspeed meme_scale/train.py --config configs/quickstart.yaml [key=value ...]``.

Runs unchanged under deepspeed, torchrun, accelerate launch, srun and plain python (one process).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable from a clone
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meme_scale.config import ConfigError, keys_help, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=keys_help()
    )
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint tag/path")
    parser.add_argument(
        "--mlflow-run-id",
        default=None,
        help="log into this existing MLflow run (a child run made by tools/compare.py) unless the "
        "checkpoint resumed from names one",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=50")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from meme_scale.engine import shutdown
    from meme_scale.loop import run
    from meme_scale.tracking import TrackingUnavailable

    try:
        run(cfg, resume=args.resume, config_path=args.config, run_id=args.mlflow_run_id)
    except TrackingUnavailable as e:  # one line, not a traceback: the user fixes a URL or starts a server
        print(f"error: {e}", file=sys.stderr)
        return 2
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
