#!/usr/bin/env python
"""Convert raw datasets into meme_scale shards (DESIGN 2).

    python tools/make_shards.py quickstart --out data/quickstart [--pairings N] [--seed S] [--shard-size N]
    python tools/make_shards.py mnist-svhn --mnist DIR --svhn DIR --out data/mnist_svhn [--pairings N] [--seed S]
    python tools/make_shards.py cub --root CUB_200_2011 --out data/cub [--image-size 64] [--vocab-size 1000]
                                    [--train-classes FILE --test-classes FILE] [--features resnet101 --weights FILE]
    python tools/make_shards.py custom --arrays DIR --out data/custom [--kind NAME=image|vector|caption]
    python tools/make_shards.py custom --images DIR --captions FILE --out data/custom

Every converter writes through one ShardWriter into OUT.tmp-<pid>, validates the result and only
then renames it to OUT, so a failed run never leaves a shard set that looks complete.

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
        module.add_arguments(
            sub.add_parser(
                name, help=module.HELP, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
            )
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one converter; user errors (missing or bad files, existing output, bad values, a missing optional
    package) exit 1 with a message naming the file, without a traceback."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        summary = load_source(args.source).run(args)
    except (OSError, ValueError, ImportError) as e:
        print(f"make_shards.py {args.source}: error: {e}", file=sys.stderr)
        return 1
    print(f"{summary} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
