"""``meme-scale`` command: one entry for the project's verbs.

    meme-scale train --config configs/quickstart.yaml [key=value ...]   (one process; use deepspeed/torchrun for more)
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="meme-scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("verb", choices=["train"], help="what to do")
    args, rest = parser.parse_known_args(argv[:1])
    if args.verb == "train":
        from .train import main as train_main

        return train_main(argv[1:])
    return 2


if __name__ == "__main__":
    sys.exit(main())
