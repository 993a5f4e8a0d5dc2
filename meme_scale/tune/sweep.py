"""The sweep file: parsing and normalising it (the format is in the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from ..config import load_yaml, validate_model

DEFAULT_METRIC = "eval/cross_coherence"  # validation cross coherence: mean of s->t and t->s
DEFAULT_MODE = "max"
SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
TUNE_OWNED = ("run.dir", "run.tracking_uri", "run.experiment", "run.run_name")  # set per trial by the sweep
MARKER = "meme_scale.json"  # checkpoint.MARKER: a step_* dir with it is complete (not imported: it pulls in torch)
TRIAL_RECORD = "tune_trial.json"
PLOT_NAME = "metric_vs_pseudo_samples.png"


class SweepError(ValueError):
    """A sweep file problem, found before any trial starts; names the key and the file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Resources(_Section):
    cpus_per_trial: Annotated[float, Field(ge=0)] = 1.0
    gpus_per_trial: Annotated[float, Field(ge=0)] = 0.0
    ranks_per_trial: Annotated[int, Field(ge=1)] = 1


class _Ray(_Section):
    address: str = ""
    num_cpus: Annotated[int, Field(ge=0)] = 0


class _SweepFile(_Section):
    """The sweep file's keys (the package docstring shows them); training keys are checked by plan.validate
    against the training config's own schema (meme_scale.config)."""

    name: str = ""
    base: Annotated[str, Field(min_length=1)]
    overrides: dict[str, Any] = {}
    search_space: Annotated[dict[str, Any], Field(min_length=1)]
    metric: str = ""
    mode: Literal["min", "max", ""] = ""
    num_samples: Annotated[int, Field(ge=1)] = 1
    seed: Annotated[int, Field(ge=0)] = 0
    scheduler: dict[str, Any] = {}
    resources: _Resources = _Resources()
    max_concurrent_trials: Annotated[int, Field(ge=0)] = 0
    max_failures: Annotated[int, Field(ge=0)] = 1
    storage: str = ""
    tracking_uri: str = ""
    experiment: str = ""
    ray: _Ray = _Ray()


_TimeAttr = Literal["step", "training_iteration"]


class _Fifo(_Section):
    name: Literal["fifo"]
    time_attr: _TimeAttr = "step"


class _Asha(_Fifo):
    name: Literal["asha"]
    grace_period: Annotated[int, Field(ge=0)] = 0
    reduction_factor: Annotated[float, Field(gt=1)] = 2
    max_t: Annotated[int, Field(ge=0)] = 0
    brackets: Annotated[int, Field(ge=1)] = 1


class _Pbt(_Fifo):
    name: Literal["pbt"]
    perturbation_interval: Annotated[int, Field(ge=0)] = 0
    hyperparam_mutations: dict[str, Any] = {}
    quantile_fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.25
    resample_probability: Annotated[float, Field(ge=0, le=1)] = 0.25
    burn_in_period: Annotated[int, Field(ge=0)] = 0


SCHEDULERS = {"asha": _Asha, "fifo": _Fifo, "pbt": _Pbt}


# -- the sweep file ---------------------------------------------------------------------------------
@dataclass
class Sweep:
    path: Path
    name: str
    base: Path
    overrides: dict[str, Any]
    search_space: dict[str, dict]  # key -> {kind: value} (normalised)
    metric: str = DEFAULT_METRIC
    mode: str = DEFAULT_MODE
    num_samples: int = 1
    seed: int = 0
    scheduler: dict = field(default_factory=lambda: {"name": "asha"})
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    ranks_per_trial: int = 1
    max_concurrent_trials: int = 0
    max_failures: int = 1
    storage: Path = Path("runs/sweeps")
    tracking_uri: str = ""
    experiment: str = ""
    ray_address: str = ""
    ray_num_cpus: int = 0

    @property
    def exp_dir(self) -> Path:
        return self.storage / self.name

    @property
    def runs_dir(self) -> Path:
        return self.exp_dir / "runs"

    def uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.exp_dir / 'mlflow.db'}"


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """Parses a sweep file; ``overrides`` (``key=value``) are training keys added to its ``overrides``."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise SweepError(f"sweep file not found: {path}") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: the top level must be a mapping")
    f = validate_model(_SweepFile, raw, str(path), SweepError)
    fixed = dict(f.overrides)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SweepError(f"command line: override {item!r} is not key=value")
        fixed[key] = load_yaml(text) if text else ""
    space = {str(k): space_entry(path, str(k), v) for k, v in f.search_space.items()}
    scheduler = {"name": "asha", **f.scheduler}
    if scheduler["name"] not in SCHEDULERS:
        raise SweepError(f"{path}: key 'scheduler.name' must be one of {sorted(SCHEDULERS)}, got {scheduler['name']!r}")
    validate_model(SCHEDULERS[scheduler["name"]], scheduler, str(path), SweepError, prefix="scheduler.")
    base = Path(f.base)
    if not base.is_absolute():  # the working dir (like data.root), else beside the sweep file or above it
        found = [d / base for d in (Path.cwd(), path.parent.resolve(), *path.parent.resolve().parents)]
        base = next((b for b in found if b.is_file()), base)
    if not base.is_file():
        raise SweepError(f"{path}: key 'base': training config {f.base!r} not found")
    name = f.name or path.stem
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SweepError(f"{path}: key 'name' may hold letters, digits, '-', '_' and '.' only, got {name!r}")
    return Sweep(
        path=path,
        name=name,
        base=base.resolve(),
        overrides=fixed,
        search_space=space,
        metric=f.metric or DEFAULT_METRIC,
        mode=f.mode or _default_mode(f.metric),
        num_samples=f.num_samples,
        seed=f.seed,
        scheduler=scheduler,
        cpus_per_trial=f.resources.cpus_per_trial,
        gpus_per_trial=f.resources.gpus_per_trial,
        ranks_per_trial=f.resources.ranks_per_trial,
        max_concurrent_trials=f.max_concurrent_trials,
        max_failures=f.max_failures,
        storage=Path(f.storage or "runs/sweeps").resolve(),
        tracking_uri=f.tracking_uri,
        experiment=f.experiment,
        ray_address=f.ray.address,
        ray_num_cpus=f.ray.num_cpus,
    )


def _default_mode(metric: str | None) -> str:
    """max for coherence, accuracies and bounds (J, log p); min for losses, KLs and distances."""
    if not metric:
        return DEFAULT_MODE
    name = metric.rsplit("/", 1)[-1]
    return "min" if name == "loss" or name.startswith(("kl", "w2")) else "max"


def space_entry(path: Path, key: str, spec: Any) -> dict:
    """``{grid: [...]}`` and friends, a bare list (a grid) or a scalar (fixed) -> ``{kind: value}``."""
    if isinstance(spec, list):
        spec = {"grid": spec}
    if not isinstance(spec, dict):
        return {"value": spec}
    if len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
        raise SweepError(
            f"{path}: search_space key {key!r} must be a value, a list or one of "
            f"{{{', '.join(f'{k}: ...' for k in SPACE_KINDS)}}}, got {spec!r}"
        )
    ((kind, value),) = spec.items()
    if kind in ("grid", "choice"):
        if not isinstance(value, list) or not value:
            raise SweepError(f"{path}: search_space key {key!r}: {kind} needs a non-empty list, got {value!r}")
    else:
        ok = (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        )
        if not ok or value[0] >= value[1] or (kind == "loguniform" and value[0] <= 0):
            raise SweepError(
                f"{path}: search_space key {key!r}: {kind} needs [low, high] with low < high"
                f"{' and low > 0' if kind == 'loguniform' else ''}, got {value!r}"
            )
        if kind == "randint" and not all(isinstance(v, int) for v in value):
            raise SweepError(f"{path}: search_space key {key!r}: randint needs integer bounds, got {value!r}")
    return {kind: value}


def candidates(entry: dict) -> list:
    """Values a trial can get from one search-space entry that are worth checking up front."""
    ((kind, value),) = entry.items()
    if kind in ("grid", "choice"):
        return list(value)
    if kind == "value":
        return [value]
    if kind == "randint":
        return [value[0], value[1] - 1]
    return list(value)


def _scalar(value: Any) -> str:
    """A value as YAML text for a ``key=value`` override (1e-05 must stay a float: ``1.0e-05``)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text.removesuffix("...").strip()


def plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def override_list(values: dict[str, Any]) -> list[str]:
    return [f"{k}={_scalar(plain(v))}" for k, v in values.items()]
