"""The step's speed options (``train.channels_last``, ``train.compile``), applied to a built model.
Neither changes what is computed, only how (tests/test_speed.py)."""

from __future__ import annotations

import torch
from torch import nn


def apply_speed_options(model: nn.Module, train_cfg) -> nn.Module:
    """In place, before the model is wrapped (the state_dict keys stay the same)."""
    if train_cfg.channels_last:
        # Inputs, not weights: oneDNN/cuDNN run NHWC when the input is NHWC, and the outputs stay
        # NHWC down the net. Weights stay contiguous, because DeepSpeed broadcasts and flattens
        # parameters through views that need a unit last stride (bf16 fails otherwise).
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                module.register_forward_pre_hook(_nhwc_input)
    if train_cfg.compile:
        # Per network, not the loss: the loss selects paired and unpaired rows with data-dependent
        # shapes, which would break one whole-loss graph into many; each network sees only a batch
        # dimension that varies (dynamic=True keeps that to one graph).
        for group in (model.encoders, model.decoders):
            for net in group.values():
                net.compile(dynamic=True)
    return model


def _nhwc_input(_module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
