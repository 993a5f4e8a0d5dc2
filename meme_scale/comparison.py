"""The comparison grid's results as a table and a figure (tools/compare.py runs the grid).

``results[model][str(f)]`` is the list of one evaluation report per seed (``eval/*`` keys, as
``eval_report.json``). Everything here is a pure function of it: mean and spread over seeds,
a markdown table and a PNG of cross coherence against the observed fraction.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

CROSS = "eval/cross_coherence"
JOINT = "eval/coherence_joint"
# MEME's joint coherence decodes z drawn from its pseudo-sample mixture, the baselines' from N(0, I).
# With every sample paired (f = 1) nothing trains the pseudo-samples: they stay the training images
# they were initialised with, so the number measures encode-then-decode of N fixed training images.
JOINT_NOTE = (
    "MEME's joint coherence decodes z from its pseudo-sample mixture (the baselines': N(0, I)). "
    "At f = 1 (marked †) no sample is unpaired, so the pseudo-samples never train: the number is "
    "the coherence of N fixed training images encoded and decoded, not of a learned prior. At f < 1 "
    "they train only through the unpaired samples' KL terms."
)


def columns(names: list[str]) -> list[tuple[str, str]]:
    s, t = names
    return [
        ("cross coherence", CROSS),
        (f"{s}→{t}", f"eval/coherence_{s}_to_{t}"),
        (f"{t}→{s}", f"eval/coherence_{t}_to_{s}"),
        ("joint", JOINT),
        (f"latent acc {s}", f"eval/latent_accuracy_{s}"),
        (f"latent acc {t}", f"eval/latent_accuracy_{t}"),
    ]


def stats(values: list[float]) -> dict | None:
    """Mean, sample standard deviation (0 for one value), min, max and count; None for no values."""
    if not values:
        return None
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summary(results: dict, names: list[str]) -> dict:
    """``{model: {f: {metric: stats}}}`` over seeds, for every table column."""
    keys = [key for _, key in columns(names)]
    return {
        model: {f: {key: stats([r[key] for r in reports if key in r]) for key in keys} for f, reports in per_f.items()}
        for model, per_f in results.items()
    }


def _cell(st: dict | None) -> str:
    if st is None:
        return "-"
    return f"{st['mean']:.3f}" if st["n"] == 1 else f"{st['mean']:.3f} ± {st['std']:.3f}"


def joint_is_untrained_prior(model: str, fraction: float) -> bool:
    """MEME at f = 1: its 'prior' is the encodings of pseudo-samples that no gradient ever reached."""
    return model == "meme" and fraction >= 1.0


def markdown(
    results: dict, models: list[str], fractions: list[float], names: list[str], header: str, recipes: dict[str, str]
) -> str:
    """The results table: mean ± standard deviation over seeds (n seeds per row), with the notes."""
    cols = columns(names)
    table = summary(results, names)
    lines = [
        header,
        "",
        "| model | recipe | observed fraction | seeds | " + " | ".join(c for c, _ in cols) + " |",
        "|---|---|---|---|" + "---|" * len(cols),
    ]
    for model in models:
        for f in fractions:
            row = table[model][str(f)]
            cells = [_cell(row[key]) for _, key in cols]
            if joint_is_untrained_prior(model, f) and row[JOINT] is not None:
                cells[[key for _, key in cols].index(JOINT)] += " †"
            n = len(results[model][str(f)])
            lines.append(f"| {model} | {recipes.get(model, '-')} | {f} | {n} | " + " | ".join(cells) + " |")
    notes = ["", f"† {JOINT_NOTE}"] if "meme" in models else []
    return "\n".join([*lines, *notes]) + "\n"


# One colour per model in every figure, whichever models a grid runs.
MODEL_COLORS = {"meme": "tab:blue", "mvae": "tab:orange", "mmvae": "tab:green", "mopoe": "tab:red"}


def coherence_plot(
    results: dict,
    models: list[str],
    fractions: list[float],
    names: list[str],
    path: str | Path,
    chance: float | None = None,
    title: str = "",
) -> Path:
    """Cross coherence against the observed fraction, one line per model (mean, bars: ± std over seeds),
    one panel per direction: the shape of the MEME paper's figure. Agg canvas, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s, t = names
    table = summary(results, names)
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    xs = sorted(fractions)
    for i, (key, label) in enumerate(
        ((f"eval/coherence_{s}_to_{t}", f"{s} → {t}"), (f"eval/coherence_{t}_to_{s}", f"{t} → {s}"))
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        for model in models:
            points = [(f, table[model][str(f)][key]) for f in xs if table[model][str(f)][key] is not None]
            if points:
                ax.errorbar(
                    [f for f, _ in points],
                    [p["mean"] for _, p in points],
                    yerr=[p["std"] for _, p in points],
                    marker="o",
                    capsize=3,
                    label=model,
                    color=MODEL_COLORS.get(model),
                )
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{f:g}" for f in xs])
        ax.minorticks_off()
        ax.set_xlabel("observed fraction f (paired share of the training set)")
        ax.set_ylabel(f"cross coherence {label}")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def parent_metrics(results: dict, names: list[str]) -> dict[str, float]:
    """Flat means for the parent MLflow run: ``<model>/f<f>/<metric>`` (MLflow keys allow '/' and '.')."""
    out = {}
    for model, per_f in summary(results, names).items():
        for f, row in per_f.items():
            for key, st in row.items():
                if st is not None and math.isfinite(st["mean"]):
                    out[f"{model}/f{f}/{key.removeprefix('eval/')}"] = st["mean"]
    return out
