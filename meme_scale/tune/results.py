"""The sweep's results: trials sorted by the metric (terminal and markdown), the plot, the best config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import dump_yaml, load_config
from .plan import Plan
from .process import tail
from .record import TrialRecord
from .sweep import PLOT_NAME, Sweep, override_list, plain


def _trial_rows(sweep: Sweep, plan: Plan) -> list[dict]:
    from ray import tune

    analysis = tune.ExperimentAnalysis(str(sweep.exp_dir))
    rows = []
    for trial in analysis.trials:
        last = dict(trial.last_result or {})
        record = TrialRecord.load(sweep.runs_dir / trial.trial_id, trial.trial_id)
        config = {k: plain(v) for k, v in trial.config.items()}
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
        rows.append(
            {
                "trial_id": trial.trial_id,
                "status": status,
                "config": config,
                "step": step,
                "value": value,
                "attempts": record.attempts,
                "mlflow_run_id": record.mlflow_run_id,
                "error": error,
            }
        )
    sign = -1 if sweep.mode == "max" else 1
    rows.sort(
        key=lambda r: (
            r["value"] is None or r["status"] == "failed",
            sign * r["value"] if r["value"] is not None else 0,
            r["trial_id"],
        )
    )
    return rows


def summarize(sweep: Sweep, plan: Plan, state: dict, parent) -> dict:
    """Results table (terminal + markdown), plot, best config; MLflow statuses of every child run."""
    from ..tracking import update_run

    rows = _trial_rows(sweep, plan)
    exp_dir = sweep.exp_dir
    keys = list(sweep.search_space)
    interrupted = any(r["status"] == "interrupted" for r in rows)
    for r in rows:
        if not r["mlflow_run_id"]:
            continue
        status = {"completed": "FINISHED", "stopped early": "FINISHED", "failed": "FAILED"}.get(r["status"], "KILLED")
        tags = {
            "tune.status": r["status"],
            "tune.stopped_early": str(r["status"] == "stopped early").lower(),
            "tune.attempts": r["attempts"],
        }
        if r["value"] is not None:
            tags["tune.final_metric"] = f"{sweep.metric}={r['value']:.6g}"
        log = sweep.runs_dir / r["trial_id"] / "train.log"  # trials stopped early never uploaded theirs
        text = {"logs/train.log": tail(log, 5000)} if log.is_file() else {}
        update_run(sweep.uri(), r["mlflow_run_id"], tags=tags, status=status, text=text)

    table = _table(rows, keys, sweep)
    (exp_dir / "results.md").write_text(
        f"# Sweep `{sweep.name}`: {sweep.metric} ({sweep.mode})\n\n{_markdown(table)}\n"
    )
    (exp_dir / "results.json").write_text(
        json.dumps(
            {"sweep": sweep.name, "metric": sweep.metric, "mode": sweep.mode, "trials": rows}, indent=2, default=str
        )
    )
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
    parent.log_metrics({"trials": len(rows), **{f"trials_{k.replace(' ', '_')}": v for k, v in counts.items()}}, step=0)
    if best is not None:
        parent.log_metrics({f"best/{sweep.metric}": best["value"]}, step=0)
        parent.set_tags({"best_trial": best["trial_id"], "best_mlflow_run_id": best["mlflow_run_id"] or ""})
        print(
            f"\nbest trial {best['trial_id']}: {sweep.metric}={best['value']:.6g} at step {best['step']} "
            f"(mlflow run {best['mlflow_run_id']})\nbest config: {best_path}\n{best_path.read_text()}"
        )
    if interrupted:
        print(f"\nthe sweep was interrupted; continue it with: meme-scale tune --config {sweep.path} --resume")
    parent.finish("KILLED" if interrupted else "FINISHED")
    print(f"results: {exp_dir / 'results.md'}; plot: {plot}; mlflow: {sweep.uri()} (parent run {parent.run_id})")
    return {
        "rows": rows,
        "best": best,
        "best_config": str(best_path) if best_path else None,
        "results_md": str(exp_dir / "results.md"),
        "plot": str(plot) if plot else None,
        "parent_run_id": parent.run_id,
        "tracking_uri": sweep.uri(),
        "interrupted": interrupted,
        "counts": counts,
    }


def _table(rows: list[dict], keys: list[str], sweep: Sweep) -> list[list[str]]:
    head = ["#", "trial", "status", *keys, "step", sweep.metric, "attempts", "mlflow run"]
    body = []
    for i, r in enumerate(rows, 1):
        value = f"{r['value']:.6g}" if r["value"] is not None else "-"
        status = r["status"] + (f": {r['error'][:60]}" if r["error"] else "")
        body.append(
            [
                str(i),
                r["trial_id"],
                status,
                *(_fmt(r["config"].get(k)) for k in keys),
                str(r["step"] if r["step"] is not None else "-"),
                value,
                str(r["attempts"]),
                r["mlflow_run_id"] or "-",
            ]
        )
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
    """The metric against pseudo-sample count, one line per observed fraction: at each point the mean
    of its completed trials (other settings, seeds) with their range; a point whose trials all stopped
    early shows their best, hollow (a mean over unequal budgets would mean nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[float, dict[int, list[dict]]] = {}
    for r in rows:
        if r["value"] is None or r["status"] == "failed":
            continue
        n = int(r["config"].get("model.pseudo_samples", plan.base_cfg.model.pseudo_samples))
        f = float(r["config"].get("data.observed_fraction", plan.base_cfg.data.observed_fraction))
        points.setdefault(f, {}).setdefault(n, []).append(r)
    pick = max if sweep.mode == "max" else min
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for f in sorted(points, reverse=True):
        xs, mean, low, high, early = [], [], [], [], []
        for n, trials in sorted(points[f].items()):
            done = [t["value"] for t in trials if t["status"] == "completed"]
            if not done:
                early.append((n, pick(t["value"] for t in trials)))
                continue
            xs.append(n)
            mean.append(sum(done) / len(done))
            low.append(mean[-1] - min(done))
            high.append(max(done) - mean[-1])
        line = ax.errorbar(xs, mean, yerr=[low, high], marker="o", capsize=3, label=f"observed fraction {f:g}")
        if early:
            color = line.lines[0].get_color()
            ax.scatter(*zip(*early), s=80, facecolors="white", edgecolors=color, zorder=3)
    ax.set_xscale("log", base=2)
    ns = sorted({n for f in points for n in points[f]})
    if ns:
        ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("pseudo-samples per modality (model.pseudo_samples)")
    ax.set_ylabel(sweep.metric)
    ax.set_title(f"{sweep.name}\nmean and range of the trials at each point (hollow: stopped early)", fontsize=8)
    if points:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _write_best_config(sweep: Sweep, plan: Plan, best: dict, state: dict) -> Path:
    """The best trial's training config, ready for ``meme-scale train --config`` (a fresh run dir)."""
    values = {k: v for k, v in best["config"].items()}
    own = {
        "run.dir": str(sweep.exp_dir / "best_run"),
        "run.tracking_uri": state.get("tracking_uri", sweep.uri()),
        "run.experiment": plan.experiment,
        "run.run_name": f"{sweep.name}/best",
    }
    cfg = load_config(sweep.base, override_list({**plan.fixed, **values, **own}))
    header = (
        f"# Best trial of sweep {sweep.name!r} ({sweep.path}): {best['trial_id']}, {sweep.metric}="
        f"{best['value']:.6g} ({sweep.mode}) at step {best['step']}; mlflow run {best['mlflow_run_id']}.\n"
        f"# Train it: meme-scale train --config {sweep.exp_dir / 'best_config.yaml'}\n"
        f"#       or: deepspeed meme_scale/train.py --config {sweep.exp_dir / 'best_config.yaml'}\n"
        f"# Search values: {', '.join(f'{k}={_fmt(v)}' for k, v in values.items())}\n"
    )
    path = sweep.exp_dir / "best_config.yaml"
    path.write_text(header + dump_yaml(cfg))
    return path
