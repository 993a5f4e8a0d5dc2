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

Modules: ``sweep`` (the file), ``plan`` (every check before Ray starts), ``driver`` (Ray, MLflow parent
run, schedulers), ``trial`` (the Ray trainable), ``process`` (the training process a trial runs and
watches), ``record`` (a trial's MLflow child run across restarts), ``results`` (table, plot, best config).
"""

from .cli import main
from .driver import run_sweep
from .plan import Plan, validate
from .sweep import Sweep, SweepError, load_sweep

__all__ = ["Plan", "Sweep", "SweepError", "load_sweep", "main", "run_sweep", "validate"]
