"""Shard reader (DESIGN 2): exactly-once epochs, equal steps, worker- and resume-invariant batches.

All tests read real tar shards written into tmp_path by the project's ShardWriter (or, for broken
shards, by webdataset's TarWriter). Toy set: 250 train samples in shards of 40 (7 shards, the
last one 10), 61 test samples; modalities 'a' (1x4x4 image) and 'b' (1x2x2 image or [3] vector).
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
from conftest_data import edit_json, expected_batch, label, make_dataset, write_raw_shard

from meme_scale.data import shards
from meme_scale.data.masks import observation_for_keys
from meme_scale.data.shards import (
    ShardFormatError,
    TrainStream,
    eval_batches,
    iter_shard,
    read_meta,
    shard_paths,
    steps_per_epoch,
)

B, SEED = 16, 3


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("toy") / "toy"))


def stream(root: str, **kw) -> TrainStream:
    args = dict(modalities=["a", "b"], rank=0, world_size=1, seed=SEED, observed_fraction=0.5, missing="either")
    args.update(kw)
    return TrainStream(root, "train", B, **args)


def take(s: TrainStream, n: int) -> list[tuple[int, int, dict]]:
    return list(itertools.islice(s, n))


def assert_same(xs: list, ys: list) -> None:
    assert len(xs) == len(ys)
    for (e1, j1, b1), (e2, j2, b2) in zip(xs, ys):
        assert (e1, j1) == (e2, j2)
        assert b1["key"] == b2["key"]
        for k in ("a", "b", "observed", "label"):
            assert torch.equal(b1[k], b2[k]), (e1, j1, k)


def shard_keys(root: str) -> dict[str, set[str]]:
    return {os.path.basename(p): {r["__key__"] for r in iter_shard(p)} for p in shard_paths(root, "train")}


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_exactly_once_per_epoch_across_two_ranks(root: str, epoch: int) -> None:
    steps = steps_per_epoch(root, "train", B, 2, SEED, epoch)
    per_shard = shard_keys(root)
    assignment = shards._rank_shards(sorted(per_shard), 2, SEED, epoch)
    seen: list[set[str]] = []
    for rank in (0, 1):
        out = take(stream(root, rank=rank, world_size=2, start_epoch=epoch), steps + 1)
        assert [(e, j) for e, j, _ in out] == [(epoch, j) for j in range(steps)] + [(epoch + 1, 0)]
        keys = [k for _, _, b in out[:-1] for k in b["key"]]
        assert len(keys) == len(set(keys)) == steps * B
        own = set().union(*(per_shard[n] for n in assignment[rank]))
        assert set(keys) <= own, "a rank only reads its own shards"
        seen.append(set(keys))
    assert not seen[0] & seen[1]
    rank_sizes = [sum(len(per_shard[n]) for n in names) for names in assignment]
    assert steps == min(rank_sizes) // B
    assert 250 - len(seen[0] | seen[1]) == sum(rank_sizes) - 2 * steps * B  # only the surplus is dropped


def test_one_rank_epoch_covers_all_but_the_remainder(root: str) -> None:
    out = take(stream(root), 250 // B)
    keys = [k for _, _, b in out for k in b["key"]]
    assert len(set(keys)) == len(keys) == (250 // B) * B and {e for e, _, _ in out} == {0}


def test_step_counts_equal_across_ranks(root: str) -> None:
    for epoch in range(6):
        expected = steps_per_epoch(root, "train", B, 2, SEED, epoch)
        assert all(stream(root, rank=r, world_size=2).steps_per_epoch(epoch) == expected for r in (0, 1))
    counts = {steps_per_epoch(root, "train", B, 2, SEED, e) for e in range(20)}
    assert len(counts) > 1, "shard assignment (and so the equalised step count) changes with the epoch"


def test_batches_identical_for_zero_one_two_workers(root: str) -> None:
    n = 2 * stream(root).steps_per_epoch(0) + 3  # crosses two epoch boundaries
    ref = take(stream(root, rank=1, world_size=2, num_workers=0), n)
    for workers in (1, 2):
        assert_same(take(stream(root, rank=1, world_size=2, num_workers=workers), n), ref)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_the_uninterrupted_sequence(root: str, workers: int) -> None:
    steps0 = stream(root).steps_per_epoch(0)
    ref = take(stream(root), 3 * steps0)
    position = {(e, j): i for i, (e, j, _) in enumerate(ref)}
    for e, j in [(0, 1), (0, steps0 - 1), (1, 0), (1, 4), (2, 2)]:
        i = position[(e, j)]
        assert_same(take(stream(root, start_epoch=e, start_batch=j, num_workers=workers), len(ref) - i), ref[i:])
    # A position saved after an epoch's last batch continues with the next epoch.
    assert_same(take(stream(root, start_epoch=0, start_batch=steps0), 2), ref[steps0 : steps0 + 2])


def test_epochs_and_seeds_shuffle_differently(root: str) -> None:
    steps = stream(root).steps_per_epoch(0)
    out = take(stream(root), 2 * steps)
    first = [k for e, _, b in out if e == 0 for k in b["key"]]
    second = [k for e, _, b in out if e == 1 for k in b["key"]]
    assert first != second and first[:B] != second[:B]
    other = [k for _, _, b in take(stream(root, seed=SEED + 1), 1) for k in b["key"]]
    assert other != first[:B]


def test_batches_match_written_pixels_and_hide_unobserved(root: str) -> None:
    hidden = np.zeros(2, dtype=int)
    for _, _, b in take(stream(root, num_workers=1), 10):
        assert b["a"].dtype == torch.float32 and b["a"].shape == (B, 1, 4, 4) and b["b"].shape == (B, 1, 2, 2)
        assert b["observed"].dtype == torch.bool and b["observed"].shape == (B, 2)
        assert b["label"].dtype == torch.int64 and b["label"].tolist() == [label(int(k)) for k in b["key"]]
        obs = b["observed"].numpy()
        np.testing.assert_array_equal(obs, observation_for_keys(b["key"], SEED, 0.5, "either"))
        want = expected_batch(b["key"], obs)
        np.testing.assert_allclose(b["a"].numpy(), want["a"], atol=1e-7)
        np.testing.assert_allclose(b["b"].numpy(), want["b"], atol=1e-7)
        hidden += (~obs).sum(axis=0)
    assert (hidden > 0).all(), "the test saw hidden s and hidden t entries"


def test_vector_modality_and_unlabelled_dataset(tmp_path) -> None:
    root = make_dataset(str(tmp_path / "vec"), t_kind="vector", labels=False)
    assert read_meta(root)["label"] is None
    _, _, b = take(stream(root, observed_fraction=0.25, missing="t"), 1)[0]
    assert b["b"].dtype == torch.float32 and b["b"].shape == (B, 3)
    assert b["label"].tolist() == [-1] * B
    want = expected_batch(b["key"], b["observed"].numpy(), t_kind="vector")
    np.testing.assert_array_equal(b["b"].numpy(), want["b"])
    assert b["observed"][:, 0].all()


def test_single_modality_stream_is_all_observed(root: str) -> None:
    _, _, b = take(stream(root, modalities=["b"], observed_fraction=1.0), 1)[0]
    assert set(b) == {"b", "observed", "label", "key"} and b["observed"].shape == (B, 1) and b["observed"].all()
    with pytest.raises(ValueError, match="exactly two modalities"):
        stream(root, modalities=["b"], observed_fraction=0.5)


def test_eval_batches_cover_each_test_sample_once(root: str) -> None:
    keys: list[str] = []
    for rank in (0, 1):
        for b in eval_batches(root, "test", 8, modalities=["a", "b"], rank=rank, world_size=2):
            assert b["observed"].all() and len(b["key"]) <= 8
            want = expected_batch(b["key"], b["observed"].numpy())
            np.testing.assert_allclose(b["a"].numpy(), want["a"], atol=1e-7)
            keys += b["key"]
    assert sorted(keys) == [f"{i:09d}" for i in range(61)]
    sizes = [len(b["key"]) for b in eval_batches(root, "test", 8, modalities=["a"], rank=0, world_size=1)]
    assert sizes == [8] * 7 + [5]


def test_argument_errors(root: str) -> None:
    with pytest.raises(ValueError, match="7 shards cannot be split over 8 ranks"):
        stream(root, rank=0, world_size=8)
    with pytest.raises(ValueError, match="batch_size 200 exceeds"):
        TrainStream(
            root, "train", 200, modalities=["a", "b"], rank=0, world_size=2, seed=0, observed_fraction=1.0, missing="s"
        )
    with pytest.raises(ValueError, match="past the end of epoch 0"):
        stream(root, start_batch=999)
    with pytest.raises(ValueError, match="subset of"):
        stream(root, modalities=["a", "zz"])
    with pytest.raises(ValueError, match="rank"):
        stream(root, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no shards for split 'val'"):
        shard_paths(root, "val")


# ---- errors: each must name the file (and key/field) and never be skipped silently ----

TRAIN0 = "toy-train-000000.tar"


@pytest.fixture
def fresh(tmp_path) -> str:
    return make_dataset(str(tmp_path / "toy"))


def first_batch(root: str, workers: int = 0) -> dict:
    return take(stream(root, num_workers=workers), 1)[0][2]  # buffer > split: reads every shard


def rewrite_shard(root: str, name: str, change) -> None:
    """Rewrite shard ``name`` with change(list of raw samples) -> list (via webdataset's TarWriter)."""
    path = os.path.join(root, name)
    samples = [{k: v for k, v in r.items() if k != "__url__"} for r in iter_shard(path)]
    write_raw_shard(path, change(samples))


def test_missing_meta_or_sizes_names_the_file(fresh: str) -> None:
    os.remove(os.path.join(fresh, "sizes.json"))
    with pytest.raises(FileNotFoundError, match="sizes.json"):
        read_meta(fresh)
    os.remove(os.path.join(fresh, "meta.json"))
    with pytest.raises(FileNotFoundError, match="meta.json"):
        stream(fresh)


def test_listed_shard_missing_on_disk(fresh: str) -> None:
    os.remove(os.path.join(fresh, "toy-train-000003.tar"))
    with pytest.raises(FileNotFoundError, match="toy-train-000003.tar"):
        shard_paths(fresh, "train")
    with pytest.raises(FileNotFoundError, match="toy-train-000003.tar"):
        stream(fresh)


def test_empty_shards(fresh: str) -> None:
    open(os.path.join(fresh, TRAIN0), "wb").close()
    with pytest.raises(ShardFormatError, match=f"shard {TRAIN0} is empty"):
        first_batch(fresh)
    write_raw_shard(os.path.join(fresh, TRAIN0), [])  # a valid tar without members
    with pytest.raises(ShardFormatError, match=f"shard {TRAIN0} contains no samples"):
        first_batch(fresh)


@pytest.mark.parametrize("cut", [0.5, 0.73, 0.9])
def test_truncated_shard(fresh: str, cut: float) -> None:
    path = os.path.join(fresh, TRAIN0)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * cut)])
    with pytest.raises(ShardFormatError, match=TRAIN0):  # corrupt, or fewer samples than sizes.json
        first_batch(fresh)


def test_corrupt_header(fresh: str) -> None:
    path = os.path.join(fresh, TRAIN0)
    with open(path, "r+b") as f:
        f.seek(3 * 1024)  # a member header (every toy member is one header + one data block)
        f.write(b"garbage!")
    with pytest.raises(ShardFormatError, match=f"shard {TRAIN0} is truncated or corrupt.*checksum"):
        first_batch(fresh)


def test_sample_missing_a_field(fresh: str) -> None:
    rewrite_shard(fresh, TRAIN0, lambda s: s[:5] + [{k: v for k, v in s[5].items() if k != "b.png"}] + s[6:])
    with pytest.raises(ShardFormatError, match=rf"shard {TRAIN0}, key 000000005: missing field\(s\) \['b.png'\]"):
        first_batch(fresh)
    with pytest.raises(ShardFormatError, match=rf"shard {TRAIN0}, key 000000005"):
        first_batch(fresh, workers=1)  # raised inside a DataLoader worker, same message


def test_sizes_json_disagrees_with_shard(fresh: str) -> None:
    edit_json(fresh, "sizes.json", lambda s: {**s, TRAIN0: 41})
    with pytest.raises(ShardFormatError, match=f"shard {TRAIN0} holds 40 samples but sizes.json says 41"):
        first_batch(fresh)


def test_decoded_shape_disagrees_with_meta(fresh: str) -> None:
    edit_json(
        fresh,
        "meta.json",
        lambda m: {**m, "modalities": {**m["modalities"], "a": {**m["modalities"]["a"], "shape": [1, 5, 5]}}},
    )
    with pytest.raises(
        ShardFormatError,
        match=r"shard toy-train-\d+.tar, key \d{9}, modality 'a': "
        r"expected shape \(1, 5, 5\), got \(1, 4, 4\)",
    ):
        first_batch(fresh)


def test_undecodable_image(fresh: str) -> None:
    rewrite_shard(fresh, TRAIN0, lambda s: [{**x, "a.png": b"not a png"} for x in s])
    with pytest.raises(ShardFormatError, match=rf"shard {TRAIN0}, key \d{{9}}, modality 'a': cannot decode"):
        for _ in eval_batches(fresh, "train", 50, modalities=["a"], rank=0, world_size=1):
            pass


@pytest.mark.parametrize("pax_from", [0, 17])
def test_pax_shards_read_like_plain_ones(fresh: str, pax_from: int) -> None:
    before = [r for r in iter_shard(os.path.join(fresh, TRAIN0))]
    ref = take(stream(fresh), 3)
    write_raw_shard(
        os.path.join(fresh, TRAIN0), [{k: v for k, v in r.items() if k != "__url__"} for r in before], pax_from=pax_from
    )
    assert b"PaxHeader" in open(os.path.join(fresh, TRAIN0), "rb").read()
    assert [r for r in iter_shard(os.path.join(fresh, TRAIN0), 40)] == before
    assert_same(take(stream(fresh), 3), ref)


def test_data_workers_and_their_server_end_with_a_killed_reader(root: str, tmp_path) -> None:
    """SIGKILL a reading process: its workers (children of the forkserver, not of the reader) must go too."""
    import signal
    import subprocess
    import sys

    import psutil

    script = tmp_path / "reader.py"
    script.write_text(
        "import itertools, sys, time\n"
        "from meme_scale.data.shards import TrainStream\n"
        "if __name__ == '__main__':\n"
        f"    s = TrainStream({root!r}, 'train', 16, modalities=['a', 'b'], rank=0, world_size=1, seed=0,\n"
        "                    observed_fraction=1.0, missing='either', num_workers=2)\n"
        "    it = iter(s); next(it)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        helpers = psutil.Process(proc.pid).children(recursive=True)
        forkserver = [h for h in helpers if "forkserver" in " ".join(h.cmdline())]
        assert forkserver, [h.cmdline() for h in helpers]
        workers = [c for f in forkserver for c in f.children()]
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(workers + forkserver, timeout=15)
        assert not alive, f"left running after the reader died: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
