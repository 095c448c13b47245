"""The embedded engine: PyTorch + transformers, one model, one worker thread, on the CPU or a GPU.

Contract:
- Serves any local HF folder of the Llama / Mistral / Qwen2 families (safetensors), on CPU or CUDA; with a
  GPU the factors live on the GPU and patching happens there.
- One worker thread owns the model (it loads it, and every torch computation of the engine runs in it) and
  runs one continuous batch whose rows may belong to any number of adaptations. Between two steps it takes
  (server/engines/scheduler.py) waiting first passes (run at once, their own forward) and newcomers, oldest
  first, each only if its adaptation has a gain slot (server/engines/slots.py, at most `max_adaptations`
  live adaptations); a request without a slot waits and does not hold up the others.
- A step is one flat ragged forward (server/engines/hf_ragged.py): the running rows' next tokens and the
  newcomers' whole prompts side by side, no padding; each row's keys and values stay in its row of a KV pool.
- Every forward takes one of two paths (server/engines/hf_factored.py), chosen per step:
  * dense: every row of the step belongs to the adaptation the weights hold (the ModelPatcher's W'): no
    extra cost, exactly today's path;
  * factored: y = ((x·Vhᵀ) ⊙ G[slot of the row])·U_sᵀ for each adapted linear: exact for any mix.
  When the running rows have all been of one other adaptation for a few steps (`swap_after` when its W' is
  cached or the base, a copy; `compose_after` when it must be composed), the weights are patched to it (the
  factored rows never read them) and the steps go dense again. So no row is ever computed
  with another request's gains, and one-adaptation traffic runs as fast as before.
- scoring (the dispatch pass): one ragged prefill, then a constrained choice among the candidates'
  first tokens (a further forward only for candidates that share a first token); generation: per-row
  sampling (greedy, temperature, top_p, seeded generators), stop strings, eos, max_tokens; finished or
  cancelled rows leave the batch and release their slot and their KV row. A row with a
  constraint (structured outputs) has its own xgrammar matcher, which masks that row's logits before it
  samples and advances on the token it took (server/engines/structured.py).
- Results reach the event loop through `loop.call_soon_threadsafe`; the loop never runs model code.
- A fault fails the requests of the failing forward (a step: its rows; newcomers failing before it: them),
  /health reports it until a forward succeeds again, and the worker goes on. `fault_hook` (tests
  only) is called before newcomers are run; whatever it raises is such a fault.
- Runtime expert changes run as control work in the worker between steps. Unloading: from the moment it
  starts, new requests for the expert get 404 and waiting ones fail with 404; rows already running finish
  (or are aborted after `unload_timeout_s`), and the unload returns once they have.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from experts.errors import ExpertNotFound
from experts.expert import Expert
from experts.factored import GainTable, gains_of
from experts.mix import BASE_NAME, Adaptation, experts_of_key, mix_z
from experts.patch import ModelPatcher, SVFMatrix
from experts.svd import load_factors
from server.engines.base import Engine, EngineHealth, GenerateRequest, LabelScores, ScoreRequest, TokenChunk
from server.engines.detok import Detokenizer
from server.engines.common import check_servable, label_walk, load_experts, resolve_device, resolve_dtype, walk_sync
from server.engines.hf_factored import install
from server.engines.hf_ragged import KV, RaggedForward, check as ragged_check
from server.engines.sampling import new_generator, prompt_logprobs, sample, token_logprob
from server.engines.scheduler import Batch, Job, JobKind, Scheduler
from server.engines.slots import Slots
from server.engines.structured import Grammars
from server.engines.factory import StartupError
from server.errors import Conflict, EngineUnavailable, ModelNotFound

log = logging.getLogger("t2.engine.hf")

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class _Sink:
    """Delivers a job's results from the worker thread to its asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class _Control:
    """Work for the worker between steps; it runs once `ready()` is true (or at its deadline)."""
    run: Callable[[], None]
    ready: Callable[[], bool] = lambda: True
    deadline: float = math.inf
    on_overdue: Callable[[], None] = lambda: None


class HFEngine(Engine):
    def __init__(self, model_dir: Path, *, name: str | None = None, experts_dir: Path | None = None,
                 device: str = "auto", dtype: str = "auto", targets: tuple[str, ...] | None = None,
                 cache_dir: Path = Path(".cache/t2"), max_batch: int = 8, max_wait_ms: float = 500,
                 max_queue: int = 1024, patch_cache_mb: int = 1024, max_adaptations: int = 32,
                 swap_after: int | None = 4, compose_after: int = 128,
                 unload_timeout_s: float = 60.0, json_any_whitespace: bool = False):
        from experts.svd import MLP_TARGETS
        self.model_dir = Path(model_dir)
        self.model_name = name or self.model_dir.name
        self.experts_dir = experts_dir
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.targets = tuple(targets or MLP_TARGETS)
        self.cache_dir = Path(cache_dir)
        self.patch_cache_bytes = patch_cache_mb << 20
        self.json_any_whitespace = json_any_whitespace
        self.scheduler = Scheduler(max_batch=max_batch, max_wait_s=max_wait_ms / 1e3, max_queue=max_queue)
        self.slots = Slots(max_adaptations)
        self.swap_after = swap_after             # None: never swap (always factored unless already patched)
        self.compose_after = compose_after       # same, when W' must be composed (not cached): far dearer
        self.unload_timeout_s = unload_timeout_s
        self.experts: dict[str, Expert] = {}
        self.fingerprint = ""
        self._thread: threading.Thread | None = None
        self._fault: str | None = None
        self._stopping = False
        self._control: deque[_Control] = deque()     # work for the worker between steps
        self._unloading: set[str] = set()            # experts being unloaded: new requests get 404
        self.fault_hook: Callable[[Batch], None] | None = None   # tests only: raise to inject a fault
        # the running generation batch (worker thread only)
        self._rows: list[_Row] = []
        self._next_ids: list[int] = []               # each running row's next token (its KV holds the rest)
        self._logits: torch.Tensor | None = None     # [B, vocab] each row's next-token logits, until sampled
        self._uniform = ("", 0)                      # (key, steps) the running rows have all been of one key
        # counters (health, /metrics)
        self.joined = 0                               # sequences that joined a running batch
        self.steps = {"dense": 0, "factored": 0}      # forwards by path
        self.step_adaptations = 0                     # distinct adaptations in the last forward
        self.step_adaptations_sum = 0                 # summed over all forwards (mean = sum / steps)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load in the worker thread itself, which then runs the steps: every torch computation of the
        engine happens in that one thread (one OpenMP pool on a CPU; see factory.in_own_thread)."""
        loop = asyncio.get_running_loop()
        loaded = loop.create_future()

        def settle(err: BaseException | None) -> None:
            if not loaded.done():
                loaded.set_result(None) if err is None else loaded.set_exception(err)

        def run() -> None:
            try:
                self.load()
            except BaseException as e:  # noqa: BLE001 - handed to start()'s caller
                loop.call_soon_threadsafe(settle, e)
                return
            loop.call_soon_threadsafe(settle, None)
            self._worker()

        self._thread = threading.Thread(target=run, name="t2-engine", daemon=True)
        self._thread.start()
        await loaded

    def load(self) -> None:
        """1. model + tokenizer; 2. factors (cached); 3. patchable matrices; 4. factored layers; 5. experts."""
        t0 = time.perf_counter()
        # 1. model
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype).to(self.device).eval()
        mtype = self.model.config.model_type
        _refuse(self.model, self.model_dir)
        if mtype not in SUPPORTED_TYPES:
            log.warning("model type %r is not one of %s; its layout fits, trying it", mtype, SUPPORTED_TYPES)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        # structured outputs: grammars over the model's whole logit width, ending on its eos tokens
        self.grammars = Grammars(self.tokenizer, int(self.model.get_output_embeddings().weight.shape[0]),
                                 self.eos_ids, any_whitespace=self.json_any_whitespace)
        # 2. factors
        factors, self.fingerprint = load_factors(
            self.model_dir, self.cache_dir / "factors" / self.model_dir.name, self.targets, device=self.device)
        # 3. matrices
        matrices = {n: SVFMatrix(n, self.model.get_parameter(n).data, f) for n, f in factors.items()}
        self.patcher = ModelPatcher(matrices, self.patch_cache_bytes)
        # 4. factored layers: one gain table row per slot (slot 0 = base), the switch they all read
        self.gain_table = GainTable(self.patcher.ranks, self.slots.capacity + 1, self.device)
        self.path = install(self.model, self.patcher, self.gain_table, self.dtype)
        self.ragged = RaggedForward(self.model)      # the one forward every step runs (server/engines/hf_ragged.py)
        # 5. experts
        self.spectra = {n: f.s.detach().cpu() for n, f in factors.items()}   # [rank] each: the rescale check
        self.experts = load_experts(self.experts_dir, self.patcher.ranks, self.fingerprint, self.model_name,
                                    self.spectra)
        log.info("engine ready in %.1f s: %s (%s, %s, %s), %d adaptable matrices, %d gain slots, experts: %s",
                 time.perf_counter() - t0, self.model_name, mtype, self.device, str(self.dtype).split(".")[-1],
                 len(matrices), self.slots.capacity,
                 ", ".join(f"{e.name}[{e.label}]" for e in self.experts.values()) or "none")

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
            adaptation=self.patcher.current if alive else None, running=len(self._rows),
            waiting=self.scheduler.waiting(), swaps=self.patcher.swaps if alive else 0, fault=self._fault,
            details={   # mixed batches: gain slots, forwards by path, distinct adaptations per forward
                "slots": self.slots.capacity, "slots_used": self.slots.used(), "slots_held": self.slots.held(),
                "slot_fills": self.slots.fills, "steps_dense": self.steps["dense"],
                "steps_factored": self.steps["factored"], "step_adaptations": self.step_adaptations,
                "step_adaptations_sum": self.step_adaptations_sum})

    # -- the async surface -------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        job = self._submit(JobKind.GENERATE, request)
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
        job = self._submit(JobKind.SCORE, request)
        try:
            item = await job.sink.queue.get()
        finally:
            job.cancelled = True
        if isinstance(item, BaseException):
            raise item
        return item

    async def apply(self, adaptation: Adaptation) -> float:
        return (await self._in_worker(lambda: self._apply(adaptation))).ms

    # -- runtime experts (the admin API) ----------------------------------------------------------------
    async def load_expert(self, path: Path) -> Expert:
        """1. read + self-check the file (a thread); 2. check it against the base; 3. add it in the worker."""
        e = await asyncio.to_thread(Expert.load, Path(path))
        e.check_against(self.patcher.ranks, self.fingerprint, self.model_name, self.spectra)

        def add() -> Expert:
            if e.name in self.experts or e.name in self._unloading:
                raise Conflict(f"expert {e.name!r} is already loaded; unload it first", "name")
            self.experts = {**self.experts, e.name: e}   # copy-on-write: readers on other threads never
            return e                                     # see a dict change size under them

        added = await self._in_worker(add)
        log.info("expert loaded: %s [%s] from %s", e.name, e.label, path)
        return added

    async def unload_expert(self, name: str) -> None:
        """1. refuse new requests for it (now); 2. fail the waiting ones; 3. once no running row uses it
        (rows still running after `unload_timeout_s` are aborted), drop it, its cached W' and its slots."""
        if name not in self.experts or name in self._unloading:
            raise ModelNotFound(f"expert {name!r} is not loaded", "name")
        self._unloading.add(name)                       # 1. from here on _submit refuses it

        def uses(key_or_job: Any) -> bool:
            key = key_or_job if isinstance(key_or_job, str) else key_or_job.adaptation.key
            return name in experts_of_key(key)

        try:
            err = ModelNotFound(f"expert {name!r} was unloaded", "model")
            for job in self.scheduler.remove(uses):     # 2.
                job.sink.put(err)

            def drop() -> None:                         # 3.
                self.experts = {k: v for k, v in self.experts.items() if k != name}
                for key in set(self.patcher.cached_keys) | {self.patcher.current}:
                    if uses(key):
                        self.patcher.forget(key)    # the live key too: the next apply rewrites the weights
                self.slots.forget(uses)

            def abort() -> None:
                for row in self._rows:
                    if uses(row.job):
                        row.job.cancelled = True

            await self._in_worker(drop, ready=lambda: not any(uses(r.job) for r in self._rows),
                                  timeout_s=self.unload_timeout_s, on_overdue=abort)
        finally:
            self._unloading.discard(name)
        log.info("expert unloaded: %s", name)

    async def _in_worker(self, fn: Callable[[], Any], ready: Callable[[], bool] = lambda: True,
                         timeout_s: float = math.inf, on_overdue: Callable[[], None] = lambda: None) -> Any:
        """Run `fn` in the worker between two steps, once `ready()`; its result or exception comes back."""
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

        self._control.append(_Control(run, ready, time.monotonic() + timeout_s, on_overdue))
        self.scheduler.wake()
        return await fut

    def _submit(self, kind: JobKind, request: GenerateRequest | ScoreRequest) -> Job:
        if self._thread is None or not self._thread.is_alive():
            raise EngineUnavailable("the engine is not running")
        check_servable(self.experts, request.adaptation)
        gone = [n for n in request.adaptation.experts if n in self._unloading]
        if gone:
            raise ExpertNotFound(f"expert {gone[0]!r} is being unloaded")
        job = Job(kind, request.adaptation, request, _Sink(asyncio.get_running_loop()))
        self.scheduler.submit(job)
        return job

    # -- the worker thread ---------------------------------------------------------------------------
    def _worker(self) -> None:
        """One iteration = one step of the running batch:
        0. control work; 1. sample a token per running row (finished rows leave); 2. first passes waiting
        (own forward, own slots); 3. newcomers with a slot become rows; 4. one forward: the running rows'
        next tokens and the newcomers' prompts together."""
        torch.set_grad_enabled(False)
        sched = self.scheduler
        while not self._stopping:
            self._run_control()                                              # 0.
            if self._logits is not None:
                self._sample()                                               # 1.
            scores = sched.take(JobKind.SCORE, sched.max_batch, self._admit)  # 2.
            if scores:
                self._run_scores(scores)
            joiners = sched.take(JobKind.GENERATE, sched.max_batch - len(self._rows), self._admit)   # 3.
            new = self._join(joiners) if joiners else []
            if self._rows or new:
                self._step(new)                                              # 4.
            if not self._rows and not scores and not joiners and sched.wait(timeout=0.5):
                time.sleep(0.005)      # work waits but none could be admitted (no slot yet): don't spin

    def _run_control(self) -> None:
        for _ in range(len(self._control)):
            c = self._control.popleft()
            if c.ready():
                c.run()
            else:
                if time.monotonic() >= c.deadline:
                    c.on_overdue()
                self._control.append(c)

    def _admit(self, job: Job) -> bool:
        """Give a waiting job its adaptation's slot (gains computed on first use); False: no slot free now."""
        a = job.adaptation

        def fill(slot: int) -> None:
            z = mix_z(self.experts, a)
            self.gain_table.write(slot, gains_of({n: m.s for n, m in self.patcher.matrices.items()}, z))

        slot = self.slots.acquire(a.key, fill)
        if slot is None:
            return False
        job.slot = slot
        return True

    def _release(self, job: Job) -> None:
        if job.slot is not None:
            self.slots.release(job.adaptation.key)
            job.slot = None

    def _fail(self, jobs: list[Job], e: Exception, what: str) -> None:
        log.exception("%s failed (%d jobs)", what, len(jobs))
        self._fault = f"{type(e).__name__}: {e}"
        err = EngineUnavailable(f"the engine failed on this request: {type(e).__name__}: {e}")
        for job in jobs:
            self._release(job)
            job.sink.put(err)

    def _run_scores(self, jobs: list[Job]) -> None:
        """Newly admitted first passes: scored to their end in their own forward."""
        try:
            if self.fault_hook is not None:
                self.fault_hook(Batch(JobKind.SCORE, jobs))
            self._start(jobs)
            self._score(jobs)
            self._fault = None
        except Exception as e:  # one bad batch fails its requests, never the server
            self._fail(jobs, e, "score batch")

    def _apply(self, adaptation: Adaptation):
        return self.patcher.apply(adaptation.key, lambda: mix_z(self.experts, adaptation))

    # -- the path of a step --------------------------------------------------------------------------
    def _set_path(self, jobs: list[Job], tokens: list[int], decode: bool = False) -> str:
        """Choose dense or factored for a forward over these jobs' rows (in batch order, `tokens[i]` flat
        tokens each); count it. Factored gives every token its row's gain slot.

        Dense only if every row is of the adaptation the weights hold. A decode step whose rows have all
        been of one other adaptation for `swap_after` steps (its W' cached or the base: the patch is a copy,
        worth ~3 factored steps) or `compose_after` steps (W' composed from the factors: ~150 steps' worth)
        patches the weights to it first (benchmarks/bench_factored.py measures both sides)."""
        keys = {j.adaptation.key for j in jobs}
        key = next(iter(keys)) if len(keys) == 1 else ""
        if decode:
            n = self._uniform[1] + 1 if key and key == self._uniform[0] else 1
            self._uniform = (key, n)
            cheap = key == BASE_NAME or key in self.patcher.cached_keys       # a copy, not a composition
            if (key and key != self.patcher.current and self.swap_after is not None
                    and n >= (self.swap_after if cheap else self.compose_after)):
                self._apply(jobs[0].adaptation)          # weights := that adaptation; factored rows unaffected
        if key and key == self.patcher.current:
            self.path.dense()
            how = "dense"
        else:
            idx = torch.tensor([j.slot for j, n in zip(jobs, tokens) for _ in range(n)],
                               dtype=torch.long, device=self.device)                           # [T]
            self.path.factored(idx)
            how = "factored"
        self.steps[how] += 1
        self.step_adaptations = len(keys)
        self.step_adaptations_sum += len(keys)
        for j in jobs:
            if how == "factored":
                j.payload.stats.path = "factored"
        return how

    # -- model work ----------------------------------------------------------------------------------
    def _score(self, jobs: list[Job]) -> None:
        """Constrained choice of a label: one ragged prefill (rows of any adaptations), then the first tokens
        decide (a further prefill only for candidates that share a first token)."""
        reqs: list[ScoreRequest] = [j.payload for j in jobs]
        self._set_path(jobs, [len(r.prompt_ids) for r in reqs])
        logits = self.ragged.forward([self.ragged.new_kv() for _ in reqs], [r.prompt_ids for r in reqs])
        logp = torch.log_softmax(logits, -1)                    # [B, vocab]

        for row, (job, r) in enumerate(zip(jobs, reqs)):
            def next_logprobs(prefix: list[int], allowed: list[int], job: Job = job) -> dict[int, float]:
                self._set_path([job], [len(prefix)])
                lp = torch.log_softmax(self.ragged.forward([self.ragged.new_kv()], [prefix])[0], -1)
                return {t: float(lp[t]) for t in allowed}

            first = {t: float(logp[row, t]) for t in {c[0] for c in r.candidates}}
            scores = walk_sync(label_walk(r.prompt_ids, r.candidates), next_logprobs, first=first)
            r.stats.prompt_tokens = scores.forward_tokens
            self._release(job)
            job.sink.put(scores)

    def _join(self, jobs: list[Job]) -> list[_Row]:
        """Newcomers become rows (their prompt is prefilled by the next step); a fault fails only them."""
        batch = Batch(JobKind.GENERATE, jobs)
        try:
            if self.fault_hook is not None:
                self.fault_hook(batch)
            self._start(jobs)
            new = [_Row(j, self.tokenizer, self.device, self.ragged.new_kv(), self.grammars) for j in jobs]
            for row in new:     # echo: the prompt's log-probabilities (its own forward, every position)
                if row.req.params.prompt_logprobs is not None:
                    ids = row.req.prompt_ids
                    self._set_path([row.job], [len(ids)])
                    full = self.ragged.forward([self.ragged.new_kv()], [ids], all_logits=True)[0]   # [T, vocab]
                    row.prompt_lps = prompt_logprobs(full, ids, row.req.params.prompt_logprobs)
            return new
        except Exception as e:  # one bad batch fails its requests, never the server
            self._fail(jobs, e, "generate batch")
            return []

    def _step(self, new: list[_Row]) -> None:
        """One forward for the whole batch: each running row's next token (from `_sample`) and each
        newcomer's prompt, side by side; afterwards every row has the logits of its next token."""
        if self._rows and new:
            self.joined += len(new)
        rows = self._rows = self._rows + new
        tokens = [[t] for t in self._next_ids] + [r.req.prompt_ids for r in new]
        try:
            self._set_path([r.job for r in rows], [len(t) for t in tokens], decode=True)
            self._logits = self.ragged.forward([r.kv for r in rows], tokens)         # [B, vocab]
            self._fault = None
        except Exception as e:  # the step's rows fail, the worker goes on
            self._fail([r.job for r in rows], e, "decode step")
            self._reset()

    def _sample(self) -> None:
        """One token per running row from the last logits; finished and cancelled rows leave (slot released,
        KV dropped)."""
        rows, logits = self._rows, self._logits
        next_ids, keep = [], []
        for b, row in enumerate(rows):
            tok = row.step(logits[b], self.eos_ids)
            if tok is not None:
                keep.append(row)
                next_ids.append(tok)
            else:
                self._release(row.job)
                row.kv.release()
        self._logits = None
        self._rows, self._next_ids = keep, next_ids
        if not keep:
            self._idle()

    def _idle(self) -> None:
        """No running rows: forget the uniform streak; a KV pool grown past 512 positions is dropped."""
        self._uniform = ("", 0)
        if self.ragged.pool.capacity > 512:
            self.ragged.pool.trim()

    def _reset(self) -> None:
        for row in self._rows:
            row.kv.release()
        self._rows, self._next_ids, self._logits = [], [], None
        self._idle()

    def _start(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        for job in jobs:
            job.payload.stats.started = now

class _Row:
    """One sequence of a generation batch: its job, KV, detokenizer, sampler, grammar matcher and token count."""

    def __init__(self, job: Job, tokenizer: Any, device: torch.device, kv: KV, grammars: Grammars | None = None):
        self.job, self.req, self.kv = job, job.payload, kv     # kv: this sequence's keys and values
        self.detok = Detokenizer(tokenizer, self.req.params.stop)
        self.gen = new_generator(self.req.params.seed, device)
        c = self.req.params.constraint
        self.matcher = grammars.matcher(c) if c is not None and grammars is not None else None
        self.count = 0
        self.req.stats.prompt_tokens = len(self.req.prompt_ids)
        self.prompt_lps: tuple | None = None     # set by the prefill when the request asks (echo)

    def step(self, logits: torch.Tensor, eos_ids: set[int]) -> int | None:
        """Sample one token from `logits` [vocab] and stream it; None when the row is finished."""
        if self.job.cancelled:
            self.job.sink.put(TokenChunk("", (), "abort"))
            return None
        p = self.req.params
        raw = logits                      # log-probabilities are the model's own (vLLM's raw logprobs_mode)
        if self.matcher is not None:      # structured outputs: this row's grammar masks this row's logits only
            logits = logits.clone() if p.logprobs is not None else logits
            self.matcher.mask(logits)
        tok = sample(logits, p, self.gen)
        if self.matcher is not None:
            self.matcher.accept(tok)
        self.count += 1
        self.req.stats.completion_tokens = self.count
        finish, ids = None, (tok,)
        if tok in eos_ids and (not p.ignore_eos or self.matcher is not None):
            text, finish = self.detok.flush(), "stop"      # the eos id is reported (as vLLM), never its text
        else:
            text, stopped = self.detok.push(tok)
            if stopped:
                finish = "stop"
            elif self.count >= p.max_tokens:
                text, finish = text + self.detok.flush(), "length"
        lps = None if p.logprobs is None else tuple(token_logprob(raw, t, p.logprobs) for t in ids)
        plps, self.prompt_lps = self.prompt_lps, None          # on the first chunk only
        self.job.sink.put(TokenChunk(text, ids, finish, lps, plps))
        return tok if finish is None else None


def check_layout(model_dir: Path) -> None:
    """StartupError unless the embedded engine's forward can run this model folder (built on the meta
    device from its config.json: nothing is read but the config)."""
    from transformers import AutoConfig
    try:
        cfg = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError, OSError) as e:
        raise StartupError(f"--model {model_dir}: cannot build the model from its config.json: {e}") from None
    _refuse(model, model_dir)


def _refuse(model: Any, model_dir: Path) -> None:
    why = ragged_check(model)
    if why is not None:
        raise StartupError(f"--model {model_dir}: model type {model.config.model_type!r} cannot run on the embedded "
                           f"engine ({why}); it serves {', '.join(SUPPORTED_TYPES)}; try --engine vllm")


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    return ids or {0}
