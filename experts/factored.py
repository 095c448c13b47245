"""The factored form of SVF: many adaptations in one batch, one gain row per batch row.

Every expert of a base shares the base's factors W = U·diag(s)·Vh; an adaptation a only changes the gains.
`svf_delta` (experts/patch.py) writes W'_a = U·diag(s ⊙ g_a)·Vh as a dense matrix; this module computes
the same product without ever forming W'_a, for a batch whose rows belong to different adaptations:

    H = X · Vhᵀ            # [T, r]   one GEMM for the whole batch
    H = H ⊙ G[idx]         # G [slots, r] gain rows, idx [T] the slot of each row's adaptation
    Y = H · U_sᵀ           # [T, m]   U_s = U·diag(s), one GEMM

Contract:
- `gains(s, z)` is g = c·z with c = Σs / Σ(s ⊙ z), in fp32: the same rescale as `svf_delta`, so
  U_s·diag(g)·Vh == W + svf_delta(U, s, Vh, z) up to rounding. Base rows use g = 1.
- `FactoredMatrix` holds U_s [m, r] and Vh [r, n] in the weight dtype (computed in fp32, cast once).
- `GainTable` is the gain table of a set of matrices, one row per slot and all matrices side by side:
  `table [slots, Σr]` fp32, matrix i owning columns `offsets[i] : offsets[i] + ranks[i]`. Slot 0 is the base
  (all ones) and is never written. `write(slot, {name: g})` fills one slot (matrices not named get ones).
  `rows(idx, dtype)` gathers the rows of a step ([B, Σr] in the compute dtype); `rows(idx, dtype, span)`
  only the columns `span = (offset, width)` ([B, width]: one matrix's `slice_of`, or adjacent ones). A
  long prefill gathers per matrix, just before its multiply: the whole [T, Σr] of 752 tokens is 156 MB for
  SmolLM2 (36 ms to gather, and out of cache when read).
- `factored_matmul(x, Us, Vh, g)` is the formula for x [B, ..., n] and per-row gains g [B, r].
No server code here: the engine decides slots, dense vs factored, and which rows go where.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from experts.mix import rescale


def gains(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """g = c·z, c = Σs / Σ(s ⊙ z). s [r], z [r] → [r] fp32 (the diagonal factor of W'/W in the s basis)."""
    s = s.to(torch.float32)
    z = z.to(device=s.device, dtype=torch.float32)
    return z * rescale(s, z)              # the one check of c (experts.mix): a degenerate z never gets a slot


class FactoredMatrix:
    """U_s = U·diag(s) [m, r] and Vh [r, n] of one matrix, in the weight dtype."""

    def __init__(self, U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, dtype: torch.dtype):
        self.Us = (U.to(torch.float32) * s.to(torch.float32)).to(dtype).contiguous()   # [m, r]
        self.Vh = Vh.to(dtype).contiguous()                                              # [r, n]
        self.s = s.to(torch.float32)                                                     # [r] fp32

    @property
    def rank(self) -> int:
        return self.s.numel()

    def dense(self, g: torch.Tensor | None = None) -> torch.Tensor:
        """U_s·diag(g)·Vh in fp32 (tests: the W' this factored form stands for)."""
        Us = self.Us.to(torch.float32)
        return (Us if g is None else Us * g.to(Us)) @ self.Vh.to(torch.float32)


def factored_matmul(x: torch.Tensor, Us: torch.Tensor, Vh: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """y = ((x·Vhᵀ) ⊙ g) · U_sᵀ. x [B, T, n] (or [B, n]), g [B, r] per row (or [r]) → [B, T, m]."""
    h = x @ Vh.T                                              # [B, T, r]
    if g.dim() == 2 and x.dim() == 3:
        g = g.unsqueeze(1)                                    # [B, 1, r]: one gain row per batch row
    return (h * g) @ Us.T                                     # [B, T, m]


class GainTable:
    """Gain rows for `slots` adaptations over a fixed list of matrices; slot 0 = base (ones)."""

    def __init__(self, ranks: Mapping[str, int], slots: int, device: torch.device | str = "cpu"):
        assert slots >= 1
        self.names: list[str] = list(ranks)
        self.ranks = [int(ranks[n]) for n in self.names]
        self.offsets = [0]
        for r in self.ranks[:-1]:
            self.offsets.append(self.offsets[-1] + r)
        self._col = {n: (o, r) for n, o, r in zip(self.names, self.offsets, self.ranks)}
        self.table = torch.ones(slots, sum(self.ranks), dtype=torch.float32, device=device)   # [slots, Σr]

    @property
    def slots(self) -> int:
        return self.table.shape[0]

    def slice_of(self, name: str) -> tuple[int, int]:
        """(offset, rank) of a matrix's columns."""
        return self._col[name]

    def write(self, slot: int, g: Mapping[str, torch.Tensor]) -> None:
        """Fill one slot: the named matrices get their gains, every other matrix ones (base)."""
        assert 0 < slot < self.slots, f"slot {slot} is not writable"
        row = self.table[slot]
        row.fill_(1.0)
        for name, gn in g.items():
            o, r = self._col[name]
            row[o:o + r].copy_(gn.to(row))

    def rows(self, idx: torch.Tensor, dtype: torch.dtype, span: tuple[int, int] | None = None) -> torch.Tensor:
        """The gain rows of a step: idx [B] slots → [B, Σr] in `dtype`, or [B, width] of columns `span`."""
        table = self.table if span is None else self.table[:, span[0]:span[0] + span[1]]
        return table.index_select(0, idx).to(dtype)


def gains_of(s_of: Mapping[str, torch.Tensor], z: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{matrix: g} for an adaptation's z' (matrices z' does not cover keep the base: not in the result)."""
    return {n: gains(s_of[n], zn) for n, zn in z.items()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


__all__: Sequence[str] = ("gains", "gains_of", "FactoredMatrix", "GainTable", "factored_matmul", "relative_error")
