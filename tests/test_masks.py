"""Observation masks (DESIGN 1.3): pure, deterministic, and within 1 % of the requested fraction."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from meme_scale.data.masks import observation, observation_array, observation_for_keys

N = 4000
FRACTIONS = (1.0, 0.5, 0.25, 0.125)


@pytest.mark.parametrize("missing", ["s", "t", "either"])
@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_paired_fraction_within_one_percent(fraction: float, missing: str, seed: int) -> None:
    obs = observation_array(np.arange(N), seed, fraction, missing)
    assert obs.shape == (N, 2) and obs.dtype == bool
    assert obs.any(axis=1).all(), "every sample keeps at least one modality"
    assert abs(obs.all(axis=1).mean() - fraction) < 0.01
    if missing == "s":
        assert obs[:, 1].all()
    if missing == "t":
        assert obs[:, 0].all()


def test_fraction_one_is_always_paired() -> None:
    for missing in ("s", "t", "either"):
        assert observation_array(np.arange(1000), 7, 1.0, missing).all()
        assert observation("000000042", 7, 1.0, missing) == (True, True)


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.125])
def test_either_splits_unpaired_about_half_each(fraction: float) -> None:
    obs = observation_array(np.arange(N), 3, fraction, "either")
    s_missing, t_missing = (~obs[:, 0]).sum(), (~obs[:, 1]).sum()
    assert 0.45 < s_missing / (s_missing + t_missing) < 0.55


def test_fraction_holds_on_a_shuffled_subset_of_keys() -> None:
    # A rank sees a random half of the keys; the fraction should still be close (within 2 %).
    keys = np.random.default_rng(0).permutation(2 * N)[:N]
    for fraction in FRACTIONS:
        assert abs(observation_array(keys, 5, fraction, "either").all(axis=1).mean() - fraction) < 0.02


def test_deterministic_and_scalar_matches_vector() -> None:
    idx = np.arange(0, 5000, 7)
    a = observation_array(idx, 9, 0.25, "either")
    b = observation_array(idx.copy(), 9, 0.25, "either")
    np.testing.assert_array_equal(a, b)
    keys = [f"{i:09d}" for i in idx]
    np.testing.assert_array_equal(observation_for_keys(keys, 9, 0.25, "either"), a)
    assert [observation(k, 9, 0.25, "either") for k in keys[:50]] == [tuple(r) for r in a[:50].tolist()]


def test_seed_changes_the_assignment_and_fractions_nest() -> None:
    idx = np.arange(N)
    a = observation_array(idx, 0, 0.5, "s").all(axis=1)
    b = observation_array(idx, 1, 0.5, "s").all(axis=1)
    assert (a != b).mean() > 0.2
    small = observation_array(idx, 0, 0.125, "s").all(axis=1)
    assert not (small & ~a).any(), "a smaller fraction pairs a subset of a larger one"


def test_non_integer_keys_use_a_stable_hash() -> None:
    keys = [f"img_{i}" for i in range(N)]
    obs = observation_for_keys(keys, 2, 0.5, "either")
    assert observation_for_keys(keys, 2, 0.5, "either").tolist() == obs.tolist()
    assert abs(obs.all(axis=1).mean() - 0.5) < 0.05  # hashed keys: binomial noise, not 1 %
    assert observation("img_3", 2, 0.5, "either") == tuple(obs[3].tolist())


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_invalid_fraction_raises(fraction: object) -> None:
    with pytest.raises(ValueError, match="fraction"):
        observation("000000001", 0, fraction, "s")  # type: ignore[arg-type]


def test_invalid_missing_and_indices_raise() -> None:
    with pytest.raises(ValueError, match="missing must be one of"):
        observation("000000001", 0, 0.5, "both")
    with pytest.raises(ValueError, match="non-negative"):
        observation_array(np.array([-1, 2]), 0, 0.5, "s")
    with pytest.raises(ValueError, match="integers"):
        observation_array(np.array([0.5]), 0, 0.5, "s")


# -- through the real reader: what a training epoch sees ------------------------------------------
@pytest.mark.parametrize("missing", ["s", "t", "either"])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.125])
def test_reader_epoch_realises_the_fraction_on_every_rank(quickstart_shards, fraction: float, missing: str) -> None:
    """One epoch of the quickstart shards per rank, 1 and 2 ranks: paired share within 1 % on each rank."""
    from meme_scale.data.shards import TrainStream

    for world in (1, 2):
        for rank in range(world):
            stream = TrainStream(
                str(quickstart_shards),
                "train",
                128,
                modalities=["mnist", "digits"],
                rank=rank,
                world_size=world,
                seed=5,
                observed_fraction=fraction,
                missing=missing,
            )
            steps = stream.steps_per_epoch(0)
            masks = [batch["observed"] for _, _, batch in itertools.islice(stream, steps)]
            obs = torch.cat(masks).numpy()
            assert obs.any(axis=1).all()
            assert abs(obs.all(axis=1).mean() - fraction) < 0.01, (world, rank)
            kept = {"s": 1, "t": 0}.get(missing)
            if kept is not None:
                assert obs[:, kept].all(), f"missing={missing} must only ever hide the other modality"


def test_mask_seed_is_independent_of_the_training_seed(quickstart_shards) -> None:
    from meme_scale.data.shards import TrainStream

    def masks(seed: int, mask_seed: int) -> dict[str, tuple[bool, ...]]:
        stream = TrainStream(
            str(quickstart_shards),
            "train",
            64,
            modalities=["mnist", "digits"],
            rank=0,
            world_size=1,
            seed=seed,
            observed_fraction=0.5,
            missing="either",
            mask_seed=mask_seed,
        )
        batches = [b for _, _, b in itertools.islice(stream, 10)]
        return {k: tuple(o.tolist()) for b in batches for k, o in zip(b["key"], b["observed"])}

    a, b, c = masks(1, 0), masks(2, 0), masks(1, 9)
    assert a.keys() != b.keys()  # another training seed reads another order...
    shared = a.keys() & b.keys()
    assert shared and all(a[k] == b[k] for k in shared)  # ...but pairs the same samples
    assert any(a[k] != c[k] for k in a.keys() & c.keys())  # mask_seed alone changes the pattern
