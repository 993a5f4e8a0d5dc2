"""Evaluation metrics: coherence on models with known answers, latent accuracy, W2 relatedness, CCA.

The "models" here are stubs with the sampling API of ``MultimodalVAE``; they stand for trained
models whose coherence is known (perfect, or random), while the classifiers are real ones trained
on a toy set of 10 prototype images per modality.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from meme_scale.classifiers import DigitClassifier, evaluate_classifier, train_classifier
from meme_scale.metrics import (
    cca_coherence,
    cross_coherence_counts,
    derangement,
    fit_cca,
    joint_coherence_counts,
    latent_accuracy,
    pack_rows,
    relatedness,
    relatedness_histogram_png,
    sample_latents,
    unpack_rows,
    wasserstein2_gaussian,
)
from meme_scale.models import MEME, ModalitySpec

SHAPES = {"s": (1, 28, 28), "t": (1, 8, 8)}  # the quickstart's modality shapes
CLASSES = 10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks: one intra-op thread is faster and steady on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prototypes(shape, seed):
    return (torch.rand(CLASSES, *shape, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


PROTOS = {"s": prototypes(SHAPES["s"], 1), "t": prototypes(SHAPES["t"], 2)}


def toy_set(name, n, seed, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (n,), generator=g)
    images = (PROTOS[name][labels] + noise * torch.randn(n, *SHAPES[name], generator=g)).clamp(0, 1)
    return images, labels


@pytest.fixture(scope="module")
def classifiers():
    out = {}
    for name in SHAPES:
        x, y = toy_set(name, 500, seed=10)
        out[name], _ = train_classifier(x, y, CLASSES, epochs=3, batch_size=32, seed=0)
        # The measuring instrument is exact on the clean prototypes the stub models decode to.
        assert evaluate_classifier(out[name], PROTOS[name], torch.arange(CLASSES)) == 1.0
    return out


class StubModel(nn.Module):
    """Stands for a trained model. Encoders read the class of a toy image (nearest prototype) into a
    one-hot latent; a ``perfect`` decoder draws the clean prototype of the latent's class, a ``random``
    decoder the prototype of a random class, whatever the latent."""

    def __init__(self, decoder="perfect", sigma=0.05):
        super().__init__()
        self.names = ["s", "t"]
        self.specs = {n: SimpleNamespace(kind="image", shape=SHAPES[n]) for n in self.names}
        self.decoder, self.sigma = decoder, sigma
        self.anchor = nn.Parameter(torch.zeros(()))  # a parameter, like any model

    def encode(self, modality, x):
        cls = torch.cdist(x.flatten(1), PROTOS[modality].flatten(1)).argmin(1)
        mu = 4.0 * F.one_hot(cls, CLASSES).float()
        return mu, torch.full_like(mu, self.sigma)

    def decode(self, modality, z):
        cls = torch.randint(CLASSES, z.shape[:1]) if self.decoder == "random" else z.argmax(-1)
        return PROTOS[modality][cls]

    def cross_generate(self, src, dst, x, sample=True):
        mu, sigma = self.encode(src, x)
        return self.decode(dst, mu + sigma * torch.randn_like(mu) if sample else mu)

    def sample_prior(self, n):
        z = 4.0 * F.one_hot(torch.randint(CLASSES, (n,)), CLASSES).float() + self.sigma * torch.randn(n, CLASSES)
        return {name: self.decode(name, z) for name in self.names}


def _binomial_tolerance(n, p=1 / CLASSES, sds=4.5):
    """|observed - p| for a Binomial(n, p) fraction stays within ``sds`` standard deviations."""
    return sds * math.sqrt(p * (1 - p) / n)


# -- coherence ---------------------------------------------------------------------------------
@pytest.mark.parametrize("src,dst", [("s", "t"), ("t", "s")])
def test_cross_coherence_of_a_perfect_model_is_one(classifiers, src, dst):
    torch.manual_seed(0)
    x, y = toy_set(src, 600, seed=20)
    correct, total = cross_coherence_counts(StubModel(), src, dst, x, y, classifiers[dst]).tolist()
    assert (correct, total) == (600.0, 600.0)


def test_cross_coherence_of_a_random_model_is_chance(classifiers):
    torch.manual_seed(0)
    n = 2000
    x, y = toy_set("s", n, seed=21)
    correct, total = cross_coherence_counts(StubModel("random"), "s", "t", x, y, classifiers["t"]).tolist()
    assert total == n
    # Decodings are random prototypes the classifier reads exactly: correct/n ~ Binomial(n, 0.1)/n, sd 0.0067.
    assert abs(correct / n - 0.1) < _binomial_tolerance(n)


def test_cross_coherence_counts_add_up_over_ranks(classifiers):
    """Each rank's [correct, total] summed = the whole split's; unlabelled samples count nowhere."""
    torch.manual_seed(0)
    x, y = toy_set("t", 300, seed=22)
    y = y.clone()
    y[::7] = -1
    shares = [cross_coherence_counts(StubModel(), "t", "s", x[r::3], y[r::3], classifiers["s"]) for r in range(3)]
    whole = cross_coherence_counts(StubModel(), "t", "s", x, y, classifiers["s"])
    torch.testing.assert_close(sum(shares), whole)
    assert whole.tolist() == [float((y >= 0).sum())] * 2
    empty = cross_coherence_counts(StubModel(), "t", "s", x[:3], torch.full((3,), -1), classifiers["s"])
    assert empty.tolist() == [0.0, 0.0]


def test_joint_coherence(classifiers):
    torch.manual_seed(0)
    agree, n = joint_coherence_counts(StubModel(), 700, classifiers, batch_size=256).tolist()
    assert (agree, n) == (700.0, 700.0)
    n = 2000
    agree, total = joint_coherence_counts(StubModel("random"), n, [classifiers["s"], classifiers["t"]]).tolist()
    assert total == n and abs(agree / n - 0.1) < _binomial_tolerance(n)
    with pytest.raises(KeyError, match="classifier for"):
        joint_coherence_counts(StubModel(), 10, {"s": classifiers["s"]})


def test_metrics_run_on_a_real_meme_model():
    """The real model API (bf16-free CPU MEME, untrained) fits the metrics; train mode is restored."""
    torch.manual_seed(0)
    specs = [ModalitySpec("s", "image", SHAPES["s"], "small_mlp"), ModalitySpec("t", "image", SHAPES["t"], "small_mlp")]
    model = MEME(specs, latent_dim=8, pseudo_samples=4).train()
    clf = {n: DigitClassifier(SHAPES[n], CLASSES).eval() for n in SHAPES}
    xs, ys = toy_set("s", 32, seed=30)
    xt, _ = toy_set("t", 32, seed=31)
    correct, total = cross_coherence_counts(model, "s", "t", xs, ys, clf["t"]).tolist()
    assert total == 32 and 0 <= correct <= 32
    agree, n = joint_coherence_counts(model, 16, clf).tolist()
    assert n == 16 and 0 <= agree <= 16
    paired, mismatched = relatedness(model, xs, xt)
    assert paired.shape == mismatched.shape == (32,) and bool((paired >= 0).all())
    assert sample_latents(model, "t", xt).shape == (32, 8)
    assert model.training


# -- latent accuracy ---------------------------------------------------------------------------
def _latents(n, seed, separable, dim=16):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(CLASSES, (n,), generator=g)
    means = 3.0 * torch.randn(CLASSES, dim, generator=torch.Generator().manual_seed(99))
    z = torch.randn(n, dim, generator=g)
    return (means[y] + 0.1 * z if separable else z), y


def test_latent_accuracy_of_separable_latents_is_one():
    (zr, yr), (ze, ye) = _latents(1000, 0, True), _latents(500, 1, True)
    assert latent_accuracy(zr, yr, ze, ye) == 1.0


def test_latent_accuracy_of_noise_is_chance():
    n_test = 1000
    (zr, yr), (ze, ye) = _latents(1000, 2, False), _latents(n_test, 3, False)
    # Test labels are independent of everything the classifier saw: accuracy ~ Binomial(n_test, 0.1)/n_test.
    assert abs(latent_accuracy(zr, yr, ze, ye) - 0.1) < _binomial_tolerance(n_test)


def test_latent_accuracy_is_seeded_and_leaves_global_rng_alone():
    (zr, yr), (ze, ye) = _latents(300, 4, True), _latents(300, 5, True)
    zr = zr + 2.0 * torch.randn(zr.shape, generator=torch.Generator().manual_seed(6))  # not trivially separable
    torch.manual_seed(3)
    before = torch.rand(2)
    torch.manual_seed(3)
    a = latent_accuracy(zr, yr, ze, ye, epochs=3, batch_size=0)  # full batch
    assert torch.equal(torch.rand(2), before)
    assert a == latent_accuracy(zr, yr, ze, ye, epochs=3, batch_size=0)


# -- relatedness -------------------------------------------------------------------------------
def test_wasserstein2_closed_form():
    mu, sigma = torch.randn(5, 4), torch.rand(5, 4) + 0.1
    assert torch.equal(wasserstein2_gaussian(mu, sigma, mu, sigma), torch.zeros(5))
    # ||(0,0) - (3,4)||^2 + ||(1,1) - (2,3)||^2 = 25 + (1 + 4) = 30
    hand = wasserstein2_gaussian(
        torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([3.0, 4.0]), torch.tensor([2.0, 3.0])
    )
    assert hand.item() == 30.0
    mu2, sigma2 = torch.randn(5, 4), torch.rand(5, 4) + 0.1
    w = wasserstein2_gaussian(mu, sigma, mu2, sigma2)
    torch.testing.assert_close(w, wasserstein2_gaussian(mu2, sigma2, mu, sigma))
    torch.testing.assert_close(w, ((mu - mu2) ** 2 + (sigma - sigma2) ** 2).sum(-1))
    low = [v.bfloat16() for v in (mu, sigma, mu2, sigma2)]
    assert wasserstein2_gaussian(*low).dtype == torch.float32


def test_derangement_has_no_fixed_point():
    for n in range(2, 40):
        perm = derangement(n, torch.Generator().manual_seed(n))
        assert sorted(perm.tolist()) == list(range(n)) and bool((perm != torch.arange(n)).all())
    fixed = [derangement(10, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(*fixed)
    assert derangement(1).tolist() == [0]


def test_relatedness_separates_pairs_and_draws_histogram(tmp_path):
    xs, ys = toy_set("s", 400, seed=40)
    xt = toy_set("t", 400, seed=41)[0]
    xt = (PROTOS["t"][ys] + 0.3 * torch.randn(xt.shape, generator=torch.Generator().manual_seed(42))).clamp(0, 1)
    paired, mismatched = relatedness(StubModel(), xs, xt, torch.Generator().manual_seed(0))
    assert paired.shape == mismatched.shape == (400,)
    assert paired.max().item() == 0.0  # same class -> same posterior in the stub
    # Different classes: one-hot means 4 apart in two coordinates -> 32; ~90% of shuffled pairs differ.
    assert set(mismatched.unique().tolist()) <= {0.0, 32.0} and mismatched.mean().item() > 0.8 * 32
    again = relatedness(StubModel(), xs, xt, torch.Generator().manual_seed(0))[1]
    assert torch.equal(again, mismatched)  # fixed permutation
    assert relatedness(StubModel(), xs[:1], xt[:1])[1].numel() == 0

    path = relatedness_histogram_png(paired, mismatched, tmp_path / "plots" / "relatedness.png", title="test")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (600, 400)
    relatedness_histogram_png(paired.numpy(), [], tmp_path / "only_paired.png")  # empty side is fine


# -- CCA coherence -----------------------------------------------------------------------------
def _features(n, seed, related):
    g = np.random.default_rng(seed)
    a = g.normal(size=(n, 12)) @ g.normal(size=(12, 12))  # correlated dimensions
    mix = np.random.default_rng(7).normal(size=(12, 8))  # the same linear map for train and test
    b = a @ mix + 5.0 if related else g.normal(size=(n, 8))
    return a, b


def test_cca_coherence_of_linearly_related_features_is_one():
    (a, b), (ta, tb) = _features(2000, 0, True), _features(500, 1, True)
    assert cca_coherence(a, b, 5, ta, tb) > 0.99
    assert cca_coherence(torch.tensor(a), torch.tensor(b) * 1000.0, 5, ta, tb * 1000.0) > 0.99  # scale-free ridge
    np.testing.assert_allclose(fit_cca(a, b, 5).train_correlations, 1.0, atol=1e-3)


def test_cca_coherence_of_independent_features_is_zero():
    (a, b), (ta, tb) = _features(2000, 2, False), _features(2000, 3, False)
    # Per-pair cosines of 5-d projections: variance ~1/5 each, so the mean of 2000 has sd ~0.01.
    assert abs(cca_coherence(a, b, 5, ta, tb)) < 0.05
    assert np.abs(fit_cca(a, b, 5).correlations(ta, tb)).max() < 0.1  # per component, sd ~1/sqrt(2000)


def test_cca_known_correlation_and_errors():
    g = np.random.default_rng(4)
    x = g.normal(size=(20000, 1))
    a = np.hstack([x, g.normal(size=(20000, 3))])
    b = np.hstack([x + g.normal(size=(20000, 1)), g.normal(size=(20000, 2))])  # corr(x, x + e) = 1/sqrt(2)
    cca = fit_cca(a[:10000], b[:10000], 1)
    assert abs(abs(cca.correlations(a[10000:], b[10000:])[0]) - 2**-0.5) < 0.03
    assert 0 < cca_coherence(a, b, 1) <= 1
    with pytest.raises(ValueError, match="n_components"):
        fit_cca(a, b, 4)
    with pytest.raises(ValueError, match="paired"):
        fit_cca(a, b[:-1], 1)
    with pytest.raises(ValueError, match="both"):
        cca_coherence(a, b, 1, test_a=a)


# -- gathering through a sum -------------------------------------------------------------------
def test_pack_rows_gathers_through_a_sum():
    world, capacity = 3, 4
    locals_ = [torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) + 100 * r for r, n in enumerate((4, 0, 2))]
    total = sum(pack_rows(rows, r, world, capacity) for r, rows in enumerate(locals_))
    torch.testing.assert_close(unpack_rows(total), torch.cat(locals_))
    assert unpack_rows(pack_rows(torch.ones(9, 2), 0, 1, capacity)).shape == (4, 2)  # capped
