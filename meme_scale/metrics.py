"""Evaluation metrics of DESIGN 4 as pure functions on tensors.

No data loading, no collectives, no tracking. Functions that evaluate a share of a split return
*sums* (``[correct, total]`` float32 tensors, or per-sample values) so that a distributed caller
adds them over ranks with one ``all_reduce_sum`` before dividing: the result is then the same for
any number of ranks. Random draws (latent samples, prior samples) come from torch's global
generator; callers that need reproducible numbers seed it (``torch.random.fork_rng`` +
``torch.manual_seed``), with a different seed per rank where ranks must draw different samples.

The ``model`` argument is anything with the sampling API of ``MultimodalVAE``: ``names``
(s, t), ``specs[name].kind/shape``, ``encode(m, x) -> (mu, sigma)``, ``decode(m, z)`` (the
likelihood's mean), ``cross_generate(src, dst, x, sample=True)`` and ``sample_prior(n)``.
The model is put in evaluation mode for the call and restored afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextmanager
def _eval_mode(*modules: nn.Module):
    states = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, state in zip(modules, states):
            m.train(state)


def _classify(classifier: nn.Module, x: Tensor) -> Tensor:
    """Argmax class of ``x`` under a frozen classifier, with ``x`` cast to the classifier's dtype/device."""
    p = next(classifier.parameters(), None)
    if p is not None and x.is_floating_point():
        x = x.to(device=p.device, dtype=p.dtype)
    return classifier(x).argmax(-1)


# -- coherence ---------------------------------------------------------------------------------
def cross_coherence_counts(
    model: nn.Module, src: str, dst: str, x_src: Tensor, labels: Tensor, classifier_dst: nn.Module
) -> Tensor:
    """Cross coherence src -> dst on one batch, as ``[correct, total]`` (float32, on ``labels``' device).

    For each sample: ``z ~ q(z | x_src)`` (one reparameterised sample), ``x_dst = d_dst(z)`` (the
    likelihood's mean), ``correct = [argmax classifier_dst(x_dst) == label]``. Coherence is
    ``sum(correct) / sum(total)`` over the whole split (after summing over ranks). Samples with
    ``label < 0`` (unlabelled) are left out of both counts.
    """
    labels = labels.long()
    keep = labels >= 0
    if not bool(keep.any()):
        return torch.zeros(2, device=labels.device)
    with _eval_mode(model, classifier_dst):
        generated = model.cross_generate(src, dst, x_src[keep.to(x_src.device)], sample=True)
        pred = _classify(classifier_dst, generated).to(labels.device)
    correct = (pred == labels[keep]).sum().float()
    return torch.stack([correct, keep.sum().float()])


def joint_coherence_counts(
    model: nn.Module, n: int, classifiers: Mapping[str, nn.Module] | Sequence[nn.Module], batch_size: int = 1024
) -> Tensor:
    """Joint coherence of ``n`` prior samples, as ``[agreeing, n]`` (float32).

    ``z ~ p(z)`` (the model's prior; the pseudo-sample mixture for MEME), decoded into both
    modalities (likelihood means); a sample counts when the two classifiers predict the same class.
    ``classifiers`` maps each modality name to its frozen classifier (or lists them in
    ``model.names`` order). Drawn in chunks of ``batch_size``.
    """
    s, t = model.names
    clf = dict(classifiers) if isinstance(classifiers, Mapping) else dict(zip(model.names, classifiers))
    if s not in clf or t not in clf:
        raise KeyError(f"joint coherence needs a classifier for {s!r} and {t!r}; got {sorted(clf)}")
    agree, device = 0, None
    with _eval_mode(model, clf[s], clf[t]):
        for start in range(0, n, batch_size):
            gen = model.sample_prior(min(batch_size, n - start))
            pred_s, pred_t = _classify(clf[s], gen[s]), _classify(clf[t], gen[t])
            agree += int((pred_s == pred_t.to(pred_s.device)).sum())
            device = pred_s.device
    return torch.tensor([float(agree), float(max(n, 0))], device=device)


# -- latent accuracy ---------------------------------------------------------------------------
def sample_latents(model: nn.Module, modality: str, x: Tensor) -> Tensor:
    """One reparameterised sample ``z = mu + sigma * eps`` of ``q(z | x)`` per example, float32 ``[B, L]``."""
    with _eval_mode(model):
        mu, sigma = model.encode(modality, x)
        return (mu + sigma * torch.randn_like(sigma)).float()


def latent_accuracy(
    train_z: Tensor,
    train_y: Tensor,
    test_z: Tensor,
    test_y: Tensor,
    epochs: int = 30,
    lr: float = 1e-3,
    seed: int = 0,
    batch_size: int = 128,
) -> float:
    """Test accuracy of a linear classifier on latent samples (DESIGN 4, latent accuracy).

    A linear map ``L -> C`` (``C = 1 + max label``) trained with Adam(lr) on the cross entropy of
    ``(train_z [N, L], train_y [N])`` for ``epochs`` passes in shuffled minibatches of
    ``batch_size`` (``batch_size <= 0``: full batch); returns the fraction of ``test_z`` rows whose
    argmax matches ``test_y``. Pass one latent sample per example (``sample_latents``). Samples
    with label < 0 are dropped. Depends only on the inputs and ``seed``; the caller's random
    stream is untouched.
    """
    train_z, test_z = train_z.detach().float(), test_z.detach().float().to(train_z.device)
    train_y, test_y = train_y.long().to(train_z.device), test_y.long().to(train_z.device)
    keep, keep_test = train_y >= 0, test_y >= 0
    train_z, train_y, test_z, test_y = train_z[keep], train_y[keep], test_z[keep_test], test_y[keep_test]
    if len(train_y) == 0 or len(test_y) == 0:
        raise ValueError(f"latent accuracy needs labelled train and test samples; got {len(train_y)} and {len(test_y)}")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / max(train_z.shape[1], 1) ** 0.5  # PyTorch's nn.Linear init, drawn from our own generator
    weight = ((torch.rand(train_z.shape[1], num_classes, generator=gen) * 2 - 1) * bound).to(train_z.device)
    bias = ((torch.rand(num_classes, generator=gen) * 2 - 1) * bound).to(train_z.device)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimiser = torch.optim.Adam([weight, bias], lr=lr)
    step = len(train_z) if batch_size <= 0 else batch_size
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(train_z), generator=gen).to(train_z.device)
            for start in range(0, len(train_z), step):
                idx = order[start : start + step]
                loss = F.cross_entropy(torch.addmm(bias, train_z[idx], weight), train_y[idx])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
    with torch.no_grad():
        return float((torch.addmm(bias, test_z, weight).argmax(-1) == test_y).float().mean())


# -- relatedness -------------------------------------------------------------------------------
def wasserstein2_gaussian(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Squared 2-Wasserstein distance between diagonal Gaussians, per sample: ``[...]`` from ``[..., L]``.

    ``W2^2(N(mu1, diag sigma1^2), N(mu2, diag sigma2^2)) = ||mu1 - mu2||^2 + ||sigma1 - sigma2||^2``
    (the closed form for commuting covariances; ``sigma`` are standard deviations). Computed in
    float32 or wider.
    """
    up = torch.promote_types(mu1.dtype, torch.float32)
    d_mu = mu1.to(up) - mu2.to(up)
    d_sigma = sigma1.to(up) - sigma2.to(up)
    return d_mu.pow(2).sum(-1) + d_sigma.pow(2).sum(-1)


def derangement(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A random permutation of ``range(n)`` with no fixed point (one cycle through a random order).

    ``perm[order[i]] = order[i + 1 mod n]`` for a uniformly random ``order``; for ``n < 2`` no
    derangement exists and the identity is returned (callers then have no mismatched pair).
    """
    if n < 2:
        return torch.arange(max(n, 0))
    order = torch.randperm(n, generator=generator)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


def relatedness(
    model: nn.Module, x_s: Tensor, x_t: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """W2 between the unimodal posteriors of matched and of mismatched pairs: ``(paired [B], mismatched [B])``.

    ``paired[i] = W2^2(q(z | s_i), q(z | t_i))`` and ``mismatched[i] = W2^2(q(z | s_i), q(z | t_perm[i]))``
    with ``perm`` a derangement drawn from ``generator`` (seed it for a fixed permutation; None:
    seed 0). A related model puts the matched pairs much closer than the mismatched ones. For
    ``B < 2`` the mismatched tensor is empty. Values are float32 on the model's device.
    """
    s, t = model.names
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    with _eval_mode(model):
        mu_s, sigma_s = model.encode(s, x_s)
        mu_t, sigma_t = model.encode(t, x_t)
    paired = wasserstein2_gaussian(mu_s, sigma_s, mu_t, sigma_t)
    n = mu_s.shape[0]
    if n < 2:
        return paired, paired.new_zeros(0)
    perm = derangement(n, generator).to(mu_t.device)
    return paired, wasserstein2_gaussian(mu_s, sigma_s, mu_t[perm], sigma_t[perm])


def relatedness_histogram_png(paired, mismatched, path: str | Path, bins: int = 50, title: str | None = None) -> Path:
    """Writes a PNG with overlaid histograms of paired and mismatched W2 values (shared bins); returns the path.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend state), so it works on
    headless machines and in worker processes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a, b = _as_numpy(paired).ravel(), _as_numpy(mismatched).ravel()
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    both = np.concatenate([a, b])
    edges = np.histogram_bin_edges(both if len(both) else np.zeros(1), bins=bins)
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for values, label, colour in ((a, "paired", "tab:blue"), (b, "mismatched", "tab:orange")):
        mean = f", mean {values.mean():.3g}" if len(values) else ""
        ax.hist(values, bins=edges, alpha=0.6, color=colour, label=f"{label} (n={len(values)}{mean})")
    ax.set_xlabel("squared 2-Wasserstein distance between q(z|s) and q(z|t)")
    ax.set_ylabel("count")
    ax.set_title(title or "relatedness")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# -- CCA coherence (CUB) -----------------------------------------------------------------------
@dataclass(frozen=True)
class CCA:
    """A fitted linear CCA: ``proj_x = (x - mean_x) @ w_x`` (``[D_x, k]``), likewise for y."""

    mean_a: np.ndarray
    w_a: np.ndarray
    mean_b: np.ndarray
    w_b: np.ndarray
    train_correlations: np.ndarray  # the k canonical correlations on the training pairs

    def transform(self, feat_a, feat_b) -> tuple[np.ndarray, np.ndarray]:
        return (_as_numpy(feat_a) - self.mean_a) @ self.w_a, (_as_numpy(feat_b) - self.mean_b) @ self.w_b

    def pair_scores(self, feat_a, feat_b) -> np.ndarray:
        """Per pair: cosine similarity of the two projections (the correlation of one pair in CCA space).

        Meaningful for ``k >= 2`` components (with one component it is only the sign agreement).
        """
        pa, pb = self.transform(feat_a, feat_b)
        norm = np.linalg.norm(pa, axis=1) * np.linalg.norm(pb, axis=1)
        return np.einsum("ij,ij->i", pa, pb) / np.maximum(norm, 1e-12)

    def correlations(self, feat_a, feat_b) -> np.ndarray:
        """Per canonical component: Pearson correlation of the projected pairs (needs >= 2 pairs)."""
        pa, pb = self.transform(feat_a, feat_b)
        pa, pb = pa - pa.mean(0), pb - pb.mean(0)
        norm = np.sqrt((pa**2).sum(0) * (pb**2).sum(0))
        return (pa * pb).sum(0) / np.maximum(norm, 1e-12)


def fit_cca(feat_a, feat_b, n_components: int, reg: float = 1e-4) -> CCA:
    """Regularised linear CCA of paired features ``feat_a [N, D_a]``, ``feat_b [N, D_b]``.

    With centred features, ``C_aa = cov(a) + r_a I``, ``C_bb = cov(b) + r_b I`` (``r = reg`` times
    the mean variance of that view, so the ridge is scale-free), ``C_ab = cov(a, b)``: the SVD
    ``C_aa^-1/2 C_ab C_bb^-1/2 = U S V^T`` gives ``w_a = C_aa^-1/2 U[:, :k]``,
    ``w_b = C_bb^-1/2 V[:, :k]`` and canonical correlations ``S[:k]``.
    """
    from scipy.linalg import eigh, svd

    a, b = _as_numpy(feat_a), _as_numpy(feat_b)
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b) or len(a) < 2:
        raise ValueError(f"CCA needs paired 2-D features with >= 2 rows; got {a.shape} and {b.shape}")
    k = int(n_components)
    if not 1 <= k <= min(a.shape[1], b.shape[1]):
        raise ValueError(f"n_components must be in [1, {min(a.shape[1], b.shape[1])}], got {n_components}")
    mean_a, mean_b = a.mean(0), b.mean(0)
    a, b = a - mean_a, b - mean_b
    n = len(a) - 1

    def inv_sqrt(c: np.ndarray) -> np.ndarray:
        c = c + reg * max(np.trace(c) / len(c), 1e-12) * np.eye(len(c))
        vals, vecs = eigh(c)
        return (vecs / np.sqrt(np.maximum(vals, 1e-12))) @ vecs.T

    ia, ib = inv_sqrt(a.T @ a / n), inv_sqrt(b.T @ b / n)
    u, s, vt = svd(ia @ (a.T @ b / n) @ ib, full_matrices=False)
    return CCA(mean_a, ia @ u[:, :k], mean_b, ib @ vt[:k].T, s[:k])


def cca_coherence(feat_a, feat_b, n_components: int, test_a=None, test_b=None, reg: float = 1e-4) -> float:
    """CCA coherence: fit ``fit_cca`` on the paired training features ``(feat_a, feat_b)``, then return the
    mean per-pair correlation (``CCA.pair_scores``) of the test pairs ``(test_a, test_b)`` (default: the
    training pairs). ~1 for linearly related features, ~0 for independent ones.

    For CUB (DESIGN 4): ``feat_a`` image features and ``feat_b`` sentence embeddings of real training
    pairs; test pairs are (real image, embedding of the caption generated from it), (generated image,
    real caption) or a prior sample's two generations. To score many sets against one fit, or to sum
    scores over ranks, call ``fit_cca`` once and ``pair_scores`` per set (sum and count).
    """
    cca = fit_cca(feat_a, feat_b, n_components, reg)
    if test_a is None and test_b is None:
        test_a, test_b = feat_a, feat_b
    elif test_a is None or test_b is None:
        raise ValueError("pass both test_a and test_b, or neither")
    return float(cca.pair_scores(test_a, test_b).mean())


# -- gathering rows with a sum-reduction ---------------------------------------------------------
def pack_rows(local: Tensor, rank: int, world_size: int, capacity: int) -> Tensor:
    """A zero buffer ``[world_size * capacity, D + 1]`` (float32) with ``local [n, D]`` or ``[n]`` in its rank slot.

    The last column is 1 on real rows. Summing the buffers of all ranks (``all_reduce_sum``)
    gathers every rank's rows; ``unpack_rows`` reads them back in rank order. Rows beyond
    ``capacity`` are dropped; every rank must pass the same ``capacity`` and ``D``.
    """
    local = local.detach().float()
    local = (local[:, None] if local.dim() == 1 else local.flatten(1))[:capacity]  # [n] -> [n, 1]
    buffer = torch.zeros(world_size * capacity, local.shape[1] + 1, device=local.device)
    start = rank * capacity
    buffer[start : start + len(local), :-1] = local
    buffer[start : start + len(local), -1] = 1.0
    return buffer


def unpack_rows(buffer: Tensor) -> Tensor:
    """The real rows of a summed ``pack_rows`` buffer, ``[n_total, D]``."""
    return buffer[buffer[:, -1] > 0.5, :-1]


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)
