"""Ray Tune sweeps (DESIGN 5): ``meme-scale tune --config configs/sweeps/<name>.yaml [--resume] [key=value ...]``.

Every trial is an ordinary training run: ``loop.run`` on a config made of the sweep's base config,
its fixed ``overrides``, the command line's ``key=value`` overrides and the trial's sampled values.
It runs in its own process (``python -m meme_scale.tune --trial-process ...``), started by the Ray
trial, so the loop keeps its main thread (signals) and a crash takes down only that trial; with
``ranks_per_trial > 1`` the trial is a Ray Train ``TorchTrainer`` whose workers each start one rank.

Sweep file (YAML; keys other than these are errors)::

    name: quickstart_pseudo_samples    # Ray experiment name; everything goes to <storage>/<name>/
    base: configs/quickstart.yaml      # training config (relative: to the working dir, else the sweep file)
    overrides:                         # dotted training keys fixed for every trial
      train.max_steps: 500
    search_space:                      # dotted training keys -> one of:
      model.pseudo_samples: {grid: [16, 32, 64, 128, 256]}    # every value (grid_search)
      data.observed_fraction: [1.0, 0.5, 0.25, 0.125]         # a bare list is a grid too
      optim.lr: {loguniform: [1.0e-4, 2.0e-3]}                # also: uniform [lo, hi], randint [lo, hi),
      model.k: 10                                             # choice [values]; a scalar is fixed
    metric: eval/cross_coherence       # any name the evaluation reports (default; needs classifiers)
    mode: max                          # max | min; default: min for eval/loss, eval/kl_*, eval/w2_*, else max
    num_samples: 1                     # how many times the grid is run (random keys drawn each time)
    seed: 0                            # for the random keys
    scheduler:                         # name: asha (default) | fifo | pbt
      name: asha
      time_attr: step                  # step (default) | training_iteration (evaluations so far)
      grace_period: 0                  # 0: one evaluation interval (run.eval_every steps)
      reduction_factor: 2
      max_t: 0                         # 0: train.max_steps
      # pbt: perturbation_interval (0: 2 evaluations), hyperparam_mutations {key: spec as above},
      #      quantile_fraction, resample_probability
    resources: {cpus_per_trial: 1, gpus_per_trial: 0, ranks_per_trial: 1}  # per trial, split over its ranks
    max_concurrent_trials: 0           # 0: as many as the resources allow
    max_failures: 1                    # retries of a trial that raised (from its last checkpoint)
    storage: runs/sweeps               # a shared filesystem when trials run on several nodes
    tracking_uri: ""                   # "": sqlite:///<storage>/<name>/mlflow.db (a server URL across nodes)
    experiment: ""                     # MLflow experiment; "": the base config's run.experiment
    ray: {address: "", num_cpus: 0}    # "": $RAY_ADDRESS, else a new local runtime (num_cpus 0: all CPUs);
                                       # "auto": the cluster `ray start` runs on this machine

The metric must be one training reports at each evaluation: ``eval/loss``, ``eval/<term>`` for the
model's loss terms, and the evaluation's metrics (``eval/cross_coherence``,
``eval/coherence_<s>_to_<t>``, ``eval/coherence_joint``, ``eval/latent_accuracy_<m>``,
``eval/w2_paired``...; coherence needs classifiers from ``tools/train_classifiers.py``), plus
``step``. Anything else, or an unknown key, is rejected before a trial starts, naming the key.

Layout under ``<storage>/<name>/``: Ray's experiment state and trial dirs (checkpoints reported at
each evaluation are copies of the run's ``checkpoints/step_*``), ``runs/<trial_id>/`` (each trial's
``run.dir``: checkpoints, ``train.log``, ``tune_trial.json``), ``mlflow.db`` + ``mlartifacts/``, and
at the end ``results.md``, ``results.json``, ``metric_vs_pseudo_samples.png``, ``best_config.yaml``.
In MLflow the sweep is a parent run and every trial a child run (tag ``mlflow.parentRunId``).

A trial that raises is retried up to ``max_failures`` times from its last checkpoint, then reported
failed with its error while the sweep goes on. ``--resume`` continues an interrupted sweep
(``Tuner.restore``): finished and failed trials are not run again, unfinished ones continue from
their checkpoints. PBT's exploit copies another trial's checkpoint into the trial's run dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import Config, ConfigError, dump_yaml, flatten, load_config
from .engine import free_port

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
    space = {str(k): _space_entry(path, str(k), v) for k, v in mapping("search_space").items()}
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


def _space_entry(path: Path, key: str, spec: Any) -> dict:
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


def _candidates(entry: dict) -> list:
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


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def _override_list(values: dict[str, Any]) -> list[str]:
    return [f"{k}={_scalar(_plain(v))}" for k, v in values.items()]


# -- checks before Ray starts -----------------------------------------------------------------------
@dataclass
class Plan:
    """What validation found: the base config and the fixed overrides every trial starts from."""

    base_cfg: Config
    fixed: dict[str, Any]  # user overrides with paths made absolute
    internal: dict[str, Any]  # what the sweep itself sets for trials (checkpoint at each evaluation, log lines)
    reported: set[str]  # metric names every variant reports
    max_steps: int
    eval_every: int
    experiment: str


def validate(sweep: Sweep) -> Plan:
    """Every check that needs no Ray: config keys and values, the metric, the scheduler. Raises SweepError."""
    where = str(sweep.path)
    for key in list(sweep.overrides) + list(sweep.search_space):
        if key in TUNE_OWNED:
            raise SweepError(f"{where}: key {key!r} is set by the sweep for each trial (run dirs live under "
                             f"{sweep.runs_dir}); remove it")  # fmt: skip
    try:
        base_cfg = load_config(sweep.base, _override_list(sweep.overrides))
    except ConfigError as e:
        raise SweepError(f"{where}: base config with the sweep's overrides: {e}") from None
    fixed = dict(sweep.overrides)
    fixed["data.root"] = str(Path(base_cfg.data.root).resolve())
    classifiers = getattr(getattr(base_cfg, "eval", None), "classifiers", "")
    if classifiers:
        fixed["eval.classifiers"] = str(Path(classifiers).resolve())
    base_cfg = load_config(sweep.base, _override_list(fixed))

    variants: list[tuple[str, Config]] = [("the base config", base_cfg)]
    for key, entry in sweep.search_space.items():
        for value in _candidates(entry):
            try:
                cfg = load_config(sweep.base, _override_list({**fixed, key: value}))
            except ConfigError as e:
                message = str(e).split(": ", 1)[-1]
                raise SweepError(f"{where}: search_space key {key!r} (value {value!r}): {message}") from None
            variants.append((f"{key}={value!r}", cfg))
    mutations = sweep.scheduler.get("hyperparam_mutations") or {}
    if sweep.scheduler["name"] == "pbt":
        if not isinstance(mutations, dict) or not mutations:
            raise SweepError(f"{where}: key 'scheduler.hyperparam_mutations' is required for pbt "
                             "(e.g. {optim.lr: {loguniform: [1.0e-4, 1.0e-2]}})")  # fmt: skip
        for key, spec in mutations.items():
            if key not in sweep.search_space:
                raise SweepError(f"{where}: key 'scheduler.hyperparam_mutations.{key}' must also be in search_space")
            for value in _candidates(_space_entry(sweep.path, key, spec)):
                try:
                    load_config(sweep.base, _override_list({**fixed, key: value}))
                except ConfigError as e:
                    raise SweepError(f"{where}: key 'scheduler.hyperparam_mutations.{key}': {e}") from None

    reported = _metric_check(sweep, variants)
    steps = [c.train.max_steps for _, c in variants]
    internal = {"run.progress": "lines"}
    if "run.checkpoint_every" not in sweep.overrides and "run.checkpoint_every" not in sweep.search_space:
        internal["run.checkpoint_every"] = base_cfg.run.eval_every  # a checkpoint for every report: exact resumes, PBT
    time_attr = sweep.scheduler.get("time_attr", "step")
    if time_attr not in ("step", "training_iteration"):
        raise SweepError(f"{where}: key 'scheduler.time_attr' must be 'step' or 'training_iteration', "
                         f"got {time_attr!r}")  # fmt: skip
    if sweep.ranks_per_trial > 1 and sweep.scheduler["name"] == "pbt":
        raise SweepError(f"{where}: scheduler 'pbt' needs one-process trials (resources.ranks_per_trial: 1): "
                         "multi-rank trials resume from their own run dir, not from Ray checkpoints")  # fmt: skip
    return Plan(base_cfg, fixed, internal, reported, max(steps), base_cfg.run.eval_every,
                sweep.experiment or base_cfg.run.experiment)  # fmt: skip


def reported_metrics(cfg: Config) -> set[str]:
    """The names training reports to Ray at each evaluation with this config (see evaluate.py)."""
    import torch

    from .data.shards import read_meta
    from .models import build_model, modality_specs

    meta = read_meta(cfg.data.root)
    specs = modality_specs(cfg.model, meta)
    with torch.device("meta"):  # only the names are needed: no memory, no initialisation cost
        model = build_model(cfg.model, specs)
    names = {"step", "eval/loss", *(f"eval/{t}" for t in model.term_names)}
    return names | _evaluation_metrics(cfg, meta, list(model.names))


def _evaluation_metrics(cfg: Config, meta: dict, modalities: list[str]) -> set[str]:
    """Names evaluate.Evaluator adds to the loss terms (mirrors Evaluator._evaluate: keep the two in step).

    Relatedness always; latent accuracy where the data has labels; coherence (and the classifiers'
    own accuracy) only where the classifier of every modality is found.
    """
    s, t = modalities
    names = {"eval/w2_paired", "eval/w2_mismatched"}
    if not meta.get("label"):
        return names
    names |= {f"eval/latent_accuracy_{m}" for m in modalities}
    folder = Path(getattr(getattr(cfg, "eval", None), "classifiers", "") or Path(cfg.data.root) / "classifiers")
    if all((folder / f"{m}.pt").is_file() for m in modalities):
        names |= {"eval/cross_coherence", f"eval/coherence_{s}_to_{t}", f"eval/coherence_{t}_to_{s}",
                  "eval/coherence_joint", *(f"eval/classifier_accuracy_{m}" for m in modalities)}  # fmt: skip
    return names


def _metric_check(sweep: Sweep, variants: list[tuple[str, Config]]) -> set[str]:
    where = str(sweep.path)
    common: set[str] | None = None
    for label, cfg in variants:
        try:
            names = reported_metrics(cfg)
        except FileNotFoundError as e:
            raise SweepError(f"{where}: data.root {cfg.data.root}: {e}") from None
        except Exception:  # noqa: BLE001 - this variant does not build: its trial fails and is reported, not the sweep
            continue
        if sweep.metric not in names:
            hint = ""
            if "coherence" in sweep.metric:
                folder = getattr(getattr(cfg, "eval", None), "classifiers", "") or Path(cfg.data.root) / "classifiers"
                hint = (f" Coherence needs a classifier per modality in {folder} (python tools/train_classifiers.py"
                        f" --shards {cfg.data.root}), or choose another metric, e.g. 'metric: eval/loss'.")  # fmt: skip
            raise SweepError(f"{where}: key 'metric': training never reports {sweep.metric!r} with {label} "
                             f"(it reports: {', '.join(sorted(names))}).{hint}")  # fmt: skip
        common = names if common is None else common & names
    if common is None:
        raise SweepError(f"{where}: the base config does not build a model: {variants[0][1].model.name}")
    return common


# -- one trial (runs inside a Ray worker) -----------------------------------------------------------
@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs from the sweep; pickled into the Ray trainable."""

    sweep_name: str
    base: str
    fixed: dict
    internal: dict
    runs_dir: str
    exp_dir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    metric: str
    ranks: int
    cpus: float
    gpus: float


@dataclass
class TrialRecord:
    """``<run_dir>/tune_trial.json``: the trial's MLflow child run, attempts and errors across restarts."""

    path: Path
    trial_id: str = ""
    sweep: str = ""
    parent_run_id: str = ""
    tracking_uri: str = ""
    experiment: str = ""
    world_size: int = 1
    mlflow_run_id: str | None = None
    attempts: int = 0
    errors: list = field(default_factory=list)
    exploits: list = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: Path, trial_id: str = "") -> TrialRecord:
        path = Path(run_dir) / TRIAL_RECORD
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.setdefault("trial_id", trial_id)
        return cls(path, **{k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "path"})

    def save(self) -> None:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "path"}
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path)


class TrialFailed(RuntimeError):
    """Training raised (or its process died): the message carries the error and the log's tail."""

    def __init__(self, message: str, tracked: bool = False):
        super().__init__(message)
        self.tracked = tracked  # the training process already marked its MLflow run FAILED


def trial_config(setup: TrialSetup, values: dict[str, Any], run_dir: Path, trial_id: str) -> Config:
    own = {"run.dir": str(run_dir), "run.tracking_uri": setup.tracking_uri, "run.experiment": setup.experiment,
           "run.run_name": f"{setup.sweep_name}/{trial_id}"}  # fmt: skip
    return load_config(setup.base, _override_list({**setup.fixed, **setup.internal, **values, **own}))


def run_trial(config: dict, setup: TrialSetup) -> None:
    """The Ray Tune trainable: one training run, reporting each evaluation (and its checkpoint) to Tune.

    Imports neither torch nor mlflow: the training process does the work, this only talks to Ray.
    """
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(setup.runs_dir) / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    values = {k: _plain(v) for k, v in config.items()}
    cfg = trial_config(setup, values, run_dir, trial_id)
    record = TrialRecord.load(run_dir, trial_id)
    record.sweep, record.parent_run_id, record.world_size = setup.sweep_name, setup.parent_run_id, setup.ranks
    record.tracking_uri, record.experiment = setup.tracking_uri, setup.experiment
    record.attempts += 1
    record.save()
    if setup.ranks == 1:
        _restore_checkpoint(tune.get_checkpoint(), run_dir, cfg, record)
    cfg_path = run_dir / "trial_config.yaml"
    cfg_path.write_text(dump_yaml(cfg))
    try:
        if setup.ranks == 1:
            _one_process(cfg, cfg_path, run_dir, setup.metric)
        else:
            _ranks(cfg, cfg_path, run_dir, setup, trial_id)
    except Exception as e:
        message = str(e) if isinstance(e, TrialFailed) else f"{type(e).__name__}: {e}"
        record = TrialRecord.load(run_dir, trial_id)  # the training process may have added its MLflow run
        record.errors.append({"attempt": record.attempts, "error": message.split("\n--- end of ")[0][-4000:]})
        record.save()
        if not getattr(e, "tracked", False):
            _mark_failed(record, message, traceback.format_exc(), run_dir)
        raise


def _ensure_child_run(cfg: Config, record: TrialRecord) -> str:
    """The trial's MLflow child run: created on its first attempt (with the trial's params), continued after."""
    from .tracking import open_tracker

    if record.mlflow_run_id:
        return record.mlflow_run_id
    tags = {"mlflow.parentRunId": record.parent_run_id, "meme_scale.sweep": record.sweep,
            "meme_scale.trial_id": record.trial_id, "model": cfg.model.name,
            "world_size": record.world_size}  # fmt: skip
    tracker = open_tracker(True, record.tracking_uri, cfg.run.dir, record.experiment, cfg.run.run_name, tags=tags)
    tracker.log_params(flatten(cfg))  # the same strings loop.run logs, so its own log_params agrees
    record.mlflow_run_id = tracker.run_id
    record.save()
    return tracker.run_id


def _mark_failed(record: TrialRecord, message: str, tb: str, run_dir: Path) -> None:
    """The child run of a failed attempt: status FAILED, the error as a tag and a text artifact, the log."""
    if not record.mlflow_run_id:
        return
    try:
        from .tracking import update_run

        text = {f"errors/attempt_{record.attempts}.txt": f"{message}\n\n{tb}"}
        log = run_dir / "train.log"
        if log.is_file():
            text["logs/train.log"] = log.read_text(errors="replace")[-200_000:]
        first = message.strip().splitlines()[0] if message.strip() else "unknown error"
        update_run(record.tracking_uri, record.mlflow_run_id, status="FAILED", text=text,
                   tags={"tune.error": first, "tune.attempts": record.attempts})  # fmt: skip
    except Exception:  # tracking trouble must not hide the training error
        traceback.print_exc()


def _newest_tag(ckpt_dir: Path) -> str | None:
    """checkpoint.latest_tag without importing torch into the Ray worker."""
    if not ckpt_dir.is_dir():
        return None
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("step_") and (p / MARKER).is_file())
    return tags[-1] if tags else None


def _restore_checkpoint(ckpt, run_dir: Path, cfg: Config, record: TrialRecord) -> None:
    """Puts the checkpoint Ray hands this trial (a retry, a resumed sweep, PBT's exploit) where loop.run resumes.

    The trial's own checkpoint: its run dir already has it or a newer one, unless the dir was lost.
    Another trial's (PBT exploit): it replaces this trial's checkpoints and keeps this trial's MLflow run.
    """
    if ckpt is None:
        return
    ckpt_dir = run_dir / "checkpoints"
    with ckpt.as_directory() as src:
        src = Path(src)
        meta = json.loads((src / MARKER).read_text())
        tag = meta["tag"]
        donor = meta.get("config", {}).get("run.dir")
        if donor and Path(donor).resolve() != run_dir.resolve():
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            _copy_tag(src, ckpt_dir, tag)
            meta.update(run_id=record.mlflow_run_id, config=flatten(cfg))
            (ckpt_dir / tag / MARKER).write_text(json.dumps(meta, indent=2))
            record.exploits.append({"attempt": record.attempts, "from": Path(donor).name, "tag": tag})
            record.save()
        elif (local := _newest_tag(ckpt_dir)) is None or local < tag:
            _copy_tag(src, ckpt_dir, tag)


def _copy_tag(src: Path, ckpt_dir: Path, tag: str) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".restoring-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".metadata.json"))
    shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    os.replace(tmp, ckpt_dir / tag)


def _one_process(cfg: Config, cfg_path: Path, run_dir: Path, metric: str) -> None:
    from ray import tune

    ckpt_dir = run_dir / "checkpoints"
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port(""))}  # fmt: skip

    def on_report(metrics: dict, step: int, proc: subprocess.Popen) -> None:
        _check_metric(metrics, metric, step)
        checkpoint = None
        if step % cfg.run.checkpoint_every == 0 or step == cfg.train.max_steps:
            # loop.run saves right after it reports: wait for that checkpoint, so Ray's copy matches this result
            tag = _wait_for_tag(ckpt_dir, f"step_{step:08d}", proc)
            if tag is not None:
                checkpoint = tune.Checkpoint.from_directory(str(ckpt_dir / tag))
        tune.report({**metrics, "step": step}, checkpoint=checkpoint)

    _train_process(cfg_path, run_dir, env, on_report, cfg.train.max_steps)


def _wait_for_tag(ckpt_dir: Path, tag: str, proc: subprocess.Popen, timeout: float = 600.0) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (ckpt_dir / tag / MARKER).is_file():
            return tag
        if proc.poll() is not None:
            return tag if (ckpt_dir / tag / MARKER).is_file() else None
        time.sleep(0.05)
    return None


def _check_metric(metrics: dict, metric: str, step: int) -> None:
    if metric != "step" and metric not in metrics:
        raise TrialFailed(f"training reported no {metric!r} at step {step} (it reported: {', '.join(sorted(metrics))})")


def _ranks(cfg: Config, cfg_path: Path, run_dir: Path, setup: TrialSetup, trial_id: str) -> None:
    """A multi-rank trial: a Ray Train TorchTrainer whose workers (one per rank) each start one training process.

    Resumes from the run dir's newest checkpoint (``run.dir`` must be on a filesystem all nodes share).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    per_rank = {"CPU": setup.cpus / setup.ranks}
    if setup.gpus:
        per_rank["GPU"] = setup.gpus / setup.ranks
    trainer = TorchTrainer(
        rank_worker,
        train_loop_config={"config_path": str(cfg_path), "run_dir": str(run_dir), "metric": setup.metric,
                           "max_steps": cfg.train.max_steps},  # fmt: skip
        scaling_config=ScalingConfig(num_workers=setup.ranks, use_gpu=setup.gpus > 0, resources_per_worker=per_rank),
        run_config=RunConfig(name=trial_id, storage_path=str(Path(setup.exp_dir) / "train"),
                             callbacks=[TuneReportCallback()], failure_config=FailureConfig(max_failures=0)),
    )  # fmt: skip
    trainer.fit()


def rank_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function: rank r of a multi-rank trial, in its own training process."""
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    box = [free_port("") if rank == 0 else None]  # training gets its own process group, beside Ray Train's
    dist.broadcast_object_list(box, src=0)
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(ctx.get_local_rank()),
           "LOCAL_SIZE": str(ctx.get_local_world_size()), "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
           "MASTER_PORT": str(box[0])}  # fmt: skip

    def on_report(metrics: dict, step: int, _proc) -> None:
        _check_metric(metrics, loop_config["metric"], step)
        ray.train.report({**metrics, "step": step})

    _train_process(Path(loop_config["config_path"]), Path(loop_config["run_dir"]), env, on_report,
                   loop_config["max_steps"])  # fmt: skip


def _train_process(cfg_path: Path, run_dir: Path, dist_env: dict[str, str],
                   on_report: Callable[[dict, int, subprocess.Popen], None], final_step: int) -> dict:  # fmt: skip
    """Runs loop.run in a child process and relays its reports; kills it if this trial is stopped.

    The report of the final step waits until the run has finished (export, summary, MLflow status),
    so a scheduler that stops the trial on that report cannot cut the run's last writes short.
    """
    package_root = str(Path(__file__).resolve().parent.parent)  # the child imports this very copy of meme_scale
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # never requeue the sweep's job
    env.update(dist_env, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p))  # fmt: skip
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "meme_scale.tune", "--trial-process", str(cfg_path), "--report-fd", str(write_fd),
           "--parent-pid", str(os.getpid())]  # fmt: skip
    with open(run_dir / "train.log", "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} rank {dist_env['RANK']}: {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, env=env, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT, pass_fds=(write_fd,))
    os.close(write_fd)
    outcome: dict = {}
    held: list[tuple[dict, int]] = []
    reported = 0
    try:
        with os.fdopen(read_fd) as reader:
            for line in reader:
                msg = json.loads(line)
                if msg["type"] != "report":
                    outcome = msg
                elif msg["step"] >= final_step:
                    held.append((msg["metrics"], msg["step"]))
                else:
                    on_report(msg["metrics"], msg["step"], proc)
                    reported += 1
        code = proc.wait()
        if outcome.get("type") == "done" and code == 0:
            for metrics, step in held:
                on_report(metrics, step, proc)
            if not reported and not held and outcome["summary"].get("step", 0) >= final_step:
                _report_finished_run(run_dir, proc, on_report)
            return outcome["summary"]
    finally:
        if proc.poll() is None:  # stopped by the scheduler, or an error here: the run must not go on alone
            proc.kill()
            proc.wait()
    tail = _tail(run_dir / "train.log")
    if outcome.get("type") == "error":
        raise TrialFailed(f"{outcome['error']}\n--- end of {run_dir / 'train.log'} ---\n{tail}",
                          outcome.get("tracked", False))  # fmt: skip
    raise TrialFailed(f"the training process exited with code {code} without a result\n"
                      f"--- end of {run_dir / 'train.log'} ---\n{tail}")  # fmt: skip


def _report_finished_run(run_dir: Path, proc: subprocess.Popen, on_report) -> None:
    """A restart found the run already complete (it ended after Ray's last result): report its final evaluation."""
    path = run_dir / "eval_report.json"  # loop.run's last evaluation, {"step": ..., metrics}
    if path.is_file():
        data = json.loads(path.read_text())
        step = int(data.pop("step"))
        on_report({k: float(v) for k, v in data.items() if isinstance(v, (int, float))}, step, proc)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- the training process (python -m meme_scale.tune --trial-process CONFIG ...) ---------------------
def trial_process(config_path: str, report_fd: int, parent_pid: int) -> int:
    """loop.run on one trial's resolved config, reporting each evaluation as a JSON line on ``report_fd``."""

    def watch_parent() -> None:  # the Ray trial died (stopped by the scheduler, killed): so does this run
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    out = os.fdopen(report_fd, "w", buffering=1)

    def send(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    rank = int(os.environ.get("RANK", "0"))
    record = None
    try:
        cfg = load_config(config_path)
        if rank == 0:
            from .tracking import RUN_ID_ENV, update_run

            record = TrialRecord.load(Path(cfg.run.dir))
            os.environ[RUN_ID_ENV] = _ensure_child_run(cfg, record)  # loop.run continues this run
            tags = {"tune.attempts": record.attempts}
            if record.exploits and record.exploits[-1]["attempt"] == record.attempts:
                tags["tune.exploited_from"] = f"{record.exploits[-1]['from']} at {record.exploits[-1]['tag']}"
            update_run(record.tracking_uri, record.mlflow_run_id, tags=tags)
        _reapply_optimizer_settings(cfg)
        from .loop import run

        summary = run(cfg, resume="auto", report=lambda metrics, step: send(
            {"type": "report", "step": int(step), "metrics": {k: float(v) for k, v in metrics.items()}}))  # fmt: skip
        if record is not None:
            log = Path(cfg.run.dir) / "train.log"
            update_run(record.tracking_uri, record.mlflow_run_id, text={"logs/train.log": _tail(log, 5000)})
        send({"type": "done", "summary": json.loads(json.dumps(summary, default=str))})
        return 0
    except BaseException as e:  # noqa: BLE001 - everything goes back to the trial
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        message = f"{type(e).__name__}: {e}"
        if record is not None and record.mlflow_run_id:
            _mark_failed(record, message, tb, Path(record.path).parent)
        send({"type": "error", "error": message, "traceback": tb, "tracked": bool(record and record.mlflow_run_id)})
        return 1


def _reapply_optimizer_settings(cfg: Config) -> None:
    """After a checkpoint loads, the optimizer takes this trial's optim.* again (PBT changes optim.lr).

    DeepSpeed restores the optimizer's param_groups, lr included, from the checkpoint; a PBT explore
    that changed ``optim.lr`` would otherwise be silently undone. Only this process is patched.
    """
    from . import checkpoint

    original = checkpoint.load

    def load(engine, *args, **kwargs):
        meta = original(engine, *args, **kwargs)
        for group in getattr(engine.optimizer, "param_groups", []):
            group["lr"] = cfg.optim.lr
            group["weight_decay"] = cfg.optim.weight_decay
            if "betas" in group:
                group["betas"] = tuple(cfg.optim.betas)
        return meta

    checkpoint.load = load


# -- the sweep (driver) -----------------------------------------------------------------------------
def _param_space(space: dict[str, dict]) -> dict:
    from ray import tune

    out = {}
    for key, entry in space.items():
        (kind, value), = entry.items()
        out[key] = {"grid": lambda v: tune.grid_search(list(v)), "choice": lambda v: tune.choice(list(v)),
                    "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
                    "randint": lambda v: tune.randint(*v), "value": lambda v: v}[kind](value)  # fmt: skip
    return out


def _scheduler(sweep: Sweep, plan: Plan):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = sweep.scheduler
    time_attr = s.get("time_attr", "step")
    unit = plan.eval_every if time_attr == "step" else 1  # one evaluation interval in time_attr units
    horizon = plan.max_steps if time_attr == "step" else math.ceil(plan.max_steps / plan.eval_every)
    if s["name"] == "fifo":
        return FIFOScheduler()
    if s["name"] == "asha":  # stop_last_trials=False: a trial reaching max_t ends its run itself (export, summary)
        return ASHAScheduler(time_attr=time_attr, max_t=s.get("max_t") or horizon,
                             grace_period=s.get("grace_period") or unit, reduction_factor=s.get("reduction_factor", 2),
                             brackets=s.get("brackets", 1), stop_last_trials=False)  # fmt: skip
    mutations = _param_space({k: _space_entry(sweep.path, k, v) for k, v in s["hyperparam_mutations"].items()})
    return PopulationBasedTraining(time_attr=time_attr,
                                   perturbation_interval=s.get("perturbation_interval") or 2 * unit,
                                   hyperparam_mutations=mutations, quantile_fraction=s.get("quantile_fraction", 0.25),
                                   resample_probability=s.get("resample_probability", 0.25),
                                   burn_in_period=s.get("burn_in_period", 0))  # fmt: skip


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _connect_ray(sweep: Sweep) -> bool:
    """Joins the cluster named by the sweep or $RAY_ADDRESS, else starts a local runtime. True if we started one."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local runtimes: no token files; clusters set their own
    address = sweep.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=sweep.ray_num_cpus or None, include_dashboard=False)
    return True


def _parent_run(sweep: Sweep, plan: Plan, state: dict):
    from .tracking import open_tracker

    tracker = open_tracker(True, sweep.uri(), sweep.exp_dir, plan.experiment, f"sweep/{sweep.name}",
                           run_id=state.get("parent_run_id"),
                           tags={"meme_scale.sweep": sweep.name, "meme_scale.kind": "sweep"})  # fmt: skip
    if not state.get("parent_run_id"):
        tracker.log_params({"sweep.name": sweep.name, "sweep.base": sweep.base, "sweep.metric": sweep.metric,
                            "sweep.mode": sweep.mode, "sweep.scheduler": json.dumps(sweep.scheduler),
                            "sweep.num_samples": sweep.num_samples, "sweep.max_failures": sweep.max_failures,
                            "sweep.resources": json.dumps({"cpus_per_trial": sweep.cpus_per_trial,
                                                           "gpus_per_trial": sweep.gpus_per_trial,
                                                           "ranks_per_trial": sweep.ranks_per_trial}),
                            "sweep.search_space": json.dumps(sweep.search_space),
                            **{f"fixed.{k}": v for k, v in plan.fixed.items()}})  # fmt: skip
        tracker.log_artifact(sweep.path, "sweep")
    return tracker


def run_sweep(sweep: Sweep, resume: bool = False) -> dict:
    """Validates, runs (or resumes) the sweep on Ray, and writes and logs its summary. Returns the summary."""
    plan = validate(sweep)  # every input check happens here, before Ray and before any trial
    exp_dir = sweep.exp_dir
    state_file = exp_dir / "sweep_state.json"
    exists = (exp_dir / "tuner.pkl").is_file()
    if resume and not exists:
        raise SweepError(f"--resume: no sweep to resume in {exp_dir} (run it once without --resume)")
    if not resume and exists:
        raise SweepError(f"{exp_dir} already holds sweep {sweep.name!r}: pass --resume to continue it, "
                         "or change 'name' or 'storage'")  # fmt: skip
    exp_dir.mkdir(parents=True, exist_ok=True)
    state = json.loads(state_file.read_text()) if resume and state_file.is_file() else {}

    from ray import tune

    started = _connect_ray(sweep)
    try:
        parent = _parent_run(sweep, plan, state)
        try:
            state.update(parent_run_id=parent.run_id, tracking_uri=sweep.uri(), experiment=plan.experiment)
            state_file.write_text(json.dumps(state, indent=2))
            setup = TrialSetup(sweep.name, str(sweep.base), plan.fixed, plan.internal, str(sweep.runs_dir),
                               str(exp_dir), sweep.uri(), plan.experiment, parent.run_id, sweep.metric,
                               sweep.ranks_per_trial, float(sweep.cpus_per_trial),
                               float(sweep.gpus_per_trial))  # fmt: skip
            if sweep.ranks_per_trial == 1:
                resources = {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
            else:  # the trial only drives a TorchTrainer; its workers hold the resources
                resources = {"cpu": 0.01}
            trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), resources)
            if resume:
                tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                           resume_errored=False, restart_errored=False)  # fmt: skip
            else:
                tuner = tune.Tuner(trainable, param_space=_param_space(sweep.search_space),
                                   tune_config=_tune_config(sweep, plan), run_config=_run_config(sweep))  # fmt: skip
            tuner.fit()
            summary = summarize(sweep, plan, state, parent)
        except BaseException:
            parent.finish("FAILED")
            raise
    finally:
        if started:
            import ray

            ray.shutdown()
    return summary


def _tune_config(sweep: Sweep, plan: Plan):
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    concurrent = sweep.max_concurrent_trials or None
    if concurrent is None and sweep.ranks_per_trial > 1:  # trials hold no CPUs themselves: bound them by the cluster
        concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // max(sweep.cpus_per_trial, 1e-9)))
    return tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=_scheduler(sweep, plan),
                           search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrent or 0),
                           num_samples=sweep.num_samples, trial_dirname_creator=_trial_dirname,
                           trial_name_creator=_trial_dirname)  # fmt: skip


def _run_config(sweep: Sweep):
    from ray import tune

    keep = 4 if sweep.scheduler["name"] == "pbt" else 2  # PBT restores from a donor's checkpoint a while later
    return tune.RunConfig(name=sweep.name, storage_path=str(sweep.storage),
                          failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=keep), verbose=1)  # fmt: skip


# -- the summary ------------------------------------------------------------------------------------
def _trial_rows(sweep: Sweep, plan: Plan) -> list[dict]:
    from ray import tune

    analysis = tune.ExperimentAnalysis(str(sweep.exp_dir))
    rows = []
    for trial in analysis.trials:
        last = dict(trial.last_result or {})
        record = TrialRecord.load(sweep.runs_dir / trial.trial_id, trial.trial_id)
        config = {k: _plain(v) for k, v in trial.config.items()}
        max_steps = int(config.get("train.max_steps", plan.base_cfg.train.max_steps))
        step = last.get("step")
        finished = sweep.runs_dir / trial.trial_id / "summary.json"  # written by loop.run when a run ends
        if finished.is_file():
            step = max(step or 0, json.loads(finished.read_text()).get("step", 0))
        if trial.status == "ERROR":
            status = "failed"
        elif trial.status == "TERMINATED":
            status = "completed" if step is not None and step >= max_steps else "stopped early"
        else:
            status = "interrupted"
        error = record.errors[-1]["error"].splitlines()[0] if record.errors and status == "failed" else ""
        value = last.get(sweep.metric)
        rows.append({"trial_id": trial.trial_id, "status": status, "config": config, "step": step, "value": value,
                     "attempts": record.attempts, "mlflow_run_id": record.mlflow_run_id, "error": error})  # fmt: skip
    sign = -1 if sweep.mode == "max" else 1
    rows.sort(key=lambda r: (r["value"] is None or r["status"] == "failed",
                             sign * r["value"] if r["value"] is not None else 0, r["trial_id"]))  # fmt: skip
    return rows


def summarize(sweep: Sweep, plan: Plan, state: dict, parent) -> dict:
    """Results table (terminal + markdown), plot, best config; MLflow statuses of every child run."""
    from .tracking import update_run

    rows = _trial_rows(sweep, plan)
    exp_dir = sweep.exp_dir
    keys = list(sweep.search_space)
    interrupted = any(r["status"] == "interrupted" for r in rows)
    for r in rows:
        if not r["mlflow_run_id"]:
            continue
        status = {"completed": "FINISHED", "stopped early": "FINISHED", "failed": "FAILED"}.get(r["status"], "KILLED")
        tags = {"tune.status": r["status"], "tune.stopped_early": str(r["status"] == "stopped early").lower(),
                "tune.attempts": r["attempts"]}  # fmt: skip
        if r["value"] is not None:
            tags["tune.final_metric"] = f"{sweep.metric}={r['value']:.6g}"
        log = sweep.runs_dir / r["trial_id"] / "train.log"  # trials stopped early never uploaded theirs
        text = {"logs/train.log": _tail(log, 5000)} if log.is_file() else {}
        update_run(sweep.uri(), r["mlflow_run_id"], tags=tags, status=status, text=text)

    table = _table(rows, keys, sweep)
    (exp_dir / "results.md").write_text(
        f"# Sweep `{sweep.name}`: {sweep.metric} ({sweep.mode})\n\n{_markdown(table)}\n")  # fmt: skip
    (exp_dir / "results.json").write_text(json.dumps({"sweep": sweep.name, "metric": sweep.metric, "mode": sweep.mode,
                                                      "trials": rows}, indent=2, default=str))  # fmt: skip
    plot = _plot(rows, sweep, plan, exp_dir / PLOT_NAME)
    scored = [r for r in rows if r["value"] is not None and r["status"] != "failed"]
    best = next((r for r in scored if r["status"] == "completed"), scored[0] if scored else None)  # a full run first
    best_path = None
    if best is not None:
        best_path = _write_best_config(sweep, plan, best, state)
    print(f"\nSweep {sweep.name}: {len(rows)} trials, sorted by {sweep.metric} ({sweep.mode})")
    print(_plain_table(table))
    for path in (exp_dir / "results.md", exp_dir / "results.json", plot, best_path):
        if path is not None:
            parent.log_artifact(path, "summary")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped early", "failed", "interrupted")}
    parent.log_metrics({"trials": len(rows), **{f"trials_{k.replace(' ', '_')}": v for k, v in counts.items()}},
                       step=0)  # fmt: skip
    if best is not None:
        parent.log_metrics({f"best/{sweep.metric}": best["value"]}, step=0)
        parent.set_tags({"best_trial": best["trial_id"], "best_mlflow_run_id": best["mlflow_run_id"] or ""})
        print(f"\nbest trial {best['trial_id']}: {sweep.metric}={best['value']:.6g} at step {best['step']} "
              f"(mlflow run {best['mlflow_run_id']})\nbest config: {best_path}\n{best_path.read_text()}")  # fmt: skip
    if interrupted:
        print(f"\nthe sweep was interrupted; continue it with: meme-scale tune --config {sweep.path} --resume")
    parent.finish("KILLED" if interrupted else "FINISHED")
    print(f"results: {exp_dir / 'results.md'}; plot: {plot}; mlflow: {sweep.uri()} (parent run {parent.run_id})")
    return {"rows": rows, "best": best, "best_config": str(best_path) if best_path else None,
            "results_md": str(exp_dir / "results.md"), "plot": str(plot) if plot else None,
            "parent_run_id": parent.run_id, "tracking_uri": sweep.uri(), "interrupted": interrupted,
            "counts": counts}  # fmt: skip


def _table(rows: list[dict], keys: list[str], sweep: Sweep) -> list[list[str]]:
    head = ["#", "trial", "status", *keys, "step", sweep.metric, "attempts", "mlflow run"]
    body = []
    for i, r in enumerate(rows, 1):
        value = f"{r['value']:.6g}" if r["value"] is not None else "-"
        status = r["status"] + (f": {r['error'][:60]}" if r["error"] else "")
        body.append([str(i), r["trial_id"], status, *(_fmt(r["config"].get(k)) for k in keys),
                     str(r["step"] if r["step"] is not None else "-"), value, str(r["attempts"]),
                     r["mlflow_run_id"] or "-"])  # fmt: skip
    return [head, *body]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plain_table(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _markdown(table: list[list[str]]) -> str:
    esc = lambda c: c.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in table[0]) + " |", "|" + "---|" * len(table[0])]
    return "\n".join(lines + ["| " + " | ".join(esc(c) for c in row) + " |" for row in table[1:]])


def _plot(rows: list[dict], sweep: Sweep, plan: Plan, path: Path) -> Path | None:
    """The metric against pseudo-sample count, one line per observed fraction (best trial per point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: dict[float, dict[int, dict]] = {}
    sign = 1 if sweep.mode == "max" else -1
    for r in rows:
        if r["value"] is None or r["status"] == "failed":
            continue
        n = int(r["config"].get("model.pseudo_samples", plan.base_cfg.model.pseudo_samples))
        f = float(r["config"].get("data.observed_fraction", plan.base_cfg.data.observed_fraction))
        current = best.setdefault(f, {}).get(n)
        if current is None or sign * r["value"] > sign * current["value"]:
            best[f][n] = r
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for f in sorted(best, reverse=True):
        points = sorted(best[f].items())
        xs, ys = [n for n, _ in points], [r["value"] for _, r in points]
        (line,) = ax.plot(xs, ys, marker="o", label=f"observed fraction {f:g}")
        early = [(n, r["value"]) for n, r in points if r["status"] != "completed"]
        if early:
            ax.scatter(*zip(*early), s=80, facecolors="white", edgecolors=line.get_color(), zorder=3)
    ax.set_xscale("log", base=2)
    ns = sorted({n for f in best for n in best[f]})
    if ns:
        ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("pseudo-samples per modality (model.pseudo_samples)")
    ax.set_ylabel(sweep.metric)
    ax.set_title(f"sweep {sweep.name}: best trial per point (hollow: stopped early)", fontsize=9)
    if best:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _write_best_config(sweep: Sweep, plan: Plan, best: dict, state: dict) -> Path:
    """The best trial's training config, ready for ``meme-scale train --config`` (a fresh run dir)."""
    values = {k: v for k, v in best["config"].items()}
    own = {"run.dir": str(sweep.exp_dir / "best_run"), "run.tracking_uri": state.get("tracking_uri", sweep.uri()),
           "run.experiment": plan.experiment, "run.run_name": f"{sweep.name}/best"}  # fmt: skip
    cfg = load_config(sweep.base, _override_list({**plan.fixed, **values, **own}))
    header = (f"# Best trial of sweep {sweep.name!r} ({sweep.path}): {best['trial_id']}, {sweep.metric}="
              f"{best['value']:.6g} ({sweep.mode}) at step {best['step']}; mlflow run {best['mlflow_run_id']}.\n"
              f"# Train it: meme-scale train --config {sweep.exp_dir / 'best_config.yaml'}\n"
              f"#       or: deepspeed meme_scale/train.py --config {sweep.exp_dir / 'best_config.yaml'}\n"
              f"# Search values: {', '.join(f'{k}={_fmt(v)}' for k, v in values.items())}\n")  # fmt: skip
    path = sweep.exp_dir / "best_config.yaml"
    path.write_text(header + dump_yaml(cfg))
    return path


# -- command line -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--trial-process"]:
        p = argparse.ArgumentParser(prog="meme_scale.tune --trial-process")
        p.add_argument("--trial-process", required=True)
        p.add_argument("--report-fd", type=int, required=True)
        p.add_argument("--parent-pid", type=int, required=True)
        a = p.parse_args(argv)
        return trial_process(a.trial_process, a.report_fd, a.parent_pid)
    parser = argparse.ArgumentParser(prog="meme-scale tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", required=True, help="sweep file (see configs/sweeps/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted sweep (finished and failed trials are not run again)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training keys fixed for every trial")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.config, args.overrides)
        summary = run_sweep(sweep, resume=args.resume)
    except (SweepError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["interrupted"]:
        return 3
    if summary["rows"] and all(r["status"] == "failed" for r in summary["rows"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
