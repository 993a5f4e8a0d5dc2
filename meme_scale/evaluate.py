"""Evaluation during and after training: held-out loss terms and the pictures of a model.

Every rank evaluates its share of the eval split (each sample once) and the sums are all-reduced
once at the end, so the numbers do not depend on the number of ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from .engine import all_reduce_sum
from .models import MultimodalVAE
from .pictures import save_grid


def to_device(batch: dict, device: torch.device, float_dtype: torch.dtype = torch.float32) -> dict:
    """Moves tensors to the device; float data takes the engine's dtype (bf16 weights need bf16 inputs)."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point():
                value = value.to(float_dtype)
        out[key] = value
    return out


@torch.no_grad()
def evaluate_loss(model: MultimodalVAE, batches: Iterable[dict], device: torch.device,
                  float_dtype: torch.dtype = torch.float32, max_batches: int = 0) -> dict[str, float]:  # fmt: skip
    """Mean loss terms over the eval split, identical for any number of ranks (same seed)."""
    with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training run's random stream
        torch.manual_seed(0)
        return _evaluate_loss(model, batches, device, float_dtype, max_batches)


def _evaluate_loss(model, batches, device, float_dtype, max_batches) -> dict[str, float]:
    was_training = model.training
    model.eval()
    names = None
    local = None
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        batch = to_device(batch, device, float_dtype)
        loss, terms = model.loss(batch)
        n = batch["observed"].shape[0]
        stacked = torch.stack([loss.detach().float() * n, torch.tensor(float(n), device=device)])[None]
        stacked = torch.cat([stacked, torch.stack(list(terms.values())).float()])
        names = names or ["loss", *terms]
        local = stacked if local is None else local + stacked
    if names is None:  # this rank had nothing to evaluate; it still joins the reduction
        names = ["loss", *model.term_names]
        local = torch.zeros(len(names), 2, device=device)
    total = all_reduce_sum(local)
    model.train(was_training)
    return {f"eval/{name}": s / c for name, (s, c) in zip(names, total.tolist()) if c > 0}


@torch.no_grad()
def picture_grid(model: MultimodalVAE, batch: dict, path: str | Path, device: torch.device,
                 float_dtype: torch.dtype = torch.float32, n: int = 10) -> Path | None:  # fmt: skip
    """Data, reconstructions, cross-generations and prior samples for image modalities."""
    images = [name for name in model.names if model.specs[name].kind == "image"]
    if not images:
        return None
    was_training = model.training
    model.eval()
    batch = to_device({k: v[:n] for k, v in batch.items() if isinstance(v, torch.Tensor)}, device, float_dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rows = _rows(model, batch, images, n)
    model.train(was_training)
    return save_grid(rows, path)


def _rows(model: MultimodalVAE, batch: dict, images: list[str], n: int) -> list:
    rows = []
    s, t = model.names
    for x, y in ((s, t), (t, s)):
        if x not in images:
            continue
        rows.append((f"{x} data", batch[x]))
        rows.append((f"{x} recon", model.reconstruct(x, batch[x])))
        rows.append((f"{y}->{x}", model.cross_generate(y, x, batch[y])))
    joint = model.sample_prior(n)
    return rows + [(f"prior {name}", joint[name]) for name in images]
