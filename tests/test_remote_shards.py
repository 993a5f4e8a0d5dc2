"""Shards from URLs (issue 14, part 1): real HTTP and S3-API servers on 127.0.0.1 serve a toy shard set.

Every check compares against reading the same shards from the local folder: the byte layer
(data/storage.py) must not change a single batch, whatever the protocol, the worker count, a
resume position, injected 503s and dropped connections, or a server killed and restarted.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import tempfile
import threading
from collections import Counter

import numpy as np
import pytest
import torch
from conftest_data import make_dataset
from conftest_servers import HttpShards, S3Server
from sources_cli import cli

from meme_scale.data import storage as st
from meme_scale.data.shards import TrainStream, eval_batches, read_meta, steps_per_epoch
from meme_scale.data.sources import fakeraw
from meme_scale.data.writer import ShardWriter, validate_dataset

B, SEED = 16, 3
FAST = st.Storage(retries=30, retry_wait=0.05)  # rides out a server restart of about a second


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Parent folder holding the toy set in ./toy (the HTTP server serves the parent)."""
    parent = tmp_path_factory.mktemp("remote")
    make_dataset(str(parent / "toy"))
    return str(parent)


@pytest.fixture(scope="module")
def http(shards):
    with HttpShards(shards) as server:
        yield server


@pytest.fixture(scope="module")
def s3(shards):
    with S3Server() as server:
        server.upload(os.path.join(shards, "toy"), "toy")
        yield server


def stream(root: str, storage: st.Storage | None = None, **kw) -> TrainStream:
    args = dict(modalities=["a", "b"], rank=0, world_size=1, seed=SEED, observed_fraction=0.5, missing="either")
    return TrainStream(root, "train", B, storage=storage, **{**args, **kw})


def take(s: TrainStream, n: int) -> list[tuple]:
    """(epoch, batch, keys, a, b, observed) of n batches: everything a batch carries, comparable."""
    return [
        (e, j, b["key"], b["a"].numpy(), b["b"].numpy(), b["observed"].numpy()) for e, j, b in itertools.islice(s, n)
    ]


def assert_same(xs: list, ys: list) -> None:
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x[:3] == y[:3]
        for u, v in zip(x[3:], y[3:]):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("where", ["http", "s3"])
def test_two_rank_read_from_a_server_equals_the_local_folder(shards, request, where: str) -> None:
    local = os.path.join(shards, "toy")
    server = request.getfixturevalue(where)
    url = f"{server.url}/toy" if where == "http" else f"s3://{server.bucket}/toy"
    storage = st.Storage(options=server.options) if where == "s3" else None
    assert read_meta(url, storage)["sizes"] == read_meta(local)["sizes"]
    n = steps_per_epoch(local, "train", B, 2, SEED, 0) + 2  # crosses into the next epoch
    for rank, workers in ((0, 0), (1, 2)):  # the 0/1/2-worker equality holds remotely too
        ref = take(stream(local, rank=rank, world_size=2), n)
        assert_same(take(stream(url, storage, rank=rank, world_size=2, num_workers=workers), n), ref)


def test_resume_mid_epoch_from_a_url_equals_uninterrupted(shards, http) -> None:
    url = f"{http.url}/toy"
    ref = take(stream(url), 2 * stream(url).steps_per_epoch(0) + 2)
    position = {(e, j): i for i, (e, j, *_) in enumerate(ref)}
    for e, j, workers in ((0, 5, 0), (1, 2, 2)):
        i = position[(e, j)]
        assert_same(take(stream(url, start_epoch=e, start_batch=j, num_workers=workers), len(ref) - i), ref[i:])


@pytest.mark.parametrize("flags", [("--reset-every", "2"), ("--fail-every", "3")])
def test_dropped_connections_and_5xx_resume_at_the_right_sample(shards, flags) -> None:
    """Half of every 2nd response is sent before the connection drops (or every 3rd GET is a 503):
    the reader re-requests from the byte it had and yields exactly the local batches."""
    local = os.path.join(shards, "toy")
    n = stream(local).steps_per_epoch(0) + 3
    with HttpShards(shards, *flags) as flaky:
        assert_same(take(stream(f"{flaky.url}/toy", FAST), n), take(stream(local), n))


def epoch_keys(s: TrainStream) -> Counter:
    steps = s.steps_per_epoch(0)
    return Counter(k for _, _, b in itertools.islice(s, steps) for k in b["key"])


def test_server_killed_mid_epoch_and_restarted_every_sample_once(shards, tmp_path) -> None:
    local = os.path.join(shards, "toy")
    small = dict(shuffle_buffer=8)  # shards are fetched as the epoch goes, not all at its start
    expected = epoch_keys(stream(local, **small))
    steps = stream(local).steps_per_epoch(0)
    log = tmp_path / "after_restart.log"
    with HttpShards(shards) as server:
        s = iter(stream(f"{server.url}/toy", FAST, **small))
        seen = Counter(k for _, _, b in itertools.islice(s, 2) for k in b["key"])
        server.kill()
        server.flags = ("--log", str(log))
        restart = threading.Timer(1.0, server.start)
        restart.start()
        try:
            for epoch, _, b in itertools.islice(s, steps - 2):
                seen.update(b["key"])
                assert epoch == 0
        finally:
            restart.join()
    assert seen == expected and set(seen.values()) == {1}
    assert re.search(r"GET /toy/toy-train-\d{6}\.tar", log.read_text()), "shards came from the restarted server"


@pytest.mark.parametrize("workers", [0, 1])
def test_server_killed_for_good_is_an_error_naming_url_and_attempts(shards, workers: int) -> None:
    with HttpShards(shards) as server:
        s = stream(f"{server.url}/toy", st.Storage(retries=3, retry_wait=0.01), num_workers=workers)
        server.kill()
        # (from a worker, torch puts the worker's traceback before the message)
        with pytest.raises(
            st.RemoteReadError,
            match=rf"http://127\.0\.0\.1:{server.port}/toy/toy-train-\d{{6}}\.tar: "
            r"giving up after 3 attempts .*last error: ClientConnectorError",
        ):
            take(s, 1)


def test_missing_remote_shard_and_meta_are_named(shards, http) -> None:
    with pytest.raises(FileNotFoundError, match=rf"meta.json not found in {re.escape(http.url)}/nothing"):
        read_meta(f"{http.url}/nothing")
    with pytest.raises(st.RemoteReadError, match="giving up after 2 attempts"):
        read_meta("http://127.0.0.1:1/toy", st.Storage(retries=2, retry_wait=0.01))  # nothing listens on port 1


def test_cache_holds_fetched_shards_within_its_bound(shards, tmp_path) -> None:
    local = os.path.join(shards, "toy")
    ref = take(stream(local), stream(local).steps_per_epoch(0))
    shard_bytes = sorted(os.path.getsize(os.path.join(local, n)) for n in os.listdir(local) if "-train-" in n)
    with HttpShards(shards) as server:
        url = f"{server.url}/toy"
        roomy = st.Storage(cache_dir=str(tmp_path / "roomy"))
        assert_same(take(stream(url, roomy), len(ref)), ref)
        bound = (shard_bytes[-1] + shard_bytes[-2] + shard_bytes[-1] // 2) / 2**30  # room for two shards
        tight = st.Storage(cache_dir=str(tmp_path / "tight"), cache_max_gb=bound)
        assert_same(take(stream(url, tight), len(ref)), ref)
        again = stream(url, st.Storage(cache_dir=str(tmp_path / "roomy"), retries=1))  # meta.json is always fetched
        server.kill()
        # every shard of the epoch is in the roomy cache: the same epoch reads without a server
        assert sorted(os.path.getsize(p) for p in (tmp_path / "roomy").iterdir()) == shard_bytes
        assert_same(take(again, len(ref)), ref)
    kept = list((tmp_path / "tight").iterdir())
    assert 1 <= len(kept) <= 2 and sum(p.stat().st_size for p in kept) <= bound * 2**30
    assert not [p for p in kept if ".tmp-" in p.name]


def test_pipe_and_file_urls_read_like_the_folder(shards) -> None:
    local = os.path.join(shards, "toy")
    ref = take(stream(local), 3)
    for root in (f"pipe:cat {local}/{{}}", f"pipe:cat {local}", f"file://{local}"):
        assert_same(take(stream(root), 3), ref)
    with pytest.raises(st.RemoteReadError, match=r"pipe:cat .*/nope/meta.json: giving up after 2 attempts.*status 1"):
        read_meta(f"pipe:cat {shards}/nope", st.Storage(retries=2, retry_wait=0.01))


def test_converter_writes_to_s3_and_readers_get_the_same_dataset(tmp_path, capsys, monkeypatch, s3) -> None:
    fakeraw.arrays_folder(str(tmp_path / "arr"), n=40, caption=True)  # captions: the tokenizer is read remotely too
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    url = f"s3://{s3.bucket}/custom"
    args = ["custom", "--arrays", str(tmp_path / "arr"), "--shard-size", "10"]
    staging = set(glob.glob(os.path.join(tempfile.gettempdir(), "meme_scale-custom-*")))
    assert cli(capsys, *args, "--out", str(tmp_path / "local")).returncode == 0
    res = cli(capsys, *args, "--out", url)
    assert res.returncode == 0 and res.stdout.startswith("custom: 36 train + 4 test samples"), res
    local, remote = read_meta(str(tmp_path / "local")), read_meta(url)
    assert {k: v for k, v in remote.items() if k != "source"} == {k: v for k, v in local.items() if k != "source"}
    s = dict(modalities=["pic", "text"], rank=0, world_size=1, seed=0, observed_fraction=1.0, missing="either")
    ref = [b["text"] for _, _, b in itertools.islice(TrainStream(str(tmp_path / "local"), "train", 8, **s), 4)]
    got = [b["text"] for _, _, b in itertools.islice(TrainStream(url, "train", 8, **s), 4)]
    assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(ref, got))
    batch = next(eval_batches(url, "test", 4, modalities=["pic", "text"], rank=0, world_size=1))
    assert os.path.isfile(batch["tokenizers"]["text"])  # a local copy, for turning generated ids into text
    res = cli(capsys, *args, "--out", url)
    assert res.returncode == 1 and f"{url} already exists; pass overwrite=True (--overwrite)" in res.stderr
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "meme_scale-custom-*"))) == staging, "staging removed"


def test_publish_uploads_meta_json_last(tmp_path) -> None:
    """An upload that fails part-way leaves shards but no meta.json: readers see no dataset."""
    target = tmp_path / "target"
    os.makedirs(target)
    os.symlink(tmp_path / "no" / "such" / "dir", target / "toy-train-000001.tar")  # that upload must fail
    w = ShardWriter(f"local://{target}", "toy", {"a": {"kind": "image", "shape": [1, 4, 4]}}, None, samples_per_shard=4)
    w.write_split("train", [{"a": np.full((1, 4, 4), i, np.uint8)} for i in range(8)])
    w.write_split("test", [{"a": np.zeros((1, 4, 4), np.uint8)}])
    with pytest.raises(OSError):
        w.finish()
    assert (target / "toy-train-000000.tar").is_file() and not (target / "meta.json").exists()
    os.remove(target / "toy-train-000001.tar")
    w = ShardWriter(f"local://{target}", "toy", {"a": {"kind": "image", "shape": [1, 4, 4]}}, None, samples_per_shard=4)
    w.write_split("train", [{"a": np.full((1, 4, 4), i, np.uint8)} for i in range(8)])
    w.write_split("test", [{"a": np.zeros((1, 4, 4), np.uint8)}])
    w.finish()
    assert validate_dataset(str(target)) == {"train": 8, "test": 1}
    first = next(
        iter(
            TrainStream(
                f"local://{target}",
                "train",
                2,
                modalities=["a"],
                rank=0,
                world_size=1,
                seed=0,
                observed_fraction=1.0,
                missing="either",
            )
        )
    )
    assert first[2]["a"].shape == (2, 1, 4, 4) and torch.is_tensor(first[2]["observed"])
