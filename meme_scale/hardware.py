"""What the machine a rank runs on does fast: the precision ``train.precision: auto`` resolves to, and
how many compute threads a rank uses. Knows nothing of MEME; decided once per run, logged and recorded.

Precision: bf16 halves memory traffic and, where the hardware runs it natively (CUDA cards with bf16,
CPUs with AVX-512 BF16 or AMX), doubles matmul throughput or better; where it does not (an AVX2-only
CPU) torch emulates it, measured 470x slower than fp32. What torch reports of the CPU is not the whole
story (oneDNN may be capped below the hardware, a VM may hide flags), so on CPU a short probe times a
bf16 matmul against an fp32 one and decides. fp16 is GPU-only (DeepSpeed refuses it on CPU).

Threads: ranks of one node share its cores. Each rank that leaves torch at its default uses every core
it can see, so two ranks on two cores run four busy threads (measured 3.9x slower than one process).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# bf16 is chosen on CPU when its matmul runs at least this much faster than fp32's. Native bf16 measured
# 2.7x (AVX-512 BF16) and ~4x (AMX) at the probe's size; emulated bf16 0.002x: any threshold between works.
BF16_MIN_SPEEDUP = 1.3
PROBE_SIZE = 256  # 33 MFLOP per matmul: ~0.2 ms natively, ~30 ms where bf16 is emulated


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run trains in, and why (logged, an MLflow param, a summary.json entry)."""

    requested: str
    precision: str
    reason: str
    probe: dict = field(default_factory=dict)

    def as_record(self) -> dict:
        return asdict(self)


def cpu_capabilities() -> dict:
    """What torch reports of this CPU (vector ISA it dispatches to, bf16 and AMX instructions)."""
    cpu = torch.cpu
    flag = lambda name: bool(getattr(cpu, name, lambda: False)())  # noqa: E731 - private, absent in old torch
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": flag("_is_avx512_bf16_supported"),
        "amx": flag("_is_amx_tile_supported"),
        "cores_available": available_cores(),
    }


def probe_bf16_matmul(size: int = PROBE_SIZE, repeats: int = 3) -> dict:
    """GFLOP/s of a ``size`` x ``size`` matmul in fp32 and bf16 with this process's threads: the best of
    ``repeats``, the two dtypes interleaved so that a burst of load from elsewhere hits both alike."""
    mats = {
        name: (torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype))
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    best = dict.fromkeys(mats, math.inf)
    for a, b in mats.values():
        torch.mm(a, b)  # warm-up: oneDNN/MKL pick and cache their kernels
    for _ in range(repeats):
        for name, (a, b) in mats.items():
            t0 = time.perf_counter()
            torch.mm(a, b)
            best[name] = min(best[name], time.perf_counter() - t0)
    rates = {f"{name}_gflops": 2 * size**3 / max(t, 1e-9) / 1e9 for name, t in best.items()}
    rates["bf16_speedup"] = rates["bf16_gflops"] / rates["fp32_gflops"]
    return rates


def resolve_precision(requested: str, device: torch.device, probe=probe_bf16_matmul) -> PrecisionChoice:
    """``train.precision`` (auto | fp32 | bf16 | fp16) -> the precision to train in, with its reason.

    ``probe`` measures bf16 against fp32 on CPU (tests pass a stand-in measurement).
    """
    if requested == "fp32":
        return PrecisionChoice(requested, "fp32", "train.precision is fp32")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        native = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return PrecisionChoice(
                requested, "bf16" if native else "fp32", f"{name} {'supports' if native else 'lacks'} bf16"
            )
        if requested == "bf16" and not native:
            log.warning(
                "train.precision is bf16, but %s lacks native bf16: expect it to be much slower than fp32 "
                "(train.precision=auto would choose fp32)",
                name,
            )
        return PrecisionChoice(requested, requested, f"train.precision is {requested} ({name})")
    if requested == "fp16":
        raise ValueError("train.precision fp16 needs a GPU (DeepSpeed has no fp16 on CPU); use auto, bf16 or fp32")
    measured = {**cpu_capabilities(), **probe()}
    speedup = measured["bf16_speedup"]
    summary = (
        f"bf16 matmul {measured['bf16_gflops']:.1f} GFLOP/s vs fp32 {measured['fp32_gflops']:.1f} "
        f"({speedup:.2f}x) on this CPU ({measured['cpu_capability']}, AVX-512 BF16 "
        f"{'yes' if measured['avx512_bf16'] else 'no'}, AMX {'yes' if measured['amx'] else 'no'})"
    )
    if requested == "auto":
        fast = speedup >= BF16_MIN_SPEEDUP
        return PrecisionChoice(
            requested,
            "bf16" if fast else "fp32",
            f"{summary}: {'bf16' if fast else 'fp32'} (bf16 needs >= {BF16_MIN_SPEEDUP}x)",
            measured,
        )
    if speedup < 1.0:
        log.warning(
            "train.precision is bf16, but this CPU runs bf16 %.0fx slower than fp32 (%s); "
            "train.precision=auto would choose fp32",
            1 / max(speedup, 1e-9),
            summary,
        )
    return PrecisionChoice(requested, "bf16", f"train.precision is bf16; {summary}", measured)


# -- threads ---------------------------------------------------------------------------------------
def available_cores() -> int:
    """Cores this process may run on: its affinity mask, capped by a cgroup CPU quota where one is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def ranks_sharing_my_cores(peers: list[tuple[str, frozenset]], rank: int) -> int:
    """How many ranks (this one included) run on this rank's host with an overlapping CPU affinity.

    ``peers`` holds every rank's (hostname, affinity set), in rank order. Launchers that bind each
    rank to its own cores (srun --cpu-bind, --bind_cores_to_rank) leave each rank alone on its set.
    """
    host, cores = peers[rank]
    return sum(1 for h, c in peers if h == host and (c & cores or not (c and cores)))


def resolve_threads(requested: int, sharing: int, env: dict | None = None) -> tuple[int, str]:
    """Compute threads for this rank and why: ``train.threads`` if set, else OMP_NUM_THREADS if set,
    else the cores this process may use divided among the ranks that share them."""
    env = os.environ if env is None else env
    if requested > 0:
        return requested, "train.threads"
    if env.get("OMP_NUM_THREADS", "").strip().isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores = available_cores()
    return max(1, cores // max(sharing, 1)), f"{cores} cores shared by {sharing} rank(s) on this node"


def configure_threads(requested: int, rank: int, gather) -> dict:
    """Sets this rank's torch threads (see resolve_threads); ``gather`` is an all-gather of a Python object
    over the ranks. Returns what was chosen, for the log and the run's record."""
    affinity = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
    sharing = ranks_sharing_my_cores(gather((socket.gethostname(), affinity)), rank)
    threads, reason = resolve_threads(requested, sharing)
    torch.set_num_threads(threads)
    return {"threads": threads, "threads_reason": reason, "ranks_sharing_cores": sharing}
