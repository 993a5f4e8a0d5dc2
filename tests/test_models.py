"""The MEME module: mixed batches, gradients on every rank, networks, shapes, bf16."""

import pytest
import torch

from meme_scale import objectives as obj
from meme_scale.models import MEME, NETWORKS, ModalitySpec, auto_network, build_networks

QUICKSTART = [
    ModalitySpec("mnist", "image", (1, 28, 28), "mnist_mlp"),
    ModalitySpec("digits", "image", (1, 8, 8), "small_mlp"),
]


def _batch(n, observed=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.ones(n, 2, dtype=torch.bool) if observed is None else observed
    return {
        "mnist": torch.rand(n, 1, 28, 28, generator=g),
        "digits": torch.rand(n, 1, 8, 8, generator=g),
        "observed": obs,
    }


def _model(**kw):
    torch.manual_seed(0)
    return MEME(QUICKSTART, latent_dim=8, pseudo_samples=16, **kw)


def _subset(batch, idx, observed):
    return {"mnist": batch["mnist"][idx], "digits": batch["digits"][idx], "observed": observed[idx]}


def _noise(model, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(model.k + 1, n, model.latent_dim, generator=g) for m in model.names}


def test_mixed_batch_equals_count_weighted_parts():
    """Each row's contribution depends on its own data and noise only: a batch mixing the three patterns
    equals its paired, s-only and t-only parts computed apart, each with its rows' noise."""
    model = _model()
    obs = torch.ones(12, 2, dtype=torch.bool)
    obs[5:9, 1] = False  # s-only
    obs[9:, 0] = False  # t-only
    obs[[1, 10]] = obs[[10, 1]].clone()  # patterns interleaved, not in blocks
    batch, noise = _batch(12, obs), _noise(model, 12)
    mixed, terms = model.loss(batch, noise)
    groups = [torch.tensor(g) for g in ([0, 2, 3, 4, 10], [5, 6, 7, 8], [1, 9, 11])]
    parts = [
        model.loss(_subset(batch, idx, obs), {m: v[:, idx] for m, v in noise.items()})[0] * len(idx) for idx in groups
    ]
    torch.testing.assert_close(mixed, sum(parts) / 12)
    assert {"J_mnist|digits", "J_digits|mnist", "J_mnist", "J_digits"} <= set(terms)
    assert list(terms) == model.term_names
    total, count = terms["paired_fraction"].tolist()
    assert (total, count) == (5, 12)
    assert terms["J_mnist"][1] == 4 and terms["J_digits"][1] == 3


def test_loss_equals_the_reference_bounds_on_the_same_noise():
    """The model's loss against objectives' reference functions, with the same draws: the paired rows give
    J_s|t + J_t|s (the reference draws its own [K+1, B, L] noise per direction: replayed by seed), the
    unpaired rows J_x under the pseudo-sample prior."""
    model = _model(k=3)
    obs = torch.ones(9, 2, dtype=torch.bool)
    obs[6:8, 1] = False  # mnist-only
    obs[8:, 0] = False  # digits-only
    batch, noise = _batch(9, obs), _noise(model, 9)
    s, t = model.names
    ref = 0.0
    for x, y, seed in ((s, t, 3), (t, s, 4)):
        torch.manual_seed(seed)
        noise[x][:, :6] = torch.randn(4, 6, 8)  # what the reference's one randn call will draw
        torch.manual_seed(seed)
        ref = (
            ref
            + obj.mutual_supervision_bound(
                batch[x][:6],
                batch[y][:6],
                model.encoders[x],
                model.decoders[x],
                model.encoders[y],
                model.decoders[y],
                model.log_lik_fn(x),
                model.log_lik_fn(y),
                k=3,
                alpha=model.alpha,
            ).sum()
        )
    for x, y, rows in ((s, t, [6, 7]), (t, s, [8])):
        torch.manual_seed(5)
        noise[x][0, rows] = torch.randn(len(rows), 8)
        torch.manual_seed(5)
        ref = (
            ref
            + obj.pseudo_sample_bound(
                batch[x][rows],
                model.encoders[x],
                model.decoders[x],
                model.encoders[y],
                model.pseudo_data(y),
                model.log_lik_fn(x),
            ).sum()
        )
    loss, _ = model.loss(batch, noise)
    torch.testing.assert_close(loss, -ref / 9)


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


def test_init_pseudo_samples_puts_the_given_samples_in_data_space():
    model = _model()
    batch = _batch(16)
    model.init_pseudo_samples({m: batch[m] for m in model.names})
    torch.testing.assert_close(model.pseudo_data("mnist"), batch["mnist"])  # pixels as they are, no clamp to 1e-3
    with pytest.raises(ValueError, match="'digits': 4 samples for 16 pseudo-samples"):
        model.init_pseudo_samples({"digits": batch["digits"][:4]})


def test_saturated_pseudo_sample_pixels_move():
    """Pixels at exactly 0 or 1 (most of an MNIST digit) get gradient and move under Adam: with a
    sigmoid-of-logits parameterisation initialised at the clamp they would barely change."""
    model = _model()
    data = (torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    model.init_pseudo_samples({"mnist": data, "digits": _batch(16)["digits"]})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    obs = torch.zeros(32, 2, dtype=torch.bool)
    obs[:, 1] = True  # digits only: the mnist pseudo-samples are the prior's
    for step in range(5):
        opt.zero_grad()
        model.loss(_batch(32, obs, seed=step))[0].backward()
        opt.step()
    moved = (model.pseudo_data("mnist") - data).abs() > 1e-2
    assert moved[data == 1].float().mean() > 0.2 and moved[data == 0].float().mean() > 0.2


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
    model.init_pseudo_samples({"mnist": batch["mnist"], "text": tokens})
    soft = model.pseudo_data("text")
    assert (soft.argmax(-1) == tokens).all()
    torch.testing.assert_close(soft.max(-1).values, torch.full((4, 32), MEME.CAPTION_INIT_PROB))
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


def test_each_network_runs_once_per_loss():
    """Each decoder runs once per loss, on its own modality's B main samples together with the other
    direction's K + 1 samples ([(K + 2) B, L]); each encoder once on the data, once on the pseudo-samples
    only when an unpaired row needs them."""
    model = _model(k=5)
    seen = {f"{kind}_{name}": [] for kind in ("enc", "dec") for name in model.names}
    for name in model.names:
        for kind, net in (("enc", model.encoders[name]), ("dec", model.decoders[name])):
            net.register_forward_hook(lambda m, inp, out, key=f"{kind}_{name}": seen[key].append(tuple(inp[0].shape)))
    model.loss(_batch(4))
    assert seen == {
        "enc_mnist": [(4, 1, 28, 28)],
        "enc_digits": [(4, 1, 8, 8)],
        "dec_mnist": [(28, 8)],
        "dec_digits": [(28, 8)],
    }
    for v in seen.values():
        v.clear()
    obs = torch.ones(4, 2, dtype=torch.bool)
    obs[3, 1] = False  # one mnist-only row: digits' pseudo-samples are encoded, once
    model.loss(_batch(4, obs))
    assert seen == {
        "enc_mnist": [(4, 1, 28, 28)],
        "enc_digits": [(3, 1, 8, 8), (16, 1, 8, 8)],
        "dec_mnist": [(4 + 6 * 3, 8)],
        "dec_digits": [(3 + 6 * 3, 8)],
    }


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
        raw = torch.zeros_like(model.pseudo[name]).flatten(1)
        raw[torch.arange(n_pseudo), torch.arange(n_pseudo)] = 1.0  # one-hot e_i in the first pixels
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


@pytest.mark.parametrize("net, shape", [("svhn_conv", (3, 32, 32)), ("conv", (3, 64, 64))])
def test_image_decoder_output_does_not_depend_on_the_rest_of_its_batch(net, shape):
    """In train mode (where BatchNorm would use batch statistics): a latent decodes to the same image alone,
    in a batch of 8, and inside the K-sample pass's [K+1, B, L] batch."""
    torch.manual_seed(0)
    _, dec = build_networks(ModalitySpec("m", "image", shape, net), 6)
    dec.train()
    z = torch.randn(3, 8, 6)
    together = dec(z)
    torch.testing.assert_close(dec(z[1]), together[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dec(z[1, 2:3]), together[1, 2:3], rtol=1e-5, atol=1e-6)


def test_encoder_takes_a_sub_batch_of_one_in_train_mode():
    """At small f a modality can be observed in a single row; its BatchNorm then uses running statistics."""
    torch.manual_seed(0)
    enc, _ = build_networks(ModalitySpec("m", "image", (3, 32, 32), "svhn_conv"), 6)
    enc.train()
    enc(torch.rand(8, 3, 32, 32))  # running statistics move off their initial values
    last_bn = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]  # sees [1, 512, 1, 1]
    before = last_bn.running_mean.clone()
    mu, sigma = enc(torch.rand(1, 3, 32, 32))
    assert mu.shape == (1, 6) and torch.isfinite(mu).all() and (sigma > 0).all()
    torch.testing.assert_close(last_bn.running_mean, before)  # one value per channel: no statistics taken from it
