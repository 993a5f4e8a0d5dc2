"""Features for the CCA coherence of image-caption data (DESIGN 4, the CUB protocol of MMVAE/MEME).

Captions become sentence embeddings: SIF-weighted means of word vectors (``a / (a + p(w))`` with
``p(w)`` the word's frequency in the training captions), minus their projection on the first
principal direction of the training embeddings. Word vectors are supplied locally as a text file
(fastText/GloVe format); ``tools/word_vectors.py`` makes one from the training captions (PPMI + SVD)
when none is at hand, as the paper's authors trained theirs on the CUB captions. Images become
their own values when the modality is already a feature vector (``make_shards.py cub --features
resnet101``, the paper's setting) and 8x8 average-pooled pixels otherwise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

POOLED_SIDE = 8  # pixels are pooled to POOLED_SIDE x POOLED_SIDE per channel


@dataclass(frozen=True)
class WordVectors:
    index: dict[str, int]
    vectors: np.ndarray  # [V, D] float32

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def words(text: str) -> list[str]:
    return text.lower().split()


def load_word_vectors(path: str | Path) -> WordVectors:
    """A word-vector text file: one ``word v_1 ... v_D`` per line, optionally after a ``V D`` header."""
    path = Path(path)
    index: dict[str, int] = {}
    rows: list[np.ndarray] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"word vectors {path}: cannot read ({type(e).__name__}: {e})") from e
    for number, line in enumerate(lines, 1):
        parts = line.rstrip().split(" ")
        if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
            continue  # fastText's "count dim" header
        if not line.strip():
            continue
        try:
            values = np.asarray(parts[1:], dtype=np.float32)
        except ValueError:
            raise ValueError(f"word vectors {path}, line {number}: expected 'word v1 ... vD' numbers") from None
        if rows and len(values) != len(rows[0]):
            raise ValueError(
                f"word vectors {path}, line {number}: {len(values)} values, earlier lines have {len(rows[0])}"
            )
        if len(values) == 0 or not np.isfinite(values).all():
            raise ValueError(f"word vectors {path}, line {number}: needs finite values after the word")
        index.setdefault(parts[0].lower(), len(rows))
        rows.append(values)
    if not rows:
        raise ValueError(f"word vectors {path}: no vectors in the file")
    return WordVectors(index, np.stack(rows))


def save_word_vectors(vectors: WordVectors, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{len(vectors.index)} {vectors.dim}\n")
        for word, i in sorted(vectors.index.items(), key=lambda kv: kv[1]):
            f.write(word + " " + " ".join(f"{v:.6g}" for v in vectors.vectors[i]) + "\n")
    tmp.replace(path)
    return path


def word_counts(texts: Iterable[str]) -> Counter:
    return Counter(w for text in texts for w in words(text))


class SentenceEmbedder:
    """SIF sentence embeddings (Arora et al. 2017): call ``fit`` on training captions first."""

    def __init__(self, vectors: WordVectors, counts: Mapping[str, int], a: float = 1e-3):
        total = max(sum(counts.values()), 1)
        self.vectors, self.a = vectors, a
        self.frequency = {w: c / total for w, c in counts.items()}
        self.direction: np.ndarray | None = None

    def weighted_means(self, texts: Sequence[str]) -> np.ndarray:
        """``sum_w a/(a+p(w)) v_w / n_known`` per text; zeros for a text with no known word."""
        out = np.zeros((len(texts), self.vectors.dim), dtype=np.float64)
        for row, text in enumerate(texts):
            known = [w for w in words(text) if w in self.vectors.index]
            if known:
                weights = np.asarray([self.a / (self.a + self.frequency.get(w, 0.0)) for w in known])
                vecs = self.vectors.vectors[[self.vectors.index[w] for w in known]]
                out[row] = weights @ vecs / len(known)
        return out

    def fit(self, texts: Sequence[str]) -> SentenceEmbedder:
        means = self.weighted_means(texts)
        _, _, vt = np.linalg.svd(means, full_matrices=False)  # uncentred, as SIF does
        self.direction = vt[0]
        return self

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if self.direction is None:
            raise RuntimeError("SentenceEmbedder.fit(training captions) must come first")
        means = self.weighted_means(texts)
        return means - np.outer(means @ self.direction, self.direction)


def image_features(x: torch.Tensor, kind: str) -> np.ndarray:
    """Feature vectors as they are; images as ``POOLED_SIDE``-pooled pixels (float64 ``[N, D]``)."""
    x = x.detach().float()
    if kind == "image" and x.dim() == 4:
        x = F.adaptive_avg_pool2d(x, min(POOLED_SIDE, x.shape[-1]))
    return x.flatten(1).cpu().double().numpy()


def train_word_vectors(texts: Iterable[str], dim: int = 100, window: int = 5, min_count: int = 1) -> WordVectors:
    """Word vectors from a corpus: positive PMI of symmetric window co-occurrences, truncated SVD
    (``U_k sqrt(S_k)``). Deterministic; for a caption corpus of a few thousand words in seconds."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import svds

    sentences = [words(t) for t in texts]
    counts = Counter(w for s in sentences for w in s)
    vocab = sorted(w for w, c in counts.items() if c >= min_count)
    if len(vocab) < 3:
        raise ValueError(f"word vectors need at least 3 distinct words with count >= {min_count}, got {len(vocab)}")
    index = {w: i for i, w in enumerate(vocab)}
    pairs: Counter = Counter()
    for s in sentences:
        ids = [index[w] for w in s if w in index]
        for i, a in enumerate(ids):
            for b in ids[max(0, i - window) : i]:
                pairs[(a, b)] += 1
                pairs[(b, a)] += 1
    v = len(vocab)
    if not pairs:
        raise ValueError("word vectors need captions of at least two words")
    (rows, cols), data = zip(*pairs.keys()), np.fromiter(pairs.values(), dtype=np.float64)
    co = coo_matrix((data, (rows, cols)), shape=(v, v)).tocsr()
    total = co.sum()
    row_sum = np.asarray(co.sum(1)).ravel()
    col_sum = np.asarray(co.sum(0)).ravel() ** 0.75  # context smoothing (Levy et al. 2015)
    col_sum = col_sum / col_sum.sum() * total
    co = co.tocoo()
    pmi = np.log(co.data * total / (row_sum[co.row] * col_sum[co.col]))
    keep = pmi > 0
    ppmi = coo_matrix((pmi[keep], (co.row[keep], co.col[keep])), shape=(v, v)).astype(np.float64)
    k = min(dim, v - 1)
    u, s, _ = svds(ppmi, k=k, v0=np.ones(v) / np.sqrt(v))  # fixed start vector: the same vectors every run
    order = np.argsort(-s)
    u, s = u[:, order], s[order]
    u *= np.sign(u[np.abs(u).argmax(0), np.arange(k)])  # a fixed sign per component
    return WordVectors(index, (u * np.sqrt(s)).astype(np.float32))


class CCAScorer:
    """The CCA of real training pairs (image features, sentence embeddings), scoring any pairs.

    A pair's score is the cosine of its two CCA projections (``metrics.CCA.pair_scores``); the
    coherence of a set is the mean score. Fitting reads only real data, so every rank fits the
    same scorer from the same samples without talking to the others.
    """

    def __init__(self, image: str, image_kind: str, caption: str, tokenizer, embedder: SentenceEmbedder, cca):
        self.image, self.image_kind, self.caption = image, image_kind, caption
        self.tokenizer, self.embedder, self.cca = tokenizer, embedder, cca

    @classmethod
    def fit(
        cls,
        batches: Iterable[dict],
        image: str,
        image_kind: str,
        caption: str,
        tokenizer,
        vectors: WordVectors,
        n_samples: int,
        n_components: int,
    ) -> CCAScorer:
        from .metrics import fit_cca

        feats, texts = [], []
        for batch in batches:
            feats.append(image_features(batch[image], image_kind))
            texts += tokenizer.decode_batch(batch[caption])
            if len(texts) >= n_samples:
                break
        feats_np, texts = np.concatenate(feats)[:n_samples], texts[:n_samples]
        embedder = SentenceEmbedder(vectors, word_counts(texts)).fit(texts)
        k = min(n_components, feats_np.shape[1], vectors.dim, len(texts) - 1)
        return cls(image, image_kind, caption, tokenizer, embedder, fit_cca(feats_np, embedder(texts), k))

    def score(self, images: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
        """``[sum of pair scores, number of pairs]`` (float32, on ``images``' device)."""
        scores = self.cca.pair_scores(
            image_features(images, self.image_kind), self.embedder(self.tokenizer.decode_batch(caption_ids))
        )
        return torch.tensor([float(scores.sum()), float(len(scores))], device=images.device)
