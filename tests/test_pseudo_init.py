"""MEME's pseudo-samples start as N distinct, observed training samples (DESIGN 1.2), whatever f and missing."""

from __future__ import annotations

import pytest
import torch

from meme_scale.config import load_config
from meme_scale.data.shards import eval_batches
from meme_scale.loop import initial_pseudo_samples


def _training_samples(root) -> dict[str, torch.Tensor]:
    batches = list(eval_batches(str(root), "train", 512, modalities=["mnist", "digits"], rank=0, world_size=1))
    return {m: torch.cat([b[m] for b in batches]) for m in ("mnist", "digits")}


@pytest.mark.parametrize("missing", ["t", "either"])
def test_pseudo_samples_are_distinct_observed_training_samples(quickstart_shards, missing):
    n = 64
    cfg = load_config(
        "configs/quickstart.yaml",
        [
            f"data.root={quickstart_shards}",
            "data.observed_fraction=0.25",
            f"data.missing={missing}",
            f"model.pseudo_samples={n}",
            "train.micro_batch_size=32",
        ],
    )
    picked = initial_pseudo_samples(cfg, ["mnist", "digits"])
    data = _training_samples(quickstart_shards)
    for m, samples in picked.items():
        assert samples.shape == (n, *data[m].shape[1:])
        assert samples.flatten(1).abs().sum(1).min() > 0  # no blank (hidden, zero-filled) sample
        flat = data[m].flatten(1)
        matches = [torch.nonzero((flat == s.flatten()).all(1)).flatten().tolist() for s in samples]
        assert all(matches), f"{m}: a pseudo-sample that is no training sample"
        assert len({tuple(x) for x in samples.flatten(1).tolist()}) == n, f"{m}: repeated pseudo-samples"


def test_too_few_observed_samples_is_an_error_naming_the_counts(quickstart_shards):
    cfg = load_config(
        "configs/quickstart.yaml",
        [
            f"data.root={quickstart_shards}",
            "data.observed_fraction=0.01",
            "data.missing=t",
            "model.pseudo_samples=1000",
        ],
    )
    with pytest.raises(ValueError, match=r"observed_fraction=0.01.*model.pseudo_samples=1000.*'digits': \d+"):
        initial_pseudo_samples(cfg, ["mnist", "digits"])
