"""The baselines MEME is compared with, behind MEME's interface (DESIGN 1.5): MVAE, MMVAE and MoPoE.

All three reuse ``MultimodalVAE``'s networks and likelihoods and the prior p(z) = N(0, I). Each
``loss(batch)`` returns ``(-(sum of per-sample bounds) / B, terms)``, terms as ``[sum, count]`` pairs
under fixed names (``term_names``). Unobserved entries are never read: an encoder sees only the rows
where its modality is observed and a likelihood is evaluated only on observed rows.

MVAE  (Wu & Goodman 2018): q_S(z|X) = PoE(N(0, I), q_m(z|x_m) for m in S)
      per sample: sum_S ELBO_S over the non-empty subsets S of its observed modalities,
      ELBO_S = log p(x_S|z) - KL(q_S || N(0, I)),  z ~ q_S,  log p(x_S|z) = sum_{m in S} log p(x_m|z)
      (paired: ELBO_{s,t} + ELBO_s + ELBO_t, the paper's sub-sampling for two modalities; one
      modality observed: its own ELBO).
MoPoE (Sutter et al. 2021): q(z|X) = 1/|P| sum_{S in P} q_S(z|X),  q_S = PoE(q_m(z|x_m) for m in S),
      P = non-empty subsets of the observed modalities (paper recipe: the prior expert joins the
      product of the full set, as the reference code's ``poe_fusion``);
      per sample: 1/|P| sum_S [ log p(x_obs|z_S) - KL(q_S || N(0, I)) ],  z_S ~ q_S,
      every observed modality explained by every subset's z; KL(q || p) is replaced by the
      subset-weighted KLs (its upper bound by convexity, as the reference implementation does).
MMVAE (Shi et al. 2019): q(z|X) = 1/M sum_m q_m(z|x_m), paired samples only; stratified bound
      1/M sum_m log 1/K sum_k w_mk,  w_mk = p(z_mk) prod_n p(x_n|z_mk) / q(z_mk|X),  z_mk ~ q_m(z|x_m)
      with DReG gradients (default) or plain IWAE gradients (``estimator``).

Training recipes (``recipes.py``): in training mode each log p(x_m|z) is multiplied by its
likelihood weight w_m and each KL by the scheduled KL weight beta_t (MVAE: a warm-up that follows
``set_step``); in evaluation mode w = 1 and beta = 1, so the loss is the model's bound. The logged
``bound`` terms are always the unweighted bound; ``kl_weight`` is beta_t.
"""

from __future__ import annotations

import itertools
import logging
import math

import torch
from torch import Tensor

from .. import objectives as obj
from .meme import MultimodalVAE
from .networks import ModalitySpec
from .recipes import Recipe, kl_schedule

log = logging.getLogger(__name__)

ESTIMATORS = ("dreg", "iwae")
Terms = dict[str, Tensor]


def nonempty_subsets(names: list[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``names``, smallest first, in ``names`` order: (s,), (t,), (s, t)."""
    return [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]


def available_subsets(subsets: list[tuple[str, ...]], names: list[str], observed: Tensor) -> Tensor:
    """``[len(subsets), B]`` bool: subset S is usable for a sample when all of S is observed."""
    col = {name: i for i, name in enumerate(names)}
    return torch.stack([observed[:, [col[m] for m in subset]].all(1) for subset in subsets])


def _full(t: Tensor) -> Tensor:
    """Encoder outputs in float32 (float64 stays): bf16 z would be too coarse for log q(z) at sigma ~ 1e-3."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class _Recorder:
    """Collects terms as ``[sum, count]`` pairs; names never recorded come back as ``[0, 0]``."""

    def __init__(self, names: list[str], device: torch.device):
        self.terms: dict[str, Tensor | None] = dict.fromkeys(names, None)
        self.device = device

    def __call__(self, name: str, values: Tensor) -> None:
        assert name in self.terms, name
        self.terms[name] = torch.stack([values.detach().float().sum(), values.new_tensor(float(len(values))).float()])

    def result(self) -> Terms:
        zero = torch.zeros(2, device=self.device)
        return {k: zero if v is None else v for k, v in self.terms.items()}


class _Baseline(MultimodalVAE):
    """A baseline with a training recipe: likelihood weights and a KL weight that may follow the step."""

    def __init__(self, specs: list[ModalitySpec], latent_dim: int = 64, recipe: Recipe | None = None):
        super().__init__(specs, latent_dim)
        self.recipe = recipe or Recipe()
        self._progress: tuple[int, int] | None = None
        self._warned_step = False

    def set_step(self, step: int, total_steps: int) -> None:
        """Where training is (optimizer steps done, of ``train.max_steps``); the loop calls it before each step."""
        self._progress = (step, total_steps)

    def likelihood_weights(self) -> list[float]:
        return self.recipe.weights(len(self.names)) if self.training else [1.0] * len(self.names)

    def kl_weight(self) -> float:
        recipe = self.recipe
        if not self.training:
            return 1.0
        if recipe.kl_warmup <= 0:
            return recipe.kl_weight
        if self._progress is None:  # without the step there is no warm-up: say so rather than train silently without
            if not self._warned_step:
                log.warning(
                    "%s: a KL warm-up over %.0f%% of the run is configured but the training step is unknown "
                    "(nothing called set_step): training with the full KL weight %g",
                    type(self).__name__,
                    100 * recipe.kl_warmup,
                    recipe.kl_weight,
                )
                self._warned_step = True
            return recipe.kl_weight
        return kl_schedule(*self._progress, recipe.kl_warmup, recipe.kl_weight)


class _SubsetELBOModel(_Baseline):
    """What MVAE and MoPoE share: one ELBO per subset of observed modalities, from the PoE of its experts."""

    prior_expert: bool  # MVAE: N(0, I) joins every product
    explain_all: bool  # MoPoE: each subset's z explains every observed modality (MVAE: only the subset's)
    average: bool  # MoPoE: mean over the available subsets (the mixture weights); MVAE: their sum

    def __init__(self, specs: list[ModalitySpec], latent_dim: int = 64, recipe: Recipe | None = None):
        super().__init__(specs, latent_dim, recipe)
        self.subsets = nonempty_subsets(self.names)

    @staticmethod
    def subset_key(subset: tuple[str, ...]) -> str:
        """``mnist_and_digits``: term names must be valid MLflow metric names ('+' is not)."""
        return "_and_".join(subset)

    @property
    def term_names(self) -> list[str]:
        per_subset = [f"{kind}_{self.subset_key(s)}" for s in self.subsets for kind in ("elbo", "kl")]
        return ["bound", *per_subset, "kl_weight", "paired_fraction"]

    def loss(self, batch: dict) -> tuple[Tensor, Terms]:
        """-(sum over samples of sum_S mix_S [sum_m w_m log p(x_m|z_S) - beta KL_S]) / B (w = 1, beta = 1 in eval)."""
        self.check_batch(batch)
        observed = batch["observed"]
        batch_size = observed.shape[0]
        record = _Recorder(self.term_names, observed.device)
        enc = self._encode_observed(batch)
        avail = available_subsets(self.subsets, self.names, observed)  # [S, B]
        mix = avail.float() / avail.sum(0).clamp(min=1) if self.average else avail.float()
        weights, beta = dict(zip(self.names, self.likelihood_weights())), self.kl_weight()
        dtype = torch.promote_types(torch.float32, next(self.parameters()).dtype)
        objective = torch.zeros(batch_size, dtype=dtype, device=observed.device)
        bound = torch.zeros(batch_size, dtype=dtype, device=observed.device)  # unweighted, for the logs
        for i, subset in enumerate(self.subsets):
            rows = avail[i]
            if not rows.any():
                continue
            log_px, weighted_log_px, kl = self._subset_terms(subset, rows, enc, batch, weights)
            mix_rows = mix[i, rows].to(dtype)
            objective = objective.index_put((rows,), mix_rows * (weighted_log_px - beta * kl), accumulate=True)
            elbo = (log_px - kl).detach()
            bound = bound.index_put((rows,), mix_rows * elbo, accumulate=True)
            record(f"elbo_{self.subset_key(subset)}", elbo)
            record(f"kl_{self.subset_key(subset)}", kl)
        seen = observed.any(1)
        record("bound", bound[seen])
        record("kl_weight", torch.full((batch_size,), beta, device=observed.device))
        record("paired_fraction", observed.all(1).float())
        return self.touch_all_parameters(-objective.sum() / batch_size), record.result()

    def _encode_observed(self, batch: dict) -> dict[str, tuple[Tensor, Tensor]]:
        """Each encoder runs on its observed rows only; results sit in ``[B, L]`` tensors whose other
        rows (mu 0, sigma 1) are fillers that no available subset ever reads."""
        out = {}
        for col, name in enumerate(self.names):
            rows = batch["observed"][:, col]
            if not rows.any():
                continue
            mu, sigma = (_full(t) for t in self.encoders[name](batch[name][rows]))
            shape = (rows.shape[0], self.latent_dim)
            out[name] = (mu.new_zeros(shape).index_put((rows,), mu), sigma.new_ones(shape).index_put((rows,), sigma))
        return out

    def uses_prior_expert(self, subset: tuple[str, ...]) -> bool:
        return self.prior_expert or (self.recipe.full_set_prior_expert and len(subset) == len(self.names))

    def _subset_terms(
        self, subset: tuple[str, ...], rows: Tensor, enc: dict, batch: dict, weights: dict[str, float]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """log p(x|z_S), its weighted sum over modalities and KL(q_S || N(0, I)) on the rows where S is
        observed, from one reparameterised sample z_S ~ q_S."""
        mus = torch.stack([enc[m][0][rows] for m in subset])
        sigmas = torch.stack([enc[m][1][rows] for m in subset])
        mu, sigma = obj.product_of_experts(mus, sigmas, prior=self.uses_prior_expert(subset))
        z = obj.reparameterise(mu, sigma)
        targets = self.names if self.explain_all else subset
        per_modality = {m: self._observed_log_lik(m, z, batch, rows) for m in targets}
        log_px = sum(per_modality.values())
        weighted = sum(weights[m] * ll for m, ll in per_modality.items())
        return log_px, weighted, obj.standard_normal_kl(mu, sigma)

    def _observed_log_lik(self, name: str, z: Tensor, batch: dict, rows: Tensor) -> Tensor | float:
        """log p(x_m|z) on the rows where m is observed, 0 elsewhere (the zero-filled data is never read)."""
        keep = batch["observed"][rows, self.names.index(name)]
        if not keep.any():
            return 0.0
        x = batch[name][rows][keep]
        ll = self.log_likelihood(name, self.decoders[name](z[keep]), x)
        return ll if keep.all() else ll.new_zeros(len(z)).index_put((keep,), ll)


class MVAE(_SubsetELBOModel):
    """Product of experts with the prior expert and sub-sampled ELBOs (Wu & Goodman 2018)."""

    prior_expert, explain_all, average = True, False, False

    def encode(self, modality: str, x: Tensor) -> tuple[Tensor, Tensor]:
        """The unimodal posterior is the product of that expert with the prior expert N(0, I)."""
        mu, sigma = self.encoders[modality](x)
        return obj.product_of_experts(mu[None], sigma[None], prior=True)


class MoPoE(_SubsetELBOModel):
    """Mixture of the products of experts of every observed subset (Sutter et al. 2021)."""

    prior_expert, explain_all, average = False, True, True


class MMVAE(_Baseline):
    """Mixture of experts with the stratified IWAE/DReG bound (Shi et al. 2019); paired samples only."""

    def __init__(
        self,
        specs: list[ModalitySpec],
        latent_dim: int = 64,
        k: int = 10,
        estimator: str = "dreg",
        recipe: Recipe | None = None,
    ):
        super().__init__(specs, latent_dim, recipe)
        if estimator not in ESTIMATORS:
            raise ValueError(f"MMVAE estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")
        if k < 1:
            raise ValueError(f"MMVAE needs k >= 1 importance samples per component, got {k}")
        if self.recipe.kl_warmup > 0 or self.recipe.kl_weight != 1.0:
            raise ValueError("MMVAE's importance-weighted bound has no KL term to weigh or anneal")
        self.k, self.estimator = k, estimator
        self._warned = False

    @property
    def term_names(self) -> list[str]:
        cross = [f"log_p_{x}|{m}" for m in self.names for x in self.names]
        return ["bound", *[f"bound_{m}" for m in self.names], *cross, "ignored_unpaired", "paired_fraction"]

    def loss(self, batch: dict) -> tuple[Tensor, Terms]:
        """-(sum of the stratified bound over paired samples) / B; unpaired samples add nothing."""
        self.check_batch(batch)
        observed = batch["observed"]
        batch_size = observed.shape[0]
        paired = observed.all(1)
        record = _Recorder(self.term_names, observed.device)
        if not paired.all():
            self._warn_unpaired(int((~paired).sum()), batch_size)
        total = torch.zeros((), device=observed.device)
        if paired.any():
            objective, per_component, log_px = self.stratified_bound(
                {m: batch[m][paired] for m in self.names}, self.likelihood_weights()
            )
            total = objective.sum()
            record("bound", per_component.mean(0))
            for i, m in enumerate(self.names):
                record(f"bound_{m}", per_component[i])
                for x in self.names:
                    record(f"log_p_{x}|{m}", log_px[x][:, i].mean(0))
        record("ignored_unpaired", (~paired).float())
        record("paired_fraction", paired.float())
        return self.touch_all_parameters(-total / batch_size), record.result()

    def stratified_bound(
        self, xs: dict[str, Tensor], weights: list[float] | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The per-sample objective ``[n]`` (1/M sum_m of the component bounds, log p(x|z) weighted by
        ``weights``), the unweighted per-component bounds ``[M, n]`` (detached) and log p(x|z)
        ``[K, M, n]`` per modality.

        Noise: one ``randn(K, M, n, L)`` draw, components in ``names`` order.
        """
        enc = [self.encoders[m](xs[m]) for m in self.names]
        mus = torch.stack([_full(mu) for mu, _ in enc])  # [M, n, L]
        sigmas = torch.stack([_full(sigma) for _, sigma in enc])
        z = obj.reparameterise(mus, sigmas, n=self.k)  # [K, M, n, L]: z[:, m] ~ q_m
        if self.estimator == "dreg":  # the score-function path through q's parameters is dropped
            mus, sigmas = mus.detach(), sigmas.detach()
        log_q = obj.gaussian_log_prob(z.unsqueeze(2), mus, sigmas)  # [K, M, M'] x n: q_m'(z from m)
        log_q_moe = torch.logsumexp(log_q, dim=2) - math.log(len(self.names))
        log_pz = obj.gaussian_log_prob(z, torch.zeros_like(z), torch.ones_like(z))
        log_px = {x: self.log_likelihood(x, self.decoders[x](z), xs[x]) for x in self.names}
        weights = weights or [1.0] * len(self.names)
        log_w = log_pz - log_q_moe + sum(w * log_px[x] for w, x in zip(weights, self.names))  # [K, M, n]
        per_component = obj.dreg_bound(log_w, z) if self.estimator == "dreg" else obj.iwae_bound(log_w)
        if all(w == 1.0 for w in weights):
            unweighted = per_component.detach()
        else:
            unweighted = obj.iwae_bound((log_pz - log_q_moe + sum(log_px.values())).detach())
        return per_component.mean(0), unweighted, log_px

    def _warn_unpaired(self, n_unpaired: int, batch_size: int) -> None:
        """MMVAE's objective needs every modality: say once that partially observed data is dropped."""
        if not self._warned:
            log.warning(
                "MMVAE trains on paired samples only: %d of %d samples of this batch are unpaired and "
                "ignored (data.observed_fraction < 1); the 'ignored_unpaired' term counts them",
                n_unpaired,
                batch_size,
            )
            self._warned = True


BASELINES = {"mvae": MVAE, "mmvae": MMVAE, "mopoe": MoPoE}
