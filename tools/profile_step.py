"""Where one training step's time goes, by operator (torch.profiler, forward + backward + optimizer).

    python tools/profile_step.py [--shapes quickstart,mnist_svhn,cub] [--batch 128] [--steps 3]
                                 [--path shipped|plain] [--observed-fraction 1.0] [--rows 15] [key=value ...]

Runs the step of tools/bench.py (``shipped``: the engine as the config sets it up; ``plain``: the eager
fp32 reference loop) on a synthetic batch and prints, per shape, the top operators by self CPU time
as a markdown table (docs/benchmarks.md quotes them), plus the step's samples/s without the profiler.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402
from bench_step import SHAPES, Engine, Plain, path_configs, synthetic_batch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from meme_scale.models import modality_specs  # noqa: E402


def profile_shape(
    shape: str, batch_size: int, steps: int, path: str, fraction: float, rows: int, overrides: list[str]
) -> str:
    config, meta = SHAPES[shape]
    cfgs = path_configs(config, [f"train.micro_batch_size={batch_size}", *overrides])
    cfg = cfgs["plain" if path == "plain" else "shipped"]
    specs = modality_specs(cfg.model, {"modalities": meta})
    batch = synthetic_batch(meta, batch_size, observed_fraction=fraction)
    runner = Plain(cfg, specs, batch) if path == "plain" else Engine(cfg, specs, batch)
    for _ in range(2):
        runner.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step()
    rate = steps * batch_size / (time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    lines = [
        f"### {shape}: {path} step, batch {batch_size}, observed fraction {fraction}, "
        f"precision {runner.precision}: {rate:.1f} samples/s",
        "",
        "| operator | self CPU share | ms per step | calls per step |",
        "|---|---|---|---|",
    ]
    for e in events[:rows]:
        lines.append(
            f"| `{e.key}` | {e.self_cpu_time_total / total:.1%} | {e.self_cpu_time_total / 1e3 / steps:.1f} "
            f"| {e.count // steps} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="quickstart,mnist_svhn,cub")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--path", choices=["shipped", "plain"], default="shipped")
    parser.add_argument("--observed-fraction", type=float, default=1.0)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    from meme_scale.engine import init_distributed

    init_distributed()
    print(
        f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads\n"
    )
    for shape in args.shapes.split(","):
        print(
            profile_shape(shape, args.batch, args.steps, args.path, args.observed_fraction, args.rows, args.overrides),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
