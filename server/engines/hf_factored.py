"""The factored layers of the embedded engine: adapted linears that run dense or factored, per forward.

Contract:
- `install(model, patcher, table, targets, dtype)` gives every adapted linear of a transformers model a
  second way to compute itself, without changing the module tree or parameter names (the instance's
  `forward` is replaced; the class's is the dense path):
  * dense: the module's own weights, i.e. whatever the ModelPatcher wrote (one adaptation per forward);
  * factored: y = ((x·Vhᵀ) ⊙ G[idx]) · U_sᵀ (experts/factored.py), one gain row per batch row.
  Llama-style MLPs whose gate, up and down are all adapted run fused: one GEMM with [Vh_gate; Vh_up]ᵀ and
  one gain multiply for both (their gain columns are adjacent in the table), then U_s per half, the
  activation, and down's two GEMMs. Other adapted linears (attention, partial MLP targets) run one by one.
- `StepPath` is the one switch all those layers read: `dense()` or `factored(idx)` before each forward
  (idx [T]: the gain slot of each token). Each layer gathers its own columns of the step's gain rows
  (`gains(span)` → [T, width] in the compute dtype) right before it multiplies: one gather of every
  matrix's columns at once is 156 MB for a 752-token SmolLM2 prefill, 36 ms, and cold when read.
  The layers never decide the path, the engine does.
- The factors are built from the SVD factors of the ModelPatcher's matrices (fp32 → weight dtype once).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from experts.factored import FactoredMatrix, GainTable, factored_matmul
from experts.patch import ModelPatcher


class StepPath:
    """Which path the next forward takes, and the factored path's gain rows."""

    def __init__(self, table: GainTable, dtype: torch.dtype):
        self.table, self.dtype = table, dtype
        self.is_factored = False
        self.idx: torch.Tensor | None = None       # [T] gain slot of each token of this step (factored only)

    def dense(self) -> None:
        self.is_factored, self.idx = False, None

    def factored(self, idx: torch.Tensor) -> None:
        """idx [T] long on the model's device: the slot of each token (of each batch row)."""
        self.idx = idx
        self.is_factored = True

    def gains(self, span: tuple[int, int]) -> torch.Tensor:
        """[T, width]: this step's gain rows, columns `span` = (offset, width) of the table."""
        return self.table.rows(self.idx, self.dtype, span)


class FactoredLinear:
    """One adapted nn.Linear: dense through the module, factored through U_s, Vh and the step's gains."""

    def __init__(self, linear: torch.nn.Linear, fm: FactoredMatrix, path: StepPath, name: str):
        self.linear, self.path = linear, path
        self.Us, self.Vh = fm.Us, fm.Vh                              # [m, r], [r, n]
        self.span = path.table.slice_of(name)                       # (offset, r)
        self.dense_forward: Callable = linear.forward                # the class's forward, bound
        linear.forward = self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.path.is_factored:
            return self.dense_forward(x)
        g = self.path.gains(self.span)                               # [B, r]
        y = factored_matmul(x, self.Us, self.Vh, g)                  # [B, T, m]
        return y if self.linear.bias is None else y + self.linear.bias


class FactoredMLP:
    """A gated MLP (down(act(gate(x)) * up(x))) whose three linears are adapted, fused where it pays."""

    def __init__(self, mlp: torch.nn.Module, gate: FactoredMatrix, up: FactoredMatrix, down: FactoredMatrix,
                 path: StepPath, names: Sequence[str]):
        self.mlp, self.path, self.act = mlp, path, mlp.act_fn
        og, rg = path.table.slice_of(names[0])
        ou, ru = path.table.slice_of(names[1])
        self.span_d = path.table.slice_of(names[2])
        assert ou == og + rg, "gate and up gains must be adjacent in the table"
        self.span_gu, self.rg = (og, rg + ru), rg
        self.Vh_gu = torch.cat([gate.Vh, up.Vh]).contiguous()       # [rg + ru, n]
        self.Us_g, self.Us_u = gate.Us, up.Us                        # [m, rg], [m, ru]
        self.Vh_d, self.Us_d = down.Vh, down.Us                      # [rd, m], [n, rd]
        self.bias = any(getattr(mlp, k).bias is not None for k in ("gate_proj", "up_proj", "down_proj"))
        assert not self.bias, "fused factored MLP: biases are not supported (use per-linear)"
        self.dense_forward: Callable = mlp.forward
        mlp.forward = self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.path.is_factored:
            return self.dense_forward(x)
        path = self.path
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)
        # 1. gate and up: one GEMM, one gain multiply
        h = x @ self.Vh_gu.T                                                    # [B, T, rg+ru]
        h = h * path.gains(self.span_gu)[:, None]
        a = self.act(h[..., :self.rg] @ self.Us_g.T) * (h[..., self.rg:] @ self.Us_u.T)   # [B, T, m]
        # 2. down
        h = (a @ self.Vh_d.T) * path.gains(self.span_d)[:, None]               # [B, T, rd]
        y = h @ self.Us_d.T                                                     # [B, T, n]
        return y.squeeze(1) if squeeze else y


def install(model: torch.nn.Module, patcher: ModelPatcher, table: GainTable, dtype: torch.dtype) -> StepPath:
    """Give each adapted linear of `model` its factored path; returns the switch they all read."""
    path = StepPath(table, dtype)
    fms = {n: FactoredMatrix(m.U, m.s, m.Vh, dtype) for n, m in patcher.matrices.items()}
    modules = dict(model.named_modules())
    done: set[str] = set()
    # 1. fused MLPs: gate, up and down all adapted, no bias
    for mod_name, mod in modules.items():
        names = [f"{mod_name}.{k}.weight" for k in ("gate_proj", "up_proj", "down_proj")]
        if not all(n in fms for n in names) or not hasattr(mod, "act_fn"):
            continue
        if any(getattr(mod, k).bias is not None for k in ("gate_proj", "up_proj", "down_proj")):
            continue
        g, u = table.slice_of(names[0]), table.slice_of(names[1])
        if g[0] + g[1] != u[0]:
            continue
        FactoredMLP(mod, fms[names[0]], fms[names[1]], fms[names[2]], path, names)
        done.update(names)
    # 2. every other adapted linear on its own
    for n, fm in fms.items():
        if n not in done:
            FactoredLinear(modules[n.removesuffix(".weight")], fm, path, n)
    return path
