"""Digit classifiers of the MMVAE evaluation protocol (DESIGN 4): one small CNN per image modality.

A classifier is trained once per dataset on a modality's training shards (Adam 1e-3, about 30
epochs), saved with its own test accuracy, and loaded frozen by the coherence metrics
(``meme_scale.metrics``), which report that accuracy beside every coherence number.

The network is LeNet-style and adapts to the modality's ``[C, H, W]`` shape: a block
``conv 3x3 -> ReLU -> max-pool 2`` is stacked while the feature map is at least 8 pixels on its
shorter side (at most three blocks: 28x28 -> 2 blocks to 7x7, 32x32 -> 3 blocks to 4x4,
8x8 -> 1 block to 4x4; a map smaller than 8 gets one conv without pooling), then
``flatten -> linear 128 -> ReLU -> dropout -> linear num_classes``. Pixels in [0, 1] are centred
to [-1, 1] inside the network.

Files hold only tensors and plain values (``state_dict``, ``shape``, ``num_classes``,
``test_accuracy``) and are read with ``torch.load(..., weights_only=True)``: loading a classifier
never runs pickled code.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WIDTHS = (16, 32, 64)  # channels of the conv blocks, in order
HIDDEN = 128
FILE_KEYS = ("state_dict", "shape", "num_classes", "test_accuracy")


class DigitClassifier(nn.Module):
    """LeNet-style CNN for images ``[B, *shape]`` in [0, 1] (uint8 input is scaled by 1/255); returns logits."""

    def __init__(self, shape: tuple[int, ...] | list[int], num_classes: int):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"a digit classifier needs an image shape [C, H, W], got {list(shape)}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.shape, self.num_classes = shape, int(num_classes)
        self.test_accuracy: float | None = None  # set when loaded from a file
        channels, h, w = shape
        layers: list[nn.Module] = []
        for width in WIDTHS:
            if min(h, w) < 8:
                break
            layers += [nn.Conv2d(channels, width, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2)]
            channels, h, w = width, h // 2, w // 2
        if not layers:  # tiny images: one conv, no pooling
            layers += [nn.Conv2d(channels, WIDTHS[0], 3, 1, 1), nn.ReLU()]
            channels = WIDTHS[0]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * h * w, HIDDEN),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(HIDDEN, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"classifier for images {list(self.shape)} got a batch of shape {list(x.shape)}")
        return self.head(self.features(as_float_images(x, self.head[1].weight.dtype) * 2 - 1))  # centre pixels


def as_float_images(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 pixels -> [0, 1]; float images are only cast to ``dtype``."""
    if not x.is_floating_point():
        return x.to(dtype) / 255.0
    return x.to(dtype)


def freeze(model: nn.Module) -> nn.Module:
    """Evaluation mode and no gradients: a frozen classifier is a fixed measuring instrument."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train_classifier(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> tuple[DigitClassifier, float]:
    """Trains a ``DigitClassifier`` on ``images [N, C, H, W]`` (float in [0, 1] or uint8) and ``labels [N]``.

    Adam(lr), ``epochs`` passes over the data in shuffled minibatches of ``batch_size``, cross
    entropy. Runs on the device of ``images``. Initialisation, shuffling and dropout depend only on
    ``seed``; the caller's random stream is left as it was. Returns the frozen classifier and its
    accuracy on the training set (evaluation mode).
    """
    labels = labels.to(images.device).long()
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (and at least one); got {len(images)} and {len(labels)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}); got [{int(labels.min())}, {int(labels.max())}]")
    device = images.device
    with torch.random.fork_rng(devices=rng_devices(device)), torch.enable_grad():
        torch.manual_seed(seed)
        model = DigitClassifier(tuple(images.shape[1:]), num_classes).to(device)
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        order_gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=order_gen).to(device)
            for start in range(0, len(images), batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(model(images[idx]), labels[idx])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
    freeze(model)
    return model, evaluate_classifier(model, images, labels)


@torch.no_grad()
def classifier_counts(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1024) -> Tensor:
    """``[correct, total]`` (float32, on the images' device) of argmax predictions; labels < 0 are skipped."""
    labels = labels.to(images.device).long()
    keep = labels >= 0
    images, labels = images[keep], labels[keep]
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        pred = model(images[start : start + batch_size]).argmax(-1)
        correct += int((pred == labels[start : start + batch_size]).sum())
    model.train(was_training)
    return torch.tensor([float(correct), float(len(labels))], device=images.device)


def evaluate_classifier(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    """Accuracy (fraction of correct argmax predictions) over the labelled images; NaN if there are none."""
    correct, total = classifier_counts(model, images, labels, batch_size).tolist()
    return correct / total if total else math.nan


def save_classifier(model: DigitClassifier, path: str | Path, test_accuracy: float | None) -> Path:
    """Writes ``{"state_dict", "shape", "num_classes", "test_accuracy"}`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "shape": [int(s) for s in model.shape],
        "num_classes": int(model.num_classes),
        "test_accuracy": None if test_accuracy is None else float(test_accuracy),
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> DigitClassifier:
    """A frozen classifier (eval mode, no gradients) from ``save_classifier``'s file; ``.test_accuracy`` is set.

    Reads only with ``weights_only=True``; a file missing a key or holding another shape is an error
    that names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier file {path} does not exist (written by save_classifier)")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    missing = [k for k in FILE_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ValueError(f"{path}: not a classifier file (missing {missing})")
    model = DigitClassifier(tuple(payload["shape"]), int(payload["num_classes"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit a classifier for shape {payload['shape']}: {err}") from err
    model.test_accuracy = payload["test_accuracy"]
    return freeze(model.to(map_location))


def rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []
