"""Every check a sweep can get before Ray starts: config keys and values, the metric, the scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, load_config
from .sweep import TUNE_OWNED, Sweep, SweepError, candidates, override_list, space_entry


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
            raise SweepError(
                f"{where}: key {key!r} is set by the sweep for each trial (run dirs live under "
                f"{sweep.runs_dir}); remove it"
            )
    try:
        base_cfg = load_config(sweep.base, override_list(sweep.overrides))
    except ConfigError as e:
        raise SweepError(f"{where}: base config with the sweep's overrides: {e}") from None
    fixed = dict(sweep.overrides)
    fixed["data.root"] = str(Path(base_cfg.data.root).resolve())
    classifiers = getattr(getattr(base_cfg, "eval", None), "classifiers", "")
    if classifiers:
        fixed["eval.classifiers"] = str(Path(classifiers).resolve())
    base_cfg = load_config(sweep.base, override_list(fixed))

    variants: list[tuple[str, Config]] = [("the base config", base_cfg)]
    for key, entry in sweep.search_space.items():
        for value in candidates(entry):
            try:
                cfg = load_config(sweep.base, override_list({**fixed, key: value}))
            except ConfigError as e:
                message = str(e).split(": ", 1)[-1]
                raise SweepError(f"{where}: search_space key {key!r} (value {value!r}): {message}") from None
            variants.append((f"{key}={value!r}", cfg))
    mutations = sweep.scheduler.get("hyperparam_mutations") or {}
    if sweep.scheduler["name"] == "pbt":
        if not isinstance(mutations, dict) or not mutations:
            raise SweepError(
                f"{where}: key 'scheduler.hyperparam_mutations' is required for pbt "
                "(e.g. {optim.lr: {loguniform: [1.0e-4, 1.0e-2]}})"
            )
        for key, spec in mutations.items():
            if key not in sweep.search_space:
                raise SweepError(f"{where}: key 'scheduler.hyperparam_mutations.{key}' must also be in search_space")
            for value in candidates(space_entry(sweep.path, key, spec)):
                try:
                    load_config(sweep.base, override_list({**fixed, key: value}))
                except ConfigError as e:
                    raise SweepError(f"{where}: key 'scheduler.hyperparam_mutations.{key}': {e}") from None

    reported = _metric_check(sweep, variants)
    steps = [c.train.max_steps for _, c in variants]
    internal = {"run.progress": "lines"}
    if "run.checkpoint_every" not in sweep.overrides and "run.checkpoint_every" not in sweep.search_space:
        internal["run.checkpoint_every"] = base_cfg.run.eval_every  # a checkpoint for every report: exact resumes, PBT
    time_attr = sweep.scheduler.get("time_attr", "step")
    if time_attr not in ("step", "training_iteration"):
        raise SweepError(
            f"{where}: key 'scheduler.time_attr' must be 'step' or 'training_iteration', got {time_attr!r}"
        )
    if sweep.ranks_per_trial > 1 and sweep.scheduler["name"] == "pbt":
        raise SweepError(
            f"{where}: scheduler 'pbt' needs one-process trials (resources.ranks_per_trial: 1): "
            "multi-rank trials resume from their own run dir, not from Ray checkpoints"
        )
    return Plan(
        base_cfg,
        fixed,
        internal,
        reported,
        max(steps),
        base_cfg.run.eval_every,
        sweep.experiment or base_cfg.run.experiment,
    )


def reported_metrics(cfg: Config) -> set[str]:
    """The names training reports to Ray at each evaluation with this config.

    The loss terms come from one real forward pass on two evaluation samples (evaluation sees every
    modality, so terms of unpaired samples never appear there); the rest from ``evaluate.metric_names``.
    """
    import torch

    from ..data.shards import eval_batches, read_meta
    from ..evaluate import metric_names, to_device
    from ..models import build_model, modality_specs

    meta = read_meta(cfg.data.root)
    model = build_model(cfg.model, modality_specs(cfg.model, meta)).eval()
    batch = next(
        iter(eval_batches(cfg.data.root, cfg.data.eval_split, 2, modalities=list(model.names), rank=0, world_size=1))
    )
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        _, terms = model.loss(to_device(batch, torch.device("cpu")))
    names = {"step", "eval/loss", *(f"eval/{k}" for k, (_, count) in terms.items() if count > 0)}
    return names | metric_names(cfg, meta, {m: model.specs[m].kind for m in model.names})


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
                hint = (
                    f" Coherence needs a classifier per modality in {folder} (python tools/train_classifiers.py"
                    f" --shards {cfg.data.root}), or choose another metric, e.g. 'metric: eval/loss'."
                )
            raise SweepError(
                f"{where}: key 'metric': training never reports {sweep.metric!r} with {label} "
                f"(it reports: {', '.join(sorted(names))}).{hint}"
            )
        common = names if common is None else common & names
    if common is None:
        raise SweepError(f"{where}: the base config does not build a model: {variants[0][1].model.name}")
    return common
