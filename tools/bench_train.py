"""Throughput of the whole training step (real runs under torchrun) against the data pipeline alone.

    python tools/bench_train.py [--steps 40] [--quickstart DIR] [--out bench_train.json]

For the quickstart shapes (MNIST 1x28x28 + digits 1x8x8, real shards) and the MNIST-SVHN shapes
(1x28x28 + 3x32x32, synthetic shards written with the project's ShardWriter): samples/s of the
training step with 1 and 2 CPU ranks (gloo; the last logged window, so start-up and evaluation
are excluded), and the reader's samples/s with 0, 1 and 2 workers. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from meme_scale.data.shards import TrainStream, read_meta  # noqa: E402
from meme_scale.data.writer import ShardWriter  # noqa: E402

BATCH = 128


def synthetic_mnist_svhn(out: Path, n_train: int = 4096, n_test: int = 256) -> Path:
    rng = np.random.default_rng(0)
    modalities = {"mnist": {"kind": "image", "shape": [1, 28, 28]}, "svhn": {"kind": "image", "shape": [3, 32, 32]}}

    def samples(n):
        for _ in range(n):
            label = int(rng.integers(10))
            yield {"mnist": rng.integers(0, 256, (1, 28, 28), dtype=np.uint8),
                   "svhn": rng.integers(0, 256, (3, 32, 32), dtype=np.uint8), "label": label}  # fmt: skip

    with ShardWriter(str(out), "synthetic", modalities, [str(i) for i in range(10)], samples_per_shard=512) as w:
        w.write_split("train", samples(n_train))
        w.write_split("test", samples(n_test))
    return out


def reader_rate(root: Path, workers: int, batches: int = 40) -> float:
    names = list(read_meta(str(root))["modalities"])
    stream = TrainStream(str(root), "train", BATCH, modalities=names, rank=0, world_size=1, seed=0,
                         observed_fraction=0.5, missing="either", num_workers=workers)  # fmt: skip
    it = iter(stream)
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    n = sum(b["observed"].shape[0] for _, _, b in islice(it, batches))
    return n / (time.perf_counter() - t0)


def step_rate(root: Path, ranks: int, steps: int, overrides: list[str], work: Path) -> float:
    run_dir = work / f"run_{root.name}_{ranks}"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks), "--master_port",
           str(29900 + ranks), str(ROOT / "meme_scale" / "train.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
           f"data.root={root}", f"run.dir={run_dir}", f"train.max_steps={steps}", f"train.micro_batch_size={BATCH // ranks}",
           "run.log_every=10", "run.eval_every=100000", "run.eval_max_batches=1", "run.progress=none",
           "eval.latent_train_samples=128", "eval.joint_samples=128", "data.num_workers=1", *overrides]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, os.cpu_count() // ranks))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads((run_dir / "summary.json").read_text())["final"]["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--quickstart", default=None, help="quickstart shards (default: built in a temp dir)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        quick = Path(args.quickstart) if args.quickstart else work / "quickstart"
        if not args.quickstart:
            subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "quickstart", "--out", str(quick)],
                           check=True, capture_output=True)  # fmt: skip
        shapes = {
            "quickstart": (quick, ["model.modalities.0.name=mnist", "model.modalities.1.name=digits"]),
            "mnist_svhn": (synthetic_mnist_svhn(work / "mnist_svhn"),
                           ["model.modalities.1.name=svhn", "model.modalities.1.net=svhn_conv", "model.latent_dim=64",
                            "model.pseudo_samples=128"]),
        }  # fmt: skip
        result = {"benchmark": "train", "global_batch": BATCH, "steps": args.steps, "cpus": os.cpu_count(),
                  "machine": platform.machine(), "shapes": {}}  # fmt: skip
        for name, (root, overrides) in shapes.items():
            readers = {f"workers_{w}": reader_rate(root, w) for w in (0, 1, 2)}
            steps = {f"ranks_{r}": step_rate(root, r, args.steps, overrides, work) for r in (1, 2)}
            fastest_step = max(steps.values())
            result["shapes"][name] = {"step_samples_per_s": steps, "reader_samples_per_s": readers,
                                      "reader_over_step": max(readers.values()) / fastest_step}  # fmt: skip
            print(f"{name}: {json.dumps(result['shapes'][name])}", file=sys.stderr, flush=True)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
