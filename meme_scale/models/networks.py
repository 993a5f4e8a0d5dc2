"""Encoders and decoders for the paper's modalities, and the registry that maps config names to them.

Every encoder maps a batch ``[B, *shape]`` to ``(mu, sigma)`` of a diagonal Gaussian over the
shared latent; every decoder maps latents ``[..., B, L]`` (any number of leading sample dims)
to likelihood parameters ``[..., B, *shape]`` (image means in (0, 1), vector means, or token
logits ``[..., B, T, V]`` for captions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModalitySpec:
    """Everything the model needs to know about one modality (from the config and meta.json)."""

    name: str
    kind: str  # "image" | "vector" | "caption"
    shape: tuple[int, ...]
    net: str
    hidden: tuple[int, ...] = ()
    sigma_min: float = 1e-3
    likelihood_scale: float = 1.0
    vocab_size: int = 0
    pad_id: int = 0
    embedding_dim: int = 128
    extra: dict = field(default_factory=dict)


class GaussianHead(nn.Module):
    """Splits features into (mu, sigma); sigma = softplus(.) + sigma_min keeps a floor with gradient everywhere."""

    def __init__(self, features: int, latent_dim: int, sigma_min: float):
        super().__init__()
        self.mu = nn.Linear(features, latent_dim)
        self.raw_sigma = nn.Linear(features, latent_dim)
        self.sigma_min = sigma_min

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.mu(h), F.softplus(self.raw_sigma(h)) + self.sigma_min


class SampleDecoder(nn.Module):
    """Folds leading sample dims into the batch so one network call serves ``[K, B, L]`` latents."""

    def __init__(self, body: nn.Module, out_shape: tuple[int, ...]):
        super().__init__()
        self.body = body
        self.out_shape = out_shape

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        weight = next(self.body.parameters())
        out = self.body(z.reshape(-1, z.shape[-1]).to(weight.dtype))  # fp32 latents into bf16 weights
        return out.reshape(*lead, *self.out_shape)


def _mlp(sizes: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    def __init__(self, spec: ModalitySpec, latent_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        d_in = math.prod(spec.shape)
        self.body = nn.Sequential(nn.Flatten(), _mlp([d_in, *hidden], nn.ELU), nn.ELU(inplace=True))
        self.head = GaussianHead(hidden[-1], latent_dim, spec.sigma_min)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.body(x))


def mlp_decoder(spec: ModalitySpec, latent_dim: int, hidden: tuple[int, ...]) -> SampleDecoder:
    d_out = math.prod(spec.shape)
    body = _mlp([latent_dim, *reversed(hidden), d_out], nn.ReLU)
    if spec.kind == "image":
        body.append(nn.Sigmoid())
    return SampleDecoder(body, spec.shape)


class Conv2d(nn.Conv2d):
    """A Conv2d whose kernel covers its whole input (the encoders' last layers) runs as one matrix product.

    That is what it computes, and oneDNN's convolution kernels are several times slower at it; the
    parameters and state_dict are nn.Conv2d's, and the result is equal up to float rounding.
    """

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.kernel_size or self.padding != (0, 0) or self.groups != 1:
            return super().forward(x)
        if x.is_contiguous(memory_format=torch.channels_last):  # flatten both in (h, w, c) order: no copy of x
            x_flat, w_flat = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1), self.weight.permute(0, 2, 3, 1).flatten(1)
        else:
            x_flat, w_flat = x.flatten(1), self.weight.flatten(1)
        return F.linear(x_flat, w_flat, self.bias)[:, :, None, None]


class ConvTranspose2d(nn.ConvTranspose2d):
    """A ConvTranspose2d from a 1 x 1 input (the decoders' first layers) runs as one matrix product.

    Each output pixel is then a linear function of the latent: z @ W[L, C*kh*kw]. oneDNN's transposed
    convolution takes 5-7x longer for it (measured at the SVHN decoder's shapes); same parameters.
    """

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if (
            x.shape[-2:] != (1, 1)
            or self.stride != (1, 1)
            or self.padding != (0, 0)
            or output_size is not None
            or self.groups != 1
        ):
            return super().forward(x, output_size)
        n, (kh, kw) = x.shape[0], self.kernel_size
        out = x.flatten(1) @ self.weight.flatten(1)  # [N, C * kh * kw], in (c, h, w) order
        out = out.view(n, self.out_channels, kh, kw)
        return out if self.bias is None else out + self.bias[:, None, None]


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that normalises a single value per channel with its running statistics.

    Masked sub-batches can hold one sample (a modality observed in one row of the batch at small f),
    and batch statistics of one value per channel are undefined. Same parameters and state_dict keys.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.numel() == x.shape[1]:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class ConvEncoder(nn.Module):
    """DCGAN-style stride-2 convs down to 4x4, then a 4x4 conv to a feature vector (SVHN net of DESIGN 1.4).

    BatchNorm after every conv, the last one without ReLU, as the authors' SVHN encoder.
    """

    def __init__(self, spec: ModalitySpec, latent_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        channels, size = spec.shape[0], spec.shape[-1]
        *widths, features = hidden
        layers: list[nn.Module] = []
        c_in = channels
        for c_out in widths:
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in, size = c_out, size // 2
        layers += [Conv2d(c_in, features, size, 1, 0, bias=False), BatchNorm2d(features), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = GaussianHead(features, latent_dim, spec.sigma_min)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.body(x))


def conv_decoder(spec: ModalitySpec, latent_dim: int, hidden: tuple[int, ...]) -> SampleDecoder:
    """Mirror of ConvEncoder with no BatchNorm (DESIGN 1.4): with it, a sample's likelihood would depend
    on the rest of its batch, and the K-sample pass decodes a batch of (K + 1) * B latents."""
    channels, size = spec.shape[0], spec.shape[-1]
    *widths, _features = hidden
    start = size >> len(widths)
    layers: list[nn.Module] = [
        nn.Unflatten(1, (latent_dim, 1, 1)),
        ConvTranspose2d(latent_dim, widths[-1], start, 1, 0),
        nn.ReLU(inplace=True),
    ]
    outs = [*reversed(widths[:-1]), channels]
    c_in = widths[-1]
    for i, c_out in enumerate(outs):
        last = i == len(outs) - 1
        layers.append(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1))
        layers.append(nn.Sigmoid() if last else nn.ReLU(inplace=True))
        c_in = c_out
    return SampleDecoder(nn.Sequential(*layers), spec.shape)


def _caption_plan(length: int, size: int, n_layers: int) -> list[tuple[tuple[int, int], ...]]:
    """Per-layer (kernel, stride, padding) pairs that halve each side of the T x E map until it is 4."""
    plan = []
    for _ in range(n_layers):
        kh, sh, ph = (4, 2, 1) if length > 4 else (1, 1, 0)
        kw, sw, pw = (4, 2, 1) if size > 4 else (1, 1, 0)
        plan.append(((kh, kw), (sh, sw), (ph, pw)))
        length, size = length // sh, size // sw
    return plan


def _caption_grid(spec: ModalitySpec, n_layers: int) -> tuple[int, int]:
    length, size = spec.shape[0], spec.embedding_dim
    for _, (sh, sw), _ in _caption_plan(length, size, n_layers):
        length, size = length // sh, size // sw
    return length, size


class CaptionEncoder(nn.Module):
    """CNN over embedded tokens ``[B, T]`` (or token distributions ``[B, T, V]`` for pseudo-samples).

    Treats the ``T x E`` embedding matrix as a one-channel image and halves both sides down to 4.
    """

    def __init__(self, spec: ModalitySpec, latent_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.embedding = nn.Embedding(spec.vocab_size, spec.embedding_dim, padding_idx=spec.pad_id)
        *widths, features = hidden
        layers: list[nn.Module] = []
        c_in = 1
        for c_out, (k, s, p) in zip(widths, _caption_plan(spec.shape[0], spec.embedding_dim, len(widths))):
            layers += [nn.Conv2d(c_in, c_out, k, s, p, bias=False), BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        layers += [Conv2d(c_in, features, _caption_grid(spec, len(widths)), 1, 0), nn.ReLU(inplace=True), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = GaussianHead(features, latent_dim, spec.sigma_min)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        if tokens.is_floating_point():  # soft tokens: expected embedding under the distribution
            emb = tokens.to(self.embedding.weight.dtype) @ self.embedding.weight
        else:
            emb = self.embedding(tokens)
        return self.head(self.body(emb.unsqueeze(1)))


def caption_decoder(spec: ModalitySpec, latent_dim: int, hidden: tuple[int, ...]) -> SampleDecoder:
    """Mirror of CaptionEncoder: latent -> T x E map -> per-position logits over the vocabulary.

    No BatchNorm, for the reason conv_decoder gives."""
    *widths, features = hidden
    plan = _caption_plan(spec.shape[0], spec.embedding_dim, len(widths))
    grid = _caption_grid(spec, len(widths))
    layers: list[nn.Module] = [
        nn.Unflatten(1, (latent_dim, 1, 1)),
        ConvTranspose2d(latent_dim, features, 1, 1, 0),
        nn.ReLU(inplace=True),
        ConvTranspose2d(features, widths[-1], grid, 1, 0),
        nn.ReLU(inplace=True),
    ]
    outs = [*reversed(widths[:-1]), 1]
    c_in = widths[-1]
    for c_out, (k, s, p) in zip(outs, reversed(plan)):
        last = c_out == 1
        layers.append(nn.ConvTranspose2d(c_in, c_out, k, s, p))
        if not last:
            layers.append(nn.ReLU(inplace=True))
        c_in = c_out
    layers += [nn.Flatten(1, 2), nn.Linear(spec.embedding_dim, spec.vocab_size)]  # [N, T, E] -> [N, T, V]
    return SampleDecoder(nn.Sequential(*layers), (spec.shape[0], spec.vocab_size))


@dataclass(frozen=True)
class NetworkKind:
    encoder: Callable[..., nn.Module]
    decoder: Callable[..., nn.Module]
    default_hidden: tuple[int, ...]
    kinds: tuple[str, ...]


NETWORKS: dict[str, NetworkKind] = {
    "mnist_mlp": NetworkKind(MLPEncoder, mlp_decoder, (512, 512), ("image",)),
    "small_mlp": NetworkKind(MLPEncoder, mlp_decoder, (256, 256), ("image", "vector")),
    "feature_mlp": NetworkKind(MLPEncoder, mlp_decoder, (1024, 512, 256), ("vector",)),
    "svhn_conv": NetworkKind(ConvEncoder, conv_decoder, (32, 64, 128, 512), ("image",)),
    "conv": NetworkKind(ConvEncoder, conv_decoder, (32, 64, 128, 256, 512), ("image",)),
    "caption_cnn": NetworkKind(CaptionEncoder, caption_decoder, (32, 64, 128, 512), ("caption",)),
}


def auto_network(kind: str, shape: tuple[int, ...]) -> str:
    """The network ``net: auto`` picks: MLPs for vectors and small images, convs for larger images."""
    if kind == "caption":
        return "caption_cnn"
    if kind == "vector":
        return "feature_mlp" if shape[0] >= 1024 else "small_mlp"
    size = shape[-1]
    if size >= 32 and shape[-2] == size and size & (size - 1) == 0:
        return "svhn_conv" if size == 32 else "conv"
    return "mnist_mlp" if math.prod(shape) > 256 else "small_mlp"


def build_networks(spec: ModalitySpec, latent_dim: int) -> tuple[nn.Module, nn.Module]:
    """The (encoder, decoder) pair the registry names for ``spec.net``."""
    if spec.net not in NETWORKS:
        raise ValueError(f"modality {spec.name!r}: unknown network {spec.net!r}; known: {sorted(NETWORKS)}")
    kind = NETWORKS[spec.net]
    if spec.kind not in kind.kinds:
        raise ValueError(f"modality {spec.name!r}: network {spec.net!r} does not take {spec.kind!r} data")
    if spec.net in ("svhn_conv", "conv"):
        _check_conv_shape(spec)
    if spec.kind == "caption" and spec.vocab_size <= 0:
        raise ValueError(f"modality {spec.name!r}: captions need a vocab_size (from meta.json)")
    hidden = tuple(spec.hidden) or kind.default_hidden
    return kind.encoder(spec, latent_dim, hidden), kind.decoder(spec, latent_dim, hidden)


def _check_conv_shape(spec: ModalitySpec) -> None:
    h, w = spec.shape[-2:]
    widths = len(tuple(spec.hidden) or NETWORKS[spec.net].default_hidden) - 1
    if len(spec.shape) != 3 or h != w or h % (1 << widths) or (h >> widths) < 1:
        raise ValueError(
            f"modality {spec.name!r}: network {spec.net!r} needs square [C, H, W] images with H divisible "
            f"by {1 << widths}, got shape {list(spec.shape)}"
        )
