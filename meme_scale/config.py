"""Typed configuration: the one source of truth for every key, its type, allowed values, default and doc.

A run's config is a YAML file plus dotted ``key=value`` overrides (``train.max_steps=50``,
``model.modalities.0.net=svhn_conv``). Each key is a field of a pydantic model below: its type (a
``Literal`` lists the allowed values), its checks (``Field(gt=0)``), its default and, in the docstring
under it, its one-line doc, which ``train.py --help`` prints. Unknown keys, wrong types and
out-of-range values are errors naming the key and where it came from. The DeepSpeed JSON is generated
from here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config problem, always naming the key and the file (or command-line override)."""


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 floats: ``1e-4`` is a number (PyYAML, YAML 1.1, reads it as a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(text: str) -> Any:
    """YAML as configs and sweep files are read: safe, with YAML 1.2 floats."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader


def _in_unit_interval(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError("must be in (0, 1]")
    return value


Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, AfterValidator(_in_unit_interval)]


class Section(BaseModel):
    # strict: YAML's 1 is no "1" and no True; extra: an unknown key is an error, not a silent default
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True, validate_default=True)


class ModalityConfig(Section):
    name: str = ""
    """A modality of the dataset's meta.json; the list's order is (s, t)."""
    net: str = "auto"
    """A network of models.NETWORKS, or auto: chosen from meta.json's kind and shape."""
    hidden: list[int] = []
    """Layer widths; empty: the network's defaults."""
    sigma_min: float = 1e-3
    """Floor of the encoder's sigma."""
    likelihood_scale: float = 1.0
    """Scale of the Laplace image likelihood."""
    embedding_dim: Positive = 128
    """Token embedding size (captions only)."""


class ModelConfig(Section):
    name: Literal["meme", "mvae", "mmvae", "mopoe"] = "meme"
    """MEME or one of the baselines it is compared with (DESIGN 1.5)."""
    latent_dim: Positive = 64
    """Size of the shared latent."""
    k: NonNegative = 10
    """Fresh samples in MEME's cross-generation term log q^(y|x)."""
    alpha: Annotated[float, Field(ge=0)] = 10.0
    """Weight of log q^(y|x) in MEME's bound."""
    pseudo_samples: Positive = 128
    """MEME's pseudo-samples per modality (N distinct points)."""
    pseudo_init: Literal["data", "random"] = "data"
    """data: N distinct observed training samples; random: noise."""
    mmvae_k: Positive = 30
    """MMVAE only: importance samples per mixture component (Shi et al. used 30)."""
    estimator: Literal["dreg", "iwae"] = "dreg"
    """MMVAE only: doubly-reparameterised or plain IWAE gradients."""
    recipe: Literal["paper", "plain"] = "paper"
    """Baselines only: paper = as their authors' code trained them (models/recipes.py), plain = the bare bound."""
    kl_warmup: float = -1.0
    """Baselines: fraction of train.max_steps over which the KL weight rises linearly; -1: the recipe's."""
    kl_weight: float = -1.0
    """Baselines: the KL weight after the warm-up (MoPoE's beta); -1: the recipe's."""
    likelihood_weights: list[float] = []
    """Baselines: per-modality likelihood weights in (s, t) order; empty: the recipe's."""
    modalities: list[ModalityConfig] = []
    """Two modalities (s, t), or none: both of meta.json with net auto."""

    @model_validator(mode="after")
    def _two_named_modalities(self) -> ModelConfig:
        if len(self.modalities) not in (0, 2):
            raise ValueError("must list exactly two modalities (s, t) or none")
        for i, m in enumerate(self.modalities):
            if not m.name:
                raise ValueError(f"model.modalities.{i}.name is required")
        return self


class DataConfig(Section):
    root: str = "data/quickstart"
    """Shard folder or URL (file://, http(s)://, s3://, pipe:COMMAND; data/storage.py)."""
    train_split: str = "train"
    """Split trained on."""
    eval_split: str = "test"
    """Split evaluated on."""
    observed_fraction: Fraction = 1.0
    """Fraction f of training samples that are paired."""
    missing: Literal["s", "t", "either"] = "either"
    """Which modality an unpaired sample keeps hidden."""
    mask_seed: int = 0
    """Which samples are paired (apart from train.seed, so seeds share one pattern)."""
    num_workers: NonNegative = 1
    """Data worker processes per rank (one thread each)."""
    retries: Positive = 8
    """Attempts per remote shard before the read fails, naming the URL."""
    retry_wait: PositiveFloat = 1.0
    """Seconds before the first retry, doubling up to 30."""
    cache_dir: str = ""
    """Keep fetched remote shards here; empty: no cache."""
    cache_max_gb: PositiveFloat = 20.0
    """The cache's size bound (least recently used shards leave first)."""


class OptimConfig(Section):
    lr: PositiveFloat = 5e-4
    """Adam's learning rate."""
    betas: list[float] = [0.9, 0.999]
    """Adam's betas."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """Adam's weight decay."""
    # 1.0 is what every run had before this key reached DeepSpeed (its silent default); MEME on the quickstart
    # data, f = 1, 2000 steps: cross coherence 0.887 with it, 0.850 without.
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    """Gradient norm clipping; 0 disables it."""


class TrainConfig(Section):
    micro_batch_size: Positive = 128
    """Samples per rank per micro-batch."""
    grad_accum: Positive = 1
    """Micro-batches per optimizer step."""
    max_steps: Positive = 1000
    """Optimizer steps of the run."""
    seed: int = 0
    """Initial weights and training noise."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 where the device runs it natively (a probe measures it on CPU), else fp32; fp16 needs a GPU."""
    zero_stage: Literal[0, 1, 2] = 0
    """DeepSpeed ZeRO stage; bf16 runs at >= 1 (its fp32 master weights live in ZeRO's optimizers)."""
    threads: NonNegative = 0
    """Compute threads per rank; 0: OMP_NUM_THREADS if set, else the cores divided among the ranks sharing them."""
    max_consecutive_nan: Positive = 5
    """Non-finite losses in a row before the run stops (the last good checkpoint stays)."""
    channels_last: bool = True
    """Conv layers run on NHWC inputs (same results; docs/benchmarks.md)."""
    compile: bool = False
    """torch.compile each encoder and decoder (same results; measured no faster on CPU)."""


class RunConfig(Section):
    dir: str = "runs/default"
    """Checkpoints, pictures, reports and the local MLflow store."""
    experiment: str = "meme_scale"
    """MLflow experiment."""
    run_name: str = ""
    """MLflow run name; empty: MLflow's."""
    tracking_uri: str = ""
    """MLflow tracking URI; empty: sqlite:///<run.dir>/mlflow.db."""
    tracking_required: bool = True
    """false: a tracking server away at start-up does not stop the run (it queues)."""
    log_every: Positive = 10
    """Steps between logged metrics."""
    eval_every: Positive = 200
    """Steps between evaluations."""
    eval_max_batches: NonNegative = 0
    """Evaluation batches; 0: the whole eval split."""
    checkpoint_every: Positive = 200
    """Steps between checkpoints."""
    keep_checkpoints: Positive = 3
    """Newest complete checkpoints kept."""
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    """auto: a bar on a terminal, log lines otherwise."""


class EvalConfig(Section):
    classifiers: str = ""
    """Folder of <modality>.pt (tools/train_classifiers.py); empty: <data.root>/classifiers."""
    joint_samples: NonNegative = 1000
    """Prior samples for joint coherence."""
    latent_train_samples: NonNegative = 2000
    """Training examples whose latents fit the linear probe."""
    latent_epochs: NonNegative = 30
    """Epochs of the latent linear probe."""
    cca_word_vectors: str = ""
    """Word vectors for CCA coherence of captions; empty: <data.root>/word_vectors.txt (tools/word_vectors.py)."""
    cca_components: Positive = 40
    """CCA components."""
    cca_train_samples: Positive = 2000
    """Real training pairs the CCA is fitted on."""
    seed: int = 0
    """Random draws of the evaluation."""


class Config(Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()


# -- loading ------------------------------------------------------------------------------------
def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Config from a YAML file (or defaults when ``path`` is None) with ``key=value`` overrides applied."""
    source = str(path) if path else "<defaults>"
    raw: dict = {}
    if path:
        try:
            raw = load_yaml(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, source)


def validate_config(raw: dict, source: str) -> Config:
    """A Config from a plain mapping (a parsed YAML file with overrides); errors name the key and ``source``."""
    return validate_model(Config, raw, source, ConfigError)


def validate_model(schema: type[BaseModel], raw: Any, source: str, error: type[Exception], prefix: str = ""):
    """``schema.model_validate(raw)``; its errors become one ``error`` naming each key (``prefix`` + its
    path) and ``source``. Shared by configs and sweep files, so both explain a bad key alike."""
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise error("\n".join(_explain(err, source, schema, prefix) for err in e.errors())) from None


def apply_override(raw: dict, item: str) -> None:
    """Sets the dotted key of ``key=value`` in ``raw`` (lists by index: ``model.modalities.1.net``)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"command line: override {item!r} is not key=value")
    try:
        value = load_yaml(text) if text else ""
    except yaml.YAMLError:
        value = text
    node: Any = raw
    parts = key.split(".")
    for part, nxt in zip(parts[:-1], parts[1:]):
        if isinstance(node, list):
            node = _list_slot(node, part, item)
        else:
            if node.get(part) is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last) if last.isdigit() else -1
        if not 0 <= idx <= len(node):
            raise ConfigError(f"command line: override {item!r}: no list element {last}")
        node[idx : idx + 1] = [value]
    else:
        node[last] = value


def _list_slot(node: list, part: str, item: str) -> Any:
    if not part.isdigit() or int(part) > len(node):
        raise ConfigError(f"command line: override {item!r}: no list element {part}")
    if int(part) == len(node):
        node.append({})
    return node[int(part)]


_TYPES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str", "list_type": "a list"}


def _explain(err: dict, source: str, schema: type[BaseModel], prefix: str) -> str:
    """One pydantic error as ``<source>: key 'a.b' must be ..., got ...``."""
    loc = [str(p) for p in err["loc"]]
    key, kind, value = prefix + ".".join(loc), err["type"], err.get("input")
    if kind == "extra_forbidden":
        parent = prefix + ".".join(loc[:-1])
        known = sorted(_section_at(schema, loc[:-1]).model_fields)
        return f"{source}: unknown key {key!r} (known under {parent or 'top level'}: {', '.join(known)})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{source}: key {key or 'config'!r} must be a mapping, got {value!r}"
    if kind in _TYPES:
        return f"{source}: key {key!r} must be {_TYPES[kind]}, got {value!r} ({type(value).__name__})"
    if kind == "missing":
        return f"{source}: key {key!r} is required"
    if kind == "literal_error":
        return f"{source}: key {key!r} must be one of {_allowed(schema, loc)}, got {value!r}"
    bounds = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than_equal": "<= {le}"}
    if kind in bounds:
        return f"{source}: key {key!r} must be {bounds[kind].format(**err['ctx'])}, got {value!r}"
    if kind == "value_error":
        message = str(err["ctx"]["error"])
        return f"{source}: key {key!r} {message}" + ("" if isinstance(value, dict) else f", got {value!r}")
    return f"{source}: key {key!r}: {err['msg']}, got {value!r}"


def _section_at(schema: type[BaseModel], loc: list[str]) -> type[BaseModel]:
    cls: type = schema
    for part in loc:
        if part.isdigit():
            continue
        cls = _unwrap(cls.model_fields[part].annotation)
    return cls


def _unwrap(annotation: Any) -> Any:
    """list[X] -> X; Annotated[X, ...] -> X."""
    while get_origin(annotation) in (list, Annotated):
        annotation = get_args(annotation)[0]
    return annotation


def _allowed(schema: type[BaseModel], loc: list[str]) -> list:
    field = _section_at(schema, loc[:-1]).model_fields[loc[-1]]
    return list(get_args(_unwrap(field.annotation)))


# -- views --------------------------------------------------------------------------------------
def to_dict(cfg: Config) -> dict:
    return cfg.model_dump()


def flatten(cfg: Config | dict, prefix: str = "") -> dict[str, Any]:
    """``{"train.max_steps": 50, "model.modalities.0.name": "mnist", ...}`` for MLflow params and checks."""
    tree = cfg.model_dump() if isinstance(cfg, BaseModel) else cfg
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
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)


def describe_keys(section: type[Section] = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type or allowed values, default, doc) of every key, in schema order (``train.py --help``)."""
    rows = []
    for name, info in section.model_fields.items():
        inner = _unwrap(info.annotation)
        if isinstance(inner, type) and issubclass(inner, Section) and get_origin(info.annotation) is not list:
            rows += describe_keys(inner, f"{prefix}{name}.")
            continue
        if get_origin(info.annotation) is list and isinstance(inner, type) and issubclass(inner, Section):
            rows.append((f"{prefix}{name}", f"list of {{{', '.join(inner.model_fields)}}}", [], info.description or ""))
            rows += describe_keys(inner, f"{prefix}{name}.N.")
            continue
        kind = (
            "|".join(map(str, get_args(inner)))
            if get_origin(inner) is Literal
            else getattr(inner, "__name__", str(inner))
        )
        if get_origin(info.annotation) is list:
            kind = f"list[{kind}]"
        rows.append((f"{prefix}{name}", kind, info.get_default(call_default_factory=True), info.description or ""))
    return rows


def keys_help() -> str:
    """Every config key with its type, default and doc, for argparse's epilog."""
    lines = ["config keys (set in the YAML file or as key=value):"]
    for key, kind, default, doc in describe_keys():
        lines.append(f"  {key} ({kind}, default {default!r})\n      {doc}")
    return "\n".join(lines)


def deepspeed_config(cfg: Config, world_size: int, precision: str | None = None) -> dict:
    """The DeepSpeed JSON, generated from the config (never kept by hand beside it).

    ``precision``: what ``train.precision`` resolved to (meme_scale.hardware.resolve_precision); needed
    when the config says auto. bf16 raises the ZeRO stage to at least 1 (fp32 master weights).
    """
    t = cfg.train
    precision = precision or t.precision
    if precision == "auto":
        raise ValueError("train.precision is auto: pass the resolved precision (hardware.resolve_precision)")
    stage = max(t.zero_stage, 1) if precision == "bf16" else t.zero_stage
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1 << 30,  # our own logging reports progress
        "wall_clock_breakdown": False,
        # always written: DeepSpeed's default when the key is absent is to clip at 1.0, not to leave gradients alone
        "gradient_clipping": cfg.optim.grad_clip,
    }
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
        # Buffers follow the weights: BatchNorm on CPU refuses bf16 weights beside fp32 running stats.
        ds["data_types"] = {"grad_accum_dtype": "fp32", "buffer_dtype": "bf16"}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}
        ds["data_types"] = {"buffer_dtype": "fp16"}
    return ds
