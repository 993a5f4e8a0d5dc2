"""The benchmark tools measure what they say: tools/bench_convs.py records each conv call of one loss once,
at the shape it ran at and whether its input needs a gradient, and counts forward + backward FLOPs."""

from __future__ import annotations

import sys

import torch
from conftest import ROOT
from torch import nn

sys.path.insert(0, str(ROOT / "tools"))
from bench_convs import conv_calls, time_call  # noqa: E402


def test_conv_calls_are_each_conv_of_one_loss_once_at_its_shape():
    calls = conv_calls("mnist_svhn", batch_size=4)
    model_convs = {name for name, *_ in calls}
    assert len(calls) == len(model_convs) == 8  # SVHN: 4 encoder + 4 decoder convs, one pass each
    encoder = [shape for name, _, shape, _ in calls if name.startswith("encoders.")]
    decoder = [shape for name, _, shape, _ in calls if name.startswith("decoders.")]
    assert encoder[0] == (4, 3, 32, 32)
    assert all(shape[0] == 4 for shape in encoder)
    assert all(shape[0] > 4 and shape[0] % 4 == 0 for shape in decoder)  # the K-sample pass: several rows per sample
    needs_input_grad = [grad for *_, grad in calls]
    assert needs_input_grad == [False] + [True] * 7  # only the data entering the encoder needs no gradient
    module = calls[0][1]
    module(torch.zeros(1, 3, 32, 32))  # the recording hooks are gone: timing the module records nothing
    assert len(calls) == 8


def test_time_call_counts_forward_and_both_backward_products():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    forward = 2 * 2 * 16 * 10 * 10 * 8 * 3 * 3
    flops, _ = time_call(conv, (2, 8, 10, 10), nhwc=True, repeats=1)
    assert flops == 3 * forward  # forward, grad of the input, grad of the weight
    flops, _ = time_call(conv, (2, 8, 10, 10), nhwc=True, repeats=1, input_grad=False)
    assert flops == 2 * forward  # data going in: no grad of the input
