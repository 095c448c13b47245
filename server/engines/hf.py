"""The embedded engine: PyTorch + transformers, one model, one worker thread, on the CPU or a GPU.

Contract:
- Serves any local HF folder of the Llama / Mistral / Qwen2 families (safetensors), on CPU or CUDA; with a
  GPU the factors live on the GPU and patching happens there.
- One worker thread owns the model. It takes batches from the Scheduler (one adaptation per batch), patches
  the weights through the ModelPatcher when the batch needs other weights, and runs the batch:
  * scoring (the dispatch pass): one left-padded prefill, then a constrained choice among the candidates'
    first tokens (a further step only for candidates that share a first token);
  * generation: left-padded prefill + decode with a KV cache, per-row sampling (greedy, temperature,
    top_p, seeded generators), stop strings, eos, max_tokens; finished or cancelled rows leave the batch.
- Results reach the event loop through `loop.call_soon_threadsafe`; the loop never runs model code.
- A fault in a batch fails the requests of that batch (they get the exception), /health reports the fault
  until a batch succeeds again, and the worker goes on. `fault_hook` (tests only) is called before every
  batch; whatever it raises is such a fault.
- Runtime expert changes (`load_expert` / `unload_expert`) run as control work in the worker thread
  between batches: the weights never change under a running batch. Unloading drops every cached patched
  weight set containing that expert; queued requests for it fail with a 404.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from experts.expert import Expert
from experts.mix import Adaptation, experts_of_key, mix_z
from experts.patch import ModelPatcher, SVFMatrix
from experts.svd import load_factors
from server.engines.base import Engine, EngineHealth, GenerateRequest, LabelScores, ScoreRequest, TokenChunk
from server.engines.detok import Detokenizer
from server.engines.common import check_servable, label_walk, load_experts, resolve_device, resolve_dtype, walk_sync
from server.engines.sampling import new_generator, prompt_logprobs, sample, token_logprob
from server.engines.scheduler import GENERATE, SCORE, Batch, Job, Scheduler
from server.errors import Conflict, EngineUnavailable, ModelNotFound

log = logging.getLogger("t2.engine.hf")

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


class _Sink:
    """Delivers a job's results from the worker thread to its asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class HFEngine(Engine):
    def __init__(self, model_dir: Path, *, name: str | None = None, experts_dir: Path | None = None,
                 device: str = "auto", dtype: str = "auto", targets: tuple[str, ...] | None = None,
                 cache_dir: Path = Path(".cache/t2"), max_batch: int = 8, max_wait_ms: float = 500,
                 max_queue: int = 1024, patch_cache_mb: int = 1024):
        from experts.svd import MLP_TARGETS
        self.model_dir = Path(model_dir)
        self.model_name = name or self.model_dir.name
        self.experts_dir = experts_dir
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.targets = tuple(targets or MLP_TARGETS)
        self.cache_dir = Path(cache_dir)
        self.patch_cache_bytes = patch_cache_mb << 20
        self.scheduler = Scheduler(max_batch=max_batch, max_wait_s=max_wait_ms / 1e3, max_queue=max_queue)
        self.experts: dict[str, Expert] = {}
        self.fingerprint = ""
        self._thread: threading.Thread | None = None
        self._fault: str | None = None
        self._stopping = False
        self.joined = 0          # sequences that joined a running batch (continuous batching)
        self._running = 0                                     # sequences in the batch being run
        self._control: deque[Callable[[], None]] = deque()   # work for the worker between batches
        self.fault_hook: Callable[[Batch], None] | None = None   # tests only: raise to inject a fault

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self.load)
        self._thread = threading.Thread(target=self._worker, name="t2-engine", daemon=True)
        self._thread.start()

    def load(self) -> None:
        """1. model + tokenizer; 2. factors (cached); 3. patchable matrices; 4. experts."""
        t0 = time.perf_counter()
        # 1. model
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype).to(self.device).eval()
        mtype = self.model.config.model_type
        # transformers ≥ 5.2x names the KV cache argument `cache`; earlier 5.x `past_key_values`
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        if mtype not in SUPPORTED_TYPES:
            log.warning("model type %r is not one of %s; trying anyway", mtype, SUPPORTED_TYPES)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        # 2. factors
        factors, self.fingerprint = load_factors(
            self.model_dir, self.cache_dir / "factors" / self.model_dir.name, self.targets, device=self.device)
        # 3. matrices
        matrices = {n: SVFMatrix(n, self.model.get_parameter(n).data, f) for n, f in factors.items()}
        self.patcher = ModelPatcher(matrices, self.patch_cache_bytes)
        # 4. experts
        self.spectra = {n: f.s.detach().cpu() for n, f in factors.items()}   # [rank] each: the rescale check
        self.experts = load_experts(self.experts_dir, self.patcher.ranks, self.fingerprint, self.model_name,
                                    self.spectra)
        log.info("engine ready in %.1f s: %s (%s, %s, %s), %d adaptable matrices, experts: %s",
                 time.perf_counter() - t0, self.model_name, mtype, self.device, str(self.dtype).split(".")[-1],
                 len(matrices), ", ".join(f"{e.name}[{e.label}]" for e in self.experts.values()) or "none")

    async def stop(self) -> None:
        self._stopping = True
        for job in self.scheduler.close():
            job.sink.put(EngineUnavailable("the server is shutting down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def health(self) -> EngineHealth:
        alive = self._thread is not None and self._thread.is_alive()
        return EngineHealth(
            ok=alive and not self._fault, engine="hf", device=str(self.device), dtype=str(self.dtype).split(".")[-1],
            adaptation=self.patcher.current if alive else None, running=self._running,
            waiting=self.scheduler.waiting(), swaps=self.patcher.swaps if alive else 0, fault=self._fault)

    # -- the async surface -------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        job = self._submit(GENERATE, request)
        try:
            while True:
                item = await job.sink.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancelled = True     # a consumer that stops early (disconnect) frees its row

    async def score_labels(self, request: ScoreRequest) -> LabelScores:
        job = self._submit(SCORE, request)
        try:
            item = await job.sink.queue.get()
        finally:
            job.cancelled = True
        if isinstance(item, BaseException):
            raise item
        return item

    async def apply(self, adaptation: Adaptation) -> float:
        return (await asyncio.to_thread(self._apply, adaptation)).ms

    # -- runtime experts (the admin API) ----------------------------------------------------------------
    async def load_expert(self, path: Path) -> Expert:
        """1. read + self-check the file (a thread); 2. check it against the base; 3. add it in the worker."""
        e = await asyncio.to_thread(Expert.load, Path(path))
        e.check_against(self.patcher.ranks, self.fingerprint, self.model_name, self.spectra)

        def add() -> Expert:
            if e.name in self.experts:
                raise Conflict(f"expert {e.name!r} is already loaded; unload it first", "name")
            self.experts = {**self.experts, e.name: e}   # copy-on-write: readers on other threads never
            return e                                     # see a dict change size under them

        added = await self._in_worker(add)
        log.info("expert loaded: %s [%s] from %s", e.name, e.label, path)
        return added

    async def unload_expert(self, name: str) -> None:
        def drop() -> None:
            if name not in self.experts:
                raise ModelNotFound(f"expert {name!r} is not loaded", "name")
            self.experts = {k: v for k, v in self.experts.items() if k != name}
            for key in set(self.patcher.cached_keys) | {self.patcher.current}:
                if name in experts_of_key(key):
                    self.patcher.forget(key)    # the live key too: the next apply rewrites the weights

        await self._in_worker(drop)
        log.info("expert unloaded: %s", name)

    async def _in_worker(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` in the worker thread between two batches; its result or exception comes back here."""
        if self._thread is None or not self._thread.is_alive():
            raise EngineUnavailable("the engine is not running")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if not fut.done():
                fut.set_result(value) if ok else fut.set_exception(value)

        def run() -> None:
            try:
                value, ok = fn(), True
            except Exception as e:  # noqa: BLE001 - handed to the caller
                value, ok = e, False
            loop.call_soon_threadsafe(settle, ok, value)

        self._control.append(run)
        self.scheduler.wake()
        return await fut

    def _submit(self, kind: str, request: GenerateRequest | ScoreRequest) -> Job:
        if self._thread is None or not self._thread.is_alive():
            raise EngineUnavailable("the engine is not running")
        check_servable(self.experts, request.adaptation)
        job = Job(kind, request.adaptation, request, _Sink(asyncio.get_running_loop()))
        self.scheduler.submit(job)
        return job

    # -- the worker thread ---------------------------------------------------------------------------
    def _worker(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping:
            while self._control:                     # control work: only here, between batches
                self._control.popleft()()
            batch = self.scheduler.next_batch(timeout=0.5)
            if batch is not None:
                self._serve(batch)
                batch = None                         # finished requests must not stay pinned by the worker

    def _serve(self, batch: Batch) -> None:
        """Run one batch; its failure fails its requests (and flips /health), never the worker."""
        missing = [n for n in batch.adaptation.experts if n not in self.experts]
        if missing:                                  # unloaded while these requests waited: their error
            err = ModelNotFound(f"expert {missing[0]!r} was unloaded", "model")
            for job in batch.jobs:
                job.sink.put(err)
            return
        self._running = len(batch.jobs)
        try:
            if self.fault_hook is not None:
                self.fault_hook(batch)
            self._run_batch(batch)
            self._fault = None
        except Exception as e:  # one bad batch fails its requests, never the server
            log.exception("batch failed (%s, %d jobs)", batch.kind, len(batch.jobs))
            self._fault = f"{type(e).__name__}: {e}"
            err = EngineUnavailable(f"the engine failed on this request: {type(e).__name__}: {e}")
            for job in batch.jobs:
                job.sink.put(err)
        finally:
            self._running = 0

    def _apply(self, adaptation: Adaptation):
        return self.patcher.apply(adaptation.key, lambda: mix_z(self.experts, adaptation))

    def _run_batch(self, batch: Batch) -> None:
        report = self._apply(batch.adaptation)
        assert self.patcher.current == batch.adaptation.key   # the invariant: weights == batch adaptation
        self._start(batch.jobs, report.ms)
        if batch.kind == SCORE:
            self._score(batch.jobs)
        else:
            self._generate(batch.adaptation, batch.jobs)

    # -- model work ----------------------------------------------------------------------------------
    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)     # [B, T], [B, T]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache | None,
                 positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=cache is not None, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1, :].float()                   # [B, vocab]

    def _prefill(self, seqs: list[list[int]], cache: DynamicCache | None):
        ids, mask = self._left_pad(seqs)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)          # [B, T]
        return self._forward(ids, mask, cache, positions), mask

    def _score(self, jobs: list[Job]) -> None:
        """Constrained choice of a label: one prefill, then the candidates' first tokens decide."""
        reqs: list[ScoreRequest] = [j.payload for j in jobs]
        logits, _ = self._prefill([r.prompt_ids for r in reqs], None)
        logp = torch.log_softmax(logits, -1)                    # [B, vocab]

        def next_logprobs(prefix: list[int], allowed: list[int]) -> dict[int, float]:
            lp = torch.log_softmax(self._prefill([prefix], None)[0][0], -1)
            return {t: float(lp[t]) for t in allowed}

        for row, (job, r) in enumerate(zip(jobs, reqs)):
            first = {t: float(logp[row, t]) for t in {c[0] for c in r.candidates}}
            scores = walk_sync(label_walk(r.prompt_ids, r.candidates), next_logprobs, first=first)
            r.stats.prompt_tokens = scores.forward_tokens
            job.sink.put(scores)

    def _generate(self, adaptation: Adaptation, jobs: list[Job]) -> None:
        """Batched generation under one adaptation, streaming each new piece of text.

        Continuous batching within the adaptation: between two decode steps, first passes waiting for these
        same weights run, and waiting requests of this adaptation join the batch (prefilled, then their KV
        cache is merged, left-padded). Rows leave the batch as soon as they finish or are cancelled.
        """
        # 1. prefill the first rows
        rows = [_Row(j, self.tokenizer, self.device) for j in jobs]
        cache, logits, mask = self._prefill_rows(rows)
        positions = mask.sum(-1, keepdim=True) - 1                 # [B, 1] last position of each row
        while rows:
            self._running = len(rows)                             # /health, vllm:num_requests_running
            # 2. one token per row; finished and cancelled rows leave
            next_ids, keep = [], []
            for b, row in enumerate(rows):
                tok = row.step(logits[b], self.eos_ids)
                if tok is not None:
                    keep.append(b)
                    next_ids.append(tok)
            if len(keep) < len(rows):
                idx = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(idx)
                mask, positions, rows = mask[idx], positions[idx], [rows[b] for b in keep]
            # 3. between steps, under the same weights: waiting first passes, then newcomers
            score_jobs = self.scheduler.take_more(adaptation, SCORE, self.scheduler.max_batch)
            if score_jobs:
                self._start(score_jobs, 0.0)
                self._score(score_jobs)
            joiners = []
            if self._can_join(cache):
                joiners = self.scheduler.take_more(adaptation, GENERATE, self.scheduler.max_batch - len(rows))
            if not rows and not joiners:
                return
            # 4. one decode step for the rows still running
            if rows:
                ids = torch.tensor(next_ids, device=self.device).unsqueeze(1)         # [B, 1]
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)    # [B, T+1]
                positions = positions + 1
                logits = self._forward(ids, mask, cache, positions)
            # 5. newcomers: prefill, then merge into the running batch
            if joiners:
                self._start(joiners, 0.0)
                new = [_Row(j, self.tokenizer, self.device) for j in joiners]
                self.joined += len(new)
                c2, l2, m2 = self._prefill_rows(new)
                p2 = m2.sum(-1, keepdim=True) - 1
                if rows:
                    cache, mask = _merge_caches(cache, mask, c2, m2)
                    logits, positions = torch.cat([logits, l2]), torch.cat([positions, p2])
                else:
                    cache, logits, mask, positions = c2, l2, m2, p2
                rows += new

    def _prefill_rows(self, rows: list["_Row"]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        cache = DynamicCache()
        logits, mask = self._prefill([r.req.prompt_ids for r in rows], cache)
        for r in rows:                    # echo: the prompt's log-probabilities (one more prefill, all positions)
            if r.req.params.prompt_logprobs is not None:
                ids = torch.tensor([r.req.prompt_ids], device=self.device)
                full = self.model(input_ids=ids, logits_to_keep=0).logits[0]          # [T, vocab]
                r.prompt_lps = prompt_logprobs(full, r.req.prompt_ids, r.req.params.prompt_logprobs)
        return cache, logits, mask

    @staticmethod
    def _can_join(cache: DynamicCache) -> bool:
        """Merging needs plain per-layer key/value tensors (not sliding-window or quantized layers)."""
        return all(type(layer).__name__ == "DynamicLayer" and isinstance(getattr(layer, "keys", None), torch.Tensor)
                   for layer in getattr(cache, "layers", [None]))

    def _start(self, jobs: list[Job], patch_ms: float) -> None:
        now = time.perf_counter()
        for job in jobs:
            job.payload.stats.started, job.payload.stats.patch_ms = now, patch_ms


class _Row:
    """One sequence of a generation batch: its job, detokenizer, sampler and token count."""

    def __init__(self, job: Job, tokenizer: Any, device: torch.device):
        self.job, self.req = job, job.payload
        self.detok = Detokenizer(tokenizer, self.req.params.stop)
        self.gen = new_generator(self.req.params.seed, device)
        self.count = 0
        self.req.stats.prompt_tokens = len(self.req.prompt_ids)
        self.prompt_lps: tuple | None = None     # set by the prefill when the request asks (echo)

    def step(self, logits: torch.Tensor, eos_ids: set[int]) -> int | None:
        """Sample one token from `logits` [vocab] and stream it; None when the row is finished."""
        if self.job.cancelled:
            self.job.sink.put(TokenChunk("", (), "abort"))
            return None
        p = self.req.params
        tok = sample(logits, p, self.gen)
        self.count += 1
        self.req.stats.completion_tokens = self.count
        finish, ids = None, (tok,)
        if tok in eos_ids and not p.ignore_eos:
            text, finish = self.detok.flush(), "stop"      # the eos id is reported (as vLLM), never its text
        else:
            text, stopped = self.detok.push(tok)
            if stopped:
                finish = "stop"
            elif self.count >= p.max_tokens:
                text, finish = text + self.detok.flush(), "length"
        lps = None if p.logprobs is None else tuple(token_logprob(logits, t, p.logprobs) for t in ids)
        plps, self.prompt_lps = self.prompt_lps, None          # on the first chunk only
        self.job.sink.put(TokenChunk(text, ids, finish, lps, plps))
        return tok if finish is None else None


def _merge_caches(a: DynamicCache, mask_a: torch.Tensor, b: DynamicCache,
                  mask_b: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Stack two batches' KV caches [B, H, T, D] along the batch, left-padding the shorter one (masked)."""
    ta, tb = mask_a.shape[1], mask_b.shape[1]
    pad_a, pad_b = max(0, tb - ta), max(0, ta - tb)
    for la, lb in zip(a.layers, b.layers):
        la.keys = torch.cat([_pad_left(la.keys, pad_a), _pad_left(lb.keys, pad_b)])
        la.values = torch.cat([_pad_left(la.values, pad_a), _pad_left(lb.values, pad_b)])
    mask = torch.cat([_pad_left(mask_a, pad_a), _pad_left(mask_b, pad_b)])
    return a, mask


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """Zeros in front of the time axis: dim 2 of [B, H, T, D], dim 1 of a mask [B, T]."""
    if n == 0:
        return t
    dim = 2 if t.dim() == 4 else 1
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    return ids or {0}
