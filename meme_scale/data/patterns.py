"""Truly incomplete data: which modalities a stored sample really has (DESIGN 1.3 simulates the rest).

A sample of a two-modality dataset (s, t: meta.json's modality order) is "both", "s_only" or
"t_only"; its shard holds only the fields that exist. meta.json's ``patterns`` counts them per
split ({"train": {"both": n, "s_only": n, "t_only": n}, ...}); a dataset without that entry (or
with other than two modalities) is complete. The reader's ``observed`` mask is the truth AND the
simulated observation-ratio mask: a modality that is absent is never observed, whatever f.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

PATTERNS = ("both", "s_only", "t_only")


def pattern_name(present: Sequence[bool]) -> str:
    """"both", "s_only" or "t_only" for a two-modality sample; a sample with neither is an error."""
    s, t = bool(present[0]), bool(present[1])
    if not (s or t):
        raise ValueError("a sample needs at least one modality")
    return "both" if s and t else "s_only" if s else "t_only"


def absent_modalities(meta: dict) -> set[str]:
    """Modalities that some stored sample lacks (their field is optional in every shard)."""
    names = list(meta["modalities"])
    out = set()
    for counts in (meta.get("patterns") or {}).values():
        if counts.get("t_only"):  # these samples lack s
            out.add(names[0])
        if counts.get("s_only"):
            out.add(names[1])
    return out


def present_mask(raws: Sequence[dict], fields: Iterable[str]) -> np.ndarray:
    """bool [B, M]: which of these modality fields each raw sample really holds."""
    fields = list(fields)
    return np.array([[f in r for f in fields] for r in raws], dtype=bool).reshape(len(raws), len(fields))


def pattern_counts(meta: dict) -> dict[str, int]:
    """Flat {"patterns.<split>.<pattern>": count} for MLflow params and summary.json (empty when
    meta.json has no pattern counts). s and t are meta.json's modality order."""
    return {f"patterns.{split}.{p}": int(counts.get(p, 0))
            for split, counts in (meta.get("patterns") or {}).items() for p in PATTERNS}


def available_samples(meta: dict, split: str, modalities: Sequence[str]) -> int:
    """Samples of ``split`` that hold every one of ``modalities``."""
    counts = (meta.get("patterns") or {}).get(split)
    if counts is None:
        return meta["splits"][split]
    names = list(meta["modalities"])
    need = {names.index(m) for m in modalities}
    having = {"both": {0, 1}, "s_only": {0}, "t_only": {1}}
    return sum(n for p, n in counts.items() if need <= having[p])
