"""The MEME module: mixed batches, gradients on every rank, networks, shapes, bf16."""

import pytest
import torch

from meme_scale.models import MEME, NETWORKS, ModalitySpec, auto_network, build_networks

QUICKSTART = [ModalitySpec("mnist", "image", (1, 28, 28), "mnist_mlp"), ModalitySpec("digits", "image", (1, 8, 8), "small_mlp")]


def _batch(n, observed=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.ones(n, 2, dtype=torch.bool) if observed is None else observed
    return {"mnist": torch.rand(n, 1, 28, 28, generator=g), "digits": torch.rand(n, 1, 8, 8, generator=g), "observed": obs}


def _model(**kw):
    torch.manual_seed(0)
    return MEME(QUICKSTART, latent_dim=8, pseudo_samples=16, **kw)


def _subset(batch, idx, observed):
    return {"mnist": batch["mnist"][idx], "digits": batch["digits"][idx], "observed": observed[idx]}


def test_mixed_batch_equals_count_weighted_parts():
    model = _model()
    obs = torch.ones(12, 2, dtype=torch.bool)
    obs[5:9, 1] = False  # s-only
    obs[9:, 0] = False  # t-only
    batch = _batch(12, obs)
    torch.manual_seed(1)
    mixed, terms = model.loss(batch)
    # The model draws noise for paired, then s-only, then t-only samples: replay that order.
    torch.manual_seed(1)
    parts = [model.loss(_subset(batch, idx, obs))[0] * len(idx) for idx in (range(0, 5), range(5, 9), range(9, 12))]
    torch.testing.assert_close(mixed, sum(parts) / 12)
    assert {"J_mnist|digits", "J_digits|mnist", "J_mnist", "J_digits"} <= set(terms)
    assert list(terms) == model.term_names
    total, count = terms["paired_fraction"].tolist()
    assert (total, count) == (5, 12)
    assert terms["J_mnist"][1] == 4 and terms["J_digits"][1] == 3


@pytest.mark.parametrize("pattern", ["paired", "s_only", "t_only"])
def test_every_parameter_gets_a_gradient_whatever_the_pattern(pattern):
    model = _model()
    obs = torch.ones(6, 2, dtype=torch.bool)
    if pattern == "s_only":
        obs[:, 1] = False
    elif pattern == "t_only":
        obs[:, 0] = False
    loss, _ = model.loss(_batch(6, obs))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    # the pseudo-samples learn exactly when their modality is the missing one
    touched = model.pseudo["digits"].grad.abs().sum() > 0
    assert touched == (pattern == "s_only")


def test_init_pseudo_samples_from_observed_data():
    model = _model()
    batch = _batch(4)
    model.init_pseudo_samples(batch)
    torch.testing.assert_close(model.pseudo_data("mnist")[:4], batch["mnist"].clamp(1e-3, 1 - 1e-3))
    torch.testing.assert_close(model.pseudo_data("mnist")[4:8], model.pseudo_data("mnist")[:4])


def test_bf16_autocast_runs_without_nan():
    model = _model()
    batch = _batch(16)
    batch["observed"][:6, 0] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_wrong_shape_names_modality_and_both_shapes():
    model = _model()
    batch = _batch(4)
    batch["digits"] = torch.rand(4, 1, 9, 9)
    with pytest.raises(ValueError, match=r"'digits'.*\[1, 9, 9\].*\[1, 8, 8\]"):
        model.loss(batch)


def test_sampling_api_shapes():
    model = _model()
    x = _batch(3)["mnist"]
    mu, sigma = model.encode("mnist", x)
    assert mu.shape == sigma.shape == (3, 8) and (sigma > 0).all()
    assert model.reconstruct("mnist", x).shape == (3, 1, 28, 28)
    assert model.cross_generate("mnist", "digits", x).shape == (3, 1, 8, 8)
    joint = model.sample_prior(5)
    assert joint["mnist"].shape == (5, 1, 28, 28) and joint["digits"].shape == (5, 1, 8, 8)


SHAPES = {"image": [(1, 28, 28), (3, 32, 32), (3, 64, 64), (1, 8, 8)], "vector": [(2048,), (10,)], "caption": [(32,)]}


@pytest.mark.parametrize("net", sorted(NETWORKS))
def test_every_registered_network_maps_shapes(net):
    for kind in NETWORKS[net].kinds:
        for shape in SHAPES[kind]:
            spec = ModalitySpec("m", kind, shape, net, vocab_size=50, pad_id=0)
            if net in ("svhn_conv", "conv") and shape[-1] % (1 << (len(NETWORKS[net].default_hidden) - 1)):
                with pytest.raises(ValueError, match="square"):
                    build_networks(spec, 6)
                continue
            enc, dec = build_networks(spec, 6)
            x = torch.randint(0, 50, (4, *shape)) if kind == "caption" else torch.rand(4, *shape)
            mu, sigma = enc(x)
            assert mu.shape == (4, 6) and (sigma > 0).all()
            out = dec(torch.randn(3, 4, 6))
            assert out.shape == ((3, 4, *shape, 50) if kind == "caption" else (3, 4, *shape))


def test_caption_pseudo_samples_are_soft_tokens():
    spec = ModalitySpec("text", "caption", (32,), "caption_cnn", vocab_size=40, pad_id=0)
    model = MEME([QUICKSTART[0], spec], latent_dim=8, pseudo_samples=4)
    tokens = torch.randint(1, 40, (4, 32))
    batch = {"mnist": torch.rand(4, 1, 28, 28), "text": tokens, "observed": torch.tensor([[1, 0]] * 4).bool()}
    model.init_pseudo_samples({**batch, "observed": torch.ones(4, 2, dtype=torch.bool)})
    assert (model.pseudo_data("text").argmax(-1) == tokens).all()
    loss, _ = model.loss(batch)
    loss.backward()
    assert model.pseudo["text"].grad.abs().sum() > 0


def test_auto_network_choice():
    assert auto_network("image", (1, 28, 28)) == "mnist_mlp"
    assert auto_network("image", (3, 32, 32)) == "svhn_conv"
    assert auto_network("image", (3, 64, 64)) == "conv"
    assert auto_network("vector", (2048,)) == "feature_mlp"
    assert auto_network("caption", (32,)) == "caption_cnn"
    with pytest.raises(ValueError, match="unknown network"):
        build_networks(ModalitySpec("m", "image", (1, 8, 8), "nope"), 4)


def test_loss_sends_the_k_plus_1_samples_through_each_decoder_in_one_pass():
    """A paired batch: each decoder runs once on its own main sample [B, L] and once, batched, on the
    other direction's K + 1 samples [K+1, B, L] -- not K + 1 separate calls."""
    model = _model(k=5)
    seen = {name: [] for name in model.names}
    for name in model.names:
        model.decoders[name].register_forward_hook(lambda m, inp, out, n=name: seen[n].append(tuple(inp[0].shape)))
    model.loss(_batch(4))
    assert {n: sorted(s, key=len) for n, s in seen.items()} == {n: [(4, 8), (6, 4, 8)] for n in model.names}


class _Probe(torch.nn.Module):
    """A stand-in encoder: mu = 10 * (first L pixels) + offset, sigma fixed, so the prior's components are known."""

    def __init__(self, offset, sigma):
        super().__init__()
        self.offset, self.sigma = offset, sigma

    def forward(self, x):
        mu = 10.0 * x.flatten(1)[:, :8] + self.offset
        return mu, torch.full_like(mu, self.sigma)


def test_sample_prior_draws_from_the_pseudo_sample_mixture():
    """Components far apart (one-hot pseudo-samples, modalities offset): every joint sample lies within
    noise of one encoded pseudo-sample of either modality, all 2N components uniformly often, with the
    encoders' sigma as spread, and both modalities are decoded from the same z."""
    n_pseudo, sigma, draws = 4, 0.05, 4000
    model = MEME(QUICKSTART, latent_dim=8, pseudo_samples=n_pseudo)
    centres = []
    for name, offset in zip(model.names, (0.0, -10.0)):
        model.encoders[name] = _Probe(offset, sigma)
        model.decoders[name] = torch.nn.Identity()  # decode(z) = z, so sample_prior shows its latents
        raw = torch.full_like(model.pseudo[name], -30.0).flatten(1)
        raw[torch.arange(n_pseudo), torch.arange(n_pseudo)] = 30.0  # sigmoid -> one-hot e_i in the first pixels
        with torch.no_grad():
            model.pseudo[name].copy_(raw.view_as(model.pseudo[name]))
        centres.append(10.0 * torch.eye(n_pseudo, 8) + offset)
    centres = torch.cat(centres)  # [2N, L], pairwise >= 10 apart
    torch.manual_seed(0)
    with torch.no_grad():
        joint = model.sample_prior(draws)
    z = joint["mnist"]
    assert z.shape == (draws, 8)
    torch.testing.assert_close(joint["digits"], z)  # one z per joint sample, decoded into both modalities
    nearest = torch.cdist(z, centres).argmin(1)
    residual = z - centres[nearest]
    assert residual.norm(dim=1).max() < 10 * sigma  # each draw sits on one component
    assert abs(residual.std().item() / sigma - 1) < 0.05  # with the component's sigma (not the mean alone)
    counts = torch.bincount(nearest, minlength=2 * n_pseudo).double()
    expected = draws / (2 * n_pseudo)  # 500 each; binomial sd ~ 21
    assert ((counts - expected).abs() < 5 * (expected * (1 - 1 / (2 * n_pseudo))) ** 0.5).all(), counts
