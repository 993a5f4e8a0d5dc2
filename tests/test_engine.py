"""Real DeepSpeed engines on 2 gloo ranks in spawned processes: mixed observation patterns never hang."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

pytestmark = pytest.mark.slow


def _worker(rank: int, world: int, port: int, out: str, zero_stage: int, precision: str = "fp32") -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    from meme_scale.config import deepspeed_config, load_config
    from meme_scale.engine import build_engine, init_distributed, shutdown
    from meme_scale.loop import parameter_digest
    from meme_scale.models import MEME, ModalitySpec

    init_distributed()
    torch.manual_seed(0)
    shape_b, net_b = ((3, 16, 16), "svhn_conv") if precision == "bf16" else ((1, 8, 8), "small_mlp")  # BatchNorm
    specs = [
        ModalitySpec("a", "image", (1, 8, 8), "small_mlp"),
        ModalitySpec("b", "image", shape_b, net_b, hidden=(8, 16, 32)),
    ]
    model = MEME(specs, latent_dim=4, k=3, pseudo_samples=8)
    cfg = load_config(
        None, [f"train.zero_stage={zero_stage}", "train.micro_batch_size=8", f"train.precision={precision}"]
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    engine = build_engine(model, torch.optim.Adam(model.parameters(), 1e-3), deepspeed_config(cfg, world))
    torch.manual_seed(1 + rank)
    observed = torch.ones(8, 2, dtype=torch.bool)
    if rank == 1:  # rank 0 sees only paired samples, rank 1 only unpaired ones (s-only and t-only)
        observed[:4, 1] = False
        observed[4:, 0] = False
    for _ in range(3):
        batch = {
            "a": torch.rand(8, 1, 8, 8, dtype=dtype),
            "b": torch.rand(8, *shape_b, dtype=dtype),
            "observed": observed,
        }
        loss, _ = engine(batch)
        assert torch.isfinite(loss)
        engine.backward(loss)
        engine.step()
    # The checkpoint's consolidated weights are the optimizer's fp32 master weights, whatever the mode
    from deepspeed.utils import safe_get_full_fp32_param

    from meme_scale.checkpoint import consolidated_state_dict

    engine.save_checkpoint(f"{out}.ckpt", tag="t")
    master = {
        name: (safe_get_full_fp32_param(p) if zero_stage else p).detach().float()
        for name, p in engine.module.named_parameters()
    }
    exact = True
    if rank == 0:
        saved = consolidated_state_dict(Path(f"{out}.ckpt"), "t")
        exact = all(torch.equal(saved[name], value) for name, value in master.items())
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"digest": parameter_digest(engine.module), "steps": engine.global_steps, "exact": exact}, f)
    shutdown()  # rank 1 must not exit while rank 0 still consolidates


@pytest.mark.parametrize("zero_stage, precision", [(0, "fp32"), (2, "fp32"), (1, "bf16"), (2, "bf16")])
def test_paired_rank_and_unpaired_rank_complete_in_sync(tmp_path, zero_stage, precision):
    """Also bf16 with BatchNorm (SVHN conv net): DeepSpeed must cast BN's buffers with the weights."""
    out = str(tmp_path / "result")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, 2, port, out, zero_stage, precision)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, "ranks hung"
    assert all(p.exitcode == 0 for p in procs)
    results = [json.load(open(f"{out}.{r}")) for r in range(2)]
    assert results[0] == results[1] and results[0]["steps"] == 3 and results[0]["exact"]
    # DeepSpeed's CPU shared-memory all-reduce stays unloaded: nothing is left behind in /dev/shm
    leftovers = [f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}" for r in range(2)]
    assert not [p for p in leftovers if os.path.exists(p)]
