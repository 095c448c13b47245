"""Log-probabilities and logit_bias on the wire: request checks and OpenAI's two response shapes.

Contract:
- `parse_logit_bias(raw, vocab)` turns OpenAI's {"token id": bias} into the engine's ((id, bias), ...),
  refusing (InvalidRequest naming `logit_bias`) a key that is not a token id below `vocab` or a bias outside
  [-100, 100] (OpenAI's range; vLLM clamps, we refuse, so a typo is not silently changed).
- `chat_logprobs(tok, lps)`: chat's `choices[].logprobs` = {content: [{token, logprob, bytes,
  top_logprobs: [{token, logprob, bytes}]}]}, one entry per generated token (a stream: per chunk).
- `completion_logprobs(tok, ids, lps, offset)`: the legacy {tokens, token_logprobs, top_logprobs,
  text_offset}; `top_logprobs[i]` holds the top k and the token itself (as OpenAI and vLLM); an entry without
  log-probabilities (the first prompt token of an echo) is None in both lists. `text_offset` counts
  characters from `offset` (the text already sent before these tokens).
Token strings are each token decoded on its own (a token that is part of a multi-byte character decodes to
U+FFFD), `bytes` their UTF-8 bytes. A log-probability of -inf is sent as -9999.0 (JSON has no -inf; vLLM does
the same).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from server.api import protocol as P
from server.engines.base import TokenLogprob
from server.errors import InvalidRequest

BIAS_LIMIT = 100.0


def parse_logit_bias(raw: dict[str, float] | None, vocab: int) -> tuple[tuple[int, float], ...]:
    if not raw:
        return ()
    out = []
    for key, bias in raw.items():
        try:
            tid = int(key)
        except ValueError:
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        if not 0 <= tid < vocab:
            raise InvalidRequest(f"logit_bias: token id {tid} is outside the vocabulary [0, {vocab})", "logit_bias")
        if not (math.isfinite(bias) and -BIAS_LIMIT <= bias <= BIAS_LIMIT):
            raise InvalidRequest(f"logit_bias: the bias of token {tid} must be in [-100, 100], got {bias}",
                                 "logit_bias")
        out.append((tid, float(bias)))
    return tuple(out)


def _lp(x: float) -> float:
    return max(x, -9999.0) if x == x else -9999.0


def token_str(tok: Any, tid: int) -> str:
    return tok.decode([tid])


def chat_logprobs(tok: Any, lps: Sequence[TokenLogprob]) -> P.ChoiceLogprobs:
    def entry(tid: int, lp: float) -> dict[str, Any]:
        s = token_str(tok, tid)
        return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode("utf-8"))}

    return P.ChoiceLogprobs(content=[
        P.TokenLogprobInfo(**entry(x.token_id, x.logprob), top_logprobs=[P.TopLogprob(**entry(t, v)) for t, v in x.top])
        for x in lps])


def completion_logprobs(tok: Any, ids: Sequence[int], lps: Sequence[TokenLogprob | None],
                        offset: int = 0) -> P.CompletionLogprobs:
    out = P.CompletionLogprobs()
    for tid, x in zip(ids, lps):
        s = token_str(tok, tid)
        out.text_offset.append(offset)
        offset += len(s)
        out.tokens.append(s)
        if x is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_lp(x.logprob))
        top = {token_str(tok, t): _lp(v) for t, v in x.top}
        top.setdefault(s, _lp(x.logprob))
        out.top_logprobs.append(top)
    return out
