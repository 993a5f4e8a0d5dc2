"""Observation masks (DESIGN 1.3): which modalities of a training sample the model may see.

A sample is paired with probability ``fraction``; an unpaired one keeps only one modality,
chosen by ``missing`` ("s": s is hidden, t kept; "t": t hidden, s kept; "either": a second
rule decides, about half each). The decision must be a pure function of
(key, seed, fraction, missing) so that every rank, worker and resumed run agrees on it without
communication.

Why a low-discrepancy rule and not a hash per key: an independent coin per key has binomial
noise (~0.7 % for 4,000 keys), so the realised paired fraction of an epoch would miss the
requested one by more than the 1 % the experiments allow. Instead the integer key ``i`` (the
sample's index within its split) is mapped to ``u = frac(i * phi + offset(seed))`` with
``phi`` the golden-ratio conjugate (a Kronecker / Weyl sequence). Any run of N consecutive
indices then covers [0, 1) with discrepancy O(log N / N), so ``u < fraction`` selects
``fraction * N`` keys almost exactly. The "which one is missing" rule uses a second Weyl
sequence with an irrational step (sqrt(2) - 1) independent of the first, so the 2-D sequence
is equidistributed and "either" splits the unpaired keys evenly as well.

Arithmetic is exact: steps and offsets are 64-bit fixed-point integers and products wrap
modulo 2**64, so the scalar and vectorised variants agree bit for bit for every index.
A smaller fraction selects a subset of the samples a larger one selects (nested settings).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

MISSING_CHOICES = ("s", "t", "either")

_MOD = 1 << 64
# 64-bit fixed-point versions of the irrational steps of the two Weyl sequences.
_STEP_PAIRED = int(((math.sqrt(5.0) - 1.0) / 2.0) * _MOD) | 1
_STEP_WHICH = int((math.sqrt(2.0) - 1.0) * _MOD) | 1


def check_args(fraction: float, missing: str) -> None:
    """Raise ValueError for arguments the rule cannot honour, naming the bad value."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"observed fraction must be a number in (0, 1], got {fraction!r}")
    if not (0.0 < float(fraction) <= 1.0) or math.isnan(fraction):
        raise ValueError(f"observed fraction must be in (0, 1], got {fraction!r}")
    if missing not in MISSING_CHOICES:
        raise ValueError(f"missing must be one of {MISSING_CHOICES}, got {missing!r}")


def _hash64(*parts: object) -> int:
    """Stable 64-bit hash (hashlib, never Python's salted hash())."""
    digest = hashlib.sha256(repr(("meme_scale.masks",) + parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def _units(words: np.ndarray) -> np.ndarray:
    """Map uint64 words to floats uniform in [0, 1) using their top 53 bits."""
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _decide(u_paired: np.ndarray, u_which: np.ndarray, fraction: float, missing: str) -> np.ndarray:
    """Turn the two uniform numbers per sample into an [N, 2] (observed s, observed t) mask."""
    paired = u_paired < float(fraction)
    if missing == "s":
        s_missing = ~paired
    elif missing == "t":
        s_missing = np.zeros_like(paired)
    else:
        s_missing = ~paired & (u_which < 0.5)
    t_missing = ~paired & ~s_missing
    return np.stack([~s_missing, ~t_missing], axis=1)


def observation_array(indices: Sequence[int] | np.ndarray, seed: int, fraction: float,
                      missing: str) -> np.ndarray:
    """Vectorised rule over non-negative integer keys: bool array [N, 2] = (observed s, observed t)."""
    check_args(fraction, missing)
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(f"indices must be a 1-D array of integers, got shape {idx.shape} dtype {idx.dtype}")
    if idx.size and int(idx.min()) < 0:
        raise ValueError(f"indices must be non-negative, got {int(idx.min())}")
    words = idx.astype(np.uint64)
    # uint64 array arithmetic wraps modulo 2**64 silently: exact fixed-point frac(i * step + offset).
    w_paired = words * np.uint64(_STEP_PAIRED) + np.uint64(_hash64("paired", int(seed)))
    w_which = words * np.uint64(_STEP_WHICH) + np.uint64(_hash64("which", int(seed)))
    return _decide(_units(w_paired), _units(w_which), fraction, missing)


def _key_index(key: str) -> int | None:
    """The integer a shard key encodes ("000000123" -> 123), or None for other keys."""
    return int(key) if key.isascii() and key.isdigit() else None


def observation_for_keys(keys: Sequence[str], seed: int, fraction: float, missing: str) -> np.ndarray:
    """Masks [N, 2] for shard keys: integer keys use the Weyl rule, others a stable hash."""
    check_args(fraction, missing)
    indices = [_key_index(k) for k in keys]
    if all(i is not None for i in indices):
        return observation_array(np.asarray(indices, dtype=np.int64).reshape(-1), seed, fraction, missing)
    return np.concatenate([observation_array([i], seed, fraction, missing) if i is not None
                           else _hashed(k, seed, fraction, missing) for k, i in zip(keys, indices)])


def _hashed(key: str, seed: int, fraction: float, missing: str) -> np.ndarray:
    """Fallback for keys that are not integers: uniform numbers from a stable hash of the key."""
    words = np.array([_hash64("key-paired", int(seed), key), _hash64("key-which", int(seed), key)],
                     dtype=np.uint64)
    u = _units(words)
    return _decide(u[:1], u[1:], fraction, missing)


def observation(key: str, seed: int, fraction: float, missing: str) -> tuple[bool, bool]:
    """(observed s, observed t) for one sample key; identical on every rank, worker and resume."""
    row = observation_for_keys([str(key)], seed, fraction, missing)[0]
    return bool(row[0]), bool(row[1])
