#!/usr/bin/env python
"""Data-path benchmark: conversion and reader throughput for every dataset kind; prints JSON.

    python tools/bench_data.py [--scale 1.0] [--batch-size 64] [--samples 10000] [--workers 0,1,2]

For each kind (mnist-svhn, cub, custom arrays with captions, custom arrays with vectors) it writes
synthetic raw input in the original formats into a temporary folder (``sources/fakeraw.py``:
idx + .mat files, a CUB-shaped tree of JPEGs and caption files, .npy/.txt arrays), converts it
with the real converter (timed: samples written per second, raw reading + resizing + tokenizer
training + writing + validation), then reads ``--samples`` training samples per setting through
``TrainStream`` (1 rank, paired fraction 0.5, so masks are exercised) with 0, 1 and 2 DataLoader
workers (timed from the first batch request: worker start-up included). Images arrive as float32,
captions as int64 ids tokenised in the reader.

Compare reader samples/s with the trainer's samples/s per rank (its log line): the issue asks
for reading to outpace the training step by 10x.

Remote reading (``--remote http,s3``, the default; ``--remote none`` skips it): the MNIST-SVHN
shards are served on 127.0.0.1 by tools/serve_shards.py (HTTP with Range) and by moto's
standalone S3-API server (``moto[server]``, the dev extra), and read through the same
TrainStream with no cache (every shard fetched: cache cold); reported beside the local-disk rate
as ``ratio_to_local`` per worker count (goal: >= 0.8).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager

try:
    import meme_scale.data.sources  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from meme_scale.data.shards import TrainStream, read_meta
from meme_scale.data.sources import cub, custom, fakeraw, mnist_svhn
from meme_scale.data.storage import Storage
from meme_scale.engine import free_port

TOOLS = os.path.dirname(os.path.abspath(__file__))


def _convert_mnist_svhn(tmp: str, scale: float) -> tuple[str, float]:
    per = max(2, int(100 * scale))
    fakeraw.mnist_files(os.path.join(tmp, "mnist"), {"train": per, "test": max(1, per // 5)})
    fakeraw.svhn_files(os.path.join(tmp, "svhn"), {"train": per, "test": max(1, per // 5)})
    out = os.path.join(tmp, "ms")
    t0 = time.perf_counter()
    mnist_svhn.build(out, os.path.join(tmp, "mnist"), os.path.join(tmp, "svhn"), shard_size=250)
    return out, time.perf_counter() - t0


def _convert_cub(tmp: str, scale: float) -> tuple[str, float]:
    fakeraw.cub_tree(
        os.path.join(tmp, "CUB"),
        n_train_classes=max(2, int(16 * scale)),
        n_test_classes=max(1, int(4 * scale)),
        images_per_class=10,
        image_size=(500, 375),
    )
    out = os.path.join(tmp, "cub")
    t0 = time.perf_counter()
    cub.build(out, os.path.join(tmp, "CUB"), shard_size=250)
    return out, time.perf_counter() - t0


def _convert_arrays(tmp: str, scale: float, caption: bool) -> tuple[str, float]:
    name = "arrays_caption" if caption else "arrays_vector"
    fakeraw.arrays_folder(os.path.join(tmp, name), n=max(40, int(2000 * scale)), caption=caption)
    out = os.path.join(tmp, name + "_shards")
    t0 = time.perf_counter()
    custom.build_from_arrays(out, os.path.join(tmp, name), shard_size=250)
    return out, time.perf_counter() - t0


KINDS = {
    "mnist-svhn": lambda tmp, s: _convert_mnist_svhn(tmp, s),
    "cub": lambda tmp, s: _convert_cub(tmp, s),
    "custom-image-caption": lambda tmp, s: _convert_arrays(tmp, s, caption=True),
    "custom-image-vector": lambda tmp, s: _convert_arrays(tmp, s, caption=False),
}


def read_rate(root: str, batch_size: int, samples: int, workers: int, storage: Storage | None = None) -> float:
    """Training samples per second through TrainStream (one rank) including worker start-up."""
    meta = read_meta(root, storage)
    stream = TrainStream(
        root,
        "train",
        batch_size,
        modalities=list(meta["modalities"])[:2],
        rank=0,
        world_size=1,
        seed=0,
        observed_fraction=0.5,
        missing="either",
        num_workers=workers,
        storage=storage,
    )
    n_batches = max(1, samples // batch_size)
    t0 = time.perf_counter()
    got = 0
    for _, _, batch in itertools.islice(stream, n_batches):
        got += batch["observed"].shape[0]
    return got / (time.perf_counter() - t0)


@contextmanager
def _server(cmd: list[str], port: int):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}") from None
                time.sleep(0.05)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _http_root(stack: ExitStack, folder: str) -> tuple[str, Storage, int]:
    port = free_port()
    parent, name = os.path.split(folder)
    proc = stack.enter_context(
        _server([sys.executable, os.path.join(TOOLS, "serve_shards.py"), parent, str(port)], port)
    )
    return f"http://127.0.0.1:{port}/{name}", Storage(), proc.pid


def _s3_root(stack: ExitStack, folder: str) -> tuple[str, Storage, int]:
    moto = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(moto):
        raise RuntimeError("moto_server not found (pip install 'moto[server]', in the dev extra)")
    import boto3

    port = free_port()
    proc = stack.enter_context(_server([moto, "-H", "127.0.0.1", "-p", str(port)], port))
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1"
    )
    client.create_bucket(Bucket="bench")
    for name in sorted(os.listdir(folder)):
        client.upload_file(os.path.join(folder, name), "bench", f"shards/{name}")
    storage = Storage(options={"s3": {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}})
    return "s3://bench/shards", storage, proc.pid


def remote_rates(
    folder: str, protocols: list[str], batch_size: int, samples: int, workers: list[int], repeats: int
) -> dict:
    """Reader samples/s from local disk and from each server on loopback (no cache: every read remote).

    Settings are measured in turns, ``repeats`` rounds, and the best of each is kept: on a shared
    machine other load only ever slows a measurement down, and turns spread it over all settings.
    The server runs on the same CPUs here (loopback), so its CPU time per 1,000 samples read is
    reported too: on a real deployment that work happens on another machine.
    """
    import psutil

    starters = {"http": _http_root, "s3": _s3_root}
    out: dict = {}
    with ExitStack() as stack:
        roots = {"local": (folder, None, None)}
        for proto in protocols:
            try:
                roots[proto] = starters[proto](stack, folder)
            except Exception as e:  # noqa: BLE001 - a missing optional server is reported, not fatal
                out[proto] = {"skipped": str(e)}
        best = {name: dict.fromkeys(map(str, workers), 0.0) for name in roots}
        server_cpu = dict.fromkeys(roots, 0.0)
        for _ in range(repeats):
            for w in workers:
                for name, (root, storage, pid) in roots.items():
                    before = sum(psutil.Process(pid).cpu_times()[:2]) if pid else 0.0
                    rate = read_rate(root, batch_size, samples, w, storage)
                    server_cpu[name] += (sum(psutil.Process(pid).cpu_times()[:2]) - before) if pid else 0.0
                    best[name][str(w)] = max(best[name][str(w)], round(rate, 1))
    for name, rates in best.items():
        out[name] = dict(rates)
        if name != "local":
            out[name]["ratio_to_local"] = {w: round(rates[w] / best["local"][w], 3) for w in rates}
            out[name]["server_cpu_s_per_1k_samples"] = round(
                server_cpu[name] / (repeats * len(workers) * samples) * 1000, 4
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--scale", type=float, default=1.0, help="size of the synthetic raw data (1.0: ~1,000-2,000 samples per kind)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=10000, help="training samples read per reader measurement")
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to measure")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"subset of {','.join(KINDS)}")
    p.add_argument(
        "--remote",
        default="http,s3",
        help="servers to read the mnist-svhn shards from on loopback (http, s3; 'none' to skip)",
    )
    p.add_argument("--repeats", type=int, default=3, help="rounds of the remote comparison (best of each kept)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "batch_size": args.batch_size,
        "samples_read": args.samples,
        "kinds": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        for kind in args.kinds.split(","):
            out, seconds = KINDS[kind](tmp, args.scale)
            meta = read_meta(out)
            total = sum(meta["splits"].values())
            entry = {
                "modalities": {m: f"{v['kind']} {v['shape']}" for m, v in meta["modalities"].items()},
                "samples": meta["splits"],
                "conversion_s": round(seconds, 3),
                "conversion_samples_per_s": round(total / seconds, 1),
                "reader_samples_per_s": {
                    str(w): round(read_rate(out, args.batch_size, args.samples, w), 1) for w in workers
                },
            }
            result["kinds"][kind] = entry
            print(f"{kind}: {json.dumps(entry)}", file=sys.stderr)
        remote = [r for r in args.remote.split(",") if r and r != "none"]
        if remote:
            folder = (
                os.path.join(tmp, "ms")
                if "mnist-svhn" in args.kinds.split(",")
                else _convert_mnist_svhn(tmp, args.scale)[0]
            )
            result["remote_mnist_svhn"] = remote_rates(
                folder, remote, args.batch_size, args.samples, workers, args.repeats
            )
            print(f"remote: {json.dumps(result['remote_mnist_svhn'])}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
