"""The Engine interface and the plain types that cross it.

Contract:
- An engine owns one base model, its tokenizer, its adaptable matrices and the experts loaded for it.
- `generate(request)` streams `TokenChunk`s of one sequence, computed entirely under `request.adaptation`:
  an engine never computes a token of a request under another adaptation (the scheduler's invariant).
  Log-probabilities, where `SamplingParams` asks for them, are the raw model's (log-softmax of the logits
  before logit_bias, temperature and top_p: vLLM's default `logprobs_mode="raw_logprobs"`): a `TokenLogprob`
  per token of `token_ids` (`logprobs=k`: also the top k), and the prompt's on the first chunk
  (`prompt_logprobs=k`; the first prompt token has none: None). `logit_bias` is added to the logits that
  are sampled from.
- `score_labels(request)` is the dispatch pass: it returns, for each candidate continuation, its score,
  computed under `request.adaptation` in about one prefill (constrained, never free sampling).
- `apply(adaptation)` makes the weights those of an adaptation (tests and benchmarks; serving lets the
  engine's scheduler call it between batches).
- All blocking model work runs off the event loop (a worker thread or another process).
- `load_expert(path)` / `unload_expert(name)` change the loaded experts at runtime (the admin API). They are
  optional: the defaults raise EngineUnavailable("not supported by this engine"). An engine that supports
  them validates a file exactly as at startup, and makes the change between batches, never under one.
- A `SamplingParams.constraint` (structured outputs) is honoured for every sequence that has one, each under
  its own grammar, in the same batch as free sequences; `grammars` validates constraints before submission.
- `health()` returns an `EngineHealth`: ok or not, sequences running and waiting, swaps, the fault, and
  engine-specific `details`; /health serves `to_json()`, /metrics reads the fields.
- `experts_dir` is the folder the engine loaded its experts from at start (None: none); the admin API
  loads from it when no admin folder is configured.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping

from experts.expert import Expert
from experts.mix import Adaptation
from server.errors import EngineUnavailable

if TYPE_CHECKING:
    from server.engines.structured import Constraint, Grammars


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None            # log p of each sampled token and of the top k (None: none)
    prompt_logprobs: int | None = None     # the same for every prompt token (echo)
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias added to its logit)
    constraint: "Constraint | None" = None   # structured outputs: the grammar this sequence must follow

    @property
    def greedy(self) -> bool:
        # as vLLM: temperatures below 1e-5 are greedy (dividing logits by a denormal gives inf/NaN)
        return self.temperature < 1e-5


@dataclass
class RequestStats:
    """Filled in by the engine while it serves a request; read by serving for the `t2` report."""

    created: float = field(default_factory=time.perf_counter)
    started: float | None = None          # when its batch started (after the wait and the patch)
    patch_ms: float = 0.0                 # the swap its batch needed (0: the weights were already right)
    path: str = "dense"                   # "factored" if any of its forwards ran the factored form
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def queue_ms(self) -> float:
        return ((self.started or self.created) - self.created) * 1e3


@dataclass
class GenerateRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adaptation: Adaptation
    stats: RequestStats = field(default_factory=RequestStats)


@dataclass
class ScoreRequest:
    request_id: str
    prompt_ids: list[int]
    candidates: list[list[int]]   # full token ids of each candidate continuation
    adaptation: Adaptation
    stats: RequestStats = field(default_factory=RequestStats)


@dataclass(frozen=True)
class LabelScores:
    best: int                     # index of the chosen candidate
    probs: tuple[float, ...]      # the model's probability of each candidate's first token, renormalised
    forward_tokens: int           # tokens computed by the pass (the first pass's usage)


@dataclass(frozen=True)
class TokenLogprob:
    """The raw model log-probability of one token, and the top alternatives at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()    # (token id, log p), best first, k of them


@dataclass(frozen=True)
class TokenChunk:
    text: str                     # new text since the previous chunk (may be "" while bytes are pending)
    token_ids: tuple[int, ...]
    finish_reason: str | None = None   # "stop" | "length" | "abort" on the last chunk
    logprobs: tuple[TokenLogprob, ...] | None = None      # one per token id (when asked for)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None   # first chunk only (when asked for)


@dataclass(frozen=True)
class EngineHealth:
    """What an engine says about itself now (GET /health, and the engine gauges of /metrics)."""

    ok: bool                        # serving; False after a fault until the engine recovers
    engine: str                     # "hf" | "vllm"
    device: str | None = None
    dtype: str | None = None
    adaptation: str | None = None   # the key of the adaptation the weights hold now (None: unknown)
    running: int = 0                # sequences in the engine's batch now
    waiting: int = 0                # sequences waiting for a batch
    swaps: int = 0                  # weight swaps since the start
    fault: str | None = None        # the last fault, while it lasts
    details: Mapping[str, Any] = field(default_factory=dict)   # engine-specific extras, JSON-serialisable

    @property
    def status(self) -> str:
        return "ok" if self.ok else "error"

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "engine": self.engine, "device": self.device, "dtype": self.dtype,
                "adaptation": self.adaptation, "running": self.running, "waiting": self.waiting,
                "swaps": self.swaps, "fault": self.fault, **self.details}


class Engine(abc.ABC):
    model_name: str
    experts_dir: Path | None       # where the startup experts came from (None: none)
    tokenizer: Any                 # a transformers tokenizer with a chat template
    experts: dict[str, Expert]     # name → expert, checked against this engine's base weights
    max_model_len: int             # prompt + answer tokens
    grammars: "Grammars | None" = None   # compiles/validates constraints for this tokenizer (structured.py)

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]: ...

    @abc.abstractmethod
    async def score_labels(self, request: ScoreRequest) -> LabelScores: ...

    @abc.abstractmethod
    async def apply(self, adaptation: Adaptation) -> float:
        """Patch the weights to `adaptation` now; returns the milliseconds it took."""

    @abc.abstractmethod
    def health(self) -> EngineHealth: ...

    async def refresh_health(self) -> None:
        """Bring what `health()` reports up to date where the engine keeps it elsewhere (the vLLM engine's step
        counters live in its worker processes); GET /metrics awaits it before rendering. Default: nothing."""

    async def load_expert(self, path: Path) -> Expert:
        """Load and check one expert file (as at startup) and make it servable; returns it."""
        raise EngineUnavailable("loading experts at runtime is not supported by this engine")

    async def unload_expert(self, name: str) -> None:
        """Stop serving an expert; requests already waiting for it fail with a 404."""
        raise EngineUnavailable("unloading experts at runtime is not supported by this engine")
