"""tools/compare.py end to end on a tiny grid: table, figure, MLflow parent and children, and resuming."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient

from meme_scale import comparison

sys.path.insert(0, str(ROOT / "tools"))
import compare  # noqa: E402  (tools/compare.py)

pytestmark = pytest.mark.slow

MODELS, FRACTIONS, SEEDS = ["meme", "mvae"], ["1.0", "0.5"], ["0", "1"]
CELLS = [f"{m}_f{f}_s{s}" for m in MODELS for f in FRACTIONS for s in SEEDS]


def _compare(out, data, classifiers, jobs=1) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "tools/compare.py",
        "--jobs",
        str(jobs),
        "--config",
        "configs/quickstart.yaml",
        "--out",
        str(out),
        "--models",
        *MODELS,
        "--fractions",
        *FRACTIONS,
        "--seeds",
        *SEEDS,
        "--steps",
        "3",
        "--batch",
        "16",
        "--",
        f"data.root={data}",
        f"eval.classifiers={classifiers}",
        "data.num_workers=0",
        "model.pseudo_samples=8",
        "run.eval_max_batches=2",
        "eval.joint_samples=32",
        "eval.latent_train_samples=64",
        "eval.latent_epochs=2",
    ]
    proc = subprocess.run(
        cmd,
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _children(client: MlflowClient, parent) -> dict:
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.data.tags["meme_scale.compare_cell"]: r for r in runs}


def test_tiny_grid_writes_table_figure_and_runs_then_reruns_only_a_deleted_cell(quickstart_shards, tmp_path):
    classifiers = tmp_path / "classifiers"
    subprocess.run(
        [
            sys.executable,
            "tools/train_classifiers.py",
            "--shards",
            str(quickstart_shards),
            "--epochs",
            "1",
            "--out",
            str(classifiers),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    out = tmp_path / "grid"
    first = _compare(out, quickstart_shards, classifiers, jobs=2)  # two cells at a time share grid.json and MLflow
    assert sorted(re.findall(r"^(\S+): \d+ s$", first.stderr, re.MULTILINE)) == sorted(CELLS)  # every cell trained once

    results = json.loads((out / "results.json").read_text())
    for m in MODELS:
        for f in FRACTIONS:
            reports = results["results"][m][f]
            assert len(reports) == 2 and all(0 <= r["eval/cross_coherence"] <= 1 for r in reports)
            cross = [r["eval/cross_coherence"] for r in reports]
            assert results["summary"][m][f]["eval/cross_coherence"]["mean"] == pytest.approx(sum(cross) / 2)
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| meme |", "| mvae |"))]
    assert len(rows) == 4 and all(line.count("±") == 6 for line in rows)  # mean ± std in every metric column
    assert "3 steps of batch 16" in table and "| mvae | paper | 0.5 | 2 |" in table
    assert "| meme | - | 1.0 | 2 |" in table and rows[0].count("†") == 1 and "†" not in rows[1]  # MEME's joint at f = 1
    assert (out / "coherence_vs_f.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    grid = json.loads((out / "grid.json").read_text())
    parent = client.get_run(grid["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.md", "coherence_vs_f.png"}
    assert parent.data.metrics["meme/f1.0/cross_coherence"] == pytest.approx(
        results["summary"]["meme"]["1.0"]["eval/cross_coherence"]["mean"]
    )
    children = _children(client, parent)
    assert sorted(children) == sorted(CELLS)
    for name, child in children.items():
        assert child.info.status == "FINISHED" and "eval/cross_coherence" in child.data.metrics, name
        assert child.data.params["model.name"] == name.split("_")[0]
        assert json.loads((out / name / "cell.json").read_text())["mlflow_run_id"] == child.info.run_id

    # a second invocation after deleting one cell's result trains that cell only
    gone = "mvae_f0.5_s1"
    before = {c: (out / c / "eval_report.json").stat().st_mtime_ns for c in CELLS if c != gone}
    shutil.rmtree(out / gone)
    second = _compare(out, quickstart_shards, classifiers)
    assert re.findall(r"^(\S+): \d+ s$", second.stderr, re.MULTILINE) == [gone]
    assert {c: (out / c / "eval_report.json").stat().st_mtime_ns for c in before} == before
    assert (out / gone / "eval_report.json").is_file()
    again = _children(client, client.get_run(grid["parent_run_id"]))
    assert sorted(again) == sorted(CELLS)  # still one live child per cell: the old one is marked deleted
    assert again[gone].info.run_id != children[gone].info.run_id
    assert client.get_run(children[gone].info.run_id).info.lifecycle_stage == "deleted"
    assert all(again[c].info.run_id == children[c].info.run_id for c in before)


def test_a_folder_holding_a_grid_of_another_budget_is_refused(tmp_path):
    budget = {"config": "configs/quickstart.yaml", "steps": 2000, "batch": 128, "eval_every": 2000, "overrides": []}
    compare.Grid(tmp_path, budget, "sqlite:///unused.db", "compare").save()
    compare.Grid(tmp_path, dict(budget), "sqlite:///unused.db", "compare")  # the same budget continues
    with pytest.raises(compare.GridError, match=r"grid.json: this folder holds a grid with budget .*'steps': 2000"):
        compare.Grid(tmp_path, {**budget, "steps": 600}, "sqlite:///unused.db", "compare")


def test_table_marks_meme_joint_at_full_observation_and_shows_spread():
    names = ["a", "b"]
    keys = [k for _, k in comparison.columns(names)]
    results = {"meme": {"1.0": [dict.fromkeys(keys, 0.5), dict.fromkeys(keys, 0.7)], "0.5": [dict.fromkeys(keys, 0.4)]}}
    table = comparison.markdown(results, ["meme"], [1.0, 0.5], names, "header", {"meme": "-"})
    full, half = [line for line in table.splitlines() if line.startswith("| meme |")]
    assert full.count("0.600 ± 0.141") == 6 and full.endswith("|") and "0.600 ± 0.141 †" in full
    assert "0.400" in half and "±" not in half and "†" not in half
    assert comparison.JOINT_NOTE in table
    assert comparison.JOINT_NOTE not in comparison.markdown({"mvae": results["meme"]}, ["mvae"], [1.0], names, "", {})
    summary = comparison.summary(results, names)["meme"]["1.0"]["eval/cross_coherence"]
    assert summary == {
        "mean": pytest.approx(0.6),
        "std": pytest.approx(0.1414, abs=1e-4),
        "min": 0.5,
        "max": 0.7,
        "n": 2,
    }


def test_jobs_split_the_cores_unless_the_user_chose_threads(monkeypatch):
    from meme_scale.hardware import available_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert compare.thread_overrides(1, []) == []
    assert compare.thread_overrides(2, []) == [f"train.threads={max(1, available_cores() // 2)}"]
    assert compare.thread_overrides(64, []) == ["train.threads=1"]
    assert compare.thread_overrides(2, ["train.threads=3"]) == []
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert compare.thread_overrides(2, []) == []
