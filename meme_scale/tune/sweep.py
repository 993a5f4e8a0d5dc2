"""The sweep file: parsing and normalising it (the format is in the package docstring)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_METRIC = "eval/cross_coherence"  # validation cross coherence: mean of s->t and t->s
DEFAULT_MODE = "max"
SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
TUNE_OWNED = ("run.dir", "run.tracking_uri", "run.experiment", "run.run_name")  # set per trial by the sweep
MARKER = "meme_scale.json"  # checkpoint.MARKER: a step_* dir with it is complete (not imported: it pulls in torch)
TRIAL_RECORD = "tune_trial.json"
PLOT_NAME = "metric_vs_pseudo_samples.png"
SWEEP_KEYS = {"name", "base", "overrides", "search_space", "metric", "mode", "num_samples", "seed", "scheduler",
              "resources", "max_concurrent_trials", "max_failures", "storage", "tracking_uri", "experiment",
              "ray"}  # fmt: skip
SCHEDULER_KEYS = {
    "asha": {"name", "time_attr", "grace_period", "reduction_factor", "max_t", "brackets"},
    "fifo": {"name", "time_attr"},
    "pbt": {"name", "time_attr", "perturbation_interval", "hyperparam_mutations", "quantile_fraction",
            "resample_probability", "burn_in_period"},  # fmt: skip
}
RESOURCE_KEYS = {"cpus_per_trial", "gpus_per_trial", "ranks_per_trial"}
RAY_KEYS = {"address", "num_cpus"}


class SweepError(ValueError):
    """A sweep file problem, found before any trial starts; names the key and the file."""


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 floats: ``1e-4`` is a number (PyYAML, YAML 1.1, reads it as a string)."""


_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT, list("-+0123456789"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader



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
        raw = _yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise SweepError(f"sweep file not found: {path}") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: the top level must be a mapping")
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(SWEEP_KEYS))})")
    for key in ("base", "search_space"):
        if not raw.get(key):
            raise SweepError(f"{path}: key {key!r} is required")

    def mapping(key: str) -> dict:
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise SweepError(f"{path}: key {key!r} must be a mapping, got {value!r}")
        return value

    fixed = dict(mapping("overrides"))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SweepError(f"command line: override {item!r} is not key=value")
        fixed[key] = _yaml(text) if text else ""
    space = {str(k): space_entry(path, str(k), v) for k, v in mapping("search_space").items()}
    scheduler = dict(mapping("scheduler")) or {"name": "asha"}
    scheduler.setdefault("name", "asha")
    if scheduler["name"] not in SCHEDULER_KEYS:
        raise SweepError(f"{path}: key 'scheduler.name' must be one of {sorted(SCHEDULER_KEYS)}, "
                         f"got {scheduler['name']!r}")  # fmt: skip
    bad = sorted(set(scheduler) - SCHEDULER_KEYS[scheduler["name"]])
    if bad:
        raise SweepError(f"{path}: unknown key 'scheduler.{bad[0]}' for scheduler {scheduler['name']!r} "
                         f"(known: {', '.join(sorted(SCHEDULER_KEYS[scheduler['name']]))})")  # fmt: skip
    resources, ray_cfg = mapping("resources"), mapping("ray")
    for section, known, given in (("resources", RESOURCE_KEYS, resources), ("ray", RAY_KEYS, ray_cfg)):
        bad = sorted(set(given) - known)
        if bad:
            raise SweepError(f"{path}: unknown key '{section}.{bad[0]}' (known: {', '.join(sorted(known))})")
    base = Path(raw["base"])
    if not base.is_absolute():  # the working dir (like data.root), else beside the sweep file or above it
        found = [d / base for d in (Path.cwd(), path.parent.resolve(), *path.parent.resolve().parents)]
        base = next((b for b in found if b.is_file()), base)
    if not base.is_file():
        raise SweepError(f"{path}: key 'base': training config {raw['base']!r} not found")
    storage = Path(raw.get("storage") or "runs/sweeps")
    sweep = Sweep(
        path=path, name=str(raw.get("name") or path.stem), base=base.resolve(), overrides=fixed, search_space=space,
        metric=str(raw.get("metric") or DEFAULT_METRIC), mode=str(raw.get("mode") or _default_mode(raw.get("metric"))),
        num_samples=raw.get("num_samples", 1), seed=raw.get("seed", 0), scheduler=scheduler,
        cpus_per_trial=resources.get("cpus_per_trial", 1), gpus_per_trial=resources.get("gpus_per_trial", 0),
        ranks_per_trial=resources.get("ranks_per_trial", 1),
        max_concurrent_trials=raw.get("max_concurrent_trials", 0), max_failures=raw.get("max_failures", 1),
        storage=storage.resolve(), tracking_uri=str(raw.get("tracking_uri") or ""),
        experiment=str(raw.get("experiment") or ""), ray_address=str(ray_cfg.get("address") or ""),
        ray_num_cpus=ray_cfg.get("num_cpus") or 0,
    )  # fmt: skip
    checks = {"num_samples": (sweep.num_samples, int, 1), "max_failures": (sweep.max_failures, int, 0),
              "max_concurrent_trials": (sweep.max_concurrent_trials, int, 0),
              "resources.ranks_per_trial": (sweep.ranks_per_trial, int, 1),
              "resources.cpus_per_trial": (sweep.cpus_per_trial, (int, float), 0),
              "resources.gpus_per_trial": (sweep.gpus_per_trial, (int, float), 0),
              "ray.num_cpus": (sweep.ray_num_cpus, int, 0), "seed": (sweep.seed, int, 0)}  # fmt: skip
    for key, (value, kind, low) in checks.items():
        if isinstance(value, bool) or not isinstance(value, kind) or value < low:
            raise SweepError(f"{path}: key {key!r} must be a number >= {low}, got {value!r}")
    if sweep.mode not in ("min", "max"):
        raise SweepError(f"{path}: key 'mode' must be 'min' or 'max', got {sweep.mode!r}")
    if not sweep.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SweepError(f"{path}: key 'name' may hold letters, digits, '-', '_' and '.' only, got {sweep.name!r}")
    return sweep


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
        raise SweepError(f"{path}: search_space key {key!r} must be a value, a list or one of "
                         f"{{{', '.join(f'{k}: ...' for k in SPACE_KINDS)}}}, got {spec!r}")  # fmt: skip
    (kind, value), = spec.items()
    if kind in ("grid", "choice"):
        if not isinstance(value, list) or not value:
            raise SweepError(f"{path}: search_space key {key!r}: {kind} needs a non-empty list, got {value!r}")
    else:
        ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                  for v in value)  # fmt: skip
        if not ok or value[0] >= value[1] or (kind == "loguniform" and value[0] <= 0):
            raise SweepError(f"{path}: search_space key {key!r}: {kind} needs [low, high] with low < high"
                             f"{' and low > 0' if kind == 'loguniform' else ''}, got {value!r}")  # fmt: skip
        if kind == "randint" and not all(isinstance(v, int) for v in value):
            raise SweepError(f"{path}: search_space key {key!r}: randint needs integer bounds, got {value!r}")
    return {kind: value}


def candidates(entry: dict) -> list:
    """Values a trial can get from one search-space entry that are worth checking up front."""
    (kind, value), = entry.items()
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

