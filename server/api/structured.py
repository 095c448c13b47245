"""Structured outputs and tools between the API models and serving: request → prompt + constraint, output →
the OpenAI message or stream deltas. Serving calls only the functions of this module (and ToolPlan.output).

Contract:
- `prepare_chat(req, grammars, config)` → (template messages, ToolPlan | None, Constraint | None) and
  `prepare_completion(req, grammars)` → Constraint | None; every constraint (and every tool schema) is
  compiled once here, off the event loop, so what xgrammar cannot compile is a 400 naming the parameter
  before anything is queued (the compiled grammar is cached; the embedded engine decodes with it).
- `chat_choice(i, text, finish, plan)` / `stream_deltas(output, chunk)` shape the answer (tool calls or
  content); `chat_template(config)` / `render(...)` are the template (server/api/templates.py).
- `request_constraint(req)` reads `response_format` (OpenAI: `text` | `json_object` | `json_schema`,
with or without `strict`) and vLLM's `structured_outputs` (`json`, `regex`, `choice`, `grammar`,
`json_object`, as `vllm serve` 0.32 takes them) and returns a Constraint or None. Exactly one source may
constrain a request: both at once, or two kinds inside `structured_outputs`, is a 400 naming the parameter.
The schema itself is checked when it is compiled (Grammars.compile: a 400 naming the same parameter).
`strict` does not change decoding: the output is always constrained to the schema (xgrammar's strict mode,
no properties beyond the schema's), so strict and non-strict schemas both validate.
"""

from __future__ import annotations

import json
from typing import Any

from server.api import protocol as P
from server.api import templates
from server.api.tools import ToolOutput, ToolPlan, chat_messages, deltas
from server.engines.base import TokenChunk
from server.engines.structured import JSON_OBJECT_SCHEMA, Constraint, Grammars
from server.errors import InvalidRequest

render = templates.render


def chat_template(config: Any) -> str | None:
    return templates.resolve_chat_template(config.chat_template, config.model is None)


def _check(grammars: Grammars | None, c: Constraint | None) -> None:
    if c is not None and grammars is not None:
        grammars.compile(c)


def prepare_chat(req: P.ChatCompletionRequest, grammars: Grammars | None,
                 config: Any) -> tuple[list[dict[str, Any]], ToolPlan | None, Constraint | None]:
    """1. messages (tool calls / results checked); 2. tools → plan; 3. the one constraint; 4. compile it."""
    messages = chat_messages(req)
    plan = ToolPlan.of(req, config.tool_call_parser)
    constraint = request_constraint(req)
    if plan is not None:
        for _, c in plan.tool_schemas():
            _check(grammars, c)
        if plan.constraint is not None:
            if constraint is not None:
                raise InvalidRequest("response_format / structured_outputs cannot be combined with tool_choice "
                                     "'required' or a named function", "response_format")
            constraint = plan.constraint
    _check(grammars, constraint)
    return messages, plan, constraint


def prepare_completion(req: P.CompletionRequest, grammars: Grammars | None) -> Constraint | None:
    constraint = request_constraint(req)
    _check(grammars, constraint)
    return constraint


def chat_choice(index: int, text: str, finish: str | None, plan: ToolPlan | None) -> P.ChatChoice:
    if plan is None:
        return P.ChatChoice(index=index, message=P.ResponseMessage(content=text), finish_reason=finish)
    out = plan.output()
    out.feed(text)
    _, finish = out.finish(finish)
    content, calls = out.message()
    return P.ChatChoice(index=index, message=P.ResponseMessage(content=content, tool_calls=calls),
                        finish_reason=finish)


def stream_deltas(out: ToolOutput | None, c: TokenChunk) -> list[tuple[P.DeltaMessage, str | None]]:
    """One engine chunk → the (delta, finish_reason) chunks to send; finish_reason only on the last."""
    if out is None:
        if c.finish_reason is None and not c.text:
            return []
        return [(P.DeltaMessage(content=c.text or None), c.finish_reason)]
    events = out.feed(c.text) if c.text else []
    finish = None
    if c.finish_reason is not None:
        more, finish = out.finish(c.finish_reason)
        events += more
    pieces: list[tuple[P.DeltaMessage, str | None]] = [(d, None) for e in events for d in deltas(e)]
    if finish is not None:
        pieces.append((P.DeltaMessage(), finish))
    return pieces


def request_constraint(req: P.ChatCompletionRequest | P.CompletionRequest) -> Constraint | None:
    rf = _from_response_format(req.response_format)
    so = _from_structured_outputs(req.structured_outputs)
    if rf is not None and so is not None:
        raise InvalidRequest("give either response_format or structured_outputs, not both", "structured_outputs")
    return rf or so


def _from_response_format(rf: P.ResponseFormat | None) -> Constraint | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return Constraint("json", JSON_OBJECT_SCHEMA, "response_format", "json_object")
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise InvalidRequest("response_format of type json_schema needs json_schema.schema",
                             "response_format.json_schema")
    return Constraint.json_schema(rf.json_schema.schema_, "response_format.json_schema.schema")


def _from_structured_outputs(so: P.StructuredOutputs | None) -> Constraint | None:
    if so is None:
        return None
    given = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(so, k) not in (None, False)]
    if len(given) != 1:
        raise InvalidRequest("structured_outputs needs exactly one of json, regex, choice, grammar, json_object "
                             f"(got {len(given)})", "structured_outputs")
    kind = given[0]
    param = f"structured_outputs.{kind.rstrip('_')}"
    if kind == "json_":
        return Constraint.json_schema(so.json_, param)
    if kind == "json_object":
        return Constraint("json", JSON_OBJECT_SCHEMA, param, "json_object")
    if kind == "choice":
        if not so.choice:
            raise InvalidRequest("structured_outputs.choice must be a non-empty list of strings", param)
        return Constraint("choice", json.dumps(so.choice), param, "choice")
    text = getattr(so, kind)
    if not text.strip():
        raise InvalidRequest(f"{param} is empty", param)
    return Constraint(kind, text, param, kind)
