"""Tool calls: request tools → prompt + constraint, model output → OpenAI `tool_calls` (whole or streamed).

Contract:
- `chat_messages(req)` turns the request's messages into the chat template's dicts. Plain messages stay
  exactly `{"role", "content"}` (the prompt of a request without tools is what it was); assistant messages
  carry `tool_calls` (`{"id", "type", "function": {"name", "arguments"}}`), tool messages `tool_call_id`,
  which must answer a call made earlier in the conversation (else a 400 naming the message).
- `ToolPlan.of(req, parser)` reads `tools`, `tool_choice` (`none` | `auto` | `required` | a named function;
  default `auto` with tools) and `parallel_tool_calls`:
  * `none`: the tools are left out of the prompt, the output is plain content;
  * `auto`: the tools are in the prompt (the chat template renders them), the model writes freely and the
    tool-call parser (`--tool-call-parser`, vLLM's names: `hermes` = `<tool_call>{"name", "arguments"}
    </tool_call>` blocks) extracts the calls;
  * `required` / named: the whole output is constrained (a Constraint handed to the engine) to a JSON
    array of calls `[{"name": ..., "arguments": {...}}]` whose `name` is one of the allowed functions and
    whose `arguments` follow that function's JSON schema; at most 1 call without parallel tool calls,
    at most MAX_PARALLEL with. So the arguments always validate (vLLM's own `required` path returned a
    bare string for a function's arguments; ours cannot).
  A named function that is not among `tools`, `tool_choice` without `tools`, or a tool schema xgrammar
  cannot compile is a 400 naming the parameter.
- `plan.output()` gives one `ToolOutput` per choice: `feed(text)` → stream events, `finish(reason)` → the
  last events and the finish reason (`tool_calls` when the output ended on its own with calls; `length`
  stays `length`), `message()` → (content, tool_calls) of the whole output. Streaming and not streaming run
  the same code on the same text, so a streamed call reassembles to the non-streamed one.
- Events: `("content", text)`, `("call", index, id, name, arguments)`; `delta(event)` gives the OpenAI delta
  (a call is two deltas, as OpenAI streams it: id + type + name + `arguments: ""`, then the arguments).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from server.api import protocol as P
from server.engines.structured import Constraint
from server.errors import InvalidRequest

MAX_PARALLEL = 4
TOOL_CALL_PARSERS = ("hermes",)
START, END = "<tool_call>", "</tool_call>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def chat_messages(req: P.ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages as the chat template sees them (checked: each tool message answers a call)."""
    out: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    for i, m in enumerate(req.messages):
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidRequest(f"messages[{i}]: only assistant messages carry tool_calls",
                                     f"messages[{i}].tool_calls")
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                               for c in m.tool_calls]
            call_ids.update(c.id for c in m.tool_calls)
        if m.role == "tool":
            if not m.tool_call_id:
                raise InvalidRequest(f"messages[{i}]: a tool message needs tool_call_id", f"messages[{i}].tool_call_id")
            if m.tool_call_id not in call_ids:
                raise InvalidRequest(f"messages[{i}]: tool_call_id {m.tool_call_id!r} answers no tool call of an "
                                     "earlier assistant message", f"messages[{i}].tool_call_id")
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def _arguments(text: str) -> Any:
    """Arguments as the template renders them: the parsed object when it is JSON, else the text."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


def _call_schema(fn: P.FunctionDefinition) -> dict[str, Any]:
    params = fn.parameters if fn.parameters else {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"type": "string", "enum": [fn.name]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


@dataclass
class ToolPlan:
    mode: str                                   # none | auto | forced
    tools: list[P.ChatTool]
    parser: str = "hermes"
    constraint: Constraint | None = None
    names: set[str] = field(default_factory=set)

    @staticmethod
    def of(req: P.ChatCompletionRequest, parser: str = "hermes") -> "ToolPlan | None":
        choice = req.tool_choice
        if not req.tools:
            if choice not in (None, "none"):
                raise InvalidRequest("tool_choice needs tools", "tool_choice")
            return None
        names = [t.function.name for t in req.tools]
        if len(set(names)) != len(names):
            raise InvalidRequest("tools: function names must be unique", "tools")
        choice = choice or "auto"
        if choice == "none":
            return ToolPlan("none", list(req.tools), parser, None, set(names))
        if choice == "auto":
            return ToolPlan("auto", list(req.tools), parser, None, set(names))
        if choice == "required":
            allowed = list(req.tools)
        else:
            allowed = [t for t in req.tools if t.function.name == choice.function.name]
            if not allowed:
                raise InvalidRequest(f"tool_choice names the function {choice.function.name!r}, which is not "
                                     f"among tools ({', '.join(names)})", "tool_choice")
        calls = [_call_schema(t.function) for t in allowed]
        schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1,
                  "maxItems": MAX_PARALLEL if req.parallel_tool_calls is not False and choice == "required" else 1}
        return ToolPlan("forced", list(req.tools), parser, Constraint.json_schema(schema, "tools", "tool_call"),
                        {t.function.name for t in allowed})

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template gets them (None: leave them out)."""
        if self.mode == "none":
            return None
        return [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in self.tools]

    def tool_schemas(self) -> Iterator[tuple[int, Constraint]]:
        """Each tool's parameter schema, to check that it compiles (a 400 naming it otherwise)."""
        for i, t in enumerate(self.tools):
            if t.function.parameters:
                yield i, Constraint.json_schema(t.function.parameters, f"tools[{i}].function.parameters", "tool_call")

    def output(self) -> "ToolOutput":
        if self.mode == "forced":
            return ForcedOutput(self.names)
        if self.mode == "auto":
            return HermesOutput(self.names)
        return ToolOutput()


class ToolOutput:
    """Plain content (tool_choice none): every piece is content."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.calls: list[P.ToolCall] = []

    def feed(self, text: str) -> list[tuple]:
        return self._content(text)

    def finish(self, reason: str | None) -> tuple[list[tuple], str | None]:
        return [], reason

    def message(self) -> tuple[str | None, list[P.ToolCall] | None]:
        text = "".join(self.content)
        if self.calls:
            return (text if text.strip() else None), list(self.calls)
        return text, None

    def _content(self, text: str) -> list[tuple]:
        if not text:
            return []
        self.content.append(text)
        return [("content", text)]

    def _call(self, name: str, arguments: Any) -> list[tuple]:
        args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        call = P.ToolCall(id=new_call_id(), function=P.FunctionCall(name=name, arguments=args))
        self.calls.append(call)
        return [("call", len(self.calls) - 1, call.id, name, args)]


class ForcedOutput(ToolOutput):
    """tool_choice required / named: the output is the constrained JSON array of calls."""

    def __init__(self, names: set[str]):
        super().__init__()
        self.names, self.buf = names, ""

    def feed(self, text: str) -> list[tuple]:
        self.buf += text
        return []

    def finish(self, reason: str | None) -> tuple[list[tuple], str | None]:
        calls = _json_or_none(self.buf) if reason == "stop" else None
        if not isinstance(calls, list) or not calls or not all(
                isinstance(c, dict) and c.get("name") in self.names and "arguments" in c for c in calls):
            return self._content(self.buf), reason   # cut by max_tokens (or a stop string): the raw text
        events: list[tuple] = []
        for c in calls:
            events += self._call(c["name"], c["arguments"])
        return events, "tool_calls"


class HermesOutput(ToolOutput):
    """tool_choice auto, parser `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks.

    Streaming holds back only text that may still become a `<tool_call>` tag, and whitespace until
    something else follows it (so whitespace between calls never becomes content)."""

    def __init__(self, names: set[str]):
        super().__init__()
        self.names, self.buf, self.inside, self.ws = names, "", False, ""

    def feed(self, text: str) -> list[tuple]:
        self.buf += text
        events: list[tuple] = []
        while True:
            if not self.inside:
                i = self.buf.find(START)
                if i >= 0:
                    events += self._text(self.buf[:i])
                    self.buf, self.inside = self.buf[i + len(START):], True
                    continue
                keep = _partial_suffix(self.buf, START)
                events += self._text(self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                return events
            j = self.buf.find(END)
            if j < 0:
                return events
            body, self.buf, self.inside = self.buf[:j], self.buf[j + len(END):], False
            events += self._block(body)

    def finish(self, reason: str | None) -> tuple[list[tuple], str | None]:
        events = self._block(self.buf) if self.inside and reason == "stop" else self._text(
            (START if self.inside else "") + self.buf)
        self.buf, self.inside = "", False
        if not self.calls:
            events += self._content(self.ws)
        self.ws = ""
        return events, ("tool_calls" if self.calls and reason == "stop" else reason)

    def _text(self, text: str) -> list[tuple]:
        """Content, except trailing whitespace, held until more content follows (whatever the chunking)."""
        text = self.ws + text
        body = text.rstrip()
        self.ws = text[len(body):]
        return self._content(body)

    def _block(self, body: str) -> list[tuple]:
        call = _json_or_none(body.strip())
        if isinstance(call, dict) and call.get("name") in self.names:
            self.ws = ""
            return self._call(call["name"], call.get("arguments", call.get("parameters", {})))
        return self._text(START + body + END)   # not a call of ours: it stays content


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def deltas(event: tuple) -> list[P.DeltaMessage]:
    """One event → the OpenAI stream deltas for it."""
    if event[0] == "content":
        return [P.DeltaMessage(content=event[1])]
    _, index, call_id, name, args = event
    return [P.DeltaMessage(tool_calls=[P.DeltaToolCall(index=index, id=call_id, type="function",
                                                       function=P.DeltaFunctionCall(name=name, arguments=""))]),
            P.DeltaMessage(tool_calls=[P.DeltaToolCall(index=index, function=P.DeltaFunctionCall(arguments=args))])]
