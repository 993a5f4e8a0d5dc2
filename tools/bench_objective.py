"""Issue-named entry kept as an alias: ``python tools/bench_objective.py [bench.py options]``.

Runs ``tools/bench.py --sections objective`` (forward + backward of ``MEME.loss`` at MNIST-SVHN
shapes, batch 128, and the K-sample cross term's share of it) and prints its JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--sections", "objective", *sys.argv[1:]]))
