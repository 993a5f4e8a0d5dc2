"""All of meme_scale's performance measurements in one place (docs/benchmarks.md); prints JSON.

    python tools/bench.py [--sections step,flops,data,scaling,objective] [--shapes mnist_svhn,cub] [--batch 128]
                          [--repeats 5] [--steps 3] [--out bench.json] [--markdown bench.md]

step     samples/s of one training step (forward + backward + optimizer) of MEME at the shipped
         configs' shapes, three ways in the same process, repeats interleaved so drift hits all
         alike: ``plain`` (an eager fp32 PyTorch loop written here: the reference), ``deepspeed``
         (the same model through meme_scale's DeepSpeed engine, fp32) and ``all_options`` (the
         engine as the shipped config sets it up: precision, channels_last, compile). Median and
         [min, max] over the repeats.
flops    the model's FLOPs per sample (torch.utils.flop_counter, forward + backward) times each
         path's samples/s, against this machine's measured fp32 and bf16 matmul FLOP/s.
data     per image shape: the reader's samples/s (TrainStream on synthetic shards of that shape,
         observed fraction 0.5) with 0, 1 and 2 workers, against that shape's step (plain and shipped);
         the reader must outpace the step 10x so the model never waits (captions: tools/bench_data.py).
scaling  real training runs under torchrun with 1 and 2 CPU ranks (gloo) at one global batch,
         and the all-reduce share of a 2-rank step (the gradient all-reduce timed alone).
objective  ms per sample of forward + backward of ``MEME.loss`` alone (eager fp32, no optimizer) at
         MNIST-SVHN shapes on an all-paired batch, with the config's K and with K = 0 on the same
         model and batch; cross_term_share = 1 - t(K=0) / t(K), also per repeat (back-to-back pairs).

The converters' own throughput is tools/bench_data.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from meme_scale.config import deepspeed_config, load_config  # noqa: E402
from meme_scale.engine import free_port  # noqa: E402
from meme_scale.models import build_model, modality_specs  # noqa: E402

SHAPES = {
    "quickstart": ("configs/quickstart.yaml", {"mnist": {"kind": "image", "shape": [1, 28, 28]},
                                               "digits": {"kind": "image", "shape": [1, 8, 8]}}),
    "mnist_svhn": ("configs/mnist_svhn.yaml", {"mnist": {"kind": "image", "shape": [1, 28, 28]},
                                               "svhn": {"kind": "image", "shape": [3, 32, 32]}}),
    "cub": ("configs/cub.yaml", {"image": {"kind": "image", "shape": [3, 64, 64]},
                                 "caption": {"kind": "caption", "shape": [32], "vocab_size": 1000, "pad_id": 0}}),
}  # fmt: skip
PATHS = ("plain", "deepspeed", "all_options")


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def synthetic_batch(meta: dict, n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {"observed": torch.ones(n, 2, dtype=torch.bool)}
    for name, spec in meta.items():
        if spec["kind"] == "caption":
            batch[name] = torch.randint(3, spec["vocab_size"], (n, *spec["shape"]), generator=g)
        else:
            batch[name] = torch.rand(n, *spec["shape"], generator=g)
    return batch


# -- step ---------------------------------------------------------------------------------------
class Plain:
    """The reference: the model, Adam and an eager fp32 loop, nothing else."""

    def __init__(self, cfg, specs, batch):
        torch.manual_seed(0)
        self.model = build_model(cfg.model, specs)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.optim.lr)
        self.batch = batch

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss, _ = self.model.loss(self.batch)
        loss.backward()
        self.opt.step()


class Engine:
    """meme_scale's step: the model prepared as the config says, inside the DeepSpeed engine."""

    def __init__(self, cfg, specs, batch):
        from meme_scale.engine import build_engine
        from meme_scale.evaluate import to_device
        from meme_scale.loop import DTYPES
        from meme_scale.speed import apply_speed_options

        torch.manual_seed(0)
        model = apply_speed_options(build_model(cfg.model, specs), cfg.train)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
        self.engine = build_engine(model, opt, deepspeed_config(cfg, 1))
        self.batch = to_device(batch, torch.device("cpu"), DTYPES[cfg.train.precision])

    def step(self) -> None:
        loss, _ = self.engine(self.batch)
        self.engine.backward(loss)
        self.engine.step()


def path_configs(config: str, overrides: list[str]) -> dict:
    shipped = load_config(ROOT / config, overrides)
    plain = load_config(ROOT / config, [*overrides, "train.precision=fp32", "train.zero_stage=0",
                                        "train.channels_last=false", "train.compile=false"])  # fmt: skip
    return {"plain": plain, "deepspeed": plain, "all_options": shipped}


def bench_steps(shape: str, batch_size: int, repeats: int, steps: int, overrides: list[str]) -> dict:
    from meme_scale.engine import init_distributed

    init_distributed()  # a one-rank gloo group, as a plain `python train.py` makes
    config, meta = SHAPES[shape]
    cfgs = path_configs(config, [f"train.micro_batch_size={batch_size}", *overrides])
    specs = modality_specs(cfgs["plain"].model, {"modalities": meta})
    batch = synthetic_batch(meta, batch_size)
    runners = {"plain": Plain(cfgs["plain"], specs, batch), "deepspeed": Engine(cfgs["deepspeed"], specs, batch),
               "all_options": Engine(cfgs["all_options"], specs, batch)}  # fmt: skip
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
    t = cfgs["all_options"].train
    out = {"batch": batch_size, "all_options": {"precision": t.precision, "zero_stage": t.zero_stage,
                                                "channels_last": t.channels_last, "compile": t.compile},
           "samples_per_s": {p: _spread(r) for p, r in rates.items()}}  # fmt: skip
    med = {p: out["samples_per_s"][p]["median"] for p in runners}
    out["deepspeed_overhead"] = 1 - med["deepspeed"] / med["plain"]
    out["all_options_speedup"] = med["all_options"] / med["plain"]
    out["flops_per_sample"] = flops_per_sample(runners["plain"], batch_size)
    return out


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
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


# -- objective ----------------------------------------------------------------------------------
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
    return {"batch": batch_size, "k": cfg.model.k, "ms_per_sample": {name: _spread(v) for name, v in ms.items()},
            "cross_term_share": 1 - t_0 / t_k, "cross_term_share_per_repeat": _spread(shares)}  # fmt: skip


# -- data and scaling ---------------------------------------------------------------------------
def synthetic_shards(shape: str, out: Path, n_train: int = 4096, n_test: int = 256) -> Path:
    """Random uint8 images in the shape's modalities, written by the project's own ShardWriter."""
    from meme_scale.data.writer import ShardWriter

    rng = np.random.default_rng(0)
    meta = SHAPES[shape][1]

    def samples(n):
        for _ in range(n):
            yield {**{m: rng.integers(0, 256, spec["shape"], dtype=np.uint8) for m, spec in meta.items()},
                   "label": int(rng.integers(10))}  # fmt: skip

    with ShardWriter(str(out), "synthetic", meta, [str(i) for i in range(10)], samples_per_shard=512) as w:
        w.write_split("train", samples(n_train))
        w.write_split("test", samples(n_test))
    return out


def reader_rate(root: Path, modalities: list[str], workers: int, batch_size: int, batches: int = 40) -> float:
    from meme_scale.data.shards import TrainStream

    stream = TrainStream(str(root), "train", batch_size, modalities=modalities, rank=0, world_size=1, seed=0,
                         observed_fraction=0.5, missing="either", num_workers=workers)  # fmt: skip
    it = iter(stream)
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    n = sum(b["observed"].shape[0] for _, _, b in islice(it, batches))
    return n / (time.perf_counter() - t0)


def run_training(root: Path, ranks: int, steps: int, batch_size: int, work: Path) -> float:
    """samples/s of a real torchrun training run (the last logged window: start-up excluded)."""
    run_dir = work / f"run_{ranks}"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), str(ROOT / "meme_scale" / "train.py"), "--config", str(ROOT / "configs" / "mnist_svhn.yaml"),
           f"data.root={root}", f"run.dir={run_dir}", f"train.max_steps={steps}",
           f"train.micro_batch_size={batch_size // ranks}", f"run.log_every={steps // 2}", "run.eval_every=100000",
           "run.eval_max_batches=1", "run.progress=none", "eval.latent_train_samples=128", "eval.joint_samples=128",
           "data.num_workers=1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())["final"]["samples_per_s"]


def allreduce_share(batch_size: int) -> dict:
    """Two gloo ranks: the step (MNIST-SVHN, shipped config, half the batch each) and the gradient all-reduce alone."""
    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "share.json"
        mp.start_processes(_share_worker, args=(port, batch_size // 2, str(out)), nprocs=2, start_method="spawn")
        return json.loads(out.read_text())


def _share_worker(rank: int, port: int, batch_size: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    from meme_scale.engine import build_engine, init_distributed
    from meme_scale.evaluate import to_device
    from meme_scale.loop import DTYPES
    from meme_scale.speed import apply_speed_options

    init_distributed()
    config, meta = SHAPES["mnist_svhn"]
    cfg = load_config(ROOT / config, [f"train.micro_batch_size={batch_size}"])
    specs = modality_specs(cfg.model, {"modalities": meta})
    torch.manual_seed(0)
    model = apply_speed_options(build_model(cfg.model, specs), cfg.train)
    engine = build_engine(model, torch.optim.Adam(model.parameters()), deepspeed_config(cfg, 2))
    batch = to_device(synthetic_batch(meta, batch_size, seed=rank), torch.device("cpu"), DTYPES[cfg.train.precision])
    grads = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=next(model.parameters()).dtype)
    step_t, reduce_t = [], []
    for i in range(8):
        dist.barrier()
        t0 = time.perf_counter()
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
        t1 = time.perf_counter()
        dist.all_reduce(grads)
        t2 = time.perf_counter()
        if i >= 2:
            step_t.append(t1 - t0)
            reduce_t.append(t2 - t1)
    if rank == 0:
        step, reduce = statistics.median(step_t), statistics.median(reduce_t)
        Path(out).write_text(json.dumps({"step_s": step, "allreduce_s": reduce, "gradient_elements": grads.numel(),
                                         "allreduce_share": reduce / step}))  # fmt: skip
    dist.destroy_process_group()


# -- report ---------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    lines = [f"Machine: {result['machine']}; torch {result['torch']}, {result['threads']} threads.", ""]
    if "step" in result:
        lines += ["| shapes | batch | plain (samples/s) | DeepSpeed fp32 | all options | DeepSpeed overhead | "
                  "all options / plain | all options setting |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for shape, r in result["step"].items():
            s = r["samples_per_s"]
            cell = [f"{s[p]['median']:.0f} [{s[p]['min']:.0f}, {s[p]['max']:.0f}]" for p in PATHS]
            opts = ", ".join(f"{k}={v}" for k, v in r["all_options"].items())
            lines.append(f"| {shape} | {r['batch']} | {' | '.join(cell)} | {100 * r['deepspeed_overhead']:.1f}% | "
                         f"{r['all_options_speedup']:.2f}x | {opts} |")  # fmt: skip
    if "flops" in result:
        f = result["flops"]
        lines += ["", f"Matmul peak: fp32 {f['matmul_fp32'] / 1e9:.0f} GFLOP/s, bf16 {f['matmul_bf16'] / 1e9:.0f} GFLOP/s.",
                  "", "| shapes | MFLOP/sample | plain | all options |", "|---|---|---|---|"]  # fmt: skip
        for shape, r in f["shapes"].items():
            lines.append(f"| {shape} | {r['flops_per_sample'] / 1e6:.1f} | {r['plain_fraction_of_fp32_peak']:.1%} of fp32 "
                         f"peak | {r['all_options_fraction_of_peak']:.1%} of {r['peak_dtype']} peak |")  # fmt: skip
    for shape, d in result.get("data", {}).items():
        rates = ", ".join(f"{k.replace('_', ' ')}: {v:.0f}" for k, v in d["reader_samples_per_s"].items())
        ratio = f"; {d['reader_over_step']:.1f}x its fastest step" if d["reader_over_step"] else ""
        lines += ["", f"Reader, {shape} shards (samples/s): {rates}{ratio}."]
    if "scaling" in result:
        s = result["scaling"]
        lines += ["", f"Training runs (samples/s, global batch {s['global_batch']}): 1 rank {s['ranks_1']:.0f}, "
                      f"2 ranks {s['ranks_2']:.0f}; gradient all-reduce {s['allreduce']['allreduce_share']:.1%} "
                      "of a 2-rank step."]  # fmt: skip
    if "objective" in result:
        o = result["objective"]
        cells = ", ".join(f"K = {name[2:]}: {v['median']:.2f} [{v['min']:.2f}, {v['max']:.2f}]"
                          for name, v in o["ms_per_sample"].items())  # fmt: skip
        lines += ["", f"MEME.loss forward + backward (ms/sample, MNIST-SVHN, batch {o['batch']}, all paired): {cells}; "
                      f"K-sample cross term {o['cross_term_share']:.1%} of it (per repeat "
                      f"{o['cross_term_share_per_repeat']['min']:.1%} to {o['cross_term_share_per_repeat']['max']:.1%})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="step,flops,data,scaling,objective")
    parser.add_argument("--shapes", default="quickstart,mnist_svhn,cub")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--train-steps", type=int, default=40, help="steps of each scaling run")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--markdown", default=None, help="also write a markdown summary here")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for the step section")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    shapes = args.shapes.split(",")
    unknown = [s for s in sections if s not in ("step", "flops", "data", "scaling", "objective")] + \
              [s for s in shapes if s not in SHAPES]  # fmt: skip
    if unknown:
        parser.error(f"unknown section or shape: {unknown}")
    result = {"benchmark": "meme_scale", "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "command": " ".join(["python", "tools/bench.py", *(argv if argv is not None else sys.argv[1:])])}  # fmt: skip
    if "step" in sections or "flops" in sections:
        result["step"] = {}
        for shape in shapes:
            result["step"][shape] = bench_steps(shape, args.batch, args.repeats, args.steps, args.overrides)
            print(f"step {shape}: {json.dumps(result['step'][shape])}", file=sys.stderr, flush=True)
    if "flops" in sections:
        peak = {"fp32": matmul_flops(torch.float32), "bf16": matmul_flops(torch.bfloat16)}
        result["flops"] = {"matmul_fp32": peak["fp32"], "matmul_bf16": peak["bf16"], "shapes": {}}
        for shape, r in result["step"].items():
            dtype = "bf16" if r["all_options"]["precision"] == "bf16" else "fp32"
            fps = r["flops_per_sample"]
            result["flops"]["shapes"][shape] = {
                "flops_per_sample": fps, "peak_dtype": dtype,
                "plain_fraction_of_fp32_peak": fps * r["samples_per_s"]["plain"]["median"] / peak["fp32"],
                "all_options_fraction_of_peak": fps * r["samples_per_s"]["all_options"]["median"] / peak[dtype]}  # fmt: skip
    if "objective" in sections:
        result["objective"] = bench_objective(args.batch, args.repeats, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "data" in sections:
            result["data"] = {}
            for shape in [s for s in shapes if all(m["kind"] == "image" for m in SHAPES[s][1].values())]:
                root = synthetic_shards(shape, work / shape)
                names = list(SHAPES[shape][1])
                readers = {f"workers_{w}": reader_rate(root, names, w, args.batch) for w in (0, 1, 2)}
                steps = result.get("step", {}).get(shape, {}).get("samples_per_s", {})
                fastest = max((v["median"] for v in steps.values()), default=None)
                result["data"][shape] = {"reader_samples_per_s": readers, "fastest_step_samples_per_s": fastest,
                                         "reader_over_step": max(readers.values()) / fastest if fastest else None}  # fmt: skip
        if "scaling" in sections:
            root = synthetic_shards("mnist_svhn", work / "scaling")
            result["scaling"] = {"global_batch": args.batch,
                                 **{f"ranks_{r}": run_training(root, r, args.train_steps, args.batch, work)
                                    for r in (1, 2)},
                                 "allreduce": allreduce_share(args.batch)}  # fmt: skip
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
