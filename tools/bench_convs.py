"""How fast the step's convolutions run on their own, against the fp32 matmul peak; prints JSON.

    python tools/bench_convs.py [--shapes mnist_svhn,cub] [--batch 128] [--repeats 5] [--nchw]

Every Conv2d / ConvTranspose2d call of one MEME loss (fp32, every sample paired, so the K-sample pass
is in it) is recorded with its input shape, then timed alone, forward + backward, at that shape
(NHWC inputs as ``train.channels_last``, or NCHW with ``--nchw``), with the input's gradient only
where the step computes one (not for the data going into an encoder's first layer). The calls' FLOPs over their summed
time is the rate the step's conv work runs at: when convolutions are most of a step, that rate, not
the matmul peak, bounds the step's fraction of the peak (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402
from bench import hardware  # noqa: E402
from bench_step import SHAPES, Plain, matmul_flops, path_configs, synthetic_batch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from meme_scale.models import modality_specs  # noqa: E402


def conv_calls(shape: str, batch_size: int) -> list[tuple[str, nn.Module, tuple[int, ...], bool]]:
    """(name, module, input shape, whether the step needs the input's gradient) of each conv call of one loss."""
    config, meta = SHAPES[shape]
    cfg = path_configs(config, [f"train.micro_batch_size={batch_size}"])["plain"]
    plain = Plain(cfg, modality_specs(cfg.model, {"modalities": meta}), synthetic_batch(meta, batch_size))
    calls, hooks = [], []
    for name, module in plain.model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            record = lambda m, args, name=name: calls.append((name, m, tuple(args[0].shape), args[0].requires_grad))  # noqa: E731
            hooks.append(module.register_forward_pre_hook(record))
    plain.model.loss(plain.batch)  # with autograd on: an input that needs a gradient says so
    for hook in hooks:  # the timing below calls the same modules
        hook.remove()
    return calls


def time_call(
    module: nn.Module, shape: tuple[int, ...], nhwc: bool, repeats: int, input_grad: bool = True
) -> tuple[float, float]:
    """(FLOPs, best seconds) of forward + backward at ``shape``."""
    x = torch.randn(shape)
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(input_grad)

    def fwd_bwd() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()

    with FlopCounterMode(display=False) as counter:
        fwd_bwd()
    fwd_bwd()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fwd_bwd()
        best = min(best, time.perf_counter() - t0)
    return counter.get_total_flops(), best


def bench_shape(shape: str, batch_size: int, repeats: int, nhwc: bool) -> dict:
    rows, flops, seconds = [], 0.0, 0.0
    for name, module, in_shape, input_grad in conv_calls(shape, batch_size):
        f, t = time_call(module, in_shape, nhwc, repeats, input_grad)
        flops, seconds = flops + f, seconds + t
        rows.append(
            {"layer": name, "input": list(in_shape), "input_grad": input_grad, "ms": 1e3 * t, "gflops": f / t / 1e9}
        )
    return {"calls": rows, "conv_ms_per_step": 1e3 * seconds, "conv_gflops": flops / seconds / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="mnist_svhn,cub")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nchw", action="store_true", help="NCHW inputs (default NHWC, as train.channels_last)")
    args = parser.parse_args(argv)
    before = matmul_flops(torch.float32)
    shapes = {s: bench_shape(s, args.batch, args.repeats, not args.nchw) for s in args.shapes.split(",")}
    # Other load only ever slows a measurement down: the faster of the peaks taken before and after the
    # convolutions is the machine's (one slow moment made convolutions read above 100% of "the peak").
    peak = max(before, matmul_flops(torch.float32))
    for r in shapes.values():
        r["of_peak"] = r["conv_gflops"] * 1e9 / peak
        for call in r["calls"]:
            call["of_peak"] = call["gflops"] * 1e9 / peak
    result = {
        "torch": torch.__version__,
        "hardware": hardware(),  # the machine, its ISA caps and what auto resolves to, as tools/bench.py reports it
        "layout": "NCHW" if args.nchw else "NHWC",
        "matmul_fp32_gflops": peak / 1e9,
        "shapes": shapes,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
