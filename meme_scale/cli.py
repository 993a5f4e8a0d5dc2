"""``meme-scale`` command: one entry for the project's verbs.

meme-scale train --config configs/quickstart.yaml [key=value ...]   (one process; use deepspeed/torchrun for more)
meme-scale eval --checkpoint runs/quickstart/checkpoints --config configs/quickstart.yaml [--out report.json]
meme-scale tune --config configs/sweeps/<name>.yaml [--resume] [key=value ...]   (a Ray Tune sweep)
meme-scale sync RUN_DIR [--tracking-uri URL]   (deliver a run's queued MLflow tracking, here or to another server)
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="meme-scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("verb", choices=["train", "eval", "tune", "sync"], help="what to do")
    args, rest = parser.parse_known_args(argv[:1])
    if args.verb == "train":
        from .train import main as train_main

        return train_main(argv[1:])
    if args.verb == "eval":
        return eval_main(argv[1:])
    if args.verb == "tune":
        from .tune import main as tune_main

        return tune_main(argv[1:])
    if args.verb == "sync":
        return sync_main(argv[1:])
    return 2


def eval_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="meme-scale eval",
        description="Evaluate a checkpoint or an export "
        "(coherence, latent accuracy, relatedness); runs under torchrun too.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoints dir, one step_* dir, or an exported .pt")
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", default=None, help="JSON report (default: <run.dir>/eval_report.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    from .config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .engine import shutdown
    from .evaluate import evaluate_checkpoint

    evaluate_checkpoint(cfg, args.checkpoint, args.out)
    shutdown()
    return 0


def sync_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="meme-scale sync",
        description="Deliver the MLflow tracking a run queued "
        "while its server was away (<RUN_DIR>/tracking_queue), in order.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's run.dir")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="deliver to this server instead (the run's whole "
        "history becomes a new run there); default: the server the run was logging to",
    )
    args = parser.parse_args(argv)
    from .tracking import TrackingUnavailable, sync_queue

    try:
        result = sync_queue(args.run_dir, args.tracking_uri)
    except (TrackingUnavailable, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrackingUnavailable) else 2
    runs = ", ".join(sorted(set(result["runs"].values()))) or "none"
    print(
        f"delivered {result['delivered']} record(s) to {result['tracking_uri']} ({result['rejected']} refused); "
        f"MLflow run(s): {runs}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
