"""The torch-only side of the vLLM engine's workers: where each HF matrix lives on a rank, and the worker
extension that fills the factored layers (server/engines/vllm_layers.py) with their factors. Does not import
vllm (vllm_layers.T2Worker, the class vLLM loads as `worker_extension_cls`, adds the layers to this).

Contract:
- vLLM calls the `t2_*` methods by name through `collective_rpc`, on every worker, with small arguments only
  (file paths, names): tensors never cross the RPC.
- `fused_slice` places an HF matrix on a rank: vLLM fuses `q/k/v_proj` into `qkv_proj` = [q; k; v] and
  `gate/up_proj` into `gate_up_proj` = [gate; up] (the model's `packed_modules_mapping`) and, with tensor
  parallelism, keeps on each rank the rows of a column-parallel layer (qkv, gate_up) and the columns of a
  row-parallel one (o_proj, down_proj).
- `t2_init` reads from the factor cache, for every factored layer of this rank, only its slice (rows of U,
  or columns of Vh; s whole) and `copy_`s U·diag(s) and Vh into the layer's persistent buffers. It returns
  how many layers were wrapped and its tensor/pipeline coordinates, so the front process can check that vLLM
  wrapped what it expected (with pipeline parallelism a rank holds only its stage's layers).
- `t2_stats` returns the step counters of the factored layers (vllm_layers.STEPS).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open

from experts.svd import read_factor_slice

log = logging.getLogger("t2.engine.vllm.worker")

COLUMN, ROW = "column", "row"
_LEAF = re.compile(r"^(.*)\.([A-Za-z0-9_]+)\.weight$")
# HF projections that vLLM shards by input features (row-parallel); all others adapted here are by output rows
ROW_PARALLEL = ("o_proj", "down_proj")


@dataclass(frozen=True)
class Placement:
    """Where one HF matrix W [m, n] lives on one tensor-parallel rank."""

    hf_name: str
    param_name: str           # the vLLM parameter (maybe fused)
    kind: str                 # COLUMN | ROW
    offset: int               # first row of this matrix's shard inside the (fused) local parameter
    rows: tuple[int, int]     # rows of W this rank holds  (all rows for ROW)
    cols: tuple[int, int]     # columns of W this rank holds (all columns for COLUMN)

    @property
    def local_shape(self) -> tuple[int, int]:
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]


def fused_slice(hf_name: str, shapes: Mapping[str, tuple[int, int]], packed: Mapping[str, list[str]],
                tp_rank: int = 0, tp_size: int = 1, head_dim: int | None = None) -> Placement:
    """Place HF matrix `hf_name` on rank `tp_rank` of `tp_size`. `shapes`: full HF shapes of every matrix.

    1. the fused parameter and the shard index (packed_modules_mapping, e.g. gate_up_proj ← [gate, up]);
    2. per shard, the rows this rank holds: m / tp each; for k/v with fewer KV heads than ranks, the head is
       replicated: rank r holds head r·kv_heads // tp (rows = one head); row-parallel: columns n / tp each;
    3. the offset of the shard inside the local fused parameter = the local rows of the shards before it.
    """
    prefix, leaf = _LEAF.match(hf_name).groups()           # "model.layers.0.mlp", "gate_proj"
    m, n = shapes[hf_name]
    # 1. fused parameter
    fused, siblings = leaf, [leaf]
    for f, parts in packed.items():
        if leaf in parts:
            fused, siblings = f, list(parts)
    param_name = f"{prefix}.{fused}.weight" if prefix else f"{fused}.weight"
    if leaf in ROW_PARALLEL:
        # 2. row-parallel: this rank's columns, all rows
        assert n % tp_size == 0, (hf_name, n, tp_size)
        w = n // tp_size
        return Placement(hf_name, param_name, ROW, 0, (0, m), (tp_rank * w, (tp_rank + 1) * w))

    def local_rows(sib: str) -> tuple[int, int]:
        full = shapes[f"{prefix}.{sib}.weight" if prefix else f"{sib}.weight"][0]
        if sib in ("k_proj", "v_proj") and head_dim and full // head_dim < tp_size:
            h = tp_rank * (full // head_dim) // tp_size        # fewer KV heads than ranks: heads are replicated
            return h * head_dim, (h + 1) * head_dim
        assert full % tp_size == 0, (sib, full, tp_size)
        w = full // tp_size
        return tp_rank * w, (tp_rank + 1) * w

    # 3. offset among the shards of the fused parameter
    offset = 0
    for sib in siblings:
        if sib == leaf:
            break
        r = local_rows(sib)
        offset += r[1] - r[0]
    return Placement(hf_name, param_name, COLUMN, offset, local_rows(leaf), (0, n))


# -- the factored form per token and its slicing (the layers in vllm_layers.py run these; the gains come from
#    experts/factored.py, as the embedded engine's; its fused per-row MLP is server/engines/hf_factored.py) ---
def local_factors(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, *, rows: tuple[int, int] | None = None,
                  cols: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U·diag(s) of rows `rows`, Vh of columns `cols`) of W = U·diag(s)·Vh [m, n]: one rank's factors.

    Column-parallel: rows = this rank's output rows, cols None. Row-parallel: cols = this rank's input
    columns, rows None. U [m, r], s [r], Vh [r, n] → ([m_local, r], [r, n_local])."""
    us = U * s                                               # [m, r]
    if rows is not None:
        us = us[rows[0]:rows[1]]
    vh = Vh if cols is None else Vh[:, cols[0]:cols[1]]
    return us.contiguous(), vh.contiguous()


def _matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return a @ w.t()


def factored(x: torch.Tensor, vh: Any, us: list[Any], gains: torch.Tensor, slots: torch.Tensor,
             ranks: tuple[int, ...] | None = None, mm: Callable[[torch.Tensor, Any], torch.Tensor] = _matmul
             ) -> torch.Tensor:
    """Y = ((x·vhᵀ) ⊙ gains[slot]) · us_iᵀ per slice, concatenated. x [T, n], vh [Σr, n], us_i [m_i, r_i],
    gains [S, Σr] fp32, slots [T] long in [0, S). Returns [T, Σm_i] in x's dtype.
    `mm(a, w)` = a·wᵀ; a caller with packed weights (vllm_layers: oneDNN handles on a CPU) passes its own
    `mm` and the slices' `ranks` (r_i; read from us_i by default)."""
    ranks = ranks or tuple(u.shape[1] for u in us)
    h = mm(x, vh)                                            # [T, Σr]
    h = h * gains.index_select(0, slots).to(h.dtype)          # [T, Σr]
    if len(us) == 1:
        return mm(h, us[0])
    outs, at = [], 0
    for u, r in zip(us, ranks):
        outs.append(mm(h[:, at:at + r], u))                  # [T, m_i]
        at += r
    return torch.cat(outs, dim=-1)


class SVFWorkerExtension:
    """Mixed into vLLM's worker class: `self` is the worker (self.model_runner, self.rank, self.vllm_config).

    `_t2_layers(model)` ({module name: factored layer}) and `_t2_local_factors` come from the subclass
    (vllm_layers.T2Worker), which can import vllm."""

    def t2_init(self, factors_file: str) -> dict[str, Any]:
        """1. the factored layers and TP coordinates; 2. shapes from the factor file; 3. copy each slice in."""
        t0 = time.perf_counter()
        model = self.model_runner.get_model()
        # 1. layers, fused groups, tensor-parallel coordinates
        layers = self._t2_layers(model)
        packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
        tp_size = int(self.vllm_config.parallel_config.tensor_parallel_size)
        pp_size = int(self.vllm_config.parallel_config.pipeline_parallel_size)
        tp_rank, pp_rank = int(self.rank) % tp_size, int(self.rank) // tp_size     # rank = pp_rank·tp + tp_rank
        hf_cfg = self.vllm_config.model_config.hf_config
        head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
        matrices = onednn = 0
        with safe_open(factors_file, framework="pt") as fh, torch.no_grad():
            # 2. full HF shapes of every matrix in the cache
            keys = {k[:-2] for k in fh.keys() if k.endswith(".U")}
            shapes = {nm: (fh.get_slice(f"{nm}.U").get_shape()[0], fh.get_slice(f"{nm}.Vh").get_shape()[1])
                      for nm in keys}
            # 3. every layer: its slices' factors, sliced for this rank, copied into its buffers
            for i, (name, layer) in enumerate(sorted(layers.items())):
                prefix, leaf = name.rsplit(".", 1)
                hf_names = [f"{prefix}.{s}.weight" for s in packed.get(leaf, [leaf])]
                missing = [h for h in hf_names if h not in shapes]
                if missing:
                    raise RuntimeError(f"t2: {name} is factored but the factor cache lacks {missing} "
                                       "(targets must cover whole fused groups)")
                us_all, vh_all = [], []
                for h in hf_names:
                    p = fused_slice(h, shapes, packed, tp_rank, tp_size, head_dim)
                    f = read_factor_slice(fh, h, rows=p.rows if p.kind == COLUMN else None,
                                          cols=p.cols if p.kind == ROW else None)
                    us, vh = self._t2_local_factors(f.U, f.s, f.Vh)
                    us_all.append(us)
                    vh_all.append(vh)
                    matrices += 1
                vh = torch.cat(vh_all)
                if tuple(vh.shape) != tuple(layer.vh.shape) or any(
                        tuple(u.shape) != tuple(b.shape) for u, b in zip(us_all, layer.t2_us)):
                    raise RuntimeError(f"t2: factor shapes of {name} ({[tuple(u.shape) for u in us_all]}, "
                                       f"{tuple(vh.shape)}) do not match the layer's buffers "
                                       f"({[tuple(b.shape) for b in layer.t2_us]}, {tuple(layer.vh.shape)})")
                layer.vh.copy_(vh)
                for u, b in zip(us_all, layer.t2_us):
                    b.copy_(u)
                onednn += bool(layer.t2_pack())      # CPU: oneDNN handles of the loaded factors
                layer.t2_attach_slots()              # the step's gain rows, computed once per step
                layer.t2_count = i == 0
        # 4. a later pipeline stage receives the previous stage's activations in a buffer that vLLM allocates in
        #    its warm-up run (gpu_model_runner._dummy_run); the CPU worker skips that run in eager mode with an
        #    explicit KV size (cpu_worker._should_warm_up_model, vllm 0.32), and the first step then fails on
        #    `assert self.intermediate_tensors is not None`: allocate it the same way
        runner = self.model_runner
        if pp_rank > 0 and getattr(runner, "intermediate_tensors", False) is None:
            runner.intermediate_tensors = model.make_empty_intermediate_tensors(
                batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)
        dev = next(iter(layers.values())).vh.device if layers else None
        return {"wrapped": len(layers), "matrices": matrices, "tp_rank": tp_rank, "tp_size": tp_size,
                "pp_rank": pp_rank, "pp_size": pp_size,
                "device": str(dev), "onednn": onednn,
                "dense_ok": bool(layers) and all(m.t2_dense_ok for m in layers.values()),
                "ms": (time.perf_counter() - t0) * 1e3}

    def t2_stats(self) -> dict[str, Any]:
        return self._t2_step_stats()
