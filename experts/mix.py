"""Adaptations and mixing: which experts, with which weights, and the mixed z' they give.

Contract:
- `Adaptation` is a frozen, hashable description of the weights a request runs under: the base weights
  (no experts) or a mix of named experts with weights α normalised to sum 1 (the rescale c makes the scale of
  z' irrelevant, so normalising loses nothing and gives one canonical key per distinct W'). Its `key` is the
  scheduler's grouping key, the patch-cache key and the prefix-cache salt.
- `mix_z` computes z' = Σ_k α_k z_k per matrix (z after the sigmoid, as the paper describes). A matrix an
  expert does not cover counts as z_k = 1 for it (that expert leaves the matrix as it is). Matrices no expert
  covers are absent from the result: they keep the base weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from experts.errors import ExpertNotFound
from experts.expert import BASE_NAME, Expert  # BASE_NAME: defined beside the expert names it excludes

_DIGITS = 6


@dataclass(frozen=True)
class Adaptation:
    """Experts and their normalised weights, sorted by name; empty = the base weights."""

    mix: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(cls, weights: Mapping[str, float] | None) -> "Adaptation":
        """Build from {expert: weight ≥ 0}; weights that are 0 after normalising to sum 1 are dropped."""
        items = {k: float(v) for k, v in (weights or {}).items()}
        bad = {k: v for k, v in items.items() if not math.isfinite(v) or v < 0}
        if bad:
            raise ValueError(f"mixing weights must be finite and ≥ 0, got {bad}")
        if BASE_NAME in items:
            raise ValueError(f"{BASE_NAME!r} is reserved for the base weights, not an expert name")
        top = max(items.values(), default=0.0)
        if top <= 0:
            return BASE
        scaled = {k: v / top for k, v in items.items()}          # ≤ 1 each: the sum cannot overflow
        total = sum(scaled.values())
        mix = {k: round(v / total, _DIGITS) for k, v in scaled.items()}
        return cls(tuple(sorted((k, w) for k, w in mix.items() if w > 0)))

    @property
    def is_base(self) -> bool:
        return not self.mix

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.mix)

    @property
    def key(self) -> str:
        if self.is_base:
            return BASE_NAME
        if len(self.mix) == 1:
            return self.mix[0][0]
        return "+".join(f"{k}*{w:g}" for k, w in self.mix)

    def as_dict(self) -> dict[str, float]:
        return dict(self.mix)


BASE = Adaptation()


def experts_of_key(key: str) -> set[str]:
    """The expert names in an adaptation key (`base`, `name`, or `a*0.5+b*0.5`, as `Adaptation.key` writes it);
    any other key that is not an expert mix (e.g. a patcher's unknown state, `<...>`) names none."""
    if key == BASE_NAME or key.startswith("<"):
        return set()
    return {part.rsplit("*", 1)[0] if "*" in part else part for part in key.split("+")}


def mix_z(experts: Mapping[str, Expert], adaptation: Adaptation) -> dict[str, torch.Tensor]:
    """z'[name] = Σ α_k z_k[name] (fp32) over every matrix covered by at least one expert of the mix."""
    chosen = []
    for name, alpha in adaptation.mix:
        if name not in experts:
            raise ExpertNotFound(f"expert {name!r} is not loaded")
        chosen.append((experts[name], alpha))
    names = sorted({n for e, _ in chosen for n in e.z})
    out: dict[str, torch.Tensor] = {}
    for n in names:
        z = None
        for e, alpha in chosen:
            term = alpha * e.z[n] if n in e.z else None
            if term is None:
                continue
            z = term if z is None else z + term
        missing = sum(alpha for e, alpha in chosen if n not in e.z)  # those experts contribute z_k = 1
        out[n] = z + missing if missing else z  # [rank]
    return out
