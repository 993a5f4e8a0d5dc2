"""MEME's objective as pure tensor functions (DESIGN section 1).

Nothing here holds state or knows about networks: encoders, decoders and likelihoods are
passed in as callables, so every formula can be checked against an independent computation
without a trainer. Conventions:

* ``encode(x) -> (mu, sigma)``, each ``[B, L]``;
* ``decode(z)`` maps latents ``[..., B, L]`` to likelihood parameters ``[..., B, *event]``;
* ``log_lik(params, data)`` returns per-sample log-likelihoods of shape ``params.shape[:-event_dims]``
  where ``data`` is ``[B, *event]`` (leading sample dimensions of ``params`` broadcast).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Encoder = Callable[[Tensor], tuple[Tensor, Tensor]]
Decoder = Callable[[Tensor], Tensor]
LogLik = Callable[[Tensor, Tensor], Tensor]

_LOG2 = math.log(2.0)
_LOG2PI = math.log(2.0 * math.pi)


def _full(t: Tensor) -> Tensor:
    """Low-precision (bf16/fp16) values are promoted to float32; float64 stays float64 for exact checks."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _sum_event(values: Tensor, event_dims: int) -> Tensor:
    return values.sum(dim=tuple(range(-event_dims, 0))) if event_dims else values


def laplace_log_prob(x: Tensor, loc: Tensor, scale: float | Tensor = 1.0) -> Tensor:
    """log Laplace(x; loc, scale) = -|x - loc| / scale - log(2 scale), summed over x's non-batch dims.

    ``loc`` may carry extra leading sample dimensions (``[K, B, ...]``); it is evaluated in
    float32 so a bf16 decoder does not lose the sum over hundreds of pixels. A scalar scale is
    applied to the per-sample sums, not to every pixel: two passes over the decoder's output fewer.
    """
    loc, x = _full(loc), _full(x)
    dims = tuple(range(-(x.dim() - 1), 0))
    if isinstance(scale, (int, float)):
        n = math.prod(x.shape[1:])
        return (x - loc).abs().sum(dims) * (-1.0 / scale) - n * math.log(2.0 * scale)
    scale = torch.as_tensor(scale, dtype=loc.dtype, device=loc.device)
    return (-(x - loc).abs() / scale - torch.log(2.0 * scale)).sum(dims)


def categorical_log_prob(tokens: Tensor, logits: Tensor, pad_id: int) -> Tensor:
    """sum_t [tokens_t != pad] * log softmax(logits_t)[tokens_t], per sample.

    ``tokens`` is ``[B, T]`` (int64), ``logits`` is ``[..., B, T, V]``. Padding carries no
    likelihood, so captions of different lengths are compared on their real tokens only.
    Computed as logit[token] - logsumexp(logits): the [..., T, V] log-softmax is never stored
    (at the CUB shape it would be 11 x B x 32 x 1000 floats).
    """
    logits = _full(logits)
    index = tokens.expand(*logits.shape[:-1]).unsqueeze(-1)
    picked = logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    keep = (tokens != pad_id).to(picked.dtype)
    return (picked * keep).sum(-1)


def gaussian_kl(mu_q: Tensor, sigma_q: Tensor, mu_p: Tensor, sigma_p: Tensor) -> Tensor:
    """KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)) for diagonal Gaussians, summed over the last dim.

    = sum_l log(sigma_p / sigma_q) + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2
    """
    mu_q, sigma_q, mu_p, sigma_p = (_full(t) for t in (mu_q, sigma_q, mu_p, sigma_p))
    var_ratio = (sigma_q / sigma_p).pow(2)
    mean_term = ((mu_q - mu_p) / sigma_p).pow(2)
    return 0.5 * (var_ratio + mean_term - 1.0 - var_ratio.log()).sum(-1)


def gaussian_log_prob(z: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    """log N(z; mu, diag(sigma^2)), summed over the last (latent) dim."""
    z, mu, sigma = _full(z), _full(mu), _full(sigma)
    return (-0.5 * ((z - mu) / sigma).pow(2) - sigma.log() - 0.5 * _LOG2PI).sum(-1)


def mixture_log_prob(z: Tensor, mus: Tensor, sigmas: Tensor) -> Tensor:
    """log (1/N) sum_i N(z; mus_i, sigmas_i^2) for z ``[B, L]`` and components ``[N, L]`` -> ``[B]``."""
    per_component = gaussian_log_prob(z.unsqueeze(-2), mus, sigmas)  # [B, N]
    return torch.logsumexp(per_component, dim=-1) - math.log(mus.shape[0])


def reparameterise(mu: Tensor, sigma: Tensor, n: int | None = None) -> Tensor:
    """z = mu + sigma * eps; ``n`` prepends a dimension of ``n`` independent samples.

    Computed in (at least) float32: a bf16 z is too coarse for log q(z|x) when sigma is ~1e-3.
    """
    mu, sigma = _full(mu), _full(sigma)
    shape = mu.shape if n is None else (n, *mu.shape)
    return mu + sigma * torch.randn(shape, dtype=mu.dtype, device=mu.device)


def mutual_supervision_from_parts(
    log_px: Tensor, log_py_all: Tensor, kl: Tensor, alpha: float = 10.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """J_x|y of DESIGN 1.1 from its pieces, per sample ``[B]``, and the pieces for logging.

    ``log_px`` [B]: log p(x|z_0); ``log_py_all`` [K+1, B]: log p(y|z_k) for the main sample z_0 and
    K fresh ones, all from q(z|x); ``kl`` [B]: KL(q(z|x) || q(z|y)).
    log q^(y|x) = logmeanexp_k log p(y|z_k)   over all K + 1 samples
    w = exp(log p(y|z_0) - log q^(y|x))      detached: no gradient through the weight
    J = w (log p(x|z_0) - log p(y|z_0) - KL) + alpha log q^(y|x)
    """
    log_py = log_py_all[0]
    log_qhat = torch.logsumexp(log_py_all, dim=0) - math.log(log_py_all.shape[0])
    w = torch.exp(log_py - log_qhat).detach()
    bound = w * (log_px - log_py - kl) + alpha * log_qhat
    return bound, {"log_px": log_px, "log_py": log_py, "kl": kl, "log_qhat": log_qhat, "w": w}


def mutual_supervision_bound(
    x: Tensor,
    y: Tensor,
    encode_x: Encoder,
    decode_x: Decoder,
    encode_y: Encoder,
    decode_y: Decoder,
    log_lik_x: LogLik,
    log_lik_y: LogLik,
    k: int = 10,
    alpha: float = 10.0,
    *,
    return_terms: bool = False,
):
    """J_x|y of DESIGN 1.1: x supervised by y, per sample ``[B]`` (the reference the model is tested against).

    z_0..z_K ~ q(z|x) (z_0 is the main sample, z_1..z_K fresh; one ``[K+1, B, L]`` draw) go through
    ``decode_y`` as one batched pass; see ``mutual_supervision_from_parts`` for the formula.
    With ``return_terms`` a dict of the per-sample pieces is returned too (for logging).
    """
    mu_x, sigma_x = encode_x(x)
    mu_y, sigma_y = encode_y(y)
    z = reparameterise(mu_x, sigma_x, n=k + 1)  # [K+1, B, L]
    log_px = log_lik_x(decode_x(z[0]), x)
    log_py_all = log_lik_y(decode_y(z), y)  # [K+1, B]
    kl = gaussian_kl(mu_x, sigma_x, mu_y, sigma_y)
    bound, terms = mutual_supervision_from_parts(log_px, log_py_all, kl, alpha)
    return (bound, terms) if return_terms else bound


def pseudo_sample_kl(z: Tensor, mu_x: Tensor, sigma_x: Tensor, mu_pseudo: Tensor, sigma_pseudo: Tensor) -> Tensor:
    """The single-sample KL estimate of DESIGN 1.2: log q(z|x) - log p_lambda(z), per sample.

    p_lambda(z) = 1/N sum_i N(z; mu_pseudo_i, sigma_pseudo_i)  (the encoded pseudo-samples, ``[N, L]``)
    """
    return gaussian_log_prob(z, mu_x, sigma_x) - mixture_log_prob(z, mu_pseudo, sigma_pseudo)


def pseudo_sample_bound(
    x: Tensor,
    encode_x: Encoder,
    decode_x: Decoder,
    encode_y: Encoder,
    pseudo_y: Tensor,
    log_lik_x: LogLik,
    *,
    return_terms: bool = False,
):
    """J_x of DESIGN 1.2 for a sample whose partner y is missing, per sample ``[B]`` (the reference).

    J_x = log p(x|z) - (log q(z|x) - log p_lambda(z)),  z ~ q(z|x), one sample
    """
    mu_x, sigma_x = encode_x(x)
    z = reparameterise(mu_x, sigma_x)
    mu_l, sigma_l = encode_y(pseudo_y)
    log_px = log_lik_x(decode_x(z), x)
    kl = pseudo_sample_kl(z, mu_x, sigma_x, mu_l, sigma_l)
    bound = log_px - kl
    if not return_terms:
        return bound
    return bound, {"log_px": log_px, "kl": kl}


# -- generic pieces of the baselines (MVAE, MMVAE, MoPoE; DESIGN 1.5) ----------------------------
def product_of_experts(mus: Tensor, sigmas: Tensor, prior: bool = True) -> tuple[Tensor, Tensor]:
    """The Gaussian product of experts ``[E, ..., L]`` -> ``(mu, sigma)`` ``[..., L]`` (Wu & Goodman 2018).

    T_i = 1 / sigma_i^2                 (with ``prior`` the expert N(0, I) joins: T = 1, mu = 0)
    sigma^2 = 1 / sum_i T_i,   mu = sigma^2 sum_i T_i mu_i
    Computed in float32 (float64 stays) since precisions of sigma ~ 1e-3 overflow bf16's mantissa.
    """
    mus, sigmas = _full(mus), _full(sigmas)
    precision = sigmas.pow(-2)
    total = precision.sum(0) + (1.0 if prior else 0.0)
    return (precision * mus).sum(0) / total, total.rsqrt()


def standard_normal_kl(mu: Tensor, sigma: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)), summed over the last dim."""
    return gaussian_kl(mu, sigma, torch.zeros_like(mu), torch.ones_like(sigma))


def iwae_bound(log_w: Tensor, dim: int = 0) -> Tensor:
    """log (1/K) sum_k exp(log_w_k) over ``dim`` (K = its size): the importance-weighted bound (Burda et al. 2016)."""
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


def dreg_bound(log_w: Tensor, z: Tensor, dim: int = 0) -> Tensor:
    """The IWAE value of ``log_w`` with doubly-reparameterised gradients (DReG, Tucker et al. 2019).

    ``log_w`` must be computed with q's parameters detached, so the encoder is reached only through
    the reparameterised samples ``z`` (``log_w.shape + [L]``; nothing else in the loss may use ``z``).
    w~_k = softmax_k(log_w) (constant),   S = sum_k w~_k log_w_k,   z's incoming gradient times w~_k:
      decoder / prior:  sum_k w~_k   d log_w_k / d theta            (the IWAE gradient)
      encoder:          sum_k w~_k^2 d log_w_k / d z_k  d z_k / d phi
    value = iwae_bound(log_w) + S - stop_grad(S), so logs show the bound, not the surrogate.
    The gradient scaling is a hook on ``z`` (as in the MMVAE reference code); none without grad.
    """
    weights = torch.softmax(log_w.detach(), dim)
    if z.requires_grad:
        z.register_hook(lambda grad: grad * weights.unsqueeze(-1).to(grad.dtype))
    surrogate = (weights * log_w).sum(dim)
    return iwae_bound(log_w.detach(), dim) + surrogate - surrogate.detach()
