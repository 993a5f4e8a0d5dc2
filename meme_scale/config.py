"""Typed configuration: the one source of truth for every key and default.

A run's config is a YAML file plus dotted ``key=value`` overrides (``train.max_steps=50``,
``model.modalities.0.net=svhn_conv``). Unknown keys, wrong types and out-of-range values are
errors that name the key and where it came from. The DeepSpeed JSON is generated from here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem, always naming the key and the file (or command-line override)."""


@dataclass
class ModalityConfig:
    name: str = ""  # must match a modality in the dataset's meta.json; order is (s, t)
    net: str = "auto"  # a name from models.NETWORKS, or auto: chosen from meta.json's kind and shape
    hidden: list[int] = field(default_factory=list)  # empty: the network's default widths
    sigma_min: float = 1e-3
    likelihood_scale: float = 1.0
    embedding_dim: int = 128  # captions only


@dataclass
class ModelConfig:
    name: str = "meme"  # meme | mvae | mmvae | mopoe (the baselines of DESIGN 1.5)
    latent_dim: int = 64
    k: int = 10  # fresh samples in the cross-generation term log q^(y|x)
    alpha: float = 10.0
    pseudo_samples: int = 128  # per modality
    pseudo_init: str = "data"  # data: a batch of real samples; random
    mmvae_k: int = 30  # MMVAE only: importance samples per mixture component (Shi et al. used 30)
    estimator: str = "dreg"  # MMVAE only: dreg (doubly-reparameterised gradients) | iwae
    # Baselines (DESIGN 1.5) train by a recipe: paper = as their authors' code did, plain = the bare bound.
    # A knob left at -1 (or []) takes the recipe's value (models/baselines.py, RECIPES). The knobs act in
    # training only; evaluation reports each model's unweighted bound.
    recipe: str = "paper"  # paper | plain
    kl_warmup: float = -1.0  # fraction of train.max_steps over which the KL weight rises linearly (MVAE paper: 0.4)
    kl_weight: float = -1.0  # the KL weight after the warm-up (MoPoE paper: beta 2.5)
    likelihood_weights: list[float] = field(default_factory=list)  # per modality, in (s, t) order
    modalities: list[ModalityConfig] = field(default_factory=list)  # empty: both of meta.json, net auto


@dataclass
class DataConfig:
    root: str = "data/quickstart"
    train_split: str = "train"
    eval_split: str = "test"
    observed_fraction: float = 1.0  # fraction of training samples that are paired
    missing: str = "either"  # which modality an unpaired sample keeps hidden: s | t | either
    mask_seed: int = 0  # which samples are paired; separate from train.seed so seeds share one pattern
    num_workers: int = 1


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping


@dataclass
class TrainConfig:
    micro_batch_size: int = 128  # per rank
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 needs a GPU)
    zero_stage: int = 0
    max_consecutive_nan: int = 5  # non-finite losses in a row before the run stops
    # Speed options (docs/benchmarks.md measures each; both leave the loss unchanged, tested):
    channels_last: bool = True  # conv layers run on NHWC inputs
    compile: bool = False  # torch.compile each encoder/decoder network


@dataclass
class RunConfig:
    dir: str = "runs/default"
    experiment: str = "meme_scale"
    run_name: str = ""
    tracking_uri: str = ""  # empty: sqlite:///<dir>/mlflow.db
    log_every: int = 10
    eval_every: int = 200
    eval_max_batches: int = 0  # 0: the whole eval split
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    progress: str = "auto"  # auto (a bar on a terminal, lines otherwise) | bar | lines | none (YAML reads a bare off as false)


@dataclass
class EvalConfig:
    classifiers: str = ""  # folder of <modality>.pt from tools/train_classifiers.py; "": <data.root>/classifiers
    joint_samples: int = 1000  # prior samples for joint coherence
    latent_train_samples: int = 2000  # training examples whose latents fit the linear probe
    latent_epochs: int = 30
    # CCA coherence of image-caption data: a word-vector text file; "": <data.root>/word_vectors.txt
    # (tools/word_vectors.py writes one from the training captions); skipped when there is none.
    cca_word_vectors: str = ""
    cca_components: int = 40
    cca_train_samples: int = 2000  # real training pairs the CCA is fitted on
    seed: int = 0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "model.name": ("meme", "mvae", "mmvae", "mopoe"),
    "model.estimator": ("dreg", "iwae"),
    "model.recipe": ("paper", "plain"),
    "model.pseudo_init": ("data", "random"),
    "data.missing": ("s", "t", "either"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.zero_stage": (0, 1, 2),
    "run.progress": ("auto", "bar", "lines", "none"),
}
POSITIVE = {"model.latent_dim", "model.pseudo_samples", "model.mmvae_k", "train.micro_batch_size",
            "train.grad_accum", "train.max_steps", "train.max_consecutive_nan", "run.log_every", "run.eval_every",
            "run.checkpoint_every", "run.keep_checkpoints", "optim.lr", "eval.cca_components", "eval.cca_train_samples"}  # fmt: skip


# -- loading ------------------------------------------------------------------------------------
def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Config from a YAML file (or defaults when ``path`` is None) with ``key=value`` overrides applied."""
    source = str(path) if path else "<defaults>"
    raw: dict = {}
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(Config, raw, "", source)
    validate(cfg, source)
    return cfg


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"command line: override {item!r} is not key=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    node: Any = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = _list_slot(node, part, item)
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last) if last.isdigit() else -1
        if not 0 <= idx <= len(node):
            raise ConfigError(f"command line: override {item!r}: no list element {last}")
        node[idx:idx + 1] = [value]
    else:
        node[last] = value


def _list_slot(node: list, part: str, item: str) -> Any:
    if not part.isdigit() or int(part) > len(node):
        raise ConfigError(f"command line: override {item!r}: no list element {part}")
    if int(part) == len(node):
        node.append({})
    return node[int(part)]


def _build(cls: type, raw: Any, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: key {prefix.rstrip('.') or 'config'!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{source}: unknown key {prefix + str(key)!r} (known under {prefix or 'top level'}: "
                              f"{', '.join(sorted(names))})")  # fmt: skip
    values = {k: _convert(hints[k], v, prefix + k, source) for k, v in raw.items()}
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, source: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, key + ".", source)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: key {key!r} must be a list, got {value!r}")
        return [_convert(item, v, f"{key}.{i}", source) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"internal: union-typed key {key!r} is not supported")
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise ConfigError(f"{source}: key {key!r} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return float(value) if hint is float else value


def validate(cfg: Config, source: str = "<config>") -> None:
    flat = flatten(cfg)
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{source}: key {key!r} must be one of {list(allowed)}, got {flat[key]!r}")
    for key in POSITIVE:
        if not flat[key] > 0:
            raise ConfigError(f"{source}: key {key!r} must be > 0, got {flat[key]!r}")
    if not 0.0 < cfg.data.observed_fraction <= 1.0:
        raise ConfigError(f"{source}: key 'data.observed_fraction' must be in (0, 1], got {cfg.data.observed_fraction}")
    if cfg.model.k < 0 or cfg.model.alpha < 0:
        raise ConfigError(f"{source}: keys 'model.k' and 'model.alpha' must be >= 0")
    if cfg.train.precision == "bf16" and cfg.train.zero_stage == 0:
        # DeepSpeed keeps fp32 master weights for bf16 only inside its ZeRO optimizers; stage 0 would
        # mean bf16 Adam updates, which round small steps away.
        raise ConfigError(f"{source}: key 'train.precision' bf16 needs 'train.zero_stage' >= 1 (fp32 master weights); "
                          "got zero_stage 0")  # fmt: skip
    if len(cfg.model.modalities) not in (0, 2):
        raise ConfigError(f"{source}: key 'model.modalities' must list exactly two modalities (s, t) or none")
    for i, m in enumerate(cfg.model.modalities):
        if not m.name:
            raise ConfigError(f"{source}: key 'model.modalities.{i}.name' is required")


# -- views --------------------------------------------------------------------------------------
def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flatten(cfg: Config | dict, prefix: str = "") -> dict[str, Any]:
    """``{"train.max_steps": 50, "model.modalities.0.name": "mnist", ...}`` for MLflow params and checks."""
    tree = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for i, v in enumerate(value):
                out.update(flatten(v, f"{prefix}{key}.{i}."))
        else:
            out[prefix + key] = value
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON, generated from the config (never kept by hand beside it)."""
    t = cfg.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "zero_optimization": {"stage": t.zero_stage},
        "steps_per_print": 1 << 30,  # our own logging reports progress
        "wall_clock_breakdown": False,
    }
    if cfg.optim.grad_clip > 0:
        ds["gradient_clipping"] = cfg.optim.grad_clip
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        # Buffers follow the weights: BatchNorm on CPU refuses bf16 weights beside fp32 running stats.
        ds["data_types"] = {"grad_accum_dtype": "fp32", "buffer_dtype": "bf16"}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}
        ds["data_types"] = {"buffer_dtype": "fp16"}
    return ds
