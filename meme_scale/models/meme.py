"""The MEME model: one encoder and one decoder per modality, plus learnable pseudo-samples.

``loss(batch)`` mixes the three observation patterns of a batch (DESIGN 1.1-1.3); the maths lives
in ``meme_scale.objectives``. The sampling methods serve metrics and pictures.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from functools import partial

import torch
from torch import Tensor, nn

from .. import objectives as obj
from .networks import ModalitySpec, build_networks


class MultimodalVAE(nn.Module):
    """What every model of this trainer shares: per-modality networks, likelihoods, batch checks.

    Baselines subclass it and only replace ``loss`` and the prior, so all models are compared with
    the same networks and likelihoods.
    """

    def __init__(self, specs: list[ModalitySpec], latent_dim: int):
        super().__init__()
        if len(specs) != 2:
            raise ValueError(f"MEME models two modalities; got {[s.name for s in specs]}")
        self.specs = {s.name: s for s in specs}
        self.names = [s.name for s in specs]
        self.latent_dim = latent_dim
        self.encoders = nn.ModuleDict()
        self.decoders = nn.ModuleDict()
        for spec in specs:
            self.encoders[spec.name], self.decoders[spec.name] = build_networks(spec, latent_dim)

    # -- likelihoods -------------------------------------------------------------------------
    def log_likelihood(self, modality: str, params: Tensor, data: Tensor) -> Tensor:
        spec = self.specs[modality]
        if spec.kind == "caption":
            return obj.categorical_log_prob(data, params, spec.pad_id)
        return obj.laplace_log_prob(data, params, spec.likelihood_scale)

    def log_lik_fn(self, modality: str):
        return partial(self.log_likelihood, modality)

    # -- checks ------------------------------------------------------------------------------
    def check_batch(self, batch: dict) -> None:
        """Shapes must match the declared ones: a wrong shape would otherwise broadcast silently."""
        for name, spec in self.specs.items():
            if name not in batch:
                raise KeyError(f"batch has no modality {name!r}; it has {sorted(k for k in batch if k != 'key')}")
            got = tuple(batch[name].shape[1:])
            if got != tuple(spec.shape):
                raise ValueError(f"modality {name!r}: batch shape {list(got)} != declared shape {list(spec.shape)}")
        observed = batch.get("observed")
        if observed is None or observed.shape != (batch[self.names[0]].shape[0], len(self.names)):
            raise ValueError(f"batch['observed'] must be a [B, {len(self.names)}] bool mask")

    # -- sampling API (metrics, pictures) ----------------------------------------------------
    def encode(self, modality: str, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoders[modality](x)

    def decode(self, modality: str, z: Tensor) -> Tensor:
        """The likelihood's mean: pixels/features, or the most likely token per position for captions."""
        params = self.decoders[modality](z)
        return params.argmax(-1) if self.specs[modality].kind == "caption" else params

    def reconstruct(self, modality: str, x: Tensor) -> Tensor:
        mu, _ = self.encode(modality, x)
        return self.decode(modality, mu)

    def cross_generate(self, src: str, dst: str, x: Tensor, sample: bool = True) -> Tensor:
        mu, sigma = self.encode(src, x)
        return self.decode(dst, obj.reparameterise(mu, sigma) if sample else mu)

    def sample_prior(self, n: int) -> dict[str, Tensor]:
        """Joint generations: z from the model's prior, decoded into every modality."""
        z = self.prior_sample(n)
        return {name: self.decode(name, z) for name in self.names}

    def prior_sample(self, n: int) -> Tensor:
        p = next(self.parameters())
        return torch.randn(n, self.latent_dim, device=p.device, dtype=p.dtype)

    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss(batch)

    def loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def touch_all_parameters(self, loss: Tensor) -> Tensor:
        """Adds 0 * every parameter so each one gets a (possibly zero) gradient on every rank.

        Without it a rank whose batch lacks a pattern (say no paired sample) would leave some
        parameters without ``.grad`` and the ranks' reductions would disagree.
        """
        return loss + sum(p.sum() for p in self.parameters()) * 0.0


class MEME(MultimodalVAE):
    """Mutual supervision (paired) + pseudo-sample priors (unpaired), DESIGN 1.1-1.2."""

    # At initialisation a caption pseudo-sample puts this much probability on its data token per position.
    CAPTION_INIT_PROB = 0.9

    def __init__(
        self,
        specs: list[ModalitySpec],
        latent_dim: int = 64,
        k: int = 10,
        alpha: float = 10.0,
        pseudo_samples: int = 128,
    ):
        super().__init__(specs, latent_dim)
        self.k, self.alpha = k, alpha
        self.pseudo = nn.ParameterDict()
        for spec in specs:  # random init (model.pseudo_init=random); init_pseudo_samples puts real data here
            shape = (pseudo_samples, *_pseudo_shape(spec))
            init = {"image": torch.rand, "caption": lambda *s: 0.01 * torch.randn(*s)}.get(spec.kind, torch.randn)
            self.pseudo[spec.name] = nn.Parameter(init(*shape))

    # -- pseudo-samples ----------------------------------------------------------------------
    def pseudo_data(self, modality: str) -> Tensor:
        """Pseudo-samples in the modality's data space.

        Images are free parameters in pixel space, clamped to [0, 1] where used (DESIGN 1.2): every pixel
        keeps a gradient, where a sigmoid of logits would freeze the saturated ones. Captions are
        per-position token distributions (softmax of free logits).
        """
        raw = self.pseudo[modality]
        kind = self.specs[modality].kind
        if kind == "image":
            return raw.clamp(0.0, 1.0)
        if kind == "caption":
            return torch.softmax(raw, dim=-1)
        return raw

    @torch.no_grad()
    def init_pseudo_samples(self, samples: dict[str, Tensor]) -> None:
        """Sets each modality's N pseudo-samples to N given data samples (distinct, observed ones: the caller's
        part, see ``loop.distinct_observed_samples``)."""
        for name, data in samples.items():
            param = self.pseudo[name]
            if len(data) != len(param):
                raise ValueError(f"modality {name!r}: {len(data)} samples for {len(param)} pseudo-samples")
            spec = self.specs[name]
            if spec.kind == "caption":
                # logits 0 everywhere but the data token, whose softmax probability is CAPTION_INIT_PROB
                p = self.CAPTION_INIT_PROB
                value = math.log(p / (1 - p) * (spec.vocab_size - 1)) * nn.functional.one_hot(data, spec.vocab_size)
            else:
                value = data
            param.copy_(value.to(param.device, param.dtype))

    def prior_sample(self, n: int) -> Tensor:
        """z from the pseudo-sample prior: an equal mixture over both modalities' encoded pseudo-samples."""
        mus, sigmas = zip(*(self.encode(name, self.pseudo_data(name)) for name in self.names))
        mu, sigma = torch.cat(mus), torch.cat(sigmas)
        pick = torch.randint(len(mu), (n,), device=mu.device)
        return obj.reparameterise(mu[pick], sigma[pick])

    # -- objective ---------------------------------------------------------------------------
    def loss(self, batch: dict, noise: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """-(sum of J over paired, s-only and t-only samples) / B, and the terms for logging.

        Each encoder runs once, on the rows where its modality is observed; each decoder runs once, on
        its own modality's main samples together with the other direction's K + 1 samples of the
        paired rows; the pseudo-samples are encoded once, only if some row needs them. No network
        sees a hidden modality. ``noise`` ({modality: [K+1, B, L]} standard normal draws, row i's
        main sample at [0, i]) replaces the random draws, for exact replay in tests.

        Each term is a ``[sum, count]`` pair over the samples it applies to, so ranks can add them
        up before dividing (a global mean, not a mean of means).
        """
        self.check_batch(batch)
        names, k1 = self.names, self.k + 1
        rows = _RowPlan(batch["observed"], batch.get("observed_host", batch["observed"]), names)
        if noise is None:
            noise = {m: torch.randn(k1, rows.size, self.latent_dim, device=rows.device) for m in names}
        terms = {name: None for name in self.term_names}

        def record(name: str, values: Tensor) -> None:
            terms[name] = torch.stack([values.detach().float().sum(), values.new_tensor(float(len(values)))])

        # q(z|x_m) on the observed rows of m: the main sample for all of them, K more for the paired ones
        xs, post, z_main = {}, {}, {}
        for m in names:
            if rows.observed[m] is None:
                continue
            xs[m] = batch[m][rows.observed[m]]
            mu, sigma = (obj._full(t) for t in self.encode(m, xs[m]))
            post[m] = (mu, sigma)
            z_main[m] = mu + sigma * noise[m][0][rows.observed[m]]
        # decoder m: its own main samples (log p(x_m|z_m)) and, for the paired rows, the other
        # modality's K + 1 samples (log p(x_m|z_n,k), the cross term of direction n|m): one pass
        own_ll, cross_ll = {}, {}
        for m, n in ((names[0], names[1]), (names[1], names[0])):
            if m not in post:
                continue
            latents = [z_main[m]]
            if rows.paired is not None:
                mu_n, sigma_n = (t[rows.paired_in[n]] for t in post[n])
                z_cross = mu_n + sigma_n * noise[n][:, rows.paired]  # [K+1, P, L]; [0] is n's main sample
                latents.append(z_cross.flatten(0, 1))
            out = self.decoders[m](torch.cat(latents) if len(latents) > 1 else latents[0])
            n_own = len(z_main[m])
            own_ll[m] = self.log_likelihood(m, out[:n_own], xs[m])
            if rows.paired is not None:
                cross_ll[m] = self.log_likelihood(m, out[n_own:].unflatten(0, (k1, -1)), xs[m][rows.paired_in[m]])

        total = torch.zeros((), device=rows.device)
        if rows.paired is not None:
            for x, y in ((names[0], names[1]), (names[1], names[0])):
                on_paired = {m: [t[rows.paired_in[m]] for t in post[m]] for m in (x, y)}
                kl = obj.gaussian_kl(*on_paired[x], *on_paired[y])
                bound, parts = obj.mutual_supervision_from_parts(
                    own_ll[x][rows.paired_in[x]], cross_ll[y], kl, self.alpha
                )
                total = total + bound.sum()
                record(f"J_{x}|{y}", bound)
                record(f"kl_{x}|{y}", parts["kl"])
                record(f"log_p_{x}", parts["log_px"])
                record(f"log_qhat_{y}|{x}", parts["log_qhat"])
        for x, y in ((names[0], names[1]), (names[1], names[0])):
            only = rows.only_in[x]
            if only is None:
                continue
            mu_l, sigma_l = (obj._full(t) for t in self.encode(y, self.pseudo_data(y)))
            mu_x, sigma_x = (t[only] for t in post[x])
            kl = obj.pseudo_sample_kl(z_main[x][only], mu_x, sigma_x, mu_l, sigma_l)
            bound = own_ll[x][only] - kl
            total = total + bound.sum()
            record(f"J_{x}", bound)
            record(f"kl_{x}|pseudo", kl)

        loss = self._touch_unused(-total / rows.size, rows)
        record("paired_fraction", rows.paired_mask.float())
        zero = torch.zeros(2, device=rows.device)
        return loss, {k: zero if v is None else v for k, v in terms.items()}

    def _touch_unused(self, loss: Tensor, rows: _RowPlan) -> Tensor:
        """Adds 0 * each parameter this batch did not reach (see ``touch_all_parameters``): the pseudo-samples
        of a modality no unpaired row needed, the networks of a modality observed nowhere."""
        s, t = self.names
        unused = []
        for x, y in ((s, t), (t, s)):
            if rows.observed[x] is None:
                unused += [*self.encoders[x].parameters(), *self.decoders[x].parameters()]
            if rows.only_in[y] is None:
                unused.append(self.pseudo[x])
        return loss + sum(p.sum() for p in unused) * 0.0 if unused else loss

    @property
    def term_names(self) -> list[str]:
        """Fixed names of the logged terms, identical on every rank whatever its batch holds."""
        s, t = self.names
        names = []
        for x, y in ((s, t), (t, s)):
            names += [f"J_{x}|{y}", f"kl_{x}|{y}", f"log_p_{x}", f"log_qhat_{y}|{x}"]
        return names + [f"J_{s}", f"kl_{s}|pseudo", f"J_{t}", f"kl_{t}|pseudo", "paired_fraction"]


Rows = Tensor | slice | None  # an index tensor, slice(None) for every row, None for no row


class _RowPlan:
    """Which rows of a batch each part of MEME's loss uses (the patterns of DESIGN 1.3).

    Worked out from a host copy of the mask, so no step waits on the device for it; "every row" is a
    slice, so indexing with it is a view, not a copy (all of an all-paired batch). ``observed[m]``:
    the rows where m is observed; ``paired``: rows with both; ``paired_in[m]`` / ``only_in[m]``: the
    paired / m-only rows as positions among m's observed rows, which is how encoder outputs are indexed.
    """

    def __init__(self, observed: Tensor, observed_host: Tensor, names: list[str]):
        mask = observed_host.cpu()
        self.size, self.device = mask.shape[0], observed.device
        self.paired_mask = observed.all(1)
        both = mask.all(1)
        self.paired = self._rows(both)
        self.observed, self.paired_in, self.only_in = {}, {}, {}
        for col, m in enumerate(names):
            seen = mask[:, col]
            self.observed[m] = self._rows(seen)
            self.paired_in[m] = self._rows(both[seen])
            self.only_in[m] = self._rows(~both[seen])

    def _rows(self, mask: Tensor) -> Rows:
        if not mask.any():
            return None
        if mask.all():
            return slice(None)
        return mask.nonzero().squeeze(1).to(self.device, non_blocking=True)


def pick_pseudo_samples(batches: Iterable[dict], names: list[str], n: int) -> dict[str, Tensor]:
    """The first ``n`` distinct observed samples of each modality in ``batches`` (DESIGN 1.2 init).

    Distinct by content (data sets repeat values under different keys: the quickstart pairs each UCI
    digit with several MNIST images), observed by the batch's mask (a hidden or absent modality is never
    taken), reading as many batches as it takes. ``batches`` should cover one epoch, so running out
    means the data hold fewer than ``n`` such samples: an error that says how many there are.
    """
    picked: dict[str, list[Tensor]] = {m: [] for m in names}
    seen: dict[str, set] = {m: set() for m in names}
    for batch in batches:
        for col, m in enumerate(names):
            for i in batch["observed"][:, col].nonzero().flatten().tolist():
                digest = hashlib.blake2b(batch[m][i].numpy().tobytes(), digest_size=16).digest()
                if len(picked[m]) < n and digest not in seen[m]:
                    seen[m].add(digest)
                    picked[m].append(batch[m][i])
        if all(len(v) == n for v in picked.values()):
            return {m: torch.stack(v) for m, v in picked.items()}
    short = {m: len(v) for m, v in picked.items() if len(v) < n}
    raise ValueError(
        f"model.pseudo_samples={n} needs {n} distinct observed samples per modality; the training "
        f"data hold only {short} (lower model.pseudo_samples or use model.pseudo_init=random)"
    )


def _pseudo_shape(spec: ModalitySpec) -> tuple[int, ...]:
    if spec.kind == "caption":
        return (*spec.shape, spec.vocab_size)
    return tuple(spec.shape)


def count_parameters(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())
