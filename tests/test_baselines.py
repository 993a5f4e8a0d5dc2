"""The baselines (MVAE, MMVAE, MoPoE) against independent computations, and MEME's interface contract."""

import logging
import math
import re

import pytest
import torch
from torch import distributions as D

from meme_scale import objectives as obj
from meme_scale.config import ConfigError, load_config
from meme_scale.models import MMVAE, MODELS, MVAE, ModalitySpec, MoPoE, build_model, modality_specs
from meme_scale.models.baselines import available_subsets, nonempty_subsets
from meme_scale.models.recipes import Recipe, kl_schedule, paper_recipe, resolve_recipe

QUICKSTART = [
    ModalitySpec("mnist", "image", (1, 28, 28), "mnist_mlp"),
    ModalitySpec("digits", "image", (1, 8, 8), "small_mlp"),
]
B, L, DA, DB = 6, 3, 5, 4
PATTERNS = {"paired": (True, True), "s_only": (True, False), "t_only": (False, True)}


@pytest.fixture(autouse=True)
def _float32_default():
    """test_objectives sets float64 as the default at import; these tests choose their dtypes themselves."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


def _mixed_observed(n: int) -> torch.Tensor:
    """Rows: first half paired, then alternately s-only and t-only."""
    obs = torch.ones(n, 2, dtype=torch.bool)
    for i in range(n // 2, n):
        obs[i, 1 - (i - n // 2) % 2] = False  # s-only, t-only, s-only, ...
    return obs


def _batch(n, observed, seed=0):
    """A quickstart-shaped batch; unobserved entries are NaN so any use of them shows."""
    g = torch.Generator().manual_seed(seed)
    batch = {"mnist": torch.rand(n, 1, 28, 28, generator=g), "digits": torch.rand(n, 1, 8, 8, generator=g)}
    batch["mnist"][~observed[:, 0]] = float("nan")
    batch["digits"][~observed[:, 1]] = float("nan")
    return {**batch, "observed": observed}


def _quickstart_model(name):
    torch.manual_seed(0)
    return MMVAE(QUICKSTART, latent_dim=8, k=3) if name == "mmvae" else MODELS[name](QUICKSTART, latent_dim=8)


# -- tiny linear networks in float64 for the hand-checkable cases --------------------------------
class LinearGaussian(torch.nn.Module):
    """A linear encoder; ``sigma_scale`` shrinks sigma towards 0 for the deterministic limit."""

    def __init__(self, d_in, seed, sigma_scale=1.0):
        super().__init__()
        self.net = _linear(d_in, 2 * L, seed)
        self.sigma_scale = sigma_scale

    def forward(self, x):
        mu, raw = self.net(x).chunk(2, -1)
        return mu, self.sigma_scale * (torch.nn.functional.softplus(raw) + 0.1)


def _linear(d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(d_in, d_out).double()
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return lin


def _linear_model(cls, sigma_scale=1.0, **kw):
    specs = [ModalitySpec(m, "vector", (d,), "small_mlp", hidden=(4,)) for m, d in (("a", DA), ("b", DB))]
    model = cls(specs, latent_dim=L, **kw)
    for i, (name, d) in enumerate((("a", DA), ("b", DB))):
        model.encoders[name] = LinearGaussian(d, 10 + i, sigma_scale)
        model.decoders[name] = _linear(L, d, 20 + i)
    return model.double()


def _linear_batch(observed):
    g = torch.Generator().manual_seed(3)
    batch = {
        "a": torch.rand(len(observed), DA, generator=g, dtype=torch.float64),
        "b": torch.rand(len(observed), DB, generator=g, dtype=torch.float64),
    }
    batch["a"][~observed[:, 0]] = float("nan")
    batch["b"][~observed[:, 1]] = float("nan")
    return {**batch, "observed": observed}


# -- generic maths ------------------------------------------------------------------------------
def test_product_of_experts_is_the_precision_weighted_product():
    # by hand: N(0, 1) x N(2, 1) = N(1, 1/2); with the prior expert N(0, 1) too: N(2/3, 1/3)
    mus, sigmas = torch.tensor([[0.0], [2.0]]), torch.ones(2, 1)
    mu, sigma = obj.product_of_experts(mus, sigmas, prior=False)
    torch.testing.assert_close((mu, sigma.pow(2)), (torch.tensor([1.0]), torch.tensor([0.5])))
    mu, sigma = obj.product_of_experts(mus, sigmas, prior=True)
    torch.testing.assert_close((mu, sigma.pow(2)), (torch.tensor([2 / 3]), torch.tensor([1 / 3])))
    mus, sigmas = torch.randn(3, 4, 5), torch.rand(3, 4, 5) + 0.1
    mus_p, sigmas_p = torch.cat([mus, torch.zeros(1, 4, 5)]), torch.cat([sigmas, torch.ones(1, 4, 5)])
    precision = sigmas_p.pow(-2)
    mu, sigma = obj.product_of_experts(mus, sigmas)
    torch.testing.assert_close(mu, (mus_p * precision).sum(0) / precision.sum(0))
    torch.testing.assert_close(sigma.pow(2), 1 / precision.sum(0))


def test_subsets_enumerated_and_matched_to_the_observation_pattern():
    assert nonempty_subsets(["s", "t"]) == [("s",), ("t",), ("s", "t")]
    three = nonempty_subsets(["a", "b", "c"])
    assert len(three) == 7 and three[-1] == ("a", "b", "c") and len(set(three)) == 7
    observed = torch.tensor([[1, 1], [1, 0], [0, 1]]).bool()
    avail = available_subsets(nonempty_subsets(["s", "t"]), ["s", "t"], observed)
    assert avail.T.tolist() == [[True, True, True], [True, False, False], [False, True, False]]
    assert MoPoE(QUICKSTART, latent_dim=4).subsets == [("mnist",), ("digits",), ("mnist", "digits")]


def test_dreg_gradient_matches_the_closed_form_on_a_gaussian():
    """log w = log N(z; m0, 1) - log q(z) with q = N(mu, sigma^2) detached: d log w / dz = m0 - z + eps / sigma."""
    torch.manual_seed(0)
    mu, log_sigma = torch.tensor([0.3, -0.2], requires_grad=True), torch.tensor([0.1, -0.4], requires_grad=True)
    m0, sigma = torch.tensor([1.0, 0.5]), log_sigma.exp()
    eps = torch.randn(7, 2)
    z = mu + sigma * eps
    log_w = D.Normal(m0, 1.0).log_prob(z).sum(-1) - D.Normal(mu.detach(), sigma.detach()).log_prob(z).sum(-1)
    value = obj.dreg_bound(log_w, z)
    torch.testing.assert_close(value, obj.iwae_bound(log_w.detach()))
    g_mu, g_log_sigma = torch.autograd.grad(value, [mu, log_sigma])
    w2 = torch.softmax(log_w.detach(), 0).pow(2)[:, None]
    dlw_dz = (m0 - z + eps / sigma).detach()
    torch.testing.assert_close(g_mu, (w2 * dlw_dz).sum(0))
    torch.testing.assert_close(g_log_sigma, (w2 * dlw_dz * sigma.detach() * eps).sum(0))


# -- MVAE and MoPoE against a per-sample torch.distributions reference ---------------------------
def _reference_subset_loss(model, batch, prior, explain_all, average, weights=None, beta=1.0):
    """The PoE by the direct precision formula, one sample at a time, replaying the model's noise
    (one ``randn(rows, L)`` per subset, in the order (a), (b), (a, b)); sigma -> 0 makes z = mu_S.
    ``prior``: True (every product), "full" (the product of both only) or False; ``weights`` per
    modality multiply log p(x_m|z) and ``beta`` the KL."""
    observed = batch["observed"]
    weights = weights or {"a": 1.0, "b": 1.0}
    subsets = [("a",), ("b",), ("a", "b")]
    rows_of = {S: [r for r in range(len(observed)) if all(observed[r, "ab".index(m)] for m in S)] for S in subsets}
    eps = {S: torch.randn(len(rows_of[S]), L, dtype=torch.float64) for S in subsets if rows_of[S]}
    elbos = {r: [] for r in range(len(observed))}
    for S in subsets:
        with_prior = prior is True or (prior == "full" and len(S) == 2)
        for j, r in enumerate(rows_of[S]):
            experts = [model.encoders[m](batch[m][r : r + 1]) for m in S]
            precision = sum(sigma.pow(-2) for _, sigma in experts) + (1.0 if with_prior else 0.0)
            mu = sum(mu_m * sigma_m.pow(-2) for mu_m, sigma_m in experts) / precision
            q = D.Normal(mu, precision.rsqrt())
            z = mu + precision.rsqrt() * eps[S][j]
            targets = [m for m in "ab" if observed[r, "ab".index(m)]] if explain_all else S
            log_px = sum(
                weights[m] * D.Laplace(model.decoders[m](z), 1.0).log_prob(batch[m][r : r + 1]).sum() for m in targets
            )
            elbos[r].append(log_px - beta * D.kl_divergence(q, D.Normal(0.0, 1.0)).sum())
    per_row = [sum(e) / len(e) if average else sum(e) for e in elbos.values()]
    return -sum(per_row) / len(observed)


@pytest.mark.parametrize("sigma_scale", [1e-8, 1.0])
@pytest.mark.parametrize("cls, prior, explain_all, average", [(MVAE, True, False, False), (MoPoE, False, True, True)])
def test_subset_elbo_matches_reference(cls, prior, explain_all, average, sigma_scale):
    model = _linear_model(cls, sigma_scale=sigma_scale)
    batch = _linear_batch(_mixed_observed(B))
    torch.manual_seed(5)
    loss, terms = model.loss(batch)
    torch.manual_seed(5 if sigma_scale == 1.0 else 6)  # the deterministic limit needs no replayed noise
    expected = _reference_subset_loss(model, batch, prior, explain_all, average)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-9)
    assert terms["elbo_a_and_b"][1] == 3 and terms["elbo_a"][1] == 5 and terms["elbo_b"][1] == 4
    torch.testing.assert_close(terms["bound"][0] / terms["bound"][1], -loss.float())


def test_mvae_encodes_a_single_modality_as_its_product_with_the_prior():
    model = _linear_model(MVAE)
    x = _linear_batch(torch.ones(B, 2, dtype=torch.bool))["a"]
    mu_e, sigma_e = model.encoders["a"](x)
    mu, sigma = model.encode("a", x)
    torch.testing.assert_close(sigma, (1 + sigma_e.pow(-2)).rsqrt())
    torch.testing.assert_close(mu, mu_e * sigma_e.pow(-2) * sigma.pow(2))


# -- MMVAE --------------------------------------------------------------------------------------
def _reference_mmvae_log_w(model, batch, k, detach_q=False, weights=(1.0, 1.0)):
    """log w ``[K, M, B]`` with a torch.distributions mixture, replaying the model's noise draw."""
    eps = torch.randn(k, 2, B, L, dtype=torch.float64)
    enc = [model.encoders[m](batch[m]) for m in "ab"]
    q_mu, q_sigma = (torch.stack([e[i].detach() if detach_q else e[i] for e in enc], 1) for i in (0, 1))
    q_moe = D.MixtureSameFamily(
        D.Categorical(torch.ones(B, 2, dtype=torch.float64)), D.Independent(D.Normal(q_mu, q_sigma), 1)
    )
    log_ws = []
    for i, (mu, sigma) in enumerate(enc):
        z = mu + sigma * eps[:, i]
        log_px = sum(w * D.Laplace(model.decoders[m](z), 1.0).log_prob(batch[m]).sum(-1) for w, m in zip(weights, "ab"))
        log_ws.append(D.Normal(0.0, 1.0).log_prob(z).sum(-1) + log_px - q_moe.log_prob(z))
    return torch.stack(log_ws, 1)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_mmvae_bound_matches_reference_given_the_same_noise(k, estimator):
    """Stratified bound 1/M sum_m logmeanexp_k log w_mk; with K = 1 it is the stratified ELBO estimator."""
    model = _linear_model(MMVAE, k=k, estimator=estimator)
    batch = _linear_batch(torch.ones(B, 2, dtype=torch.bool))
    torch.manual_seed(4)
    loss, _ = model.loss(batch)
    torch.manual_seed(4)
    log_w = _reference_mmvae_log_w(model, batch, k)
    torch.testing.assert_close(loss, -(torch.logsumexp(log_w, 0) - math.log(k)).mean(0).mean())


def test_dreg_and_iwae_share_value_and_decoder_gradient_but_not_encoder_gradient():
    model = _linear_model(MMVAE, k=5)
    batch = _linear_batch(torch.ones(B, 2, dtype=torch.bool))
    names, params = zip(*model.named_parameters())
    results = {}
    for estimator in ("iwae", "dreg"):
        model.estimator = estimator
        torch.manual_seed(9)
        loss, _ = model.loss(batch)
        results[estimator] = (loss, torch.autograd.grad(loss, params))
    (v_iwae, g_iwae), (v_dreg, g_dreg) = results["iwae"], results["dreg"]
    torch.testing.assert_close(v_iwae, v_dreg)
    encoder = [i for i, n in enumerate(names) if n.startswith("encoders")]
    for i, name in enumerate(names):
        if name.startswith("decoders"):
            torch.testing.assert_close(g_iwae[i], g_dreg[i])
    assert max((g_iwae[i] - g_dreg[i]).abs().max() for i in encoder) > 1e-4
    # DReG's encoder gradient: -(1/(M B)) sum w~^2 d log w / dz dz/dphi, q's parameters held constant
    torch.manual_seed(9)
    log_w = _reference_mmvae_log_w(model, batch, 5, detach_q=True)
    surrogate = -(torch.softmax(log_w.detach(), 0).pow(2) * log_w).sum(0).mean()
    expected = torch.autograd.grad(surrogate, [params[i] for i in encoder])
    for i, g in zip(encoder, expected):
        torch.testing.assert_close(g_dreg[i], g)


def test_mmvae_ignores_unpaired_samples_and_says_so(caplog):
    model = _quickstart_model("mmvae")
    observed = _mixed_observed(8)
    batch = _batch(8, observed)
    with caplog.at_level(logging.WARNING, logger="meme_scale.models.baselines"):
        torch.manual_seed(2)
        mixed, terms = model.loss(batch)
        model.loss(batch)
    torch.manual_seed(2)
    paired_only, _ = model.loss({k: v[:4] for k, v in batch.items()})
    torch.testing.assert_close(mixed * 8, paired_only * 4)
    assert terms["ignored_unpaired"].tolist() == [4, 8] and terms["bound"][1] == 4
    assert sum("paired samples only" in r.message for r in caplog.records) == 1


# -- training recipes (models/recipes.py) -------------------------------------------------------
MNIST_SVHN = [
    ModalitySpec("mnist", "image", (1, 28, 28), "mnist_mlp"),
    ModalitySpec("svhn", "image", (3, 32, 32), "svhn_conv"),
]
CUB_RAW = [
    ModalitySpec("image", "image", (3, 64, 64), "svhn_conv"),
    ModalitySpec("caption", "caption", (32,), "caption_cnn"),
]


def test_paper_recipes_follow_the_reference_code():
    # MMVAE (iffsid/mmvae README): "MNIST scaling factor 32*32*3/28*28*1 = 3.92", "Image scaling factor
    # 32/64*64*3 = 0.0026" for CUB: the first modality's likelihood scaled to the second's dimension
    assert paper_recipe("mmvae", MNIST_SVHN).likelihood_weights == pytest.approx((3.92, 1.0), abs=5e-3)
    assert paper_recipe("mmvae", CUB_RAW).likelihood_weights == pytest.approx((0.0026, 1.0), abs=5e-5)
    assert paper_recipe("mmvae", MNIST_SVHN).kl_warmup == 0 and load_config(None, []).model.mmvae_k == 30
    # MoPoE (thomassutter/MoPoE): rec weight = numel(svhn) / numel(m), beta 2.5, prior expert in the full set
    mopoe = paper_recipe("mopoe", MNIST_SVHN)
    assert mopoe.likelihood_weights == pytest.approx((3072 / 784, 1.0)) and mopoe.kl_weight == 2.5
    assert mopoe.full_set_prior_expert and mopoe.kl_warmup == 0
    # MVAE (mhw32/multimodal-vae-public): lambda 10 on the low-dimensional modality, KL annealed over 200 of 500 epochs
    mvae = paper_recipe("mvae", QUICKSTART)
    assert mvae.likelihood_weights == (1.0, 10.0) and mvae.kl_warmup == 0.4 and mvae.kl_weight == 1.0
    assert paper_recipe("mvae", [QUICKSTART[0], QUICKSTART[0]]).likelihood_weights == (1.0, 1.0)  # no smaller one


def test_kl_warmup_is_linear_per_step_then_constant():
    # the reference: (batch_idx + epoch * N + 1) / (annealing_epochs * N) until it reaches 1
    assert kl_schedule(0, 1000, 0.4) == 1 / 400
    assert kl_schedule(199, 1000, 0.4) == 0.5
    assert kl_schedule(399, 1000, 0.4) == 1.0 and kl_schedule(999, 1000, 0.4) == 1.0
    assert kl_schedule(9, 1000, 0.4, weight=2.5) == 2.5 * 10 / 400
    assert kl_schedule(0, 1000, 0.0, weight=2.5) == 2.5  # no warm-up


def _model_cfg(*overrides):
    return load_config(None, list(overrides)).model


def test_recipe_resolution_from_config_and_its_errors():
    assert resolve_recipe(_model_cfg("model.name=mvae"), QUICKSTART) == paper_recipe("mvae", QUICKSTART)
    assert resolve_recipe(_model_cfg("model.name=mopoe", "model.recipe=plain"), QUICKSTART) == Recipe()
    knobs = resolve_recipe(
        _model_cfg("model.name=mvae", "model.kl_warmup=0.1", "model.likelihood_weights=[2, 3]"), QUICKSTART
    )
    assert (knobs.kl_warmup, knobs.kl_weight, knobs.likelihood_weights) == (0.1, 1.0, (2.0, 3.0))
    assert resolve_recipe(_model_cfg("model.name=mopoe", "model.kl_weight=1"), QUICKSTART).kl_weight == 1.0
    bad = {
        ("model.name=mmvae", "model.kl_warmup=0.2"): "model.kl_warmup does not apply to model 'mmvae'",
        ("model.name=meme", "model.likelihood_weights=[1, 1]"): "model.likelihood_weights does not apply",
        ("model.name=mvae", "model.likelihood_weights=[1]"): "one positive weight per modality",
        ("model.name=mvae", "model.likelihood_weights=[1, 0]"): "one positive weight per modality",
        ("model.name=mvae", "model.kl_warmup=1.5"): "model.kl_warmup must be a fraction",
        ("model.name=mopoe", "model.kl_weight=-2"): "model.kl_weight must be >= 0",
    }
    for overrides, message in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            build_model(_model_cfg(*overrides), QUICKSTART)
    with pytest.raises(ConfigError, match="'model.recipe' must be one of"):
        load_config(None, ["model.recipe=authors"])


@pytest.mark.parametrize("cls, prior, explain_all, average", [(MVAE, True, False, False), (MoPoE, "full", True, True)])
def test_recipe_weighs_likelihoods_and_kl_in_training_and_evaluation_reports_the_bound(
    cls, prior, explain_all, average
):
    recipe = Recipe((2.0, 0.5), kl_weight=3.0, kl_warmup=0.5, full_set_prior_expert=cls is MoPoE)
    model = _linear_model(cls, recipe=recipe)
    batch = _linear_batch(_mixed_observed(B))
    model.set_step(9, 100)  # 10 of 50 warm-up steps: KL weight 3 * 10 / 50
    torch.manual_seed(5)
    loss, terms = model.loss(batch)
    torch.manual_seed(5)
    expected = _reference_subset_loss(model, batch, prior, explain_all, average, {"a": 2.0, "b": 0.5}, beta=0.6)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-9)
    assert terms["kl_weight"].tolist() == pytest.approx([0.6 * B, B])
    torch.manual_seed(5)
    bound = -_reference_subset_loss(model, batch, prior, explain_all, average) * B
    torch.testing.assert_close(terms["bound"][0].double(), bound, atol=1e-4, rtol=1e-6)  # logs: the unweighted bound
    model.eval()  # evaluation: weights 1, KL weight 1, whatever the step
    torch.manual_seed(5)
    loss, terms = model.loss(batch)
    torch.testing.assert_close(loss, -bound / B, atol=1e-5, rtol=1e-9)
    assert terms["kl_weight"].tolist() == [B, B]


def test_mopoe_prior_expert_joins_only_the_full_set():
    plain, paper = _linear_model(MoPoE), _linear_model(MoPoE, recipe=Recipe(full_set_prior_expert=True))
    assert [paper.uses_prior_expert(s) for s in paper.subsets] == [False, False, True]
    assert not any(plain.uses_prior_expert(s) for s in plain.subsets)
    assert all(_linear_model(MVAE).uses_prior_expert(s) for s in plain.subsets)
    x = _linear_batch(torch.ones(B, 2, dtype=torch.bool))
    torch.testing.assert_close(paper.encode("a", x["a"]), plain.encode("a", x["a"]))  # unimodal: q_a alone


def test_mmvae_likelihood_scaling_weighs_log_w_and_logs_the_unscaled_bound():
    model = _linear_model(MMVAE, k=4, recipe=Recipe((3.0, 1.0)))
    batch = _linear_batch(torch.ones(B, 2, dtype=torch.bool))
    torch.manual_seed(4)
    loss, terms = model.loss(batch)
    torch.manual_seed(4)
    log_w = _reference_mmvae_log_w(model, batch, 4, weights=(3.0, 1.0))
    torch.testing.assert_close(loss, -(torch.logsumexp(log_w, 0) - math.log(4)).mean(0).mean())
    torch.manual_seed(4)
    plain = _reference_mmvae_log_w(model, batch, 4)
    torch.testing.assert_close(
        terms["bound"][0].double(), (torch.logsumexp(plain, 0) - math.log(4)).mean(0).sum(), rtol=1e-6, atol=1e-4
    )
    with pytest.raises(ValueError, match="no KL term"):
        MMVAE(QUICKSTART, latent_dim=4, recipe=Recipe(kl_warmup=0.4))


def test_a_warmup_without_the_step_says_so_once(caplog):
    model = _linear_model(MVAE, recipe=Recipe(kl_warmup=0.4))
    batch = _linear_batch(torch.ones(B, 2, dtype=torch.bool))
    with caplog.at_level(logging.WARNING, logger="meme_scale.models.baselines"):
        _, terms = model.loss(batch)
        model.loss(batch)
    assert terms["kl_weight"].tolist() == [B, B]  # full KL weight, and a warning instead of silence
    assert sum("nothing called set_step" in r.message for r in caplog.records) == 1


# -- the interface every model of the trainer keeps ----------------------------------------------
@pytest.mark.parametrize("name", ["mvae", "mmvae", "mopoe"])
@pytest.mark.parametrize("pattern", [*PATTERNS, "mixed"])
def test_every_parameter_gets_a_finite_gradient_whatever_the_pattern(name, pattern):
    model = _quickstart_model(name)
    observed = _mixed_observed(8) if pattern == "mixed" else torch.tensor([PATTERNS[pattern]] * 8)
    loss, terms = model.loss(_batch(8, observed))
    loss.backward()
    assert torch.isfinite(loss)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert list(terms) == model.term_names and all(v.shape == (2,) for v in terms.values())
    assert all(re.fullmatch(r"[\w.\-:/ |]+", n) for n in terms)  # MLflow metric names (tracking maps '|')
    if pattern == "paired":  # every network takes part in every baseline's paired objective
        assert all(p.grad.abs().sum() > 0 for p in model.parameters())
    if pattern == "s_only" and name != "mmvae":
        assert terms["elbo_digits"].tolist() == [0, 0] and terms["elbo_mnist_and_digits"].tolist() == [0, 0]


@pytest.mark.parametrize("name", ["mvae", "mmvae", "mopoe"])
def test_bf16_autocast_gives_a_finite_loss(name):
    model = _quickstart_model(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = model.loss(_batch(8, _mixed_observed(8)))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in terms.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["mvae", "mmvae", "mopoe"])
def test_sampling_api_shapes(name):
    model = _quickstart_model(name)
    x = _batch(3, torch.ones(3, 2, dtype=torch.bool))["mnist"]
    mu, sigma = model.encode("mnist", x)
    assert mu.shape == sigma.shape == (3, 8) and (sigma > 0).all()
    assert model.reconstruct("mnist", x).shape == (3, 1, 28, 28)
    assert model.cross_generate("mnist", "digits", x).shape == (3, 1, 8, 8)
    joint = model.sample_prior(5)
    assert joint["mnist"].shape == (5, 1, 28, 28) and joint["digits"].shape == (5, 1, 8, 8)


@pytest.mark.parametrize("name, cls", [("mvae", MVAE), ("mmvae", MMVAE), ("mopoe", MoPoE)])
def test_build_model_from_config(name, cls):
    cfg = load_config(None, [f"model.name={name}", "model.latent_dim=8", "model.mmvae_k=3", "model.estimator=iwae"])
    meta = {
        "modalities": {
            "mnist": {"kind": "image", "shape": [1, 28, 28]},
            "digits": {"kind": "image", "shape": [1, 8, 8]},
        }
    }
    model = build_model(cfg.model, modality_specs(cfg.model, meta))
    assert type(model) is cls and model.latent_dim == 8 and model.names == ["mnist", "digits"]
    if name == "mmvae":
        assert (model.k, model.estimator) == (3, "iwae")
        assert load_config(None, ["model.name=mmvae"]).model.estimator == "dreg"


def test_bad_baseline_keys_are_named():
    with pytest.raises(ConfigError, match="'model.estimator' must be one of"):
        load_config(None, ["model.estimator=reinforce"])
    with pytest.raises(ConfigError, match="'model.mmvae_k' must be > 0"):
        load_config(None, ["model.mmvae_k=0"])
    with pytest.raises(ValueError, match="estimator"):
        MMVAE(QUICKSTART, latent_dim=4, estimator="nope")
