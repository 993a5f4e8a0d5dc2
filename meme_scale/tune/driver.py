"""The sweep's driver: Ray (joined or started), the MLflow parent run, the Tuner and its scheduler."""

from __future__ import annotations

import json
import math
import os

from .plan import Plan, validate
from .results import summarize
from .sweep import Sweep, SweepError, space_entry
from .trial import TrialSetup, run_trial


def _param_space(space: dict[str, dict]) -> dict:
    from ray import tune

    out = {}
    for key, entry in space.items():
        ((kind, value),) = entry.items()
        out[key] = {
            "grid": lambda v: tune.grid_search(list(v)),
            "choice": lambda v: tune.choice(list(v)),
            "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v),
            "value": lambda v: v,
        }[kind](value)
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
        return ASHAScheduler(
            time_attr=time_attr,
            max_t=s.get("max_t") or horizon,
            grace_period=s.get("grace_period") or unit,
            reduction_factor=s.get("reduction_factor", 2),
            brackets=s.get("brackets", 1),
            stop_last_trials=False,
        )
    mutations = _param_space({k: space_entry(sweep.path, k, v) for k, v in s["hyperparam_mutations"].items()})
    return PopulationBasedTraining(
        time_attr=time_attr,
        perturbation_interval=s.get("perturbation_interval") or 2 * unit,
        hyperparam_mutations=mutations,
        quantile_fraction=s.get("quantile_fraction", 0.25),
        resample_probability=s.get("resample_probability", 0.25),
        burn_in_period=s.get("burn_in_period", 0),
    )


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
    from ..tracking import open_tracker

    tracker = open_tracker(
        True,
        sweep.uri(),
        sweep.exp_dir,
        plan.experiment,
        f"sweep/{sweep.name}",
        run_id=state.get("parent_run_id"),
        tags={"meme_scale.sweep": sweep.name, "meme_scale.kind": "sweep"},
    )
    if not state.get("parent_run_id"):
        tracker.log_params(
            {
                "sweep.name": sweep.name,
                "sweep.base": sweep.base,
                "sweep.metric": sweep.metric,
                "sweep.mode": sweep.mode,
                "sweep.scheduler": json.dumps(sweep.scheduler),
                "sweep.num_samples": sweep.num_samples,
                "sweep.max_failures": sweep.max_failures,
                "sweep.resources": json.dumps(
                    {
                        "cpus_per_trial": sweep.cpus_per_trial,
                        "gpus_per_trial": sweep.gpus_per_trial,
                        "ranks_per_trial": sweep.ranks_per_trial,
                    }
                ),
                "sweep.search_space": json.dumps(sweep.search_space),
                **{f"fixed.{k}": v for k, v in plan.fixed.items()},
            }
        )
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
        raise SweepError(
            f"{exp_dir} already holds sweep {sweep.name!r}: pass --resume to continue it, or change 'name' or 'storage'"
        )
    exp_dir.mkdir(parents=True, exist_ok=True)
    state = json.loads(state_file.read_text()) if resume and state_file.is_file() else {}

    from ray import tune

    started = _connect_ray(sweep)
    try:
        parent = _parent_run(sweep, plan, state)
        try:
            state.update(parent_run_id=parent.run_id, tracking_uri=sweep.uri(), experiment=plan.experiment)
            state_file.write_text(json.dumps(state, indent=2))
            setup = TrialSetup(
                sweep.name,
                str(sweep.base),
                plan.fixed,
                plan.internal,
                str(sweep.runs_dir),
                str(exp_dir),
                sweep.uri(),
                plan.experiment,
                parent.run_id,
                sweep.metric,
                sweep.ranks_per_trial,
                float(sweep.cpus_per_trial),
                float(sweep.gpus_per_trial),
            )
            if sweep.ranks_per_trial == 1:
                resources = {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
            else:  # the trial only drives a TorchTrainer; its workers hold the resources
                resources = {"cpu": 0.01}
            trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), resources)
            if resume:
                tuner = tune.Tuner.restore(
                    str(exp_dir),
                    trainable=trainable,
                    resume_unfinished=True,
                    resume_errored=False,
                    restart_errored=False,
                )
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space=_param_space(sweep.search_space),
                    tune_config=_tune_config(sweep, plan),
                    run_config=_run_config(sweep),
                )
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
    return tune.TuneConfig(
        metric=sweep.metric,
        mode=sweep.mode,
        scheduler=_scheduler(sweep, plan),
        search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrent or 0),
        num_samples=sweep.num_samples,
        trial_dirname_creator=_trial_dirname,
        trial_name_creator=_trial_dirname,
    )


def _run_config(sweep: Sweep):
    from ray import tune

    keep = 4 if sweep.scheduler["name"] == "pbt" else 2  # PBT restores from a donor's checkpoint a while later
    return tune.RunConfig(
        name=sweep.name,
        storage_path=str(sweep.storage),
        failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
        verbose=1,
    )
