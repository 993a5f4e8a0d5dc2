"""The MEME model: one encoder and one decoder per modality, plus learnable pseudo-samples.

``loss(batch)`` mixes the three observation patterns of a batch (DESIGN 1.1-1.3); the maths lives
in ``meme_scale.objectives``. The sampling methods serve metrics and pictures.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from .. import objectives as obj
from .networks import ModalitySpec, build_networks


class MultimodalVAE(nn.Module):
    """What every model of this trainer shares: per-modality networks, likelihoods, batch checks.

    Baselines subclass it and only replace ``loss`` and the prior, so all models are compared with
    the same networks and likelihoods.
    """

    def __init__(self, specs: list[ModalitySpec], latent_dim: int):
        super().__init__()
        if len(specs) != 2:
            raise ValueError(f"MEME models two modalities; got {[s.name for s in specs]}")
        self.specs = {s.name: s for s in specs}
        self.names = [s.name for s in specs]
        self.latent_dim = latent_dim
        self.encoders = nn.ModuleDict()
        self.decoders = nn.ModuleDict()
        for spec in specs:
            self.encoders[spec.name], self.decoders[spec.name] = build_networks(spec, latent_dim)

    # -- likelihoods -------------------------------------------------------------------------
    def log_likelihood(self, modality: str, params: Tensor, data: Tensor) -> Tensor:
        spec = self.specs[modality]
        if spec.kind == "caption":
            return obj.categorical_log_prob(data, params, spec.pad_id)
        return obj.laplace_log_prob(data, params, spec.likelihood_scale)

    def log_lik_fn(self, modality: str):
        return partial(self.log_likelihood, modality)

    # -- checks ------------------------------------------------------------------------------
    def check_batch(self, batch: dict) -> None:
        """Shapes must match the declared ones: a wrong shape would otherwise broadcast silently."""
        for name, spec in self.specs.items():
            if name not in batch:
                raise KeyError(f"batch has no modality {name!r}; it has {sorted(k for k in batch if k != 'key')}")
            got = tuple(batch[name].shape[1:])
            if got != tuple(spec.shape):
                raise ValueError(f"modality {name!r}: batch shape {list(got)} != declared shape {list(spec.shape)}")
        observed = batch.get("observed")
        if observed is None or observed.shape != (batch[self.names[0]].shape[0], len(self.names)):
            raise ValueError(f"batch['observed'] must be a [B, {len(self.names)}] bool mask")

    # -- sampling API (metrics, pictures) ----------------------------------------------------
    def encode(self, modality: str, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoders[modality](x)

    def decode(self, modality: str, z: Tensor) -> Tensor:
        """The likelihood's mean: pixels/features, or the most likely token per position for captions."""
        params = self.decoders[modality](z)
        return params.argmax(-1) if self.specs[modality].kind == "caption" else params

    def reconstruct(self, modality: str, x: Tensor) -> Tensor:
        mu, _ = self.encode(modality, x)
        return self.decode(modality, mu)

    def cross_generate(self, src: str, dst: str, x: Tensor, sample: bool = True) -> Tensor:
        mu, sigma = self.encode(src, x)
        return self.decode(dst, obj.reparameterise(mu, sigma) if sample else mu)

    def sample_prior(self, n: int) -> dict[str, Tensor]:
        """Joint generations: z from the model's prior, decoded into every modality."""
        z = self.prior_sample(n)
        return {name: self.decode(name, z) for name in self.names}

    def prior_sample(self, n: int) -> Tensor:
        p = next(self.parameters())
        return torch.randn(n, self.latent_dim, device=p.device, dtype=p.dtype)

    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss(batch)

    def loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def touch_all_parameters(self, loss: Tensor) -> Tensor:
        """Adds 0 * every parameter so each one gets a (possibly zero) gradient on every rank.

        Without it a rank whose batch lacks a pattern (say no paired sample) would leave some
        parameters without ``.grad`` and the ranks' reductions would disagree.
        """
        return loss + sum(p.sum() for p in self.parameters()) * 0.0


class MEME(MultimodalVAE):
    """Mutual supervision (paired) + pseudo-sample priors (unpaired), DESIGN 1.1-1.2."""

    def __init__(
        self,
        specs: list[ModalitySpec],
        latent_dim: int = 64,
        k: int = 10,
        alpha: float = 10.0,
        pseudo_samples: int = 128,
    ):
        super().__init__(specs, latent_dim)
        self.k, self.alpha = k, alpha
        self.pseudo = nn.ParameterDict()
        for spec in specs:  # random init; init_pseudo_samples replaces it with real data
            shape = (pseudo_samples, *_pseudo_shape(spec))
            self.pseudo[spec.name] = nn.Parameter(torch.randn(shape) * (0.01 if spec.kind == "caption" else 1.0))

    # -- pseudo-samples ----------------------------------------------------------------------
    def pseudo_data(self, modality: str) -> Tensor:
        """Pseudo-samples in the modality's data space (unconstrained parameters mapped there)."""
        raw = self.pseudo[modality]
        kind = self.specs[modality].kind
        if kind == "image":
            return torch.sigmoid(raw)
        if kind == "caption":
            return torch.softmax(raw, dim=-1)
        return raw

    @torch.no_grad()
    def init_pseudo_samples(self, batch: dict) -> None:
        """Start each modality's pseudo-samples at real observed samples (cycled if the batch is small)."""
        for col, name in enumerate(self.names):
            data = batch[name][batch["observed"][:, col]]
            if len(data) == 0:
                continue
            n = self.pseudo[name].shape[0]
            data = data[torch.arange(n) % len(data)].to(self.pseudo[name].device)
            kind = self.specs[name].kind
            if kind == "image":
                value = torch.logit(data.float().clamp(1e-3, 1 - 1e-3))
            elif kind == "caption":
                value = 5.0 * nn.functional.one_hot(data, self.specs[name].vocab_size).float()
            else:
                value = data.float()
            self.pseudo[name].copy_(value)

    def prior_sample(self, n: int) -> Tensor:
        """z from the pseudo-sample prior: an equal mixture over both modalities' encoded pseudo-samples."""
        mus, sigmas = zip(*(self.encode(name, self.pseudo_data(name)) for name in self.names))
        mu, sigma = torch.cat(mus), torch.cat(sigmas)
        pick = torch.randint(len(mu), (n,), device=mu.device)
        return obj.reparameterise(mu[pick], sigma[pick])

    # -- objective ---------------------------------------------------------------------------
    def loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """-(sum of J over paired, s-only and t-only samples) / B, and the terms for logging.

        Each term is a ``[sum, count]`` pair over the samples it applies to, so ranks can add them
        up before dividing (a global mean, not a mean of means).
        """
        self.check_batch(batch)
        s, t = self.names
        observed = batch["observed"]
        batch_size = observed.shape[0]
        paired = observed[:, 0] & observed[:, 1]
        only = {s: observed[:, 0] & ~observed[:, 1], t: ~observed[:, 0] & observed[:, 1]}
        total = torch.zeros((), device=observed.device)
        terms = dict.fromkeys(self.term_names, None)

        def record(name: str, values: Tensor) -> None:
            terms[name] = torch.stack([values.detach().float().sum(), values.new_tensor(float(len(values)))])

        if paired.any():
            xs, xt = batch[s][paired], batch[t][paired]
            enc = {s: self.encode(s, xs), t: self.encode(t, xt)}  # encode once, use in both directions
            for x_name, y_name, x, y in ((s, t, xs, xt), (t, s, xt, xs)):
                bound, parts = obj.mutual_supervision_bound(
                    x, y,
                    lambda _, n=x_name: enc[n], self.decoders[x_name],
                    lambda _, n=y_name: enc[n], self.decoders[y_name],
                    self.log_lik_fn(x_name), self.log_lik_fn(y_name),
                    k=self.k, alpha=self.alpha, return_terms=True,
                )  # fmt: skip
                total = total + bound.sum()
                record(f"J_{x_name}|{y_name}", bound)
                record(f"kl_{x_name}|{y_name}", parts["kl"])
                record(f"log_p_{x_name}", parts["log_px"])
                record(f"log_qhat_{y_name}|{x_name}", parts["log_qhat"])

        for x_name, y_name in ((s, t), (t, s)):
            mask = only[x_name]
            if not mask.any():
                continue
            bound, parts = obj.pseudo_sample_bound(
                batch[x_name][mask],
                self.encoders[x_name], self.decoders[x_name], self.encoders[y_name],
                self.pseudo_data(y_name), self.log_lik_fn(x_name), return_terms=True,
            )  # fmt: skip
            total = total + bound.sum()
            record(f"J_{x_name}", bound)
            record(f"kl_{x_name}|pseudo", parts["kl"])

        loss = self.touch_all_parameters(-total / batch_size)
        record("paired_fraction", paired.float())
        zero = torch.zeros(2, device=observed.device)
        return loss, {k: zero if v is None else v for k, v in terms.items()}

    @property
    def term_names(self) -> list[str]:
        """Fixed names of the logged terms, identical on every rank whatever its batch holds."""
        s, t = self.names
        names = []
        for x, y in ((s, t), (t, s)):
            names += [f"J_{x}|{y}", f"kl_{x}|{y}", f"log_p_{x}", f"log_qhat_{y}|{x}"]
        return names + [f"J_{s}", f"kl_{s}|pseudo", f"J_{t}", f"kl_{t}|pseudo", "paired_fraction"]


def _pseudo_shape(spec: ModalitySpec) -> tuple[int, ...]:
    if spec.kind == "caption":
        return (*spec.shape, spec.vocab_size)
    return tuple(spec.shape)


def count_parameters(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())
