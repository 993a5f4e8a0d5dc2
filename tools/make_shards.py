#!/usr/bin/env python
"""Convert raw datasets into meme_scale shards (DESIGN 2).

    python tools/make_shards.py quickstart --out data/quickstart [--pairings N] [--seed S] [--shard-size N]

Thin on purpose: each subcommand's code lives in ``meme_scale/data/sources/<name>.py`` and is
registered in ``meme_scale.data.sources.SOURCES``; this file only builds the parser, runs the
converter and prints its one-line summary with the elapsed seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

try:
    import meme_scale.data.sources  # noqa: F401  (installed, or run from an activated venv)
except ImportError:  # run as `python tools/make_shards.py` from a plain checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meme_scale.data.sources import SOURCES, load_source


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per registered source, each with its own options."""
    parser = argparse.ArgumentParser(prog="make_shards.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name in SOURCES:
        module = load_source(name)
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one converter; user errors (missing files, existing output, bad values) exit 1 without a traceback."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        summary = load_source(args.source).run(args)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"make_shards.py {args.source}: error: {e}", file=sys.stderr)
        return 1
    print(f"{summary} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
