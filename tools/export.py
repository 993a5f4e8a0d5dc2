"""Turn a training checkpoint into a plain state_dict file.

    python tools/export.py runs/quickstart/checkpoints[/step_00000500] OUT.pt

The output is ``{"state_dict": {name: fp32 tensor}, "config": {flat config}, "step": N}``, loadable
with ``torch.load(OUT.pt, weights_only=True)`` and by ``meme-scale eval``. ZeRO-1/2 checkpoints are
consolidated from their fp32 master partitions; stage 0 reads the model states directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meme_scale.checkpoint import export  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoints/ directory (newest tag) or one step_* directory")
    parser.add_argument("out", help="output .pt file")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
