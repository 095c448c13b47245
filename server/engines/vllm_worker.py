"""The patching side of the vLLM engine: a worker extension (mixed into each vLLM worker by
`worker_extension_cls`) and the torch-only mapping it uses. Does not import vllm.

Contract:
- vLLM calls the `t2_*` methods by name through `collective_rpc`, on every worker, with small arguments only
  (file paths, expert names and mixing weights, a byte budget): tensors never cross the RPC.
- `t2_init` maps every adapted HF matrix onto the worker's own parameter slice (`fused_slice`):
  vLLM fuses `q/k/v_proj` into `qkv_proj` = [q; k; v] and `gate/up_proj` into `gate_up_proj` = [gate; up]
  (the model's `packed_modules_mapping`) and, with tensor parallelism, keeps on each rank the rows of a
  column-parallel layer (qkv, gate_up) and the columns of a row-parallel one (o_proj, down_proj). The worker
  reads from the factor cache only its slice (rows of U, or columns of Vᵀ = rows of V; s whole), so no rank
  composes the full matrix; and it holds the factors and a base copy on its own device (experts.patch).
- Two write paths, detected per model: `copy` — the parameters are plain tensors (CUDA, unquantized): W' is
  written in place with `param.data.copy_` into a view of the fused parameter (never reassigned, so CUDA
  graphs stay valid); `reload` — the backend repacked the weights (vLLM's CPU backend: `.weight` is then
  empty or of another shape): W' is composed into HF-shaped shadow tensors and handed to vLLM's own
  `reload_weights(weights_iterator=..., is_checkpoint_format=True)`, all shards of a fused layer together.
- `t2_apply(key, mix)` moves the weights to an adaptation through `ModelPatcher` (nothing / restore of the
  base, bit for bit / copy of a cached W' / composition), with the LRU cache of patched weights bounded by
  `patch_cache_mb`; it returns how and how long. The caller guarantees no request runs during the call.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from experts.expert import Expert
from experts.mix import Adaptation, mix_z
from experts.patch import ModelPatcher, SVFMatrix
from experts.svd import read_factor_slice, read_weights

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


class SVFWorkerExtension:
    """Mixed into vLLM's worker class: `self` is the worker (self.model_runner, self.rank, self.vllm_config)."""

    # -- RPC entry points ----------------------------------------------------------------------------------
    def t2_init(self, model_dir: str, factors_file: str, names: list[str], expert_files: dict[str, str],
                cache_bytes: int) -> dict[str, Any]:
        """Build the patcher: 1. parameters and shapes; 2. placement; 3. write path; 4. matrices; 5. experts."""
        t0 = time.perf_counter()
        model = self.model_runner.get_model()
        # 1. parameters, HF shapes, tensor-parallel coordinates
        params = dict(model.named_parameters())
        packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
        tp_size = int(self.vllm_config.parallel_config.tensor_parallel_size)
        tp_rank = int(self.rank) % tp_size
        hf_cfg = self.vllm_config.model_config.hf_config
        head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
        with safe_open(factors_file, framework="pt") as fh:
            shapes = {nm: (fh.get_slice(f"{nm}.U").get_shape()[0], fh.get_slice(f"{nm}.Vh").get_shape()[1])
                      for nm in names}
        shapes.update(_sibling_shapes(model_dir, names, packed))
        # 2. placement of every matrix on this rank
        places = {nm: fused_slice(nm, shapes, packed, tp_rank, tp_size, head_dim) for nm in names}
        # 3. write path: in-place copy if every parameter is a plain tensor of the expected local shape
        self._t2_repacked = any(not _plain(params.get(p.param_name), p, places.values()) for p in places.values())
        dtype = self.vllm_config.model_config.dtype
        if self._t2_repacked and tp_size > 1:
            raise RuntimeError("t2: repacked weights (reload path) are only supported with tensor parallelism 1")
        # 4. matrices: views into the live parameters, or HF-shaped shadows for the reload path
        matrices: dict[str, SVFMatrix] = {}
        self._t2_extra: dict[str, torch.Tensor] = {}
        with safe_open(factors_file, framework="pt") as fh:
            if self._t2_repacked:
                base = read_weights(Path(model_dir), names)
                for nm in names:
                    shadow = base[nm].to(dtype)                                  # [m, n] checkpoint layout
                    matrices[nm] = SVFMatrix(nm, shadow, read_factor_slice(fh, nm))
                # shards of fused layers that are not adapted go along unchanged (vLLM loads fused layers whole)
                extra = _siblings(names, packed) - set(names)
                self._t2_extra = {k: v.to(dtype) for k, v in read_weights(Path(model_dir), extra).items()}
            else:
                for nm, p in places.items():
                    live = params[p.param_name].data
                    view = live.narrow(0, p.offset, p.local_shape[0]) if p.kind == COLUMN else live
                    f = read_factor_slice(fh, nm, rows=p.rows if p.kind == COLUMN else None,
                                          cols=p.cols if p.kind == ROW else None)
                    matrices[nm] = SVFMatrix(nm, view, f)                        # factors moved to the device
        self._t2_patcher = ModelPatcher(matrices, cache_bytes)
        # 5. experts (checked against the base by the front process)
        self._t2_experts = {n: Expert.load(Path(p)) for n, p in expert_files.items()}
        return {"path": "reload" if self._t2_repacked else "copy", "matrices": len(matrices),
                "tp_rank": tp_rank, "tp_size": tp_size, "device": str(next(iter(params.values())).device),
                "ms": (time.perf_counter() - t0) * 1e3}

    def t2_apply(self, key: str, mix: list[tuple[str, float]]) -> dict[str, Any]:
        """Make the weights those of adaptation `key` (= Adaptation(mix).key); returns how and how long."""
        t0 = time.perf_counter()
        adaptation = Adaptation(tuple((str(n), float(w)) for n, w in mix))
        with torch.no_grad():
            report = self._t2_patcher.apply(key, lambda: mix_z(self._t2_experts, adaptation))
            reload_ms = 0.0
            if self._t2_repacked and report.how != "noop":
                t1 = time.perf_counter()
                self._t2_reload()
                reload_ms = (time.perf_counter() - t1) * 1e3
        return {"key": key, "how": report.how, "patch_ms": report.ms, "reload_ms": reload_ms,
                "ms": (time.perf_counter() - t0) * 1e3}

    # -- the reload path --------------------------------------------------------------------------------------
    def _t2_reload(self) -> None:
        weights = [(n, m.param) for n, m in self._t2_patcher.matrices.items()] + list(self._t2_extra.items())
        # vLLM warns about every layer and weight we did not pass (all but the adapted ones): expected here
        quiet = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{m}") for m in ("inplace", "layerwise")]
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)


def _plain(param: torch.Tensor | None, p: Placement, all_places) -> bool:
    """A plain parameter: 2-D, of the local fused shape this placement implies (else it was repacked)."""
    if param is None or param.dim() != 2 or param.numel() == 0:
        return False
    rows = sum(q.local_shape[0] for q in all_places if q.param_name == p.param_name) if p.kind == COLUMN else None
    if p.kind == COLUMN:
        return param.shape[1] == p.local_shape[1] and param.shape[0] >= rows
    return tuple(param.shape) == p.local_shape


def _siblings(names: list[str], packed: Mapping[str, list[str]]) -> set[str]:
    """Every HF matrix that shares a fused parameter with one of `names` (names included)."""
    out = set(names)
    for nm in names:
        prefix, leaf = _LEAF.match(nm).groups()
        for parts in packed.values():
            if leaf in parts:
                out.update(f"{prefix}.{s}.weight" for s in parts)
    return out


def _sibling_shapes(model_dir: str, names: list[str], packed: Mapping[str, list[str]]) -> dict[str, tuple[int, int]]:
    from experts.svd import safetensors_files
    want = _siblings(names, packed)
    out: dict[str, tuple[int, int]] = {}
    for f in safetensors_files(Path(model_dir)):
        with safe_open(str(f), framework="pt") as fh:
            for k in want.intersection(fh.keys()):
                out[k] = tuple(fh.get_slice(k).get_shape())
    return out
