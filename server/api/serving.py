"""Serving: the two passes of every request, between the API models and the engine.

The request path, top to bottom: routes (server/api/app.py) → `Serving` (here, beside the protocol models it
reads and writes, server/api/protocol.py) → the Engine interface (server/engines/base.py).

Contract, per chat or completion request:
  0. check the request (fields we don't implement, lengths, n, max_tokens) and tokenize its prompt;
  1. dispatch: decide the adaptation. explicit → the named mix; none → base; prompt → the first pass scores
     the labels on the base weights; classifier → the same with the classification expert patched in.
     The label maps to an expert (or the base weights for `other`);
  2. schedule + 3. generate: submit n sequences under that adaptation to the engine (its scheduler groups
     them with other requests of the same adaptation, patches between groups) and stream the answer back
     as OpenAI JSON or SSE chunks (one token per chunk), with `usage` and the `t2` report (what the dispatch
     decided, first-pass and patch times) in the body or the last chunk.
Every user error is raised as a ServerError (OpenAI-shaped 4xx by the API layer).

Streams are *primed*: `chat`/`completions` return only once the first token is there (the role chunk goes
out with it), so a full queue, an engine fault or a bad request before the first token is still a plain
HTTP error (429 / 503 / 4xx), and TTFT as a client measures it is the real one. Every request, finished or
aborted, is recorded once in the app's Metrics (when given).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

from experts.dispatch import (ANSWER_PREFIX, CLASSIFIER_LABEL, LABEL_SUFFIX, LABELS, Strategy,
                              classification_messages, experts_by_label, route)
from experts.mix import BASE, Adaptation
from server.api import protocol as P
from server.api.logprobs import chat_logprobs, completion_logprobs, parse_logit_bias
from server.config import ServerConfig
from server.engines.base import Engine, GenerateRequest, SamplingParams, ScoreRequest, TokenChunk
from server.errors import InvalidRequest, ModelNotFound, ServerError
from server.metrics import Metrics

AUTO = "auto"
MAX_STOP = 16


@dataclass
class Dispatched:
    """The outcome of step 1."""

    strategy: Strategy
    adaptation: Adaptation
    label: str | None = None
    label_probs: dict[str, float] | None = None
    first_pass_ms: float = 0.0
    tokens: int = 0


@dataclass
class Prepared:
    """A checked request, ready for the two passes."""

    prompt_ids: list[int]
    question: str
    params: list[SamplingParams]          # one per choice (n)
    strategy: Strategy
    explicit: Adaptation | None
    stream: bool
    include_usage: bool
    logprobs: bool = False                # the response carries log-probabilities
    echo: bool = False                    # completions: the prompt goes before the completion
    echo_only: bool = False               # completions, max_tokens=0 with echo: only the prompt (scoring)
    prompt_text: str = ""


@dataclass
class _Track:
    """What one request did, for the metrics: arrival, first token, finish reasons."""

    t0: float
    first: float | None = None
    finish: list[str | None] | None = None


class Serving:
    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics | None = None):
        self.engine, self.config, self.metrics = engine, config, metrics
        self._label_overhead: int | None = None

    # ---- catalogue ----------------------------------------------------------------------------------
    @property
    def base(self) -> str:
        return self.engine.model_name

    def models(self) -> P.ModelList:
        cards = [P.ModelCard(id=self.base, t2={"kind": "base"}),
                 P.ModelCard(id=AUTO, t2={"kind": "auto", "dispatch": self.config.dispatch.value})]
        for name, e in sorted(self.engine.experts.items()):
            cards.append(P.ModelCard(id=f"{self.base}:{name}", t2={
                "kind": "expert", "label": e.label, "description": e.description, "params": e.num_params}))
        return P.ModelList(data=cards)

    def _by_label(self) -> dict[str, str]:
        return experts_by_label({n: e.label for n, e in self.engine.experts.items() if e.label in LABELS})

    def _classifier(self) -> str | None:
        return experts_by_label({n: e.label for n, e in self.engine.experts.items()}).get(CLASSIFIER_LABEL)

    # ---- step 0: check -------------------------------------------------------------------------------
    def _resolve(self, model: str, t2: P.T2RequestOptions | None) -> tuple[Strategy, Adaptation | None]:
        """model id + `t2` extension → (strategy, explicit adaptation or None)."""
        asked = t2.dispatch if t2 else None
        explicit: Adaptation | None = None
        if model == AUTO:
            strategy = asked or self.config.dispatch
        elif model == self.base:
            strategy = asked or Strategy.NONE
        elif model.startswith(self.base + ":") and model[len(self.base) + 1:] in self.engine.experts:
            strategy, explicit = Strategy.EXPLICIT, Adaptation.of({model[len(self.base) + 1:]: 1.0})
            if asked not in (None, Strategy.EXPLICIT):
                raise InvalidRequest(f"model {model!r} names an expert, which conflicts with "
                                     f"t2.dispatch={asked.value!r}", "t2.dispatch")
        else:
            raise ModelNotFound(f"The model {model!r} does not exist. See GET /v1/models.", "model")
        if t2 and t2.experts is not None:
            if asked not in (None, Strategy.EXPLICIT) or explicit is not None:
                raise InvalidRequest("t2.experts gives an explicit mix: use it with model "
                                     f"{AUTO!r} or {self.base!r} and no other dispatch", "t2.experts")
            unknown = sorted(set(t2.experts) - set(self.engine.experts))
            if unknown:
                raise InvalidRequest(f"unknown expert(s) {unknown}; loaded: {sorted(self.engine.experts)}",
                                     "t2.experts")
            if any(w < 0 or w != w or w == float("inf") for w in t2.experts.values()) \
                    or sum(t2.experts.values()) <= 0:
                raise InvalidRequest("t2.experts weights must be finite, ≥ 0, and not all 0", "t2.experts")
            strategy, explicit = Strategy.EXPLICIT, Adaptation.of(t2.experts)
        if strategy == Strategy.EXPLICIT and explicit is None:
            raise InvalidRequest("dispatch 'explicit' needs t2.experts or a model id '<base>:<expert>'",
                                 "t2.dispatch")
        if strategy == Strategy.CLASSIFIER and self._classifier() is None:
            raise InvalidRequest("dispatch 'classifier' needs a classification expert (label "
                                 "'classifier'); none is loaded", "t2.dispatch")
        return strategy, explicit

    def _check_common(self, req: P.ChatCompletionRequest | P.CompletionRequest, prompt_len: int,
                      max_tokens: int | None, **sampling: Any) -> list[SamplingParams]:
        if req.frequency_penalty or req.presence_penalty:
            raise InvalidRequest("frequency_penalty and presence_penalty are not supported (use 0)",
                                 "frequency_penalty" if req.frequency_penalty else "presence_penalty")
        for name, neutral in P.REFUSED.items():     # OpenAI fields we do not implement: only their neutral value
            value = getattr(req, name, None)
            if value is not None and value not in neutral:
                raise InvalidRequest(f"{name} is not supported by this server", name)
        sampling["logit_bias"] = parse_logit_bias(req.logit_bias, len(self.engine.tokenizer))
        if req.n > self.config.max_n:
            raise InvalidRequest(f"n must be ≤ {self.config.max_n}", "n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP:
            raise InvalidRequest(f"at most {MAX_STOP} stop sequences", "stop")
        if req.stream_options is not None and not req.stream:
            raise InvalidRequest("stream_options is only allowed with stream=true", "stream_options")
        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise InvalidRequest(f"This model's maximum context length is {limit} tokens; the prompt has "
                                 f"{prompt_len}.", "messages", code="context_length_exceeded")
        room = limit - prompt_len
        if max_tokens is not None and max_tokens > self.config.max_tokens_limit:
            raise InvalidRequest(f"max_tokens must be ≤ {self.config.max_tokens_limit} on this server "
                                 f"(got {max_tokens})", "max_tokens")
        if max_tokens is not None and max_tokens > room:
            raise InvalidRequest(f"This model's maximum context length is {limit} tokens: the prompt has "
                                 f"{prompt_len}, so max_tokens must be ≤ {room} (got {max_tokens}).",
                                 "max_tokens", code="context_length_exceeded")
        mt = max_tokens if max_tokens is not None else min(self.config.default_max_tokens,
                                                           self.config.max_tokens_limit, room)
        temp = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        return [SamplingParams(max_tokens=mt, temperature=temp, top_p=top_p,
                               seed=None if req.seed is None else (req.seed + i) % (2**63),
                               stop=tuple(stop), ignore_eos=req.ignore_eos, **sampling) for i in range(req.n)]

    def _tokenize(self, text: str) -> list[int]:
        return self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _chat_template(self, messages: list[dict[str, str]], suffix: str = "") -> str:
        try:
            text = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template that rejects this conversation (roles, order)
            raise InvalidRequest(f"the chat template rejected these messages: {e}", "messages") from None
        return text + suffix

    def _prepare_chat(self, req: P.ChatCompletionRequest) -> Prepared:
        if req.tools:
            raise InvalidRequest("tools are not supported", "tools")
        strategy, explicit = self._resolve(req.model, req.t2)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        ids = self._tokenize(self._chat_template(messages))
        users = [m["content"] for m in messages if m["role"] == "user"]
        question = users[-1] if users else "\n".join(m["content"] for m in messages)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs=true", "top_logprobs")
        params = self._check_common(req, len(ids), max_tokens,
                                    logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        return Prepared(ids, question, params, strategy, explicit, req.stream,
                        bool(req.stream_options and req.stream_options.include_usage), logprobs=bool(req.logprobs))

    def _prepare_completion(self, req: P.CompletionRequest) -> Prepared:
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)) else list(p)
        if len(prompts) != 1:
            raise InvalidRequest("send one prompt per request (a list must hold exactly one prompt)", "prompt")
        if req.suffix:
            raise InvalidRequest("suffix is not supported", "suffix")
        if req.max_tokens == 0 and not req.echo:
            raise InvalidRequest("max_tokens=0 is only allowed with echo=true (to score the prompt)", "max_tokens")
        strategy, explicit = self._resolve(req.model, req.t2)
        if isinstance(prompts[0], str):
            text, ids = prompts[0], self._tokenize(prompts[0])
        else:                                   # token ids (lm-evaluation-harness sends these)
            vocab = len(self.engine.tokenizer)
            ids = list(prompts[0])
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
            text = self.engine.tokenizer.decode(ids)
        if not ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        echo_only = req.echo and req.max_tokens == 0       # as vLLM: one token is computed, none returned
        params = self._check_common(req, len(ids), 1 if echo_only else req.max_tokens, logprobs=req.logprobs,
                                    prompt_logprobs=req.logprobs if req.echo else None)
        return Prepared(ids, text, params, strategy, explicit, req.stream,
                        bool(req.stream_options and req.stream_options.include_usage),
                        logprobs=req.logprobs is not None, echo=req.echo, echo_only=echo_only, prompt_text=text)

    # ---- step 1: dispatch ----------------------------------------------------------------------------
    def _label_request(self, question: str, adaptation: Adaptation) -> ScoreRequest:
        # the first pass must fit the model too: a question longer than the room left is cut (its head
        # is what classifies it)
        if self._label_overhead is None:      # tokens of the classification prompt around the question
            self._label_overhead = len(self._tokenize(self._chat_template(classification_messages(""), ANSWER_PREFIX)))
        room = self.engine.max_model_len - self._label_overhead - 16
        q_ids = self._tokenize(question)
        if len(q_ids) > room:
            question = self.engine.tokenizer.decode(q_ids[:max(0, room)])
        prompt = self._chat_template(classification_messages(question), ANSWER_PREFIX)
        full = [self._tokenize(prompt + label + LABEL_SUFFIX) for label in LABELS]
        common = 0
        while all(len(f) > common + 1 and f[common] == full[0][common] for f in full):
            common += 1
        return ScoreRequest(uuid.uuid4().hex, full[0][:common], [f[common:] for f in full], adaptation)

    async def dispatch(self, prep: Prepared) -> Dispatched:
        if prep.strategy == Strategy.EXPLICIT:
            assert prep.explicit is not None
            return Dispatched(prep.strategy, prep.explicit)
        if prep.strategy == Strategy.NONE:
            return Dispatched(prep.strategy, BASE)
        t0 = time.perf_counter()
        scorer = BASE if prep.strategy == Strategy.PROMPT else Adaptation.of({self._classifier(): 1.0})
        sreq = await asyncio.to_thread(self._label_request, prep.question, scorer)
        scores = await self.engine.score_labels(sreq)
        label = LABELS[scores.best]
        expert = route(label, self._by_label())
        return Dispatched(prep.strategy, Adaptation.of({expert: 1.0}) if expert else BASE, label,
                          dict(zip(LABELS, (round(p, 4) for p in scores.probs))),
                          (time.perf_counter() - t0) * 1e3, scores.forward_tokens)

    # ---- steps 2+3: generate -------------------------------------------------------------------------
    def _requests(self, prep: Prepared, d: Dispatched) -> list[GenerateRequest]:
        return [GenerateRequest(uuid.uuid4().hex, prep.prompt_ids, p, d.adaptation) for p in prep.params]

    def _report(self, d: Dispatched, reqs: Sequence[GenerateRequest]) -> P.T2Report:
        return P.T2Report(strategy=d.strategy, label=d.label, label_probs=d.label_probs,
                          mix=d.adaptation.as_dict(), adaptation=d.adaptation.key,
                          first_pass_ms=round(d.first_pass_ms, 2),
                          patch_ms=round(max(r.stats.patch_ms for r in reqs), 3),
                          queue_ms=round(max(r.stats.queue_ms for r in reqs), 2),
                          path=reqs[0].stats.path if reqs else None)

    def _usage(self, prep: Prepared, d: Dispatched, reqs: Sequence[GenerateRequest]) -> P.Usage:
        completion = 0 if prep.echo_only else sum(r.stats.completion_tokens for r in reqs)
        return P.Usage(prompt_tokens=len(prep.prompt_ids), completion_tokens=completion,
                       total_tokens=len(prep.prompt_ids) + completion, dispatch_tokens=d.tokens)

    def _first_token(self, track: _Track) -> None:
        if track.first is None:
            track.first = time.perf_counter()
            if self.metrics:
                self.metrics.first_token(track.first - track.t0)

    def _record(self, track: _Track, prep: Prepared, d: Dispatched, reqs: Sequence[GenerateRequest]) -> None:
        if self.metrics is None:
            return
        now = time.perf_counter()
        self.metrics.request_done(
            strategy=d.strategy.value, label=d.label, mix=d.adaptation.as_dict(),
            finish=list(track.finish or [None] * len(reqs)), prompt_tokens=len(prep.prompt_ids),
            completion_tokens=sum(r.stats.completion_tokens for r in reqs), e2e_s=now - track.t0,
            ttft_s=None if track.first is None else track.first - track.t0, first_pass_ms=d.first_pass_ms,
            patch_ms=max(r.stats.patch_ms for r in reqs), queue_ms=max(r.stats.queue_ms for r in reqs))

    async def _collect(self, prep: Prepared, d: Dispatched, reqs: list[GenerateRequest], track: _Track,
                       chunks: list[list[TokenChunk]] | None = None) -> tuple[list[str], list[str | None]]:
        """Non-stream: every choice's whole text and finish reason (recorded in the metrics); each choice's
        chunks into `chunks` when given (for the log-probabilities)."""
        texts, track.finish = [""] * len(reqs), [None] * len(reqs)
        try:
            async with aclosing(self._merged(reqs)) as merged:
                async for i, c in merged:
                    self._first_token(track)
                    texts[i] += c.text
                    if chunks is not None:
                        chunks[i].append(c)
                    track.finish[i] = c.finish_reason or track.finish[i]
        finally:
            self._record(track, prep, d, reqs)
        return texts, track.finish

    async def _merged(self, reqs: list[GenerateRequest]) -> AsyncIterator[tuple[int, TokenChunk]]:
        """The n sequences' chunks as they come, tagged with the choice index."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, r: GenerateRequest) -> None:
            try:
                async for chunk in self.engine.generate(r):
                    await queue.put((i, chunk))
            except BaseException as e:  # handed to the consumer, which re-raises
                await queue.put((i, e))
                if isinstance(e, asyncio.CancelledError):
                    raise
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
        try:
            done = 0
            while done < len(tasks):
                i, item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def chat(self, req: P.ChatCompletionRequest) -> P.ChatCompletionResponse | AsyncIterator[str]:
        track = _Track(time.perf_counter())
        prep = await asyncio.to_thread(self._prepare_chat, req)
        d = await self.dispatch(prep)
        reqs = self._requests(prep, d)
        if prep.stream:
            return _guard_stream(await _primed(self._chat_stream(req.model, prep, d, reqs, track)))
        chunks: list[list[TokenChunk]] = [[] for _ in reqs]
        texts, finish = await self._collect(prep, d, reqs, track, chunks)
        choices = [P.ChatChoice(index=i, message=P.ResponseMessage(content=t), finish_reason=f,
                                logprobs=self._chat_logprobs(prep, cs))
                   for i, (t, f, cs) in enumerate(zip(texts, finish, chunks))]
        return P.ChatCompletionResponse(model=req.model, choices=choices, usage=self._usage(prep, d, reqs),
                                        t2=self._report(d, reqs))

    def _chat_logprobs(self, prep: Prepared, chunks: Sequence[TokenChunk]) -> P.ChoiceLogprobs | None:
        if not prep.logprobs:
            return None
        return chat_logprobs(self.engine.tokenizer, [x for c in chunks for x in (c.logprobs or ())])

    def _completion_choice(self, prep: Prepared, i: int, text: str, chunks: Sequence[TokenChunk],
                           finish: str | None, offset: int = 0, first: bool = True) -> P.CompletionChoice:
        """One choice of a completion (a whole answer, or one chunk of a stream), echo and logprobs included.
        `first`: these are the first chunks of the choice (the echo goes there); `offset`: characters sent."""
        echo = prep.echo and first
        ids: list[int] = list(prep.prompt_ids) if echo else []
        lps: list = []
        if echo and prep.logprobs:
            plps = next((c.prompt_logprobs for c in chunks if c.prompt_logprobs is not None), None)
            lps = list(plps) if plps is not None else [None] * len(ids)
        if not prep.echo_only:
            for c in chunks:
                ids += c.token_ids
                lps += c.logprobs or [None] * len(c.token_ids)
        else:
            text = ""
        logprobs = completion_logprobs(self.engine.tokenizer, ids, lps, offset) if prep.logprobs else None
        return P.CompletionChoice(index=i, text=(prep.prompt_text if echo else "") + text, logprobs=logprobs,
                                  finish_reason=finish)

    def _chat_stream(self, model: str, prep: Prepared, d: Dispatched, reqs: list[GenerateRequest],
                     track: _Track) -> AsyncIterator[str]:
        base = dict(id=P.response_id("chatcmpl"), created=int(time.time()), model=model)

        def chunk(choices: list[P.ChatChunkChoice], **extra: Any) -> str:
            return _sse(P.ChatCompletionChunk(**base, choices=choices, **extra))

        async def body() -> AsyncIterator[str]:
            finished, track.finish = 0, [None] * len(reqs)
            try:
                async with aclosing(self._merged(reqs)) as merged:
                    async for i, c in merged:
                        if track.first is None:   # the role chunks go out with the first token
                            self._first_token(track)
                            for j in range(len(reqs)):
                                yield chunk([P.ChatChunkChoice(index=j, delta=P.DeltaMessage(role="assistant",
                                                                                             content=""))])
                        if c.finish_reason is None and not c.text and not (prep.logprobs and c.logprobs):
                            continue
                        choice = P.ChatChunkChoice(index=i, delta=P.DeltaMessage(content=c.text or None),
                                                   finish_reason=c.finish_reason,
                                                   logprobs=self._chat_logprobs(prep, [c]))
                        finished += c.finish_reason is not None
                        track.finish[i] = c.finish_reason or track.finish[i]
                        last = finished == len(reqs) and not prep.include_usage
                        yield chunk([choice], t2=self._report(d, reqs) if last else None)
            finally:
                self._record(track, prep, d, reqs)
            if prep.include_usage:
                yield chunk([], usage=self._usage(prep, d, reqs), t2=self._report(d, reqs))
            yield "data: [DONE]\n\n"

        return body()

    async def completions(self, req: P.CompletionRequest) -> P.CompletionResponse | AsyncIterator[str]:
        track = _Track(time.perf_counter())
        prep = await asyncio.to_thread(self._prepare_completion, req)
        d = await self.dispatch(prep)
        reqs = self._requests(prep, d)
        if prep.stream:
            return _guard_stream(await _primed(self._completion_stream(req.model, prep, d, reqs, track)))
        chunks: list[list[TokenChunk]] = [[] for _ in reqs]
        texts, finish = await self._collect(prep, d, reqs, track, chunks)
        choices = [self._completion_choice(prep, i, t, cs, f) for i, (t, f, cs) in enumerate(zip(texts, finish, chunks))]
        return P.CompletionResponse(model=req.model, choices=choices, usage=self._usage(prep, d, reqs),
                                    t2=self._report(d, reqs))

    def _completion_stream(self, model: str, prep: Prepared, d: Dispatched, reqs: list[GenerateRequest],
                           track: _Track) -> AsyncIterator[str]:
        base = dict(id=P.response_id("cmpl"), created=int(time.time()), model=model)

        async def body() -> AsyncIterator[str]:
            finished, track.finish = 0, [None] * len(reqs)
            sent = [0] * len(reqs)                   # characters sent per choice (text_offset)
            started = [False] * len(reqs)            # the echo goes with a choice's first chunk
            try:
                async with aclosing(self._merged(reqs)) as merged:
                    async for i, c in merged:
                        self._first_token(track)
                        first = not started[i]
                        if (c.finish_reason is None and not c.text and not (prep.echo and first)
                                and not (prep.logprobs and c.logprobs)) or \
                                (prep.echo_only and not first and c.finish_reason is None):
                            continue
                        started[i] = True
                        finished += c.finish_reason is not None
                        track.finish[i] = c.finish_reason or track.finish[i]
                        last = finished == len(reqs) and not prep.include_usage
                        choice = self._completion_choice(prep, i, c.text, [c], c.finish_reason, sent[i], first)
                        sent[i] += len(choice.text)
                        yield _sse(P.CompletionResponse(**base, choices=[choice],
                                                        t2=self._report(d, reqs) if last else None))
            finally:
                self._record(track, prep, d, reqs)
            if prep.include_usage:
                yield _sse(P.CompletionResponse(**base, choices=[], usage=self._usage(prep, d, reqs),
                                                t2=self._report(d, reqs)))
            yield "data: [DONE]\n\n"

        return body()


def _sse(chunk: Any) -> str:
    """One SSE event; absent fields are left out (as OpenAI does), but the `t2` report is always whole."""
    body = chunk.model_dump(exclude_none=True)
    if chunk.t2 is not None:
        body["t2"] = chunk.t2.model_dump(mode="json")
    return f"data: {json.dumps(body)}\n\n"


async def _primed(body: AsyncIterator[str]) -> AsyncIterator[str]:
    """Wait for the stream's first piece (so errors before it are plain HTTP errors), then the whole stream."""
    first = await body.__anext__()

    async def whole() -> AsyncIterator[str]:
        async with aclosing(body):
            yield first
            async for piece in body:
                yield piece

    return whole()


async def _guard_stream(body: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once the stream has started, a failure can only be told in the stream: an OpenAI error event."""
    try:
        async with aclosing(body):
            async for piece in body:
                yield piece
    except ServerError as e:
        yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'param': e.param, 'code': e.code}})}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - the headers are sent: report in-band, never crash
        yield f"data: {json.dumps({'error': {'message': f'internal error: {type(e).__name__}', 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
        yield "data: [DONE]\n\n"
