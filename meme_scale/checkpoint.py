"""Checkpoints all ranks write together, that are never half-visible, and that resume exactly.

Layout under ``<run.dir>/checkpoints/`` (DeepSpeed's own files inside each tag):

    step_00000200/                      DeepSpeed model/optimizer states (all ranks)
    step_00000200/rank_00000.pt         this rank's RNG states (torch, cuda, python, numpy)
    step_00000200/meme_scale.json       step, data position, MLflow run id, world size; written last
    latest                              the newest complete tag (for DeepSpeed's own tools)

A tag counts only once ``meme_scale.json`` exists: rank 0 writes it (temp file + rename) after
every rank has finished writing, so a crash at any point leaves either a complete checkpoint or a
directory that ``--resume auto`` ignores.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .engine import barrier

log = logging.getLogger(__name__)
MARKER = "meme_scale.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("step_") and (p / MARKER).is_file())


def latest_tag(ckpt_dir: Path) -> str | None:
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((ckpt_dir / tag / MARKER).read_text())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, meta: dict, rank: int, keep: int) -> str:
    """Every rank calls this at the same step. Returns the tag written."""
    tag = tag_for(step)
    target = ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if target.exists():  # leftovers of a killed save, or a complete tag this run is about to rewrite
            remove_tag_dir(target)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    torch.save(rng_state(), target / f"rank_{rank:05d}.pt")
    barrier()  # every rank has written all of its files
    if rank == 0:
        _atomic_write(target / MARKER, json.dumps({**meta, "step": step, "tag": tag}, indent=2))
        _atomic_write(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, keep)
    barrier()
    return tag


def _prune(ckpt_dir: Path, keep: int) -> None:
    complete = complete_tags(ckpt_dir)
    newest = complete[-1]
    for tag in complete[:-keep]:
        remove_tag_dir(ckpt_dir / tag, ignore_errors=True)
    for p in ckpt_dir.iterdir():  # incomplete saves older than the newest complete one are dead
        if p.name.startswith("step_") and p.name < newest and not (p / MARKER).exists():
            remove_tag_dir(p, ignore_errors=True)


def remove_tag_dir(path: Path, ignore_errors: bool = False) -> None:
    """Deletes a checkpoint directory so that it stops counting as complete before anything else goes.

    ``shutil.rmtree`` removes files in directory order, so a kill or an error midway could leave
    ``meme_scale.json`` behind with the model files gone: a tag ``--resume auto`` would pick and could
    not load. The marker goes first, and its removal is made durable (fsync of the directory) before
    the rest, so any interruption leaves an incomplete directory, which ``_prune`` and ``save`` clear.
    """
    try:
        (path / MARKER).unlink(missing_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except FileNotFoundError:  # the directory itself is gone already
        return
    except OSError:
        if not ignore_errors:
            raise
        if (path / MARKER).exists():
            return  # the marker could not be removed: keep the whole checkpoint rather than half of it
    shutil.rmtree(path, ignore_errors=ignore_errors)


def load(engine, ckpt_dir: Path, tag: str, rank: int, world_size: int) -> dict:
    """Restores engine state (weights, optimizer, loss scaler, step counters) and this rank's RNG.

    With another world size, ZeRO-1/2 optimizer partitions cannot be re-split by DeepSpeed: the
    weights are restored from the consolidated fp32 state, the optimizer's moments start afresh.
    """
    meta = read_meta(ckpt_dir, tag)
    same_world = meta.get("world_size") == world_size
    if same_world or engine.zero_optimization_stage() == 0:
        path, _ = engine.load_checkpoint(
            str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    else:
        _load_weights_only(engine, consolidated_state_dict(ckpt_dir, tag))
        engine.global_steps = meta["step"]
    rank_file = ckpt_dir / tag / f"rank_{rank:05d}.pt"
    if same_world and rank_file.exists():
        set_rng_state(torch.load(rank_file, weights_only=True))
    elif rank == 0:
        log.warning(
            "checkpoint %s was written by %s ranks, resuming with %s: the data order and random draws differ "
            "from an uninterrupted run from here on%s",
            tag,
            meta.get("world_size"),
            world_size,
            "" if engine.zero_optimization_stage() == 0 else "; ZeRO optimizer moments were re-initialised",
        )
    return meta


def apply_optim_settings(optimizer, optim) -> None:
    """Sets lr, betas and weight decay of every param group from ``optim`` (an OptimConfig).

    A checkpoint restores the saved values with the moments; a sweep's scheduler (PBT) that changed
    ``optim.*`` between a trial's segments needs the new ones to win.
    """
    for group in optimizer.param_groups:  # DeepSpeed's ZeRO/bf16 wrappers expose the inner groups
        group["lr"] = optim.lr
        group["weight_decay"] = optim.weight_decay
        if "betas" in group:
            group["betas"] = tuple(optim.betas)


def _load_weights_only(engine, state: dict[str, torch.Tensor]) -> None:
    module_state = engine.module.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            module_state[name].copy_(value.to(module_state[name].dtype))
    engine.optimizer.refresh_fp32_params()  # ZeRO's fp32 partitions follow the module's weights


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights and buffers of a checkpoint; ZeRO-1/2 weights come from the fp32 master partitions."""
    model_file = ckpt_dir / tag / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} is missing: not a DeepSpeed checkpoint written by meme_scale")
    model_states = torch.load(model_file, map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in model_states["module"].items()}
    stage = model_states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)
    if stage == 1 and any((ckpt_dir / tag).glob("bf16_zero_pp_rank_*_optim_states.pt")):
        state.update(_bf16_optimizer_weights(ckpt_dir / tag, model_states["param_shapes"]))
    elif any((ckpt_dir / tag).glob("*zero_pp_rank_*_optim_states.pt")):
        # ZeRO keeps the exact fp32 weights only in the optimizer partitions; "module" holds bf16 copies.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state.update(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
    return state


def _bf16_optimizer_weights(tag_dir: Path, param_shapes: list[dict]) -> dict[str, torch.Tensor]:
    """The fp32 master weights of DeepSpeed's BF16_Optimizer (bf16 with ZeRO stage 1).

    Its files are no ZeRO checkpoints to ``zero_to_fp32``: each rank holds one slice of every
    parameter group's flat fp32 buffer (``single_partition_of_fp32_groups``); in rank order the
    slices make the buffer, parameters laid out in ``param_shapes`` order, padding at the end.
    """
    from deepspeed.utils.tensor_fragment import fragment_address

    files = sorted(
        tag_dir.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=lambda f: int(f.name.split("_")[4])
    )
    with torch.serialization.safe_globals([fragment_address]):
        parts = [torch.load(f, map_location="cpu", weights_only=True)["optimizer_state_dict"] for f in files]
    if len(parts) != parts[0]["partition_count"][0]:
        raise ValueError(f"{tag_dir}: {len(parts)} bf16 optimizer files for {parts[0]['partition_count'][0]} ranks")
    state = {}
    for g, shapes in enumerate(param_shapes):
        flat = torch.cat([p["single_partition_of_fp32_groups"][g] for p in parts])
        offset = 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            state[name] = flat[offset : offset + n].view(tuple(shape)).clone()
            offset += n
        if offset > len(flat):
            raise ValueError(f"{tag_dir}: parameter group {g} holds {len(flat)} values, its parameters {offset}")
    return state


def resolve(path: Path) -> tuple[Path, str]:
    """(checkpoints dir, tag) from a tag directory or a checkpoints directory (its newest complete tag)."""
    if (path / MARKER).is_file():
        return path.parent, path.name
    tag = latest_tag(path)
    if tag is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (a step_* directory with {MARKER})")
    return path, tag


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Writes ``{"state_dict", "config", "step"}``, loadable with ``torch.load(out, weights_only=True)``."""
    ckpt_dir, tag = resolve(Path(checkpoint))
    meta = read_meta(ckpt_dir, tag)
    payload = {"state_dict": consolidated_state_dict(ckpt_dir, tag), "config": meta["config"], "step": meta["step"]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, out)
    return out
