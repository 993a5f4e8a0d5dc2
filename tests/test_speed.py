"""Speed options change no results, and every shipped config starts training through the real engine.

Tolerances (relative, on the loss of one fixed batch with the same random draws):
channels_last and torch.compile in fp32: 1e-5 (only the order of float sums may differ; gradients
1e-3 in norm per tensor, measured up to 1.1e-4 on conv weights, whose gradients sum B*H*W terms);
bf16 weights and data: 1e-2 (measured: at most 0.3% at the MNIST-SVHN and CUB shapes).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT, free_port

from meme_scale.config import load_config
from meme_scale.models import build_model, modality_specs
from meme_scale.speed import apply_speed_options

sys.path.insert(0, str(ROOT / "tools"))
from bench_step import SHAPES, synthetic_batch  # noqa: E402

FP32_TOL, BF16_TOL = 1e-5, 1e-2
# Per-tensor gradients under channels_last: oneDNN's NHWC kernels on an AVX2-only CPU put the CUB caption
# decoder's first layers 1.2e-3 from an fp64 reference (NCHW: 1.2e-4), elsewhere <= 1e-4; a layout bug is O(1).
NHWC_GRAD_TOL = 5e-3
SHIPPED_SHAPES = {  # every training config and the meta.json shapes of its dataset
    "quickstart.yaml": {
        "mnist": {"kind": "image", "shape": [1, 28, 28]},
        "digits": {"kind": "image", "shape": [1, 8, 8]},
    },
    "mnist_svhn.yaml": SHAPES["mnist_svhn"][1],
    "cub.yaml": SHAPES["cub"][1],
    "custom.yaml": {"pic": {"kind": "image", "shape": [3, 32, 32]}, "vec": {"kind": "vector", "shape": [16]}},
}


def _model_and_batch(shape: str, *overrides: str, n: int = 16):
    config, meta = SHAPES[shape]
    cfg = load_config(ROOT / config, [*overrides, "train.precision=fp32", "train.zero_stage=0"])
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, modality_specs(cfg.model, {"modalities": meta})), synthetic_batch(meta, n)


def _loss(model, batch) -> torch.Tensor:
    torch.manual_seed(1)  # the same latent draws for every variant
    loss, _ = model.loss(batch)
    return loss


@pytest.mark.parametrize("shape", ["mnist_svhn", "cub"])  # the shapes with convolutions
def test_channels_last_changes_neither_loss_nor_gradients(shape):
    cfg, model, batch = _model_and_batch(shape, "train.channels_last=false")
    reference = _loss(model, batch)
    reference.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    cfg.train.channels_last = True
    apply_speed_options(model, cfg.train)
    seen = []  # registered after the option's own hooks: sees what each conv really gets
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    for conv in convs:
        conv.register_forward_pre_hook(
            lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
    loss = _loss(model, batch)
    assert convs and len(seen) >= len(convs) and all(seen)  # every conv ran on an NHWC input
    assert loss.item() == pytest.approx(reference.item(), rel=FP32_TOL)
    loss.backward()
    for p, g in zip(model.parameters(), ref_grads):  # per tensor: single entries may differ by summation order
        assert (p.grad - g).norm() <= NHWC_GRAD_TOL * g.norm() + 1e-8


@pytest.mark.slow
def test_compiled_networks_give_the_eager_loss():
    cfg, model, batch = _model_and_batch("mnist_svhn", "model.k=2")
    reference = _loss(model, batch).item()
    cfg.train.compile = True
    keys = set(model.state_dict())
    apply_speed_options(model, cfg.train)
    assert set(model.state_dict()) == keys  # checkpoints of compiled and eager runs are interchangeable
    assert _loss(model, batch).item() == pytest.approx(reference, rel=FP32_TOL)


@pytest.mark.parametrize("shape", ["mnist_svhn", "cub"])  # the shapes with convolutions
def test_bf16_loss_agrees_within_its_tolerance(shape):
    _, model, batch = _model_and_batch(shape)
    reference = _loss(model, batch).item()
    low = {k: v.bfloat16() if v.is_floating_point() else v for k, v in batch.items()}
    assert _loss(model.bfloat16(), low).item() == pytest.approx(reference, rel=BF16_TOL)


def _step_every_config(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu"
    )
    from meme_scale.config import deepspeed_config
    from meme_scale.engine import adam, build_engine, init_distributed
    from meme_scale.evaluate import to_device
    from meme_scale.hardware import DTYPES, resolve_precision

    init_distributed()
    results = {}
    for name, meta in SHIPPED_SHAPES.items():
        cfg = load_config(ROOT / "configs" / name, ["train.micro_batch_size=8"])
        torch.manual_seed(0)
        model = apply_speed_options(build_model(cfg.model, modality_specs(cfg.model, {"modalities": meta})), cfg.train)
        precision = resolve_precision(cfg.train.precision, torch.device("cpu")).precision
        engine = build_engine(model, adam(model.parameters(), cfg.optim.lr), deepspeed_config(cfg, 1, precision))
        batch = to_device(synthetic_batch(meta, 8, observed_fraction=0.5), torch.device("cpu"), DTYPES[precision])
        before = [p.detach().float().clone() for p in engine.module.parameters()]
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
        moved = any(not torch.equal(a, p.detach().float()) for a, p in zip(before, engine.module.parameters()))
        results[name] = {"loss": loss.item(), "moved": moved, "precision": precision}
    Path(out).write_text(json.dumps(results))


@pytest.mark.slow
def test_every_shipped_config_takes_a_step_through_the_engine(tmp_path):
    """As shipped (precision, ZeRO stage, speed options), on synthetic data of its dataset's shapes."""
    shipped = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert shipped == set(SHIPPED_SHAPES), "a new config needs its shapes here"
    out = tmp_path / "steps.json"
    mp.start_processes(_step_every_config, args=(free_port(), str(out)), nprocs=1, start_method="spawn")
    results = json.loads(out.read_text())
    for name, r in results.items():
        assert torch.isfinite(torch.tensor(r["loss"])) and r["moved"], (name, r)
    # all the same: every shipped config says auto, resolved by this machine's bf16 probe
    assert len({r["precision"] for r in results.values()}) == 1 and results["cub.yaml"]["precision"] in ("fp32", "bf16")


def _train_with_and_without_allreduce(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu"
    )
    from meme_scale.config import deepspeed_config
    from meme_scale.engine import adam, build_engine, init_distributed

    init_distributed()
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["train.micro_batch_size=16", "train.grad_accum=2"])
    meta = SHIPPED_SHAPES["quickstart.yaml"]
    batch = synthetic_batch(meta, 16, observed_fraction=0.5)
    results = {}
    for allreduce in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg.model, modality_specs(cfg.model, {"modalities": meta}))
        engine = build_engine(model, adam(model.parameters(), cfg.optim.lr), deepspeed_config(cfg, 1, "fp32"))
        skipped = not engine.enable_backward_allreduce
        engine.enable_backward_allreduce = allreduce
        initial = torch.cat([p.detach().flatten() for p in engine.module.parameters()]).clone()
        for micro_step in range(6):  # 3 optimizer steps of 2 micro-batches
            torch.manual_seed(micro_step)
            loss, _ = engine(batch)
            engine.backward(loss)
            engine.step()
        params = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
        moved = not torch.equal(params, initial)
        results[str(allreduce)] = {"skipped_by_default": skipped, "moved": moved, "params": params.tolist()}
    Path(out).write_text(json.dumps(results))


def test_one_rank_engine_skips_the_gradient_allreduce_and_trains_the_same(tmp_path):
    """build_engine turns off DeepSpeed's all-reduce on one rank without ZeRO: same weights to the bit."""
    out = tmp_path / "params.json"
    mp.start_processes(_train_with_and_without_allreduce, args=(free_port(), str(out)), nprocs=1, start_method="spawn")
    results = json.loads(out.read_text())
    assert results["False"]["skipped_by_default"]
    with_allreduce, without = torch.tensor(results["True"]["params"]), torch.tensor(results["False"]["params"])
    assert results["True"]["moved"] and results["False"]["moved"]
    assert torch.equal(with_allreduce, without)


@pytest.mark.parametrize("net", ["svhn_conv", "caption_cnn"])
def test_matrix_product_layers_equal_the_convolutions_they_replace(net):
    """The networks' whole-input Conv2d and 1x1-input ConvTranspose2d run as matrix products: same outputs and
    gradients as torch's convolutions with the same weights, in both memory formats."""
    from meme_scale.models.networks import Conv2d, ConvTranspose2d

    torch.manual_seed(0)
    cases = (
        [
            (Conv2d(8, 16, (4, 16)), torch.nn.Conv2d, (5, 8, 4, 16)),
            (ConvTranspose2d(6, 12, (4, 4)), torch.nn.ConvTranspose2d, (5, 6, 1, 1)),
        ]
        if net == "svhn_conv"
        else [(ConvTranspose2d(6, 12, (1, 1), bias=False), torch.nn.ConvTranspose2d, (5, 6, 1, 1))]
    )
    for fast, base, shape in cases:
        ref = base(fast.in_channels, fast.out_channels, fast.kernel_size, bias=fast.bias is not None)
        ref.load_state_dict(fast.state_dict())
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
            out_fast, out_ref = fast(x), ref(x)
            torch.testing.assert_close(out_fast, out_ref, rtol=FP32_TOL, atol=1e-6)
            g = torch.randn_like(out_ref)
            grads = [torch.autograd.grad(o, [x, m.weight], g) for o, m in ((out_fast, fast), (out_ref, ref))]
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
