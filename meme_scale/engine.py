"""The distributed runtime: process-group setup for every launcher, the DeepSpeed engine, collectives.

Knows nothing of MEME: it takes an ``nn.Module`` whose ``forward(batch)`` returns ``(loss, terms)``.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` ("" = every interface, for peers on other nodes)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _launcher_env() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from Slurm, or for a single plain process.

    torchrun, the deepspeed launcher and accelerate set them already; ``srun`` sets only SLURM_*
    (DeepSpeed does not read those); plain ``python`` sets nothing and DeepSpeed would otherwise
    try MPI discovery.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and os.environ.get("MASTER_ADDR"):
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_PORT", "29500")
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def _without_shm_allreduce() -> None:
    """Keep DeepSpeed from loading its CPU shared-memory all-reduce op.

    Training never calls ``inference_all_reduce`` (the op's only user), yet every process group
    would JIT-build it under a lock in ~/.cache/torch_extensions (35 s on a fresh machine; a rank
    killed during the build leaves the lock behind and every later launch waits on it forever),
    leave a 67 MB ``/dev/shm/deepspeed_allreduce_buffer_*`` file per rank behind, and busy-wait
    forever on a peer that died before creating its file. ``deepspeed.ops.__compatible_ops__`` is
    the switch DeepSpeed consults before building it.
    """
    if torch.cuda.is_available():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> DistInfo:
    """One call for every launcher; gloo on CPU, NCCL on CUDA."""
    _launcher_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # Under srun --gpus-per-task/--gpu-bind (or any per-task CUDA_VISIBLE_DEVICES) each task sees
        # only its own GPU(s), so LOCAL_RANK can exceed the visible count; with every GPU visible the
        # modulo is LOCAL_RANK itself.
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        import deepspeed

        _without_shm_allreduce()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def adam(parameters, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam as one fused kernel over all parameters where torch has one (CPU and CUDA, fp32/bf16/fp16).

    The default for-loop Adam runs ~8 small ops per parameter tensor: at the quickstart's size that was
    as long as the model's own matmuls. Same update rule; fused=False elsewhere.
    """
    params = list(parameters)
    fused = all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params
    )
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused or None)


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
    """Wraps the model in a DeepSpeed engine (passing a torch optimizer avoids JIT-building FusedAdam)."""
    import deepspeed

    _without_shm_allreduce()  # a process group made by someone else (Ray Train) still gets a DeepSpeed backend here
    args = None
    if torch.cuda.is_available():  # DeepSpeed would set_device(LOCAL_RANK) itself: wrong when a task sees one GPU
        args = argparse.Namespace(device_rank=torch.cuda.current_device())
    engine, *_ = deepspeed.initialize(args=args, model=model, optimizer=optimizer, config=ds_config)
    if engine.dp_world_size == 1 and not engine.zero_optimization():
        # One data-parallel rank: the all-reduce would flatten every gradient, reduce it over nobody and copy
        # it back each step (~5% of the quickstart step). ZeRO's optimizers keep theirs: they move the
        # gradients into their partitions there.
        engine.enable_backward_allreduce = False
    return engine


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; every rank calls it every time (never inside a rank-dependent branch)."""
    out = values.detach().clone().float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Ends the process group together: every rank waits for the others, then tears gloo/NCCL down.

    A rank that simply exits while a peer still works (rank 0 exporting, writing reports) closes
    its sockets under the peer's communication threads, which can abort the peer ("terminate
    called without an active exception").
    """
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
