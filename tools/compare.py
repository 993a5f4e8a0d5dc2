"""MEME against the baselines over observed fractions and seeds, at one budget: table, figure, MLflow.

    python tools/compare.py --config configs/quickstart.yaml --out runs/compare \\
        [--models meme mvae mmvae mopoe] [--fractions 1.0 0.5 0.25 0.125] [--seeds 0 1] \\
        [--steps 2000] [--batch 128] [--jobs 2] [-- key=value ...]

Every cell (model x f x seed) is an ordinary training run of ``meme_scale/train.py`` in one
process, in ``OUT/<model>_f<f>_s<seed>``, evaluated on the test split at its last step. Each
baseline trains by ``model.recipe`` (default: its authors' recipe; ``-- model.recipe=plain`` for
the bare bound). Writes ``OUT/results.md`` (mean ± std over seeds), ``OUT/results.json`` and
``OUT/coherence_vs_f.png``. MLflow (``OUT/mlflow.db`` unless ``run.tracking_uri`` is given): one
parent run for the grid, one child run per cell.

Run it again to continue: finished cells are reused, an interrupted cell resumes from its last
checkpoint, a deleted cell is trained again (its old child run is marked deleted). A folder that
holds a grid of another config or budget is refused rather than mixed.

``--jobs J`` trains J cells at once, each with (this process's cores) / J compute threads unless
``train.threads`` or ``OMP_NUM_THREADS`` says otherwise: more threads than free cores make every step
wait on busy threads (measured: 97 vs ~2000 samples/s for MVAE on 2 loaded cores). Cells are
independent runs with their own seeds, so J changes the wall time, never the results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meme_scale import comparison  # noqa: E402
from meme_scale.config import ConfigError, load_config  # noqa: E402

GRID = "grid.json"
CELL = "cell.json"


class GridError(RuntimeError):
    """A grid that cannot be run as asked (a folder of another grid, a failed cell)."""


def cell_name(model: str, fraction: float, seed: int) -> str:
    return f"{model}_f{fraction}_s{seed}"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _env() -> dict:
    env = dict(os.environ)
    if shutil.which("nvidia-smi") is None:
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


class Grid:
    """The grid's folder: its budget, the MLflow parent run and one child run per cell (``OUT/grid.json``)."""

    def __init__(self, out: Path, budget: dict, tracking_uri: str, experiment: str):
        self.out, self.budget, self.tracking_uri, self.experiment = out, budget, tracking_uri, experiment
        self.path = out / GRID
        state = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if state and state["budget"] != budget:
            raise GridError(
                f"{self.path}: this folder holds a grid with budget {state['budget']}, not {budget}; "
                "choose another --out (cells of different budgets must not be mixed)"
            )
        self.parent_run_id: str | None = state.get("parent_run_id")
        self.children: dict[str, str] = state.get("children", {})
        self.lock = threading.RLock()  # cells of --jobs > 1 start their child runs from several threads

    def save(self) -> None:
        with self.lock:
            self._save()

    def _save(self) -> None:
        _write_json(
            self.path,
            {
                "budget": self.budget,
                "tracking_uri": self.tracking_uri,
                "experiment": self.experiment,
                "parent_run_id": self.parent_run_id,
                "children": self.children,
            },
        )

    def open_parent(self, params: dict):
        from meme_scale.tracking import open_tracker

        tracker = open_tracker(
            True,
            self.tracking_uri,
            self.out,
            self.experiment,
            f"compare {self.out.name}",
            run_id=self.parent_run_id,
            tags={"meme_scale.compare": "grid"},
        )
        if self.parent_run_id is None:
            tracker.log_params(params)
            self.parent_run_id = tracker.run_id
            self.save()
        return tracker

    def child_run(self, name: str, tags: dict) -> str:
        """A new child run for cell ``name``; a child of a deleted earlier attempt is marked deleted."""
        from meme_scale.tracking import delete_run, open_tracker

        with self.lock:
            if name in self.children:
                delete_run(self.tracking_uri, self.children.pop(name))
            tags = {"mlflow.parentRunId": self.parent_run_id, "meme_scale.compare_cell": name, **tags}
            tracker = open_tracker(True, self.tracking_uri, self.out / name, self.experiment, name, tags=tags)
            self.children[name] = tracker.run_id
            self.save()
            return tracker.run_id


def run_cell(grid: Grid, config: str, model: str, fraction: float, seed: int, overrides: list[str]) -> dict:
    """The cell's evaluation report: reused when finished, else trained (or resumed) and evaluated."""
    name = cell_name(model, fraction, seed)
    run_dir = grid.out / name
    report, summary_path = run_dir / "eval_report.json", run_dir / "summary.json"
    finished = summary_path.is_file() and json.loads(summary_path.read_text()).get("status") == "finished"
    if finished and report.is_file():
        return json.loads(report.read_text())
    cell = {"model": model, "fraction": fraction, "seed": seed}
    record = run_dir / CELL
    if record.is_file() and name in grid.children:
        run_id = grid.children[name]  # an interrupted cell continues in its own child run
    else:
        run_id = grid.child_run(name, {"model": model, "observed_fraction": fraction, "seed": seed})
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(record, {**cell, "mlflow_run_id": run_id})
    steps = grid.budget["steps"]
    cell_args = [
        f"model.name={model}",
        f"data.observed_fraction={fraction}",
        f"train.seed={seed}",
        f"train.max_steps={steps}",
        f"train.micro_batch_size={grid.budget['batch']}",
        f"run.eval_every={grid.budget['eval_every']}",
        f"run.dir={run_dir}",
        "run.progress=none",
        f"run.experiment={grid.experiment}",
        f"run.tracking_uri={grid.tracking_uri}",
        *overrides,
    ]
    if finished:  # trained, but its report is gone: evaluate the final checkpoint again
        cmd = [
            sys.executable,
            "-m",
            "meme_scale.cli",
            "eval",
            "--checkpoint",
            str(run_dir / "checkpoints"),
            "--config",
            config,
            "--out",
            str(report),
            *cell_args,
        ]
    else:
        cmd = [
            sys.executable,
            str(ROOT / "meme_scale" / "train.py"),
            "--config",
            config,
            "--resume",
            "auto",
            "--mlflow-run-id",
            run_id,
            *cell_args,
        ]
    t0 = time.time()
    with open(run_dir / "train.log", "a") as log:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env())
    if proc.returncode == 0 and summary_path.is_file() and json.loads(summary_path.read_text())["status"] == "stopped":
        raise GridError(
            f"cell {name} was stopped by a signal at step {json.loads(summary_path.read_text())['step']} "
            "(checkpointed): run the same command again to continue it"
        )
    if proc.returncode != 0 or not report.is_file():
        tail = (run_dir / "train.log").read_text(errors="replace")[-3000:]
        raise GridError(f"cell {name} failed (exit {proc.returncode}); log {run_dir / 'train.log'}:\n{tail}")
    print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    result = json.loads(report.read_text())
    if finished:
        from meme_scale.tracking import open_tracker

        tracker = open_tracker(True, grid.tracking_uri, run_dir, grid.experiment, run_id=run_id)
        tracker.log_metrics({k: v for k, v in result.items() if k.startswith("eval/")}, int(result["step"]))
        tracker.finish("FINISHED")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--models", nargs="+", default=["meme", "mvae", "mmvae", "mopoe"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.125])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per cell (the budget)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (one process)")
    parser.add_argument("--eval-every", type=int, default=0, help="0: evaluate at the last step only")
    parser.add_argument("--experiment", default="compare", help="MLflow experiment of the parent and child runs")
    parser.add_argument("--jobs", type=int, default=1, help="cells trained at once (they share this machine's cores)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every cell")
    args = parser.parse_args(argv)
    args.models = list(dict.fromkeys(args.models))
    args.fractions = list(dict.fromkeys(args.fractions))
    args.seeds = list(dict.fromkeys(args.seeds))
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    return args


def thread_overrides(jobs: int, overrides: list[str]) -> list[str]:
    """Cores split between the cells that run at once, unless the user chose the threads."""
    from meme_scale.hardware import available_cores

    if jobs == 1 or "OMP_NUM_THREADS" in os.environ or any(o.startswith("train.threads=") for o in overrides):
        return []
    return [f"train.threads={max(1, available_cores() // jobs)}"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    try:
        cfg = load_config(
            args.config, [*args.overrides, f"train.micro_batch_size={args.batch}", f"train.max_steps={args.steps}"]
        )
        for model in args.models:
            load_config(args.config, [*args.overrides, f"model.name={model}"])
        for f in args.fractions:
            load_config(args.config, [*args.overrides, f"data.observed_fraction={f}"])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from meme_scale.data.shards import read_meta
    from meme_scale.models import build_model, modality_specs

    meta = read_meta(cfg.data.root)
    specs = modality_specs(cfg.model, meta)
    names = [s.name for s in specs]
    for model in args.models:  # a bad recipe knob fails here, not after hours of other cells
        build_model(load_config(args.config, [*args.overrides, f"model.name={model}"]).model, specs)
    out.mkdir(parents=True, exist_ok=True)
    budget = {
        "config": args.config,
        "steps": args.steps,
        "batch": args.batch,
        "eval_every": args.eval_every or args.steps,
        "overrides": args.overrides,
    }
    tracking_uri = cfg.run.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    grid = Grid(out, budget, tracking_uri, args.experiment)
    recipes = {m: "-" if m == "meme" else cfg.model.recipe for m in args.models}
    parent = grid.open_parent(
        {
            **{f"budget.{k}": v for k, v in budget.items()},
            "models": args.models,
            "fractions": args.fractions,
            "seeds": args.seeds,
            "recipes": recipes,
        }
    )
    cell_overrides = [*args.overrides, *thread_overrides(args.jobs, args.overrides)]
    pool = ThreadPoolExecutor(args.jobs)
    try:
        cells = {
            (m, f, seed): pool.submit(run_cell, grid, args.config, m, f, seed, cell_overrides)
            for m in args.models
            for f in args.fractions
            for seed in args.seeds
        }
        results = {
            m: {str(f): [cells[m, f, seed].result() for seed in args.seeds] for f in args.fractions}
            for m in args.models
        }
    except BaseException:
        pool.shutdown(cancel_futures=True)  # a failed cell starts no more; the running ones finish and are reused
        parent.finish("FAILED")
        raise
    pool.shutdown()
    header = (
        f"Data: `{cfg.data.root}` ({args.config}); budget: {args.steps} steps of batch {args.batch}, one "
        f"process; seeds {args.seeds}; test split evaluated at the last step; mean ± std over seeds. "
        f"Command: `python tools/compare.py {' '.join(argv if argv is not None else sys.argv[1:])}`."
    )
    table = comparison.markdown(results, args.models, args.fractions, names, header, recipes)
    labels = meta.get("label", {}).get("names") or []
    figure = comparison.coherence_plot(
        results,
        args.models,
        args.fractions,
        names,
        out / "coherence_vs_f.png",
        chance=1 / len(labels) if labels else None,
        title=f"{args.steps} steps of batch {args.batch}, seeds {args.seeds}",
    )
    (out / "results.md").write_text(table)
    _write_json(
        out / "results.json",
        {
            "budget": budget,
            "models": args.models,
            "fractions": args.fractions,
            "seeds": args.seeds,
            "recipes": recipes,
            "joint_note": comparison.JOINT_NOTE,
            "summary": comparison.summary(results, names),
            "results": results,
        },
    )
    parent.log_metrics(comparison.parent_metrics(results, names), args.steps)
    for path in (out / "results.md", out / "results.json", figure):
        parent.log_artifact(path)
    parent.finish("FINISHED")
    print(table)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
