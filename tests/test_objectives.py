"""The MEME maths against independent computations (DESIGN 1.1, 1.2)."""

import math

import pytest
import torch
from torch import distributions as D

from meme_scale import objectives as obj

B, L, DX, DY = 5, 3, 6, 4


def _linear_net(d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.nn.Linear(d_in, d_out)
        .double()
        .requires_grad_(True)
        .apply(lambda m: [p.data.copy_(torch.randn(p.shape, generator=g) * 0.5) for p in m.parameters()])
    )


class Gaussian(torch.nn.Module):
    """A linear encoder; ``sigma_scale`` shrinks sigma towards 0 for the deterministic limit."""

    def __init__(self, d_in, seed, sigma_scale=1.0):
        super().__init__()
        self.net = _linear_net(d_in, 2 * L, seed)
        self.sigma_scale = sigma_scale

    def forward(self, x):
        mu, raw = self.net(x).chunk(2, -1)
        return mu, self.sigma_scale * (torch.nn.functional.softplus(raw) + 0.1)


def laplace_lik(params, data):
    return obj.laplace_log_prob(data, params, 1.0)


@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons in float64, restored afterwards so other test modules keep float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture()
def nets():
    torch.manual_seed(0)
    x, y = torch.rand(B, DX), torch.rand(B, DY)
    return dict(x=x, y=y, ex=Gaussian(DX, 1), ey=Gaussian(DY, 2), dx=_linear_net(L, DX, 3), dy=_linear_net(L, DY, 4))


def bound(n, k=10, alpha=10.0, ex=None, **kw):
    return obj.mutual_supervision_bound(
        n["x"], n["y"], ex or n["ex"], n["dx"], n["ey"], n["dy"], laplace_lik, laplace_lik, k=k, alpha=alpha, **kw
    )


# -- the elementary densities -----------------------------------------------------------------
def test_laplace_log_prob_matches_torch_distributions():
    x, loc = torch.rand(4, 2, 3), torch.rand(4, 2, 3)
    expected = D.Laplace(loc, 0.7).log_prob(x).sum((1, 2))
    torch.testing.assert_close(obj.laplace_log_prob(x, loc, 0.7), expected)
    stacked = obj.laplace_log_prob(x, loc.expand(5, 4, 2, 3), 0.7)  # leading sample dim broadcasts
    assert stacked.shape == (5, 4)
    torch.testing.assert_close(stacked[3], expected)


def test_categorical_log_prob_ignores_padding():
    logits = torch.randn(3, 5, 7)
    tokens = torch.randint(1, 7, (3, 5))
    tokens[0, 3:] = 0
    expected = torch.stack(
        [
            sum(D.Categorical(logits=logits[b, t]).log_prob(tokens[b, t]) for t in range(5) if tokens[b, t] != 0)
            for b in range(3)
        ]
    )
    torch.testing.assert_close(obj.categorical_log_prob(tokens, logits, pad_id=0), expected)
    assert obj.categorical_log_prob(tokens, logits.expand(2, 3, 5, 7), pad_id=0).shape == (2, 3)


def test_gaussian_kl_matches_torch_distributions():
    mq, mp = torch.randn(6, 4), torch.randn(6, 4)
    sq, sp = torch.rand(6, 4) + 0.1, torch.rand(6, 4) + 0.1
    expected = D.kl_divergence(D.Normal(mq, sq), D.Normal(mp, sp)).sum(-1)
    torch.testing.assert_close(obj.gaussian_kl(mq, sq, mp, sp), expected)
    assert obj.gaussian_kl(mq, sq, mq, sq).abs().max() < 1e-12


def test_mixture_prior_matches_direct_logsumexp():
    z, mus, sigmas = torch.randn(5, 3), torch.randn(7, 3), torch.rand(7, 3) + 0.2
    direct = torch.stack(
        [
            torch.log(sum(torch.exp(D.Normal(mus[i], sigmas[i]).log_prob(z[b]).sum()) for i in range(7)) / 7)
            for b in range(5)
        ]
    )
    torch.testing.assert_close(obj.mixture_log_prob(z, mus, sigmas), direct)


# -- the mutual-supervision bound -------------------------------------------------------------
def test_bound_in_the_deterministic_limit(nets):
    """sigma_x -> 0: every z equals mu_x, w = 1, q^ = p(y|mu)."""
    ex = Gaussian(DX, 1, sigma_scale=1e-9)
    got = bound(nets, ex=ex)
    mu_x, sigma_x = ex(nets["x"])
    mu_y, sigma_y = nets["ey"](nets["y"])
    log_px = D.Laplace(nets["dx"](mu_x), 1.0).log_prob(nets["x"]).sum(-1)
    log_py = D.Laplace(nets["dy"](mu_x), 1.0).log_prob(nets["y"]).sum(-1)
    kl = D.kl_divergence(D.Normal(mu_x, sigma_x), D.Normal(mu_y, sigma_y)).sum(-1)
    expected = log_px - log_py - kl + 10.0 * log_py
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _reference_bound(n, k, alpha, gen):
    """A per-sample loop over torch.distributions: an independent implementation of J_x|y."""
    out = []
    for b in range(B):
        x, y = n["x"][b], n["y"][b]
        q_x = D.Normal(*n["ex"](x[None]))
        q_y = D.Normal(*n["ey"](y[None]))
        zs = [q_x.mean + q_x.stddev * torch.randn(q_x.mean.shape, generator=gen) for _ in range(k + 1)]
        log_py = [D.Laplace(n["dy"](z), 1.0).log_prob(y).sum() for z in zs]
        log_qhat = torch.logsumexp(torch.stack(log_py), 0) - math.log(k + 1)
        w = torch.exp(log_py[0] - log_qhat)
        log_px = D.Laplace(n["dx"](zs[0]), 1.0).log_prob(x).sum()
        kl = D.kl_divergence(q_x, q_y).sum()
        out.append(w * (log_px - log_py[0] - kl) + alpha * log_qhat)
    return torch.stack(out)


def test_bound_expectation_matches_monte_carlo_reference(nets):
    draws = 400
    with torch.no_grad():
        ours = torch.stack([bound(nets, k=4) for _ in range(draws)])
        gen = torch.Generator().manual_seed(123)
        ref = torch.stack([_reference_bound(nets, 4, 10.0, gen) for _ in range(draws)])
    se = torch.sqrt(ours.var(0) / draws + ref.var(0) / draws)
    assert ((ours.mean(0) - ref.mean(0)).abs() < 4 * se).all(), (ours.mean(0), ref.mean(0), se)
    assert (se > 0).all()


def _grads(value, params):
    return torch.autograd.grad(value.sum(), params, allow_unused=True, retain_graph=True)


def test_no_gradient_flows_through_the_weight(nets):
    """d J / d theta_y must equal the gradient with w held constant, and differ from the undetached one."""
    params = list(nets["dy"].parameters())
    torch.manual_seed(7)
    got = _grads(bound(nets), params)
    torch.manual_seed(7)
    _, parts = bound(nets, return_terms=True)
    w = torch.exp(parts["log_py"] - parts["log_qhat"])
    held = w.detach() * (parts["log_px"] - parts["log_py"] - parts["kl"]) + 10.0 * parts["log_qhat"]
    free = w * (parts["log_px"] - parts["log_py"] - parts["kl"]) + 10.0 * parts["log_qhat"]
    for g, h, f in zip(got, _grads(held, params), _grads(free, params)):
        torch.testing.assert_close(g, h)
        assert (g - f).abs().max() > 1e-6  # the test could tell a missing .detach()
    assert not parts["w"].requires_grad


def test_gradients_reach_both_encoders_through_kl_and_qhat(nets):
    _, parts = bound(nets, return_terms=True)
    ey, ex, dy = (list(nets[k].parameters()) for k in ("ey", "ex", "dy"))
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(parts["kl"], ey))  # other encoder, via KL
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(parts["log_qhat"], ex))  # q^ -> own encoder
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(parts["log_qhat"], dy))  # q^ -> other decoder
    total = _grads(bound(nets), ey)
    assert all(g.abs().sum() > 0 for g in total)


# -- the pseudo-sample bound ------------------------------------------------------------------
def test_pseudo_sample_bound_matches_reference_and_trains_the_pseudo_samples(nets):
    pseudo = torch.rand(7, DY, requires_grad=True)
    torch.manual_seed(3)
    got, parts = obj.pseudo_sample_bound(
        nets["x"], nets["ex"], nets["dx"], nets["ey"], pseudo, laplace_lik, return_terms=True
    )
    torch.manual_seed(3)
    mu, sigma = nets["ex"](nets["x"])
    z = mu + sigma * torch.randn(mu.shape)
    mu_l, sigma_l = nets["ey"](pseudo)
    mix = D.MixtureSameFamily(D.Categorical(torch.ones(7)), D.Independent(D.Normal(mu_l, sigma_l), 1))
    expected = (
        D.Laplace(nets["dx"](z), 1.0).log_prob(nets["x"]).sum(-1)
        - D.Independent(D.Normal(mu, sigma), 1).log_prob(z)
        + mix.log_prob(z)
    )
    torch.testing.assert_close(got, expected)
    g_pseudo, *g_ey = _grads(got, [pseudo, *nets["ey"].parameters()])
    assert g_pseudo.abs().sum() > 0 and all(g.abs().sum() > 0 for g in g_ey)


def _replayed_reference(n, k, alpha, seed):
    """J_x|y built by hand from the very noise the bound draws: one ``torch.randn([K+1, B, L])`` of
    ``reparameterise`` (float64 here), z_0 for log p(x|z), log q(y|z) and w, all K + 1 in q^."""
    mu_x, sigma_x = n["ex"](n["x"])
    mu_y, sigma_y = n["ey"](n["y"])
    torch.manual_seed(seed)
    eps = torch.randn(k + 1, B, L, dtype=torch.float64)
    zs = [mu_x + sigma_x * eps[i] for i in range(k + 1)]
    log_py = torch.stack([D.Laplace(n["dy"](z), 1.0).log_prob(n["y"]).sum(-1) for z in zs])  # [K+1, B]
    log_qhat = torch.logsumexp(log_py, 0) - math.log(k + 1)
    w = torch.exp(log_py[0] - log_qhat)
    log_px = D.Laplace(n["dx"](zs[0]), 1.0).log_prob(n["x"]).sum(-1)
    kl = D.kl_divergence(D.Normal(mu_x, sigma_x), D.Normal(mu_y, sigma_y)).sum(-1)
    terms = {"log_px": log_px, "log_py": log_py[0], "kl": kl, "log_qhat": log_qhat, "w": w}
    return w * (log_px - log_py[0] - kl) + alpha * log_qhat, terms


@pytest.mark.parametrize("k", [0, 1, 4, 10])
def test_bound_equals_a_hand_reference_on_the_same_noise(nets, k):
    """Exact, unlike the Monte-Carlo test: which sample feeds log p(x|z) and how many enter q^ show."""
    with torch.no_grad():
        torch.manual_seed(11)
        got, parts = bound(nets, k=k, alpha=3.0, return_terms=True)
        expected, ref = _replayed_reference(nets, k, 3.0, seed=11)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    for name, value in ref.items():
        torch.testing.assert_close(parts[name], value, rtol=1e-9, atol=1e-9, msg=name)
    assert (parts["w"] - 1).abs().max() > 1e-3 or k == 0  # w is not trivially 1 (the test sees q^)


def test_bound_with_k_0_has_qhat_equal_to_the_main_likelihood(nets):
    """K = 0: q^ is p(y|z_0) alone, so w = 1 and J = log p(x|z_0) - KL + (alpha - 1) log p(y|z_0)."""
    torch.manual_seed(5)
    got, parts = bound(nets, k=0, alpha=3.0, return_terms=True)
    torch.testing.assert_close(parts["log_qhat"], parts["log_py"], rtol=0, atol=1e-12)
    torch.testing.assert_close(parts["w"], torch.ones(B), rtol=0, atol=1e-12)
    torch.testing.assert_close(got, parts["log_px"] - parts["kl"] + 2.0 * parts["log_py"], rtol=1e-12, atol=1e-10)


def test_cross_term_is_one_batched_decoder_pass(nets):
    """decode_y sees the K + 1 samples once, as [K+1, B, L]; decode_x sees the main sample once, [B, L]."""
    calls = {"dx": [], "dy": []}

    def counted(name):
        return lambda z: calls[name].append(tuple(z.shape)) or nets[name](z)

    k = 6
    obj.mutual_supervision_bound(
        nets["x"], nets["y"], nets["ex"], counted("dx"), nets["ey"], counted("dy"), laplace_lik, laplace_lik, k=k
    )
    assert calls == {"dx": [(B, L)], "dy": [(k + 1, B, L)]}
