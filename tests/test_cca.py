"""CCA coherence of image-caption data: word vectors, SIF sentence embeddings, pooled image features,
the fitted scorer, and the evaluation of a CUB-shaped run (1 rank == 2 ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import BIN, ROOT, free_port, launch

from meme_scale.cca_features import (
    CCAScorer,
    SentenceEmbedder,
    WordVectors,
    image_features,
    load_word_vectors,
    save_word_vectors,
    train_word_vectors,
    word_counts,
)
from meme_scale.data.sources import fakeraw


def test_word_vector_file_round_trip_and_errors(tmp_path):
    good = tmp_path / "v.txt"
    good.write_text("3 2\nbird 1 0\nRed 0.5 -2\nwing 0 1\n")
    vectors = load_word_vectors(good)
    assert vectors.index == {"bird": 0, "red": 1, "wing": 2} and vectors.dim == 2
    np.testing.assert_array_equal(vectors.vectors[1], [0.5, -2])
    again = load_word_vectors(save_word_vectors(vectors, tmp_path / "w.txt"))
    assert again.index == vectors.index and np.array_equal(again.vectors, vectors.vectors)

    for text, why in (
        ("bird 1 0\nred 1\n", "line 2: 1 values"),
        ("bird 1 x\n", "line 1: expected"),
        ("", "no vectors"),
        ("bird nan 1\n", "line 1: needs finite"),
    ):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"{bad}.*{why}"):
            load_word_vectors(bad)
    with pytest.raises(ValueError, match="missing.txt"):
        load_word_vectors(tmp_path / "missing.txt")


def test_sif_weights_and_removed_direction():
    vectors = WordVectors({"a": 0, "b": 1}, np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32))
    embedder = SentenceEmbedder(vectors, {"a": 1, "b": 3}, a=0.5)  # p(a) = 1/4, p(b) = 3/4
    means = embedder.weighted_means(["a b", "A unknown", "nothing known"])
    np.testing.assert_allclose(means[0], [0.5 / 0.75 / 2, 0.5 / 1.25 / 2])
    np.testing.assert_allclose(means[1], [0.5 / 0.75, 0.0])  # the mean is over known words
    np.testing.assert_array_equal(means[2], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="fit"):
        embedder(["a"])
    texts = ["a", "a b", "b b a", "a a"]
    embedder.fit(texts)
    emb = embedder(texts)
    assert np.abs(emb @ embedder.direction).max() < 1e-12  # the common direction is gone
    assert word_counts(["A b", "b"]) == {"a": 1, "b": 2}


def test_image_features_pool_pixels_and_keep_vectors():
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    feats = image_features(images, "image")
    assert feats.shape == (2, 3 * 8 * 8) and feats.dtype == np.float64
    assert feats[0, 0] == pytest.approx(images[0, 0, :2, :2].mean().item())
    vec = torch.randn(4, 7)
    np.testing.assert_allclose(image_features(vec, "vector"), vec.double().numpy())


def _topic_corpus(seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    topics = [["red", "crimson", "scarlet", "wing"], ["blue", "azure", "water", "tail"]]
    return [" ".join(rng.choice(topics[i % 2], size=6)) + " bird" for i in range(200)]


def test_trained_word_vectors_group_words_that_share_contexts():
    corpus = _topic_corpus()
    vectors = train_word_vectors(corpus, dim=4, window=3)
    assert set(vectors.index) == {"red", "crimson", "scarlet", "wing", "blue", "azure", "water", "tail", "bird"}

    def cos(a, b):
        va, vb = vectors.vectors[vectors.index[a]], vectors.vectors[vectors.index[b]]
        return float(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb))

    assert cos("red", "crimson") > cos("red", "azure") + 0.5
    again = train_word_vectors(corpus, dim=4, window=3)
    assert np.array_equal(again.vectors, vectors.vectors)  # deterministic
    with pytest.raises(ValueError, match="at least 3 distinct words"):
        train_word_vectors(["one two"], dim=2)


class _WordTokenizer:
    """Captions as word ids (a stand-in for the sentencepiece model: the scorer only needs decode_batch)."""

    def __init__(self, words):
        self.words = ["<pad>", *words]

    def encode(self, texts):
        return torch.tensor([[self.words.index(w) for w in t.split()] for t in texts])

    def decode_batch(self, ids):
        return [" ".join(self.words[i] for i in row if i) for row in ids.tolist()]


def test_scorer_rates_true_pairs_above_shuffled_ones():
    corpus = _topic_corpus()
    vectors = train_word_vectors(corpus, dim=4, window=3)
    tokenizer = _WordTokenizer(sorted(vectors.index))
    gen = torch.Generator().manual_seed(0)
    topic = torch.tensor([i % 2 for i in range(len(corpus))])
    features = torch.stack([topic.float(), 1 - topic.float()], 1) + 0.3 * torch.randn(len(corpus), 2, generator=gen)
    ids = tokenizer.encode(corpus)
    batches = [{"img": features[i : i + 50], "cap": ids[i : i + 50]} for i in range(0, 200, 50)]
    scorer = CCAScorer.fit(batches, "img", "vector", "cap", tokenizer, vectors, n_samples=150, n_components=2)
    true_sum, n = scorer.score(features[150:], ids[150:]).tolist()
    shuffled_sum, _ = scorer.score(features[150:], ids[150:].roll(1, 0)).tolist()  # neighbours differ in topic
    assert n == 50 and true_sum / n > 0.5 and shuffled_sum / n < -0.2


# -- end to end on CUB-shaped shards -----------------------------------------------------------
@pytest.fixture(scope="module")
def cub_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cub_cca")
    fakeraw.cub_tree(str(root / "raw"), n_train_classes=4, n_test_classes=2, images_per_class=4)
    data = root / "shards"
    subprocess.run(
        [
            sys.executable,
            "tools/make_shards.py",
            "cub",
            "--root",
            str(root / "raw"),
            "--out",
            str(data),
            "--image-size",
            "32",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    made = subprocess.run(
        [sys.executable, "tools/word_vectors.py", "--shards", str(data), "--dim", "16"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    assert json.loads(made.stdout)["file"] == str(data / "word_vectors.txt")
    run_dir = root / "run"
    launch(
        "python",
        [
            "--config",
            "configs/cub.yaml",
            *_small(data),
            f"run.dir={run_dir}",
            "train.max_steps=4",
            "run.eval_every=4",
            "run.progress=none",
        ],
        nproc=1,
    )
    return data, run_dir


def _small(data) -> list[str]:
    return [
        f"data.root={data}",
        "data.num_workers=0",
        "train.micro_batch_size=16",
        "train.precision=fp32",
        "train.zero_stage=0",
        "model.latent_dim=8",
        "model.k=2",
        "model.pseudo_samples=8",
        "eval.joint_samples=40",
        "eval.cca_components=8",
        "data.eval_split=train",
    ]


def _eval(launcher: list[str], data, checkpoint, out) -> dict:
    cmd = [
        *launcher,
        "-m",
        "meme_scale.cli",
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--config",
        "configs/cub.yaml",
        "--out",
        str(out),
        *_small(data),
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_cub_evaluation_reports_cca_coherence_on_any_world_size(cub_run, tmp_path):
    data, run_dir = cub_run
    logged = json.loads((run_dir / "summary.json").read_text())["final"]
    keys = ["eval/cca_image_to_caption", "eval/cca_caption_to_image", "eval/cca_joint", "eval/cca_data"]
    assert set(keys) <= set(logged)
    # what a sweep may name as its metric is exactly what evaluation reported
    from meme_scale.config import load_config
    from meme_scale.tune.plan import reported_metrics

    report = json.loads((run_dir / "eval_report.json").read_text())
    assert set(report) == reported_metrics(load_config(ROOT / "configs" / "cub.yaml", _small(data)))
    one = _eval([sys.executable], data, run_dir / "final" / "model.pt", tmp_path / "one.json")
    two = _eval(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())],
        data,
        run_dir / "checkpoints",
        tmp_path / "two.json",
    )
    for key in keys:
        assert -1.0 <= one[key] <= 1.0
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
        assert one[key] == pytest.approx(logged[key], rel=1e-5, abs=1e-6), key
    assert one["eval/cca_data"] > 0.5  # real pairs: captions name the colours the images show
    # generated captions are decoded back to text beside the picture grid (and logged with it)
    rows = (run_dir / "pictures" / "step_00000004.txt").read_text().splitlines()
    labels = {line.split("\t")[0] for line in rows}
    assert {"caption data", "caption recon", "image->caption", "prior caption"} <= labels
    assert all(len(line.split("\t")) == 3 for line in rows) and any(line.split("\t")[2].strip() for line in rows)

    (data / "word_vectors.txt").rename(data / "elsewhere.txt")
    try:  # without vectors the metric is skipped, and a named file that is missing is an error
        assert not {
            k
            for k in _eval([sys.executable], data, run_dir / "final" / "model.pt", tmp_path / "x.json")
            if k.startswith("eval/cca")
        }
        cmd = [
            sys.executable,
            "-m",
            "meme_scale.cli",
            "eval",
            "--checkpoint",
            str(run_dir / "final" / "model.pt"),
            "--config",
            "configs/cub.yaml",
            *_small(data),
            f"eval.cca_word_vectors={data / 'nope.txt'}",
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and "nope.txt" in proc.stderr
    finally:
        (data / "elsewhere.txt").rename(data / "word_vectors.txt")
