"""Forward+backward time of MEME.loss on MNIST-SVHN shapes, and the share spent in the K-sample cross term.

    python tools/bench_objective.py [--batch 128] [--repeats 5] [--observed-fraction 1.0]

Prints one JSON object. The cross-term share is (t(K) - t(K=0)) / t(K): K=0 keeps the main
sample only, so the difference is what the K fresh samples through the decoders cost.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from meme_scale.models import MEME, ModalitySpec  # noqa: E402

SPECS = [ModalitySpec("mnist", "image", (1, 28, 28), "mnist_mlp"),
         ModalitySpec("svhn", "image", (3, 32, 32), "svhn_conv", sigma_min=1e-4)]  # fmt: skip


def _batch(n: int, fraction: float) -> dict:
    observed = torch.ones(n, 2, dtype=torch.bool)
    unpaired = torch.arange(n) >= int(n * fraction)
    observed[unpaired & (torch.arange(n) % 2 == 0), 1] = False
    observed[unpaired & (torch.arange(n) % 2 == 1), 0] = False
    return {"mnist": torch.rand(n, 1, 28, 28), "svhn": torch.rand(n, 3, 32, 32), "observed": observed}


def time_step(k: int, batch: dict, repeats: int, warmup: int = 2) -> list[float]:
    torch.manual_seed(0)
    model = MEME(SPECS, latent_dim=64, k=k, pseudo_samples=128)
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        loss, _ = model.loss(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--observed-fraction", type=float, default=1.0)
    args = parser.parse_args()
    batch = _batch(args.batch, args.observed_fraction)
    full = time_step(args.k, batch, args.repeats)
    main_only = time_step(0, batch, args.repeats)
    t_full, t_main = statistics.median(full), statistics.median(main_only)
    print(json.dumps({
        "benchmark": "objective", "shapes": "mnist 1x28x28 + svhn 3x32x32", "batch": args.batch, "k": args.k,
        "observed_fraction": args.observed_fraction,
        "step_s_median": t_full, "step_s_spread": [min(full), max(full)],
        "ms_per_sample": 1e3 * t_full / args.batch,
        "samples_per_s": args.batch / t_full,
        "cross_term_share": (t_full - t_main) / t_full,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
