"""All of meme_scale's performance measurements in one place (docs/benchmarks.md); prints JSON.

    python tools/bench.py [--sections step,flops,fraction,data,scaling,objective]
                          [--shapes quickstart,mnist_svhn,cub] [--batch 128] [--repeats 5] [--steps 3]
                          [--out bench.json] [--markdown bench.md] [key=value ...]

hardware  what the numbers hold for: CPU model, torch's CPU capability, AVX-512 BF16 / AMX, cores, the
         bf16-vs-fp32 matmul probe and what ``train.precision: auto`` resolves to here, and any of
         ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS that cap the ISA (setting all
         three to AVX2 makes an AVX-512 machine behave as an AVX2-only one, emulated bf16 included).
step     samples/s of one training step (forward + backward + optimizer) of MEME at the shipped configs'
         shapes, three ways in the same process, repeats interleaved so drift hits all alike: ``plain``
         (an eager fp32 PyTorch loop written here: the reference), ``deepspeed`` (the same model through
         meme_scale's DeepSpeed engine, fp32) and ``shipped`` (the engine as the shipped config sets it
         up: precision resolved as a run resolves it, ZeRO stage, channels_last, compile). Median and
         [min, max] over the repeats.
flops    the model's FLOPs per sample (torch.utils.flop_counter, forward + backward) times each path's
         samples/s, against the fp32 and bf16 matmul FLOP/s measured in the same run: each path's
         fraction of the peak of the dtype it runs in.
fraction the shipped step with every sample paired (f = 1) and with 75% unpaired (f = 0.25, missing
         either): unpaired samples skip the K-sample cross term, so they should cost a fraction.
data     per image shape: the reader's samples/s (TrainStream on synthetic shards of that shape,
         observed fraction 0.5) with 0, 1 and 2 workers, against that shape's step (plain and shipped);
         the reader must outpace the step 10x so the model never waits (captions: tools/bench_data.py).
scaling  real training runs (meme_scale/train.py, threads chosen by the run) at one global batch: one
         process against 2 ranks under the deepspeed launcher, on this machine's cores, per shape;
         and the all-reduce share of a 2-rank step (the gradient all-reduce timed alone).
objective  ms per sample of forward + backward of ``MEME.loss`` alone (eager fp32, no optimizer) at
         MNIST-SVHN shapes on an all-paired batch, with the config's K and with K = 0 on the same
         model and batch; cross_term_share = 1 - t(K=0) / t(K), also per repeat (back-to-back pairs).

Where an operator's time goes: tools/profile_step.py. The converters' own throughput: tools/bench_data.py.
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
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_data import remote_rates  # noqa: E402
from bench_step import (  # noqa: E402
    PATHS,
    SHAPES,
    bench_objective,
    bench_observed_fraction,
    bench_steps,
    cpu_probe,  # noqa: E402
    matmul_peaks,
    resolved_precision,
    synthetic_batch,
)

from meme_scale.config import deepspeed_config, load_config  # noqa: E402
from meme_scale.engine import free_port  # noqa: E402
from meme_scale.hardware import DTYPES, cpu_capabilities  # noqa: E402
from meme_scale.models import build_model, modality_specs  # noqa: E402

ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict:
    auto = resolved_precision(load_config(None, ["train.precision=auto"]))
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        **cpu_capabilities(),
        "threads": torch.get_num_threads(),
        "bf16_probe": cpu_probe(),
        "auto_precision": auto,
        "isa_caps": {k: os.environ[k] for k in ISA_CAPS if k in os.environ},
    }


# -- data and scaling ---------------------------------------------------------------------------
def synthetic_shards(shape: str, out: Path, n_train: int = 4096, n_test: int = 256) -> Path:
    """Random uint8 images in the shape's modalities, written by the project's own ShardWriter."""
    from meme_scale.data.writer import ShardWriter

    rng = np.random.default_rng(0)
    meta = SHAPES[shape][1]

    def samples(n):
        for _ in range(n):
            yield {
                **{m: rng.integers(0, 256, spec["shape"], dtype=np.uint8) for m, spec in meta.items()},
                "label": int(rng.integers(10)),
            }

    with ShardWriter(str(out), "synthetic", meta, [str(i) for i in range(10)], samples_per_shard=512) as w:
        w.write_split("train", samples(n_train))
        w.write_split("test", samples(n_test))
    return out


def reader_rate(root: Path, modalities: list[str], workers: int, batch_size: int, batches: int = 40) -> float:
    from meme_scale.data.shards import TrainStream

    stream = TrainStream(
        str(root),
        "train",
        batch_size,
        modalities=modalities,
        rank=0,
        world_size=1,
        seed=0,
        observed_fraction=0.5,
        missing="either",
        num_workers=workers,
    )
    it = iter(stream)
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    n = sum(b["observed"].shape[0] for _, _, b in islice(it, batches))
    return n / (time.perf_counter() - t0)


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_training(shape: str, root: Path, ranks: int, steps: int, batch_size: int, work: Path) -> dict:
    """samples/s of a real training run at global batch ``batch_size``: one plain process, or ``ranks`` ranks
    under the deepspeed launcher (the last logged window: start-up excluded). No OMP_NUM_THREADS: the
    run chooses its threads (cores / ranks sharing them), as a user's run does."""
    run_dir = work / f"{shape}_ranks_{ranks}"
    script = str(ROOT / "meme_scale" / "train.py")
    launcher = (
        [sys.executable]
        if ranks == 1
        else [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(free_port()),
        ]
    )
    cmd = [
        *launcher,
        script,
        "--config",
        str(ROOT / SHAPES[shape][0]),
        f"data.root={root}",
        f"run.dir={run_dir}",
        f"train.max_steps={steps}",
        f"train.micro_batch_size={batch_size // ranks}",
        f"run.log_every={steps // 2}",
        "run.eval_every=100000",
        "run.eval_max_batches=1",
        "run.progress=none",
        "eval.latent_train_samples=128",
        "eval.joint_samples=128",
        "data.num_workers=1",
        "model.pseudo_samples=32",
    ]
    # the run chooses its own threads, and must not join the rendezvous of this process's own engines
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", *DIST_ENV)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "samples_per_s": summary["final"]["samples_per_s"],
        "threads": summary["hardware"]["threads"],
        "precision": summary["hardware"]["precision"],
    }


def bench_scaling(shapes: list[str], steps: int, batch_size: int, work: Path) -> dict:
    out = {"global_batch": batch_size}
    for shape in shapes:
        root = synthetic_shards(shape, work / f"scaling_{shape}")
        runs = {f"ranks_{r}": run_training(shape, root, r, steps, batch_size, work) for r in (1, 2)}
        out[shape] = {**runs, "two_ranks_over_one": runs["ranks_2"]["samples_per_s"] / runs["ranks_1"]["samples_per_s"]}
    out["allreduce"] = allreduce_share(batch_size)
    return out


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

    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from meme_scale.engine import all_gather_object, build_engine, init_distributed
    from meme_scale.evaluate import to_device
    from meme_scale.hardware import configure_threads
    from meme_scale.speed import apply_speed_options

    init_distributed()
    configure_threads(0, rank, all_gather_object)
    config, meta = SHAPES["mnist_svhn"]
    cfg = load_config(ROOT / config, [f"train.micro_batch_size={batch_size}"])
    precision = resolved_precision(cfg)
    specs = modality_specs(cfg.model, {"modalities": meta})
    torch.manual_seed(0)
    model = apply_speed_options(build_model(cfg.model, specs), cfg.train)
    engine = build_engine(model, torch.optim.Adam(model.parameters()), deepspeed_config(cfg, 2, precision))
    batch = to_device(synthetic_batch(meta, batch_size, seed=rank), torch.device("cpu"), DTYPES[precision])
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
        Path(out).write_text(
            json.dumps(
                {
                    "step_s": step,
                    "allreduce_s": reduce,
                    "gradient_elements": grads.numel(),
                    "allreduce_share": reduce / step,
                }
            )
        )
    dist.destroy_process_group()


# -- report ---------------------------------------------------------------------------------------
def _cell(s: dict) -> str:
    return f"{s['median']:.1f} [{s['min']:.1f}, {s['max']:.1f}]"


def markdown(result: dict) -> str:
    h = result["hardware"]
    caps = ", ".join(f"{k}={v}" for k, v in h["isa_caps"].items()) or "none"
    lines = [
        f"Machine: {h['cpu']}, {h['cpus']} CPUs ({h['cores_available']} available), torch {result['torch']} "
        f"(CPU capability {h['cpu_capability']}, AVX-512 BF16 {h['avx512_bf16']}, AMX {h['amx']}; ISA caps: {caps}); "
        f"{h['threads']} threads. bf16 probe: {h['bf16_probe']['bf16_gflops']:.1f} vs fp32 "
        f"{h['bf16_probe']['fp32_gflops']:.1f} GFLOP/s ({h['bf16_probe']['bf16_speedup']:.2f}x): "
        f"`train.precision: auto` resolves to **{h['auto_precision']}**.",
        "",
    ]
    if "step" in result:
        lines += [
            "| shapes | batch | plain (samples/s) | DeepSpeed fp32 | shipped | DeepSpeed overhead | "
            "shipped / plain | shipped setting |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for shape, r in result["step"].items():
            cells = " | ".join(_cell(r["samples_per_s"][p]) for p in PATHS)
            opts = ", ".join(f"{k}={v}" for k, v in r["shipped"].items())
            lines.append(
                f"| {shape} | {r['batch']} | {cells} | {r['deepspeed_overhead']:.1%} | "
                f"**{r['shipped_over_plain']:.2f}x** | {opts} |"
            )
    if "flops" in result:
        f = result["flops"]
        lines += [
            "",
            f"Matmul peak: fp32 {f['matmul_fp32'] / 1e9:.0f} GFLOP/s, bf16 {f['matmul_bf16'] / 1e9:.0f} GFLOP/s.",
            "",
            "| shapes | MFLOP/sample | plain | shipped |",
            "|---|---|---|---|",
        ]
        for shape, r in f["shapes"].items():
            cells = " | ".join(f"{r[p]['fraction_of_peak']:.1%} of {r[p]['dtype']} peak" for p in ("plain", "shipped"))
            lines.append(f"| {shape} | {r['flops_per_sample'] / 1e6:.1f} | {cells} |")
    for shape, r in result.get("fraction", {}).items():
        rates = ", ".join(f"{k.replace('_', ' = ')}: {_cell(v)}" for k, v in r["samples_per_s"].items())
        lines += [
            "",
            f"Observed fraction, {shape} (shipped step, {r['precision']}, samples/s): {rates}; "
            f"f = 0.25 runs **{r['f_0.25_over_f_1.0']:.2f}x** f = 1.",
        ]
    remote = result.get("data", {}).get("remote_mnist_svhn")
    for shape, d in result.get("data", {}).items():
        if shape.startswith("remote_"):
            continue
        rates = ", ".join(f"{k.replace('_', ' ')}: {v:.0f}" for k, v in d["reader_samples_per_s"].items())
        ratio = f"; {d['reader_over_step']:.1f}x its fastest step" if d["reader_over_step"] else ""
        lines += ["", f"Reader, {shape} shards (samples/s): {rates}{ratio}."]
    if remote:
        cells = ", ".join(
            f"{proto} {r['ratio_to_local']['0']:.2f}x / {r['ratio_to_local']['2']:.2f}x"
            for proto, r in remote.items()
            if "ratio_to_local" in r
        )
        lines += [
            "",
            f"Reader from servers on loopback, MNIST-SVHN shards, cache cold (0 / 2 workers, vs local disk): {cells}.",
        ]
    if "scaling" in result:
        s = result["scaling"]
        for shape, r in s.items():
            if isinstance(r, dict) and "two_ranks_over_one" in r:
                lines += [
                    "",
                    f"Training runs, {shape}, global batch {s['global_batch']} ({r['ranks_1']['precision']}): "
                    f"1 process {r['ranks_1']['samples_per_s']:.0f} samples/s ({r['ranks_1']['threads']} threads), "
                    f"2 ranks {r['ranks_2']['samples_per_s']:.0f} ({r['ranks_2']['threads']} thread(s) each): "
                    f"**{r['two_ranks_over_one']:.2f}x**.",
                ]
        lines += ["", f"Gradient all-reduce: {s['allreduce']['allreduce_share']:.1%} of a 2-rank MNIST-SVHN step."]
    if "objective" in result:
        o = result["objective"]
        cells = ", ".join(
            f"K = {name[2:]}: {v['median']:.2f} [{v['min']:.2f}, {v['max']:.2f}]"
            for name, v in o["ms_per_sample"].items()
        )
        lines += [
            "",
            f"MEME.loss forward + backward (ms/sample, MNIST-SVHN, batch {o['batch']}, all paired): {cells}; "
            f"K-sample cross term {o['cross_term_share']:.1%} of it (per repeat "
            f"{o['cross_term_share_per_repeat']['min']:.1%} to {o['cross_term_share_per_repeat']['max']:.1%}).",
        ]
    return "\n".join(lines) + "\n"


SECTIONS = ("step", "flops", "fraction", "data", "scaling", "objective")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--shapes", default="quickstart,mnist_svhn,cub")
    parser.add_argument("--fraction-shapes", default="quickstart,mnist_svhn", help="shapes of the fraction section")
    parser.add_argument("--scaling-shapes", default="quickstart,mnist_svhn", help="shapes of the scaling section")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--train-steps", type=int, default=60, help="steps of each scaling run")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--markdown", default=None, help="also write a markdown summary here")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for the step and fraction sections")
    args = parser.parse_args(argv)
    sections, shapes = args.sections.split(","), args.shapes.split(",")
    fraction_shapes, scaling_shapes = args.fraction_shapes.split(","), args.scaling_shapes.split(",")
    unknown = [s for s in sections if s not in SECTIONS] + [
        s for s in shapes + fraction_shapes + scaling_shapes if s not in SHAPES
    ]
    if unknown:
        parser.error(f"unknown section or shape: {unknown}")
    from meme_scale.engine import init_distributed

    init_distributed()  # a one-rank gloo group, as a plain `python train.py` makes
    result = {
        "benchmark": "meme_scale",
        "torch": torch.__version__,
        "hardware": hardware(),
        "command": " ".join(["python", "tools/bench.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    print(f"hardware: {json.dumps(result['hardware'])}", file=sys.stderr, flush=True)
    if "step" in sections or "flops" in sections:
        result["step"] = {}
        for shape in shapes:
            result["step"][shape] = bench_steps(shape, args.batch, args.repeats, args.steps, args.overrides)
            print(f"step {shape}: {json.dumps(result['step'][shape])}", file=sys.stderr, flush=True)
    if "flops" in sections:
        peak = matmul_peaks()
        result["flops"] = {"matmul_fp32": peak["fp32"], "matmul_bf16": peak["bf16"], "shapes": {}}
        for shape, r in result["step"].items():
            fps = r["flops_per_sample"]
            result["flops"]["shapes"][shape] = {
                "flops_per_sample": fps,
                **{
                    p: {
                        "dtype": r["precision"][p],
                        "fraction_of_peak": fps * r["samples_per_s"][p]["median"] / peak[r["precision"][p]],
                    }
                    for p in PATHS
                },
            }
    if "fraction" in sections:
        result["fraction"] = {}
        for shape in fraction_shapes:
            result["fraction"][shape] = bench_observed_fraction(
                shape, args.batch, args.repeats, args.steps, args.overrides
            )
            print(f"fraction {shape}: {json.dumps(result['fraction'][shape])}", file=sys.stderr, flush=True)
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
                result["data"][shape] = {
                    "reader_samples_per_s": readers,
                    "fastest_step_samples_per_s": fastest,
                    "reader_over_step": max(readers.values()) / fastest if fastest else None,
                }
                if shape == "mnist_svhn":  # the same shards from an HTTP and an S3 server on loopback, cache cold
                    # 8192 samples (2 epochs): with 2048, worker start-up and the first fetch were most of the time.
                    result["data"]["remote_mnist_svhn"] = remote_rates(
                        str(root), ["http", "s3"], args.batch, 8192, [0, 2], repeats=2
                    )
        if "scaling" in sections:
            result["scaling"] = bench_scaling(scaling_shapes, args.train_steps, args.batch, work)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
