"""The training step's measurements for tools/bench.py: samples/s of three ways to run it, FLOPs, peaks.

Run through ``python tools/bench.py`` (which prints JSON); this module holds the pieces it and
tools/profile_step.py share: the shapes of the shipped configs, synthetic batches, the eager fp32
reference loop (``Plain``) and meme_scale's engine step (``Engine``).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from meme_scale.config import deepspeed_config, load_config  # noqa: E402
from meme_scale.hardware import DTYPES, probe_bf16_matmul, resolve_precision  # noqa: E402
from meme_scale.models import build_model, modality_specs  # noqa: E402

SHAPES = {
    "quickstart": ("configs/quickstart.yaml", {"mnist": {"kind": "image", "shape": [1, 28, 28]},
                                               "digits": {"kind": "image", "shape": [1, 8, 8]}}),
    "mnist_svhn": ("configs/mnist_svhn.yaml", {"mnist": {"kind": "image", "shape": [1, 28, 28]},
                                               "svhn": {"kind": "image", "shape": [3, 32, 32]}}),
    "cub": ("configs/cub.yaml", {"image": {"kind": "image", "shape": [3, 64, 64]},
                                 "caption": {"kind": "caption", "shape": [32], "vocab_size": 1000, "pad_id": 0}}),
}  # fmt: skip
PATHS = ("plain", "deepspeed", "shipped")


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def synthetic_batch(meta: dict, n: int, seed: int = 0, observed_fraction: float = 1.0) -> dict:
    """Random data of the shapes in ``meta``; a ``1 - observed_fraction`` share of the samples keeps one
    modality only (which one alternates, as ``data.missing=either``)."""
    g = torch.Generator().manual_seed(seed)
    observed = torch.ones(n, 2, dtype=torch.bool)
    unpaired = torch.arange(n) >= round(n * observed_fraction)
    observed[unpaired & (torch.arange(n) % 2 == 0), 0] = False
    observed[unpaired & (torch.arange(n) % 2 == 1), 1] = False
    batch = {"observed": observed}
    for name, spec in meta.items():
        if spec["kind"] == "caption":
            batch[name] = torch.randint(3, spec["vocab_size"], (n, *spec["shape"]), generator=g)
        else:
            batch[name] = torch.rand(n, *spec["shape"], generator=g)
        batch[name][~observed[:, list(meta).index(name)]] = 0  # hidden data is zero-filled, as the reader does
    return batch


@functools.lru_cache(maxsize=1)
def cpu_probe() -> dict:
    """One bf16-vs-fp32 probe per benchmark process: every path resolves ``auto`` the same way."""
    return probe_bf16_matmul()


def resolved_precision(cfg) -> str:
    return resolve_precision(cfg.train.precision, torch.device("cpu"), probe=cpu_probe).precision


class Plain:
    """The reference: the model, Adam and an eager fp32 loop, nothing else."""

    precision = "fp32"

    def __init__(self, cfg, specs, batch):
        torch.manual_seed(0)
        self.model = build_model(cfg.model, specs)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.optim.lr)  # torch's default Adam: the reference
        self.batch = batch

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss, _ = self.model.loss(self.batch)
        loss.backward()
        self.opt.step()


class Engine:
    """meme_scale's step: the model prepared as the config says, inside the DeepSpeed engine."""

    def __init__(self, cfg, specs, batch):
        from meme_scale.engine import adam, build_engine
        from meme_scale.evaluate import to_device
        from meme_scale.speed import apply_speed_options

        self.precision = resolved_precision(cfg)
        torch.manual_seed(0)
        model = apply_speed_options(build_model(cfg.model, specs), cfg.train)
        opt = adam(model.parameters(), cfg.optim.lr)
        self.engine = build_engine(model, opt, deepspeed_config(cfg, 1, self.precision))
        self.batch = to_device(batch, torch.device("cpu"), DTYPES[self.precision])

    def step(self) -> None:
        loss, _ = self.engine(self.batch)
        self.engine.backward(loss)
        self.engine.step()


def path_configs(config: str, overrides: list[str]) -> dict:
    shipped = load_config(ROOT / config, overrides)
    plain = load_config(
        ROOT / config,
        [*overrides, "train.precision=fp32", "train.zero_stage=0", "train.channels_last=false", "train.compile=false"],
    )
    return {"plain": plain, "deepspeed": plain, "shipped": shipped}


def time_interleaved(runners: dict, batch_size: int, repeats: int, steps: int) -> dict[str, list[float]]:
    """samples/s of each runner, repeats interleaved so drift (other load, clocks) hits all alike."""
    for runner in runners.values():  # warm-up: allocator, oneDNN primitives, compilation
        for _ in range(2):
            runner.step()
    rates: dict[str, list[float]] = {p: [] for p in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                runner.step()
            rates[name].append(steps * batch_size / (time.perf_counter() - t0))
    return rates


def bench_steps(shape: str, batch_size: int, repeats: int, steps: int, overrides: list[str]) -> dict:
    """plain, DeepSpeed fp32 and shipped steps at one shape; FLOPs per sample from the plain model."""
    config, meta = SHAPES[shape]
    cfgs = path_configs(config, [f"train.micro_batch_size={batch_size}", *overrides])
    specs = modality_specs(cfgs["plain"].model, {"modalities": meta})
    batch = synthetic_batch(meta, batch_size)
    runners = {
        "plain": Plain(cfgs["plain"], specs, batch),
        "deepspeed": Engine(cfgs["deepspeed"], specs, batch),
        "shipped": Engine(cfgs["shipped"], specs, batch),
    }
    rates = time_interleaved(runners, batch_size, repeats, steps)
    t = cfgs["shipped"].train
    out = {
        "batch": batch_size,
        "precision": {p: r.precision for p, r in runners.items()},
        "shipped": {
            "precision": t.precision,
            "resolved_precision": runners["shipped"].precision,
            "zero_stage": t.zero_stage,
            "channels_last": t.channels_last,
            "compile": t.compile,
        },
        "samples_per_s": {p: spread(r) for p, r in rates.items()},
    }
    med = {p: out["samples_per_s"][p]["median"] for p in runners}
    out["deepspeed_overhead"] = 1 - med["deepspeed"] / med["plain"]
    out["shipped_over_plain"] = med["shipped"] / med["plain"]
    out["flops_per_sample"] = flops_per_sample(runners["plain"], batch_size)
    return out


def bench_observed_fraction(
    shape: str,
    batch_size: int,
    repeats: int,
    steps: int,
    overrides: list[str],
    fractions: tuple[float, ...] = (1.0, 0.25),
) -> dict:
    """The shipped step at observed fraction f = 1 and f = 0.25 (missing: either), interleaved."""
    config, meta = SHAPES[shape]
    cfg = path_configs(config, [f"train.micro_batch_size={batch_size}", *overrides])["shipped"]
    specs = modality_specs(cfg.model, {"modalities": meta})
    runners = {f"f_{f}": Engine(cfg, specs, synthetic_batch(meta, batch_size, observed_fraction=f)) for f in fractions}
    rates = time_interleaved(runners, batch_size, repeats, steps)
    med = {name: statistics.median(r) for name, r in rates.items()}
    first, *rest = fractions
    return {
        "batch": batch_size,
        "precision": runners[f"f_{first}"].precision,
        "samples_per_s": {name: spread(r) for name, r in rates.items()},
        **{f"f_{f}_over_f_{first}": med[f"f_{f}"] / med[f"f_{first}"] for f in rest},
    }


def flops_per_sample(plain: Plain, batch_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss, _ = plain.model.loss(plain.batch)
        loss.backward()
    plain.model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size


def matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def matmul_peaks() -> dict[str, float]:
    """fp32 and bf16 matmul FLOP/s at 2048 (bf16 at 512 where the probe shows it emulated: 2048 would take minutes)."""
    native = cpu_probe()["bf16_speedup"] >= 1.0
    return {"fp32": matmul_flops(torch.float32), "bf16": matmul_flops(torch.bfloat16, 2048 if native else 512, 3)}


def bench_objective(batch_size: int, repeats: int, steps: int) -> dict:
    """The K-sample cross term's share of MEME.loss: one model, the config's K against K = 0, interleaved."""
    config, meta = SHAPES["mnist_svhn"]
    cfg = load_config(ROOT / config, [f"train.micro_batch_size={batch_size}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, modality_specs(cfg.model, {"modalities": meta}))
    batch = synthetic_batch(meta, batch_size)  # all paired: the cross term runs for every sample
    ks = {f"k_{model.k}": model.k, "k_0": 0}

    def fwd_bwd(k: int) -> None:
        model.k = k
        model.zero_grad(set_to_none=True)
        loss, _ = model.loss(batch)
        loss.backward()

    for k in ks.values():  # warm-up
        fwd_bwd(k)
        fwd_bwd(k)
    ms: dict[str, list[float]] = {name: [] for name in ks}
    for _ in range(repeats):
        for name, k in ks.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fwd_bwd(k)
            ms[name].append(1e3 * (time.perf_counter() - t0) / (steps * batch_size))
    t_k, t_0 = (statistics.median(ms[name]) for name in ks)
    shares = [1 - b / a for a, b in zip(*ms.values())]  # per repeat: the two timings ran back to back
    return {
        "batch": batch_size,
        "k": cfg.model.k,
        "ms_per_sample": {name: spread(v) for name, v in ms.items()},
        "cross_term_share": 1 - t_0 / t_k,
        "cross_term_share_per_repeat": spread(shares),
    }
