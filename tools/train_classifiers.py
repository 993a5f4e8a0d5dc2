"""Train the frozen digit/label classifiers that coherence is measured with (MMVAE protocol, DESIGN 4).

    python tools/train_classifiers.py --shards data/quickstart [--out DIR] [--epochs 30]

One small CNN per image modality, trained on the training shards, evaluated on the test shards;
saved as ``<out>/<modality>.pt`` (default ``<shards>/classifiers``, where training finds them)
with its test accuracy. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from meme_scale.classifiers import evaluate_classifier, save_classifier, train_classifier  # noqa: E402
from meme_scale.data.shards import eval_batches, read_meta  # noqa: E402


def load_split(root: str, split: str, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(eval_batches(root, split, 1024, modalities=[modality], rank=0, world_size=1))
    return torch.cat([b[modality] for b in batches]), torch.cat([b["label"] for b in batches])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="a shard folder written by tools/make_shards.py")
    parser.add_argument("--out", default=None, help="where to save <modality>.pt (default: <shards>/classifiers)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    meta = read_meta(args.shards)
    if not meta.get("label"):
        print(
            f"error: {args.shards}/meta.json has no labels: coherence classifiers need labelled data", file=sys.stderr
        )
        return 2
    num_classes = len(meta["label"]["names"])
    out = Path(args.out or Path(args.shards) / "classifiers")
    report = {}
    for name, spec in meta["modalities"].items():
        if spec["kind"] != "image":
            continue
        t0 = time.perf_counter()
        x_train, y_train = load_split(args.shards, "train", name)
        x_test, y_test = load_split(args.shards, "test", name)
        model, train_acc = train_classifier(
            x_train, y_train, num_classes, epochs=args.epochs, lr=args.lr, seed=args.seed
        )
        test_acc = evaluate_classifier(model, x_test, y_test)
        path = save_classifier(model, out / f"{name}.pt", test_acc)
        report[name] = {
            "file": str(path),
            "train_accuracy": train_acc,
            "test_accuracy": test_acc,
            "train_samples": len(y_train),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(f"{name}: test accuracy {test_acc:.4f} ({len(y_test)} samples) -> {path}", file=sys.stderr)
    if not report:
        print(f"error: {args.shards} has no image modality to classify", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
