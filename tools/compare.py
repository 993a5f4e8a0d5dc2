"""Train MEME and the baselines at several observation ratios with one budget, evaluate, tabulate.

    python tools/compare.py --config configs/quickstart.yaml --out runs/compare \\
        [--models meme mvae mmvae mopoe] [--fractions 1.0 0.5 0.25 0.125] [--steps 600] [--seeds 0] \\
        [-- key=value ...]

Each cell is an ordinary training run (``meme_scale/train.py``, one process) in ``OUT/<model>_f<f>_s<seed>``
evaluated at its last step; finished cells are reused, so an interrupted comparison continues.
Writes ``OUT/results.json`` and ``OUT/results.md`` (mean over seeds, min-max in brackets).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cell(config: str, out: Path, model: str, fraction: float, seed: int, steps: int, extra: list[str]) -> dict:
    run_dir = out / f"{model}_f{fraction}_s{seed}"
    report = run_dir / "eval_report.json"
    if (run_dir / "summary.json").is_file() and report.is_file():
        return json.loads(report.read_text())
    cmd = [sys.executable, str(ROOT / "meme_scale" / "train.py"), "--config", config, "--resume", "auto",
           f"model.name={model}", f"data.observed_fraction={fraction}", f"train.seed={seed}",
           f"train.max_steps={steps}", f"run.dir={run_dir}", "run.progress=none", "run.experiment=compare", *extra]  # fmt: skip
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if proc.returncode != 0:
        raise RuntimeError(f"{model} f={fraction} seed={seed} failed:\n{proc.stderr[-3000:]}")
    print(f"{model:6s} f={fraction:<6} seed={seed}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(report.read_text())


def summarise(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} [{min(values):.3f}-{max(values):.3f}]"


def markdown(results: dict, models: list[str], fractions: list[float], names: list[str], header: str) -> str:
    s, t = names
    columns = [("cross coherence", "eval/cross_coherence"), (f"{s}->{t}", f"eval/coherence_{s}_to_{t}"),
               (f"{t}->{s}", f"eval/coherence_{t}_to_{s}"), ("joint", "eval/coherence_joint"),
               (f"latent acc {s}", f"eval/latent_accuracy_{s}"), (f"latent acc {t}", f"eval/latent_accuracy_{t}")]  # fmt: skip
    lines = [header, "", "| model | observed fraction | " + " | ".join(c for c, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]  # fmt: skip
    for model in models:
        for f in fractions:
            reports = results[model][str(f)]
            cells = [summarise([r[key] for r in reports if key in r]) for _, key in columns]
            lines.append(f"| {model} | {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--models", nargs="+", default=["meme", "mvae", "mmvae", "mopoe"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.125])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for model in args.models:
        for f in args.fractions:
            results.setdefault(model, {})[str(f)] = [
                run_cell(args.config, out, model, f, seed, args.steps, args.overrides) for seed in args.seeds]
    sys.path.insert(0, str(ROOT))
    from meme_scale.config import load_config

    cfg = load_config(args.config, args.overrides)
    names = [m.name for m in cfg.model.modalities] or ["s", "t"]
    header = (f"Data: `{cfg.data.root}` ({args.config}); {args.steps} steps of batch {cfg.train.micro_batch_size}, "
              f"one process; seeds {args.seeds}; evaluated on the test split at the last step.")  # fmt: skip
    table = markdown(results, args.models, args.fractions, names, header)
    (out / "results.json").write_text(json.dumps({"config": args.config, "steps": args.steps, "seeds": args.seeds,
                                                  "overrides": args.overrides, "results": results}, indent=2))  # fmt: skip
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
