"""Grammar-constrained decoding (structured outputs) with xgrammar: one compiled grammar per constraint, one
matcher per row, that row's token bitmask applied to that row's logits.

Contract:
- `Constraint` is what crosses the Engine interface (a field of SamplingParams): a kind (`json` | `regex` |
  `choice` | `grammar`) and its text (a JSON schema as canonical JSON, a regex, a JSON list of strings, an EBNF
  or Lark grammar). `json_object` is `json` with the schema `{"type": "object"}`, as vLLM does.
- `Grammars(tokenizer, vocab_size, stop_ids)` compiles constraints for one tokenizer and caches the compiled
  grammars (LRU, `max_entries`); `compile(c)` raises InvalidRequest naming `c.param` when the constraint is
  invalid or uses what xgrammar cannot compile. `stats()` gives compiles, cache hits and compile seconds
  (the metrics read them at scrape time). Thread-safe (serving validates in a thread, the worker compiles).
- JSON whitespace: by default `any_whitespace=False` with separators `(",", ":")` — exactly what vLLM 0.32
  passes to xgrammar for `disable_any_whitespace` (xgrammar 0.2.8 still puts one space after a comma, and
  after a colon only where the separator says so), so both engines decode under the same grammar: no
  newlines, no runs of spaces. `any_whitespace=True` (the server flag `--json-any-whitespace`) allows
  xgrammar's free whitespace between tokens.
- `RowMatcher` belongs to one row of a batch: `mask(logits [vocab])` sets every token the grammar forbids
  next to -inf *in that row's logits only*; `accept(token)` advances the grammar; once the grammar is
  complete only the stop tokens (eos) remain allowed, so the row ends with finish_reason `stop`; a row cut by
  max_tokens ends with `length` like any other. `rollback(n)` undoes the last n accepted tokens (xgrammar's
  rollback, kept for stop strings that end a row mid-token: the row ends, nothing is decoded after it).
- The vLLM engine never uses RowMatcher: it hands the same Constraint to vLLM's own structured outputs
  (server/engines/vllm.py); it uses `Grammars.compile` only to validate (so a bad schema is the same 400 on
  both engines, before vLLM sees it).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import xgrammar as xgr

from server.errors import InvalidRequest

Kind = Literal["json", "regex", "choice", "grammar"]
JSON_OBJECT_SCHEMA = '{"type": "object"}'
SEPARATORS = (",", ":")


@dataclass(frozen=True)
class Constraint:
    kind: Kind
    spec: str                                         # schema JSON | regex | JSON list of choices | grammar
    param: str = field(default="response_format", compare=False)   # the request parameter it came from
    source: str = field(default="json_schema", compare=False)      # for the metrics: json_schema | json_object |
                                                                    # regex | choice | grammar | tool_call

    @staticmethod
    def json_schema(schema: Any, param: str = "response_format", source: str = "json_schema") -> "Constraint":
        """A JSON schema (dict or JSON text) → a Constraint with its canonical text (one cache entry per schema)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise InvalidRequest(f"{param}: the JSON schema is not valid JSON: {e}", param) from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequest(f"{param}: a JSON schema must be an object", param)
        return Constraint("json", json.dumps(schema, separators=(",", ":")), param, source)


def _ebnf_choice(choices: list[str]) -> str:
    def esc(s: str) -> str:
        table = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
        return "".join(table.get(ch) or (f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
                       for ch in s)
    return "root ::= " + " | ".join(f'"{esc(c)}"' for c in choices)


class Grammars:
    """Compiled grammars of one tokenizer, cached per constraint."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int] | list[int], *,
                 any_whitespace: bool = False, max_entries: int = 256, max_threads: int = 2):
        # [vocab_size] may exceed len(tokenizer) (padded embedding rows); those tokens are never allowed
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_ids))
        self.vocab_size = vocab_size
        self.any_whitespace = any_whitespace
        # tokens holding a control character (bytes < 0x20): compact JSON never needs one (whitespace between
        # tokens is off, and inside strings they must be escaped), but xgrammar 0.2.8's rule for strings with
        # maxLength lets raw tabs through (`[^"\\\r\n]`), which json.loads rejects: they are masked too
        self.control_ids = [i for i, b in enumerate(self.info.decoded_vocab)
                            if any(x < 0x20 for x in b) and i not in set(self.info.stop_token_ids)]
        self._control = torch.zeros(vocab_size, dtype=torch.bool)      # [vocab]
        self._control[self.control_ids] = True
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[Constraint, xgr.CompiledGrammar] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()
        self.compiles = 0
        self.hits = 0
        self.compile_seconds = 0.0
        self.last_compile_s = 0.0

    def stats(self) -> dict[str, float]:
        return {"compiles": self.compiles, "cache_hits": self.hits, "compile_seconds": self.compile_seconds,
                "cached": len(self._cache)}

    def compile(self, c: Constraint) -> xgr.CompiledGrammar:
        with self._lock:
            hit = self._cache.get(c)
            if hit is not None:
                self._cache.move_to_end(c)
                self.hits += 1
                return hit
            t0 = time.perf_counter()
            try:
                compiled = self._compile(c)
            except InvalidRequest:
                raise
            except Exception as e:  # xgrammar's RuntimeError / ValueError: the user's constraint is at fault
                msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise InvalidRequest(f"{c.param}: the {c.kind} constraint cannot be compiled: {msg[:300]}",
                                     c.param) from None
            dt = time.perf_counter() - t0
            self.compiles += 1
            self.compile_seconds += dt
            self.last_compile_s = dt
            self._cache[c] = compiled
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
            return compiled

    def _compile(self, c: Constraint) -> xgr.CompiledGrammar:
        ws = {"any_whitespace": True} if self.any_whitespace else {"any_whitespace": False,
                                                                     "separators": SEPARATORS}
        if c.kind == "json":
            return self._compiler.compile_json_schema(c.spec, strict_mode=True, **ws)
        if c.kind == "regex":
            return self._compiler.compile_regex(c.spec)
        if c.kind == "choice":
            choices = json.loads(c.spec)
            if not choices or not all(isinstance(x, str) for x in choices):
                raise InvalidRequest(f"{c.param}: choice must be a non-empty list of strings", c.param)
            return self._compiler.compile_grammar(_ebnf_choice(choices))
        if c.kind == "grammar":
            # EBNF (GBNF-style `root ::= ...`) as xgrammar and vLLM take it; otherwise Lark
            if "::=" in c.spec:
                return self._compiler.compile_grammar(c.spec)
            return self._compiler.compile_lark(c.spec)
        raise InvalidRequest(f"{c.param}: unknown constraint kind {c.kind!r}", c.param)

    def no_control(self, c: Constraint) -> bool:
        """Whether this constraint also bans control-character tokens (compact JSON)."""
        return c.kind == "json" and not self.any_whitespace

    def allowed_ids(self, c: Constraint) -> list[int] | None:
        """For engines that take an allow-list (vLLM): every token but the control ones, for compact JSON."""
        if not self.no_control(c):
            return None
        if not hasattr(self, "_allowed"):
            banned = set(self.control_ids)
            self._allowed = [i for i in range(self.vocab_size) if i not in banned]
        return self._allowed

    def matcher(self, c: Constraint) -> "RowMatcher":
        return RowMatcher(self.compile(c), self.vocab_size, self._control if self.no_control(c) else None)


class RowMatcher:
    """The grammar state of one row: mask its logits, advance on its tokens."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int, banned: torch.Tensor | None = None):
        self._m = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)      # [1, ceil(vocab / 32)] int32
        self.vocab_size = vocab_size
        self._banned = banned                                          # [vocab] bool, or None

    def mask(self, logits: torch.Tensor) -> None:
        """Forbidden next tokens of this row → -inf, in place. `logits` is this row's [vocab] (fp32), contiguous:
        xgrammar's CPU kernel walks the raw buffer (a strided row would be masked at the wrong entries)."""
        assert logits.is_contiguous(), "xgrammar masks a contiguous row only"
        self._m.fill_next_token_bitmask(self._bitmask)
        bitmask = self._bitmask if logits.device.type == "cpu" else self._bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=min(self.vocab_size, logits.shape[-1]))
        if self._banned is not None:
            if self._banned.device != logits.device:
                self._banned = self._banned.to(logits.device)
            logits[: self._banned.shape[0]].masked_fill_(self._banned[: logits.shape[0]], float("-inf"))

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False if the grammar refused it (cannot happen after `mask`)."""
        return bool(self._m.accept_token(int(token)))

    def rollback(self, n: int) -> None:
        self._m.rollback(n)

    @property
    def terminated(self) -> bool:
        return bool(self._m.is_terminated())
