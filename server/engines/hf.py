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
- A fault in a batch fails the requests of that batch (they get the exception) and the worker goes on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from experts.errors import ExpertNotFound
from experts.expert import Expert
from experts.mix import BASE, Adaptation, mix_z
from experts.patch import ModelPatcher, SVFMatrix
from experts.svd import load_factors
from server.engines.base import (Engine, GenerateRequest, LabelScores, ScoreRequest, TokenChunk)
from server.engines.detok import Detokenizer
from server.errors import EngineUnavailable
from server.scheduler import GENERATE, SCORE, Batch, Job, Scheduler

log = logging.getLogger("t2.engine.hf")

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def load_experts(experts_dir: Path | None, ranks: dict[str, int], fingerprint: str,
                 base_model: str) -> dict[str, Expert]:
    """Every `*.safetensors` of `experts_dir`, each checked against the base; a bad file stops the start."""
    out: dict[str, Expert] = {}
    if experts_dir is None or not Path(experts_dir).is_dir():
        return out
    for path in sorted(Path(experts_dir).glob("*.safetensors")):
        e = Expert.load(path)
        e.check_against(ranks, fingerprint, base_model)
        out[e.name] = e
    return out


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
        self.experts = load_experts(self.experts_dir, self.patcher.ranks, self.fingerprint, self.model_name)
        log.info("engine ready in %.1f s: %s (%s, %s, %s), %d adaptable matrices, experts: %s",
                 time.perf_counter() - t0, self.model_name, mtype, self.device, str(self.dtype).split(".")[-1],
                 len(matrices), ", ".join(f"{e.name}[{e.label}]" for e in self.experts.values()) or "none")

    async def stop(self) -> None:
        self._stopping = True
        for job in self.scheduler.close():
            job.sink.put(EngineUnavailable("the server is shutting down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def health(self) -> dict[str, Any]:
        alive = self._thread is not None and self._thread.is_alive()
        return {"status": "ok" if alive and not self._fault else "error", "engine": "hf",
                "device": str(self.device), "dtype": str(self.dtype).split(".")[-1],
                "adaptation": self.patcher.current if alive else None, "waiting": self.scheduler.waiting(),
                "swaps": self.patcher.swaps if alive else 0, "fault": self._fault}

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

    def _submit(self, kind: str, request: GenerateRequest | ScoreRequest) -> Job:
        if self._thread is None or not self._thread.is_alive():
            raise EngineUnavailable("the engine is not running")
        for name in request.adaptation.experts:
            if name not in self.experts:
                raise ExpertNotFound(f"expert {name!r} is not loaded")
        job = Job(kind, request.adaptation, request, _Sink(asyncio.get_running_loop()))
        self.scheduler.submit(job)
        return job

    # -- the worker thread ---------------------------------------------------------------------------
    def _worker(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping:
            batch = self.scheduler.next_batch(timeout=0.5)
            if batch is None:
                continue
            try:
                self._run_batch(batch)
                self._fault = None
            except Exception as e:  # one bad batch fails its requests, never the server
                log.exception("batch failed (%s, %d jobs)", batch.kind, len(batch.jobs))
                self._fault = f"{type(e).__name__}: {e}"
                err = EngineUnavailable(f"the engine failed on this request: {type(e).__name__}: {e}")
                for job in batch.jobs:
                    job.sink.put(err)

    def _apply(self, adaptation: Adaptation):
        return self.patcher.apply(adaptation.key, lambda: mix_z(self.experts, adaptation))

    def _run_batch(self, batch: Batch) -> None:
        report = self._apply(batch.adaptation)
        assert self.patcher.current == batch.adaptation.key   # the invariant: weights == batch adaptation
        now = time.perf_counter()
        for job in batch.jobs:
            job.payload.stats.started, job.payload.stats.patch_ms = now, report.ms
            job.payload.stats.patch_how = report.how
        if batch.kind == SCORE:
            self._score(batch.jobs)
        else:
            self._generate(batch.jobs)

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
        for row, (job, r) in enumerate(zip(jobs, reqs)):
            first = [c[0] for c in r.candidates]
            lp = logp[row, first]                               # [K]
            best = int(lp.argmax())
            tokens = len(r.prompt_ids)
            # candidates sharing the best first token: walk on (rare; costs one more pass each step)
            tied = [k for k, t in enumerate(first) if t == first[best]]
            depth, prefix = 1, list(r.prompt_ids)
            while len(tied) > 1:
                prefix.append(r.candidates[tied[0]][depth - 1])
                live = [k for k in tied if len(r.candidates[k]) > depth]
                if not live:
                    break
                nxt = torch.log_softmax(self._prefill([prefix], None)[0][0], -1)
                tokens += len(prefix)
                best = max(live, key=lambda k: float(nxt[r.candidates[k][depth]]))
                tied = [k for k in live if r.candidates[k][depth] == r.candidates[best][depth]]
                depth += 1
            uniq = {t: float(logp[row, t]) for t in first}
            z = torch.softmax(torch.tensor(list(uniq.values())), 0).tolist()
            p_of = dict(zip(uniq, z))
            r.stats.prompt_tokens = tokens
            job.sink.put(LabelScores(best=best, probs=tuple(p_of[t] for t in first), forward_tokens=tokens))

    def _generate(self, jobs: list[Job]) -> None:
        """Batched generation of one adaptation's requests, streaming each new piece of text."""
        # 1. per-row state
        reqs: list[GenerateRequest] = [j.payload for j in jobs]
        detoks = [Detokenizer(self.tokenizer, r.params.stop) for r in reqs]
        gens = [_generator(r.params.seed, self.device) for r in reqs]
        counts = [0] * len(reqs)
        for r in reqs:
            r.stats.prompt_tokens = len(r.prompt_ids)
        # 2. prefill
        cache = DynamicCache()
        logits, mask = self._prefill([r.prompt_ids for r in reqs], cache)
        positions = mask.sum(-1, keepdim=True) - 1                 # [B, 1] last position of each row
        rows = list(range(len(reqs)))                              # batch row → request index
        # 3. decode
        while rows:
            next_ids, keep = [], []
            for b, i in enumerate(rows):
                r, job = reqs[i], jobs[i]
                if job.cancelled:
                    job.sink.put(TokenChunk("", (), "abort"))
                    continue
                tok = _sample(logits[b], r.params, gens[i])
                counts[i] += 1
                r.stats.completion_tokens = counts[i]
                finish = None
                if tok in self.eos_ids and not r.params.ignore_eos:
                    text, finish, ids = detoks[i].flush(), "stop", ()
                else:
                    text, stopped = detoks[i].push(tok)
                    ids = (tok,)
                    if stopped:
                        finish = "stop"
                    elif counts[i] >= r.params.max_tokens:
                        text, finish = text + detoks[i].flush(), "length"
                job.sink.put(TokenChunk(text, ids, finish))
                if finish is None:
                    keep.append(b)
                    next_ids.append(tok)
            if not keep:
                break
            # 3a. drop finished rows from the batch and the cache
            if len(keep) < len(rows):
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                mask, positions = mask[idx], positions[idx]
                rows = [rows[b] for b in keep]
            # 3b. one decode step for the rows still running
            ids = torch.tensor(next_ids, device=self.device).unsqueeze(1)        # [B, 1]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)   # [B, T+1]
            positions = positions + 1
            logits = self._forward(ids, mask, cache, positions)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    return ids or {0}


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _sample(logits: torch.Tensor, params, gen: torch.Generator) -> int:
    """One token from a row of logits [vocab]: greedy at temperature 0, else temperature + nucleus."""
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, -1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > params.top_p      # drop tokens once mass before them > top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))
