"""Patching: the only code that writes adapted weights.

Contract:
- `svf_delta` is the formula, differentiable in z: Δ = U·diag(s ⊙ (c·z − 1))·Vᵀ with c = Σs / Σ(s ⊙ z),
  computed in fp32, c from `experts.mix.rescale` (which raises DegenerateZ on a degenerate z). W' = W + Δ is
  cast once to the weight dtype; `SVFMatrix.compose` refuses a W' that is not finite (DegenerateZ), so NaN
  or Inf weights are never written: `ModelPatcher.apply` composes every matrix before it writes any.
- `SVFMatrix` is one adaptable weight matrix: it holds a reference to the live parameter, a private copy of
  the base weights and its factors (on the parameter's device), and knows how to compose W' and write it in
  place (`copy_`, never reassigning the parameter). Restoring copies the base back: bit for bit.
- `ModelPatcher` owns all SVFMatrix of a model and the current adaptation key. `apply` moves the weights to
  another adaptation by the cheapest way: nothing (same key), copy of the base (base), copy of a cached W'
  (recently used), or composition from the factors; composed W' are kept in an LRU cache bounded in bytes.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from experts.errors import DegenerateZ
from experts.mix import BASE_NAME as BASE_KEY
from experts.mix import rescale
from experts.svd import Factors

UNKNOWN_KEY = "<unknown>"   # after forget(): the live weights must be rewritten by the next apply


def svf_delta(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Δ = U·diag(s ⊙ (c·z − 1))·Vh, c = Σs / Σ(s ⊙ z). U [m, r], s [r], Vh [r, n], z [r] → [m, n] fp32."""
    z = z.to(device=s.device, dtype=torch.float32)
    c = rescale(s, z)
    return (U * (s * (c * z - 1))) @ Vh


class SVFMatrix:
    """One adaptable matrix: live parameter + base copy + factors. Knows how it is patched."""

    def __init__(self, name: str, param: torch.Tensor, factors: Factors):
        assert tuple(param.shape) == (factors.U.shape[0], factors.Vh.shape[1]), (name, param.shape)
        self.name = name
        self.param = param                      # [m, n] live weight, written only by write()/restore()
        self.base = param.detach().clone()      # [m, n] weight dtype
        f = factors.to(param.device)
        self.U, self.s, self.Vh = f.U, f.s, f.Vh  # [m, r], [r], [r, n] fp32

    @property
    def rank(self) -> int:
        return self.s.numel()

    def compose(self, z: torch.Tensor) -> torch.Tensor:
        """W' = W + Δ(z), computed in fp32, cast once to the weight dtype; DegenerateZ if z or W' is not sane."""
        try:
            w = (self.base.to(torch.float32) + svf_delta(self.U, self.s, self.Vh, z)).to(self.base.dtype)
        except DegenerateZ as e:
            raise DegenerateZ(f"{self.name}: {e}") from None
        if not torch.isfinite(w).all():      # never write NaN/Inf weights (e.g. a non-finite z in memory)
            raise DegenerateZ(f"{self.name}: the patched weights are not finite")
        return w

    def write(self, w: torch.Tensor) -> None:
        self.param.copy_(w)

    def restore(self) -> None:
        self.param.copy_(self.base)


class PatchMode(str, enum.Enum):
    """How a swap made the weights (a str: it compares equal to, and serialises as, its value)."""

    NOOP = "noop"            # the weights already were those of the adaptation
    RESTORE = "restore"      # back to the base weights
    CACHED = "cached"        # a copy of a cached W'
    COMPOSED = "composed"    # W' composed from the factors (then cached)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PatchReport:
    key: str
    how: PatchMode
    ms: float


class ModelPatcher:
    """All adaptable matrices of one model, the current adaptation, and an LRU cache of composed W'."""

    def __init__(self, matrices: Mapping[str, SVFMatrix], cache_bytes: int = 1 << 30):
        self.matrices = dict(matrices)
        self.cache_bytes = int(cache_bytes)
        self.current = BASE_KEY
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.swaps = 0

    @property
    def ranks(self) -> dict[str, int]:
        return {n: m.rank for n, m in self.matrices.items()}

    @property
    def cached_keys(self) -> list[str]:
        return list(self._cache)

    def cached_bytes(self) -> int:
        return sum(_nbytes(e) for e in self._cache.values())

    @torch.no_grad()
    def apply(self, key: str, z_of: Callable[[], Mapping[str, torch.Tensor]] | None = None) -> PatchReport:
        """Make the live weights those of adaptation `key`; `z_of()` gives its z' when it must be composed."""
        if key == self.current:
            return PatchReport(key, PatchMode.NOOP, 0.0)
        t0 = time.perf_counter()
        if key == BASE_KEY:
            how = PatchMode.RESTORE
            for m in self.matrices.values():
                m.restore()
        elif key in self._cache:
            how = PatchMode.CACHED
            self._cache.move_to_end(key)
            self._write(self._cache[key])
        else:
            how = PatchMode.COMPOSED
            assert z_of is not None, f"adaptation {key!r} is not cached and no z' was given"
            z = z_of()
            patched = {n: self.matrices[n].compose(zn) for n, zn in z.items()}
            self._write(patched)
            self._remember(key, patched)
        _sync(self.matrices)
        self.current = key
        self.swaps += 1
        return PatchReport(key, how, (time.perf_counter() - t0) * 1e3)

    def _write(self, patched: Mapping[str, torch.Tensor]) -> None:
        for n, m in self.matrices.items():
            if n in patched:
                m.write(patched[n])
            else:
                m.restore()

    def _remember(self, key: str, patched: dict[str, torch.Tensor]) -> None:
        size = _nbytes(patched)
        if size > self.cache_bytes:
            return
        while self._cache and self.cached_bytes() + size > self.cache_bytes:
            self._cache.popitem(last=False)
        self._cache[key] = patched

    def forget(self, key: str | None = None) -> None:
        """Drop one cached W' (an expert was unloaded or changed) or all of them.

        Forgetting the live adaptation also forgets that the weights hold it: the next `apply` of that key
        composes it again instead of being a no-op on stale weights.
        """
        if key is None:
            self._cache.clear()
        else:
            self._cache.pop(key, None)
        if key is None or key == self.current:
            self.current = UNKNOWN_KEY


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _sync(matrices: Mapping[str, SVFMatrix]) -> None:
    for m in matrices.values():
        if m.param.is_cuda:
            torch.cuda.synchronize(m.param.device)
        return
