"""Ray Tune sweeps end to end: a real local Ray runtime (2 CPUs), real MLflow (SQLite), the real quickstart shards.

One Ray runtime serves the module; the CLI tests join it through RAY_ADDRESS. Trials are a few steps
of batch 16 with an evaluation every 2 steps, so the whole file stays within a few minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN, ROOT
from mlflow.tracking import MlflowClient

from meme_scale.config import Config, load_config
from meme_scale.tune import SweepError, load_sweep, main, run_sweep, validate
from meme_scale.tune.record import TrialRecord
from meme_scale.tune.sweep import override_list
from meme_scale.tune.trial import restore_checkpoint

pytestmark = pytest.mark.slow

TINY = {
    "train.max_steps": 6,
    "train.micro_batch_size": 16,
    "run.eval_every": 2,
    "run.eval_max_batches": 1,
    "run.log_every": 2,
    "data.num_workers": 0,
}
if hasattr(Config(), "eval"):  # keep the evaluation's probes small where the evaluation has them
    TINY.update({"eval.latent_train_samples": 64, "eval.latent_epochs": 1, "eval.joint_samples": 16})


@pytest.fixture(scope="module")
def ray_address():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False)  # never a stale `ray start` cluster
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def write_sweep(path: Path, data: Path, **keys) -> Path:
    sweep = {
        "name": path.stem,
        "base": str(ROOT / "configs" / "quickstart.yaml"),
        "storage": str(path.parent / "store"),
        "overrides": {"data.root": str(data), **TINY, **keys.pop("overrides", {})},
        **keys,
    }
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def child_runs(uri: str, parent_run_id: str) -> list:
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.mlflow.parentRunId = '{parent_run_id}'")


# -- a real ASHA sweep ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def asha_sweep(ray_address, quickstart_shards, tmp_path_factory):
    """4 trials (lr x pseudo-samples), 2 at a time; the tiny lr cannot keep up, so ASHA stops such trials."""
    path = write_sweep(
        tmp_path_factory.mktemp("asha") / "asha.yaml",
        quickstart_shards,
        search_space={"optim.lr": {"grid": [0.003, 0.00001]}, "model.pseudo_samples": [16, 64]},
        metric="eval/loss",
        mode="min",
        scheduler={"name": "asha", "grace_period": 2, "reduction_factor": 2},
    )
    sweep = load_sweep(path)
    t0 = time.perf_counter()
    summary = run_sweep(sweep)
    summary["wall_s"] = time.perf_counter() - t0
    return sweep, summary


def test_asha_sweep_stops_early_and_every_trial_is_an_mlflow_child_run(asha_sweep):
    sweep, summary = asha_sweep
    rows = summary["rows"]
    assert len(rows) == 4 and not summary["interrupted"]
    statuses = [r["status"] for r in rows]
    assert "stopped early" in statuses and "completed" in statuses, statuses
    assert all(r["status"] in ("completed", "stopped early") for r in rows)
    for r in rows:
        assert r["step"] == 6 if r["status"] == "completed" else r["step"] < 6
    values = [r["value"] for r in rows]
    assert values == sorted(values)  # mode min: best first

    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.metric"] == "eval/loss"
    assert parent.data.tags["best_trial"] == rows[0]["trial_id"]
    children = child_runs(summary["tracking_uri"], summary["parent_run_id"])
    assert sorted(c.info.run_id for c in children) == sorted(r["mlflow_run_id"] for r in rows)
    by_id = {c.info.run_id: c for c in children}
    for r in rows:
        child = by_id[r["mlflow_run_id"]]
        assert child.info.status == "FINISHED"
        assert child.data.tags["meme_scale.trial_id"] == r["trial_id"]
        assert child.data.tags["tune.status"] == r["status"]
        assert float(child.data.params["optim.lr"]) == r["config"]["optim.lr"]
        assert int(child.data.params["model.pseudo_samples"]) == r["config"]["model.pseudo_samples"]
        assert child.data.params["run.dir"] == str(sweep.runs_dir / r["trial_id"])
        history = client.get_metric_history(child.info.run_id, "eval/loss")
        assert [m.step for m in history] == list(range(2, r["step"] + 1, 2))
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "pictures"} <= artifacts
        if r["status"] == "completed":
            assert "model" in artifacts

    summary_files = {a.path for a in client.list_artifacts(summary["parent_run_id"], "summary")}
    assert {
        "summary/results.md",
        "summary/results.json",
        "summary/metric_vs_pseudo_samples.png",
        "summary/best_config.yaml",
    } <= summary_files
    assert Path(summary["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = Path(summary["results_md"]).read_text()
    assert table.index(rows[0]["trial_id"]) < table.index(rows[-1]["trial_id"]) and "stopped early" in table


def test_best_config_loads_and_trains(asha_sweep, tmp_path):
    sweep, summary = asha_sweep
    best = summary["best"]
    assert best["trial_id"] == summary["rows"][0]["trial_id"] and best["status"] == "completed"
    cfg = load_config(summary["best_config"])
    assert (
        cfg.optim.lr == best["config"]["optim.lr"]
        and cfg.model.pseudo_samples == best["config"]["model.pseudo_samples"]
    )
    assert cfg.train.max_steps == 6 and Path(cfg.data.root).is_absolute()
    run_dir = tmp_path / "best"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "meme_scale" / "train.py"),
            "--config",
            summary["best_config"],
            "train.max_steps=2",
            f"run.dir={run_dir}",
            "run.tracking_uri=",
            "run.eval_every=2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 2


# -- failures, max_failures, interruption and --resume through the command line ---------------------
def _cli(args: list[str], ray_address: str) -> list[str]:
    script = BIN / "meme-scale"
    return ([str(script)] if script.exists() else [sys.executable, "-m", "meme_scale.cli"]) + args


def test_failing_trial_is_reported_and_resume_does_not_rerun_finished_trials(ray_address, quickstart_shards, tmp_path):
    """Trials: A (good), C (a network that does not exist: fails, retried once), B (good, interrupted mid-run).

    The sweep goes on past C; SIGINT (Ctrl+C) stops it while B trains; ``--resume`` finishes B from its
    checkpoint and runs neither A (finished) nor C (failed) again.
    """
    path = write_sweep(
        tmp_path / "fail_resume.yaml",
        quickstart_shards,
        max_failures=1,
        max_concurrent_trials=2,
        search_space={"model.modalities.0.net": {"grid": ["mnist_mlp", "no_such_net", "mnist_mlp"]}},
        metric="eval/loss",
        mode="min",
        scheduler={"name": "fifo"},
        overrides={"train.max_steps": 20},
    )
    sweep = load_sweep(path)
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_address,
        "RAY_AUTH_MODE": "disabled",
        "DS_ACCELERATOR": "cpu",
        "PYTHONUNBUFFERED": "1",
    }
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(
        _cli(["tune", "--config", str(path)], ray_address), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
    )

    def trial(suffix: str) -> Path | None:
        found = list(sweep.runs_dir.glob(f"*_{suffix}")) if sweep.runs_dir.is_dir() else []
        return found[0] if found else None

    deadline = time.monotonic() + 300
    while True:
        a, c, b = trial("00000"), trial("00001"), trial("00002")
        a_done = a is not None and (a / "summary.json").is_file()
        c_failed = c is not None and len(TrialRecord.load(c).errors) >= 2
        b_checkpointed = b is not None and any(b.glob("checkpoints/step_*/meme_scale.json"))
        if a_done and c_failed and b_checkpointed:
            break
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-5000:]
        assert time.monotonic() < deadline, "the sweep did not reach the interruption point"
        time.sleep(0.2)
    assert not (b / "summary.json").exists(), "trial B finished before the interruption; lengthen it"
    a_summary_mtime = (a / "summary.json").stat().st_mtime_ns
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=120) == 3, (tmp_path / "first.log").read_text()[-5000:]
    first = json.loads((sweep.exp_dir / "results.json").read_text())
    status = {r["trial_id"][-5:]: r["status"] for r in first["trials"]}
    assert status == {"00000": "completed", "00001": "failed", "00002": "interrupted"}, status

    resumed = subprocess.run(
        _cli(["tune", "--config", str(path), "--resume"], ray_address),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-5000:] + resumed.stderr[-5000:]
    final = {r["trial_id"][-5:]: r for r in json.loads((sweep.exp_dir / "results.json").read_text())["trials"]}
    assert {k: r["status"] for k, r in final.items()} == {"00000": "completed", "00001": "failed", "00002": "completed"}

    # A: finished before the interruption, not run again
    assert (a / "summary.json").stat().st_mtime_ns == a_summary_mtime and TrialRecord.load(a).attempts == 1
    # C: failed with its error after max_failures=1 retry (2 attempts), not retried by --resume
    record = TrialRecord.load(c)
    assert record.attempts == 2 and all("no_such_net" in e["error"] for e in record.errors)
    assert "no_such_net" in final["00001"]["error"]
    # B: continued from its checkpoint in the same MLflow run
    record = TrialRecord.load(b)
    assert record.attempts == 2 and final["00002"]["step"] == 20
    log_text = (b / "train.log").read_text()
    assert "resumed from" in log_text and json.loads((b / "summary.json").read_text())["step"] == 20

    state = json.loads((sweep.exp_dir / "sweep_state.json").read_text())
    uri, parent_id = state["tracking_uri"], state["parent_run_id"]
    client = MlflowClient(uri)
    assert client.get_run(parent_id).info.status == "FINISHED"
    children = {c.data.tags["meme_scale.trial_id"][-5:]: c for c in child_runs(uri, parent_id)}
    assert sorted(children) == ["00000", "00001", "00002"]  # one child run per trial, across attempts and resume
    assert children["00001"].info.status == "FAILED" and "no_such_net" in children["00001"].data.tags["tune.error"]
    assert children["00002"].info.status == "FINISHED" and children["00002"].info.run_id == record.mlflow_run_id
    steps = [m.step for m in client.get_metric_history(record.mlflow_run_id, "eval/loss")]
    assert steps[-1] == 20 and len(set(steps)) == 10  # every evaluation logged, the resumed ones continuing


# -- a multi-rank trial: Ray Train's TorchTrainer, one training process per rank ----------------------
def test_two_rank_trial_runs_through_ray_train(ray_address, quickstart_shards, tmp_path):
    path = write_sweep(
        tmp_path / "ranks.yaml",
        quickstart_shards,
        search_space={"optim.lr": [0.001]},
        metric="eval/loss",
        mode="min",
        scheduler={"name": "fifo"},
        resources={"cpus_per_trial": 1, "ranks_per_trial": 2},
        overrides={"train.max_steps": 4},
    )
    sweep = load_sweep(path)
    summary = run_sweep(sweep)
    (row,) = summary["rows"]
    assert row["status"] == "completed" and row["step"] == 4
    run = json.loads((sweep.runs_dir / row["trial_id"] / "summary.json").read_text())
    assert run["world_size"] == 2 and len(set(run["parameter_digest_per_rank"])) == 1  # ranks in sync
    child = MlflowClient(summary["tracking_uri"]).get_run(row["mlflow_run_id"])
    assert child.info.status == "FINISHED" and child.data.tags["world_size"] == "2"
    assert child.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
    # rank 0 reported each complete checkpoint to Ray: a copy a retried trial can resume from
    saved = sorted((sweep.exp_dir / "train" / row["trial_id"]).glob("checkpoint_*/meme_scale.json"))
    assert saved and {json.loads(p.read_text())["tag"] for p in saved} >= {"step_00000004"}
    assert all((p.parent / "rank_00001.pt").is_file() for p in saved)  # every rank's part, not just rank 0's


# -- bad input, before any trial ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "keys, message",
    [
        ({"search_space": {"model.pseudo_sample": [16, 32]}}, "'model.pseudo_sample'"),
        ({"search_space": {"model.pseudo_samples": [16, "many"]}}, "'model.pseudo_samples'"),
        ({"search_space": {"optim.lr": {"loguniform": [0.0, 1.0]}}}, "'optim.lr'"),
        ({"search_space": {"optim.lr": {"between": [1, 2]}}}, "'optim.lr'"),
        ({"search_space": {"run.dir": ["/tmp/x"]}}, "'run.dir'"),
        ({"metric": "eval/coherence_made_up"}, "'eval/coherence_made_up'"),
        ({"metric": "eval/loss", "mode": "best"}, "'mode'"),
        ({"metric": "eval/loss", "scheduler": {"name": "hyperband"}}, "'scheduler.name'"),
        ({"metric": "eval/loss", "scheduler": {"name": "asha", "patience": 3}}, "'scheduler.patience'"),
        ({"metric": "eval/loss", "trials": 4}, "'trials'"),
        ({"metric": "eval/loss", "scheduler": {"name": "pbt"}}, "'scheduler.hyperparam_mutations'"),
    ],
)
def test_bad_input_is_rejected_before_any_trial_naming_the_key(keys, message, quickstart_shards, tmp_path, capsys):
    keys = {"search_space": {"model.pseudo_samples": [16, 32]}, **keys}
    path = write_sweep(tmp_path / "bad.yaml", quickstart_shards, **keys)
    with pytest.raises(SweepError) as info:
        validate(load_sweep(path))
    assert message in str(info.value) and str(path) in str(info.value)
    assert main(["--config", str(path)]) == 2  # the command says so and stops
    assert message in capsys.readouterr().err
    assert not (tmp_path / "store").exists()  # nothing started: no experiment dir, no MLflow store, no trial


def test_default_metric_is_cross_coherence_and_needs_classifiers(quickstart_shards, tmp_path):
    path = write_sweep(tmp_path / "default.yaml", quickstart_shards, search_space={"model.pseudo_samples": [16, 32]})
    sweep = load_sweep(path)
    assert (sweep.metric, sweep.mode) == ("eval/cross_coherence", "max")
    with pytest.raises(SweepError, match="eval/cross_coherence.*train_classifiers"):
        validate(sweep)
    data = tmp_path / "data"  # the same shards beside (dummy) classifier files: only their presence is checked
    data.mkdir()
    for f in quickstart_shards.iterdir():
        (data / f.name).symlink_to(f)
    (data / "classifiers").mkdir()
    for m in ("mnist", "digits"):
        (data / "classifiers" / f"{m}.pt").write_bytes(b"")
    plan = validate(load_sweep(path, [f"data.root={data}"]))
    assert {"eval/cross_coherence", "eval/coherence_mnist_to_digits", "eval/coherence_digits_to_mnist"} <= plan.reported


def test_sweep_file_reads_floats_without_a_dot_and_infers_the_mode(quickstart_shards, tmp_path):
    path = tmp_path / "floats.yaml"
    path.write_text(
        f"base: {ROOT / 'configs' / 'quickstart.yaml'}\nmetric: eval/loss\nstorage: {tmp_path / 'store'}\n"
        f"overrides: {{data.root: {quickstart_shards}}}\n"
        "search_space:\n  optim.lr: {loguniform: [1e-4, 2e-3]}\n  model.pseudo_samples: 32\n"
    )
    sweep = load_sweep(path, ["optim.weight_decay=1e-6"])
    assert sweep.name == "floats" and sweep.mode == "min"  # a loss is minimised unless the file says otherwise
    assert sweep.search_space == {"optim.lr": {"loguniform": [1e-4, 2e-3]}, "model.pseudo_samples": {"value": 32}}
    plan = validate(sweep)
    assert plan.fixed["optim.weight_decay"] == 1e-6 and plan.fixed["data.root"] == str(quickstart_shards.resolve())
    assert plan.internal["run.checkpoint_every"] == plan.base_cfg.run.eval_every  # a checkpoint for every report


def test_shipped_sweeps_cover_the_paper_grid():
    paths = sorted((ROOT / "configs" / "sweeps").glob("*_pseudo_samples.yaml"))
    assert paths
    for path in paths:
        sweep = load_sweep(path)
        assert sweep.search_space["model.pseudo_samples"] == {"grid": [16, 32, 64, 128, 256]}
        assert sweep.search_space["data.observed_fraction"] == {"grid": [1.0, 0.5, 0.25, 0.125]}
        assert "optim.lr" in sweep.search_space
        assert sweep.metric == "eval/cross_coherence" and sweep.mode == "max"
        load_config(sweep.base, override_list(sweep.overrides))


def test_shipped_f025_sweep_varies_only_the_pseudo_samples():
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "quickstart_pseudo_samples_f025.yaml")
    assert sweep.search_space == {
        "model.pseudo_samples": {"grid": [16, 32, 64, 128, 256]},
        "train.seed": {"grid": [0, 1]},
    }
    assert sweep.overrides["data.observed_fraction"] == 0.25 and sweep.scheduler["name"] == "fifo"
    load_config(sweep.base, override_list(sweep.overrides))


# -- a real PBT sweep: the weak trial takes the strong one's checkpoint and a new learning rate -------
def test_pbt_exploits_the_better_trial_and_its_new_learning_rate_is_used(ray_address, quickstart_shards, tmp_path):
    path = write_sweep(
        tmp_path / "pbt.yaml",
        quickstart_shards,
        search_space={"optim.lr": [0.003, 0.000001]},
        metric="eval/loss",
        mode="min",
        max_concurrent_trials=2,
        scheduler={
            "name": "pbt",
            "perturbation_interval": 2,
            "quantile_fraction": 0.5,
            "resample_probability": 1.0,
            "hyperparam_mutations": {"optim.lr": {"loguniform": [0.001, 0.002]}},
        },
        overrides={"train.max_steps": 8},
    )
    sweep = load_sweep(path)
    summary = run_sweep(sweep)
    rows = {r["trial_id"]: r for r in summary["rows"]}
    assert all(r["status"] == "completed" for r in rows.values()), rows
    records = {t: TrialRecord.load(sweep.runs_dir / t) for t in rows}
    exploited = [t for t, rec in records.items() if rec.exploits]
    assert exploited, "PBT never exploited: the 1e-6 trial should have taken the 3e-3 trial's checkpoint"
    client = MlflowClient(summary["tracking_uri"])
    for t in exploited:
        rec = records[t]
        child = client.get_run(rec.mlflow_run_id)  # still this trial's own child run
        assert child.data.tags["meme_scale.trial_id"] == t and "tune.exploited_from" in child.data.tags
        # after the exploit the trial trains with the mutated lr, not the one in the donor's optimizer state
        lrs = [m.value for m in client.get_metric_history(rec.mlflow_run_id, "lr")]
        assert any(0.001 <= lr <= 0.002 for lr in lrs), lrs


# -- PBT's exploit: another trial's checkpoint becomes this trial's, under this trial's MLflow run ----
def test_exploit_copies_the_donor_checkpoint_and_keeps_the_trials_run(tmp_path):
    from ray.tune import Checkpoint

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"run.dir={tmp_path / 'b'}", "optim.lr=0.002"])
    donor = tmp_path / "ray" / "checkpoint_000003"
    donor.mkdir(parents=True)
    (donor / "mp_rank_00_model_states.pt").write_bytes(b"weights of A")
    (donor / "meme_scale.json").write_text(
        json.dumps(
            {"tag": "step_00000006", "step": 6, "run_id": "run-of-A", "config": {"run.dir": str(tmp_path / "a")}}
        )
    )
    own = tmp_path / "b" / "checkpoints" / "step_00000008"
    own.mkdir(parents=True)
    (own / "meme_scale.json").write_text(json.dumps({"tag": "step_00000008"}))
    record = TrialRecord(tmp_path / "b" / "tune_trial.json", "b", mlflow_run_id="run-of-B", attempts=3)
    restore_checkpoint(Checkpoint.from_directory(str(donor)), tmp_path / "b", cfg, record)
    tags = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert tags == ["step_00000006"]  # B's own later checkpoint must not win over the exploit
    meta = json.loads((tmp_path / "b" / "checkpoints" / "step_00000006" / "meme_scale.json").read_text())
    assert meta["run_id"] == "run-of-B" and meta["config"]["optim.lr"] == 0.002 and meta["step"] == 6
    assert TrialRecord.load(tmp_path / "b").exploits == [{"attempt": 3, "from": "a", "tag": "step_00000006"}]

    # the trial's own checkpoint (a retry, a resumed sweep): a newer local one is kept
    record = TrialRecord(tmp_path / "a" / "tune_trial.json", "a", mlflow_run_id="run-of-A", attempts=2)
    newer = tmp_path / "a" / "checkpoints" / "step_00000010"
    newer.mkdir(parents=True)
    (newer / "meme_scale.json").write_text("{}")
    restore_checkpoint(Checkpoint.from_directory(str(donor)), tmp_path / "a", cfg, record)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step_00000010"]
    shutil.rmtree(newer)  # its run dir lost (another node, no shared filesystem): Ray's copy comes back
    restore_checkpoint(Checkpoint.from_directory(str(donor)), tmp_path / "a", cfg, record)
    restored = tmp_path / "a" / "checkpoints" / "step_00000006"
    assert (restored / "mp_rank_00_model_states.pt").read_bytes() == b"weights of A"
    assert json.loads((restored / "meme_scale.json").read_text())["run_id"] == "run-of-A"
