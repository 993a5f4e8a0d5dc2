"""Models: MEME and the baselines it is compared with, behind one interface (``loss(batch)``)."""

from __future__ import annotations

from .baselines import BASELINES, MMVAE, MVAE, MoPoE
from .meme import MEME, MultimodalVAE, count_parameters, pick_pseudo_samples
from .networks import NETWORKS, ModalitySpec, auto_network, build_networks
from .recipes import Recipe, resolve_recipe

MODELS = {"meme": MEME, **BASELINES}


def modality_specs(model_cfg, meta: dict) -> list[ModalitySpec]:
    """Joins the config's modality entries with the dataset's meta.json (kinds, shapes, vocabulary)."""
    available = meta["modalities"]
    entries = model_cfg.modalities or [None, None]
    names = [e.name for e in entries] if model_cfg.modalities else list(available)[:2]
    specs = []
    for name, entry in zip(names, entries):
        if name not in available:
            raise ValueError(f"model.modalities names {name!r}, but the dataset has only {sorted(available)}")
        info = available[name]
        kind, shape = info["kind"], tuple(info["shape"])
        net = entry.net if entry is not None and entry.net != "auto" else auto_network(kind, shape)
        opts = {}
        if entry is not None:
            opts = dict(
                hidden=tuple(entry.hidden),
                sigma_min=entry.sigma_min,
                likelihood_scale=entry.likelihood_scale,
                embedding_dim=entry.embedding_dim,
            )
        specs.append(
            ModalitySpec(
                name, kind, shape, net, vocab_size=info.get("vocab_size", 0), pad_id=info.get("pad_id", 0), **opts
            )
        )
    return specs


def build_model(model_cfg, specs: list[ModalitySpec]) -> MultimodalVAE:
    """The model of ``model.name``; a baseline gets its training recipe (``model.recipe`` and its knobs)."""
    if model_cfg.name not in MODELS:
        raise ValueError(f"model.name: unknown model {model_cfg.name!r}; known: {sorted(MODELS)}")
    recipe = resolve_recipe(model_cfg, specs)
    if model_cfg.name == "meme":
        return MEME(specs, model_cfg.latent_dim, model_cfg.k, model_cfg.alpha, model_cfg.pseudo_samples)
    if model_cfg.name == "mmvae":
        return MMVAE(specs, model_cfg.latent_dim, k=model_cfg.mmvae_k, estimator=model_cfg.estimator, recipe=recipe)
    return MODELS[model_cfg.name](specs, model_cfg.latent_dim, recipe=recipe)


__all__ = [
    "MEME",
    "MMVAE",
    "MODELS",
    "MVAE",
    "NETWORKS",
    "ModalitySpec",
    "MoPoE",
    "MultimodalVAE",
    "Recipe",
    "auto_network",
    "build_model",
    "build_networks",
    "count_parameters",
    "modality_specs",
    "pick_pseudo_samples",
    "resolve_recipe",
]
