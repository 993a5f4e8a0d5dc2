"""Issue-named entry kept as an alias: ``python tools/bench_train.py [bench.py options]``.

Runs ``tools/bench.py --sections step,data,scaling --shapes quickstart,mnist_svhn``: samples/s of
the full training step at the quickstart and MNIST-SVHN shapes, the reader alone against each
step, and 1 vs 2 ranks on this machine. Prints the JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--sections", "step,data,scaling", "--shapes", "quickstart,mnist_svhn", *sys.argv[1:]]))
