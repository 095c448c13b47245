"""Adaptations and mixing: which experts, with which weights, and the mixed z' they give.

Contract:
- `Adaptation` is a frozen, hashable description of the weights a request runs under: the base weights
  (no experts) or a mix of named experts with weights α normalised to sum 1 (the rescale c makes the scale of
  z' irrelevant, so normalising loses nothing and gives one canonical key per distinct W'). Its `key` is the
  scheduler's grouping key, the patch-cache key and the prefix-cache salt.
- `mix_z` computes z' = Σ_k α_k z_k per matrix (z after the sigmoid, as the paper describes). A matrix an
  expert does not cover counts as z_k = 1 for it (that expert leaves the matrix as it is). Matrices no expert
  covers are absent from the result: they keep the base weights.
- `rescale(s, z)` is the one place the SVF rescale c = Σs / Σ(s ⊙ z) is computed (experts.patch.svf_delta,
  so every composition path, and `Expert.check_against` at load). It raises DegenerateZ unless Σ(s ⊙ z) > 0
  and c ∈ C_RANGE = [1e-4, 1e4]. Why that range: c·z·s_i ≤ Σs whatever z is, so the patched weights are
  bounded for any finite c; the range only refuses z whose Σ(s ⊙ z) is so small (or large) that its float
  arithmetic degenerates (z = [1e-45, 0, …] gives c ≈ 1e46, inf in fp32, NaN weights). Every z of the paper
  (a sigmoid, z ∈ [1e-4, 1]) has c ∈ [1, 1e4] and passes; a uniform z is the identity at any scale, but a
  scale below 1e-4 or above 1e4 is refused (rescale the file).
- Blends of valid experts are valid: Σ(s ⊙ z') = Σ_k α_k Σ(s ⊙ z_k) (+ the missing experts' share, α·Σs, i.e.
  c = 1) is a convex combination of values inside [Σs / 1e4, Σs / 1e-4], so c' stays in C_RANGE. The only
  slack is the 6-digit rounding of the α (Σα = 1 ± 1e-5), absorbed by a relative tolerance of 1e-3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from experts.errors import DegenerateZ, ExpertNotFound
from experts.expert import BASE_NAME, Expert  # BASE_NAME: defined beside the expert names it excludes

_DIGITS = 6
C_RANGE = (1e-4, 1e4)   # the sane range of the rescale c (see the contract)
_C_TOL = 1e-3           # relative slack of the range for blends (rounded mixing weights)


def rescale(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """c = Σs / Σ(s ⊙ z) (fp32, differentiable in z) for s [r], z [r]; raises DegenerateZ if c is not sane."""
    z = z.to(device=s.device, dtype=torch.float32)
    den = float((s.detach().double() * z.detach().double()).sum())      # fp64: a tiny Σ(s⊙z) stays visible
    c64 = float(s.detach().double().sum()) / den if den > 0 else math.inf
    lo, hi = C_RANGE
    if not (math.isfinite(c64) and lo * (1 - _C_TOL) <= c64 <= hi * (1 + _C_TOL)):
        raise DegenerateZ(f"the rescale c = Σs / Σ(s⊙z) is {c64:.3g} (Σ(s⊙z) = {den:.3g}), outside the sane "
                          f"range [{lo:g}, {hi:g}]: z is degenerate (almost all zero, or far too large)")
    return s.sum() / (s * z).sum()


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
