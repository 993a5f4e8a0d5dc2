"""How each baseline is trained: its authors' recipe ("paper") or the bare bound ("plain").

A comparison against a baseline trained some other way than its authors trained it measures our
training, not the model: MVAE with unit weights and no KL annealing collapses to its prior on the
quickstart data (coherence at chance). The paper recipes, read from the reference implementations:

MVAE  (Wu & Goodman 2018; mhw32/multimodal-vae-public): KL weight annealed linearly from ~0 to 1
      over the first 200 of 500 epochs (40% of training), per minibatch; the low-dimensional
      modality's likelihood weighted 10 (``lambda_text``/``lambda_attrs``), the image's 1; the sum
      of the joint and unimodal ELBOs (sub-sampling, always on in this trainer).
MMVAE (Shi et al. 2019; iffsid/mmvae): DReG with K = 30 per component, stratified ("looser");
      the first modality's likelihood scaled by dim(x_2) / dim(x_1) (``llik_scaling``: MNIST x 3.92
      against SVHN, CUB images x 32/(3*64*64) against 32-token captions). K lives in model.mmvae_k.
MoPoE (Sutter et al. 2021; thomassutter/MoPoE): the prior expert N(0, I) joins the product of the
      full set only (``poe_fusion`` when every modality is in the subset); likelihood weights
      dim(largest) / dim(m) (``rec_weights``); beta = 2.5 on the KL terms (their shipped jobs).

Every knob acts in training only: in evaluation mode a model's loss is its unweighted bound, so
held-out numbers compare across recipes. Dimensions are ``prod(shape)``: pixels, features, tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .networks import ModalitySpec

RECIPES = ("paper", "plain")
UNSET = -1.0  # a knob at UNSET takes the recipe's value


@dataclass(frozen=True)
class Recipe:
    """The training knobs of one baseline, resolved: what its loss weighs and anneals."""

    likelihood_weights: tuple[float, ...] = ()  # per modality in names order; () = all 1
    kl_weight: float = 1.0  # weight of the KL terms once warmed up
    kl_warmup: float = 0.0  # fraction of the run over which the KL weight rises linearly from ~0
    full_set_prior_expert: bool = False  # MoPoE: N(0, I) joins the product of all modalities

    def weights(self, n: int) -> list[float]:
        return list(self.likelihood_weights) if self.likelihood_weights else [1.0] * n


def paper_recipe(model: str, specs: list[ModalitySpec]) -> Recipe:
    """The authors' recipe of ``model`` for these modalities (module docstring)."""
    sizes = [math.prod(s.shape) for s in specs]
    if model == "mvae":
        smallest = min(sizes)
        weights = tuple(10.0 if size == smallest and sizes.count(smallest) == 1 else 1.0 for size in sizes)
        return Recipe(weights, kl_weight=1.0, kl_warmup=0.4)
    if model == "mmvae":
        return Recipe((sizes[1] / sizes[0], *([1.0] * (len(sizes) - 1))))
    if model == "mopoe":
        return Recipe(tuple(max(sizes) / size for size in sizes), kl_weight=2.5, full_set_prior_expert=True)
    raise ValueError(f"model.recipe: no recipe for model {model!r}; baselines are mvae, mmvae, mopoe")


def resolve_recipe(model_cfg, specs: list[ModalitySpec]) -> Recipe:
    """``model.recipe`` with the explicitly set knobs (``kl_warmup``, ``kl_weight``, ``likelihood_weights``) on top."""
    name = model_cfg.name
    if model_cfg.recipe not in RECIPES:
        raise ValueError(f"model.recipe must be one of {list(RECIPES)}, got {model_cfg.recipe!r}")
    knobs = {
        "kl_warmup": model_cfg.kl_warmup != UNSET,
        "kl_weight": model_cfg.kl_weight != UNSET,
        "likelihood_weights": bool(model_cfg.likelihood_weights),
    }
    unused = [
        k for k, set_ in knobs.items() if set_ and (name == "meme" or (name == "mmvae" and k != "likelihood_weights"))
    ]
    if unused:  # a knob the model has no use for would be silently ignored
        raise ValueError(
            f"model.{unused[0]} does not apply to model {name!r} (MMVAE's bound has no KL term; "
            "MEME has no recipe knobs)"
        )
    if name == "meme":
        return Recipe()
    recipe = paper_recipe(name, specs) if model_cfg.recipe == "paper" else Recipe()
    if not 0.0 <= (warmup := model_cfg.kl_warmup if knobs["kl_warmup"] else recipe.kl_warmup) <= 1.0:
        raise ValueError(f"model.kl_warmup must be a fraction of train.max_steps in [0, 1], got {warmup}")
    if (weight := model_cfg.kl_weight if knobs["kl_weight"] else recipe.kl_weight) < 0:
        raise ValueError(f"model.kl_weight must be >= 0, got {weight}")
    weights = tuple(model_cfg.likelihood_weights) if knobs["likelihood_weights"] else recipe.likelihood_weights
    if weights and (len(weights) != len(specs) or min(weights) <= 0):
        raise ValueError(
            f"model.likelihood_weights needs one positive weight per modality "
            f"({[s.name for s in specs]}), got {list(weights)}"
        )
    return Recipe(weights, weight, warmup, recipe.full_set_prior_expert)


def kl_schedule(step: int, total_steps: int, warmup: float, weight: float = 1.0) -> float:
    """The KL weight at optimizer step ``step`` (0-based) of ``total_steps``: a linear warm-up.

    As the MVAE reference, per minibatch: ``weight * min(1, (step + 1) / n)`` with
    ``n = round(warmup * total_steps)`` warm-up steps; no warm-up (n = 0): ``weight``.
    """
    n = round(warmup * total_steps)
    return weight * min(1.0, (step + 1) / n) if n > 0 else weight
