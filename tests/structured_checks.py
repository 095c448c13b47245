"""The client checks of structured outputs and tool calls, shared by both engines' tests (a helper, not a test).

Each `check_*` takes a base URL (`http://host:port/v1`) and a model id, drives a real client (openai SDK,
LangChain, instructor, raw HTTP) against the real server and asserts that every output validates. The tiny
random model writes garbage, so the schemas bound every free field (maxLength, integer ranges, enums):
the grammar then ends the output on its own, and what is checked is that it always validates.
"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
from openai import OpenAI
from pydantic import BaseModel, Field


class Person(BaseModel):
    """A 5-field schema (the benchmark's too)."""

    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    member: bool
    kind: Literal["cat", "dog", "fox"]
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)


class GetWeather(BaseModel):
    """Get the weather of a city."""

    city: str = Field(max_length=6)
    unit: Literal["celsius", "fahrenheit"]


WEATHER_SCHEMA = GetWeather.model_json_schema()
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather of a city.",
                                                 "parameters": WEATHER_SCHEMA}}
TIME_SCHEMA = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]},
                                                "hour24": {"type": "boolean"}}, "required": ["zone", "hour24"]}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time in a zone.",
                                              "parameters": TIME_SCHEMA}}
TOOL_SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}
ASK = [{"role": "user", "content": "Tell me about a person, as JSON."}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
MAX = 300


def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)


def valid_calls(calls, names=("get_weather", "get_time")) -> list[tuple[str, dict]]:
    """Every tool call names one of `names` and its arguments (JSON text) validate against its schema."""
    assert calls, "no tool call"
    out = []
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        args = json.loads(c.function.arguments)
        jsonschema.validate(args, TOOL_SCHEMAS[c.function.name])
        out.append((c.function.name, args))
    return out


# ---- the client checks ----------------------------------------------------------------------------------
def check_openai_parse(base_url: str, model: str) -> Person:
    r = client(base_url).chat.completions.parse(model=model, messages=ASK, response_format=Person,
                                                max_tokens=MAX, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    p = r.choices[0].message.parsed
    assert isinstance(p, Person)
    # compact JSON: exactly what json.dumps writes with separators (",", ":") (xgrammar any_whitespace=False)
    text = r.choices[0].message.content
    assert json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False) == text
    return p


def check_json_schema_and_object(base_url: str, model: str) -> None:
    c = client(base_url)
    schema = Person.model_json_schema()
    for strict in (True, False):
        r = c.chat.completions.create(model=model, messages=ASK, max_tokens=MAX, temperature=0, response_format={
            "type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": strict}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # json_object: an object (the tiny model may ramble inside a key: then `length`, and the text is a prefix)
    r = c.chat.completions.create(model=model, messages=ASK, max_tokens=40, temperature=0,
                                  response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    # completions take response_format too
    r = c.completions.create(model=model, prompt="A person as JSON:", max_tokens=MAX, temperature=0,
                             extra_body={"response_format": {"type": "json_schema",
                                                             "json_schema": {"name": "p", "schema": schema}}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), schema)


def check_max_tokens_cut_is_length(base_url: str, model: str) -> None:
    r = client(base_url).chat.completions.create(
        model=model, messages=ASK, max_tokens=5, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    text = r.choices[0].message.content
    assert text.startswith('{"') and ('{"name":"'.startswith(text) or text.startswith('{"name":"'))


def check_vllm_structured_outputs(base_url: str, model: str) -> None:
    """vLLM's own request field, as `vllm serve` 0.32 takes it: choice, regex, json, grammar, json_object."""
    c = client(base_url)

    def ask(so, max_tokens=60):
        r = c.chat.completions.create(model=model, messages=ASK, max_tokens=max_tokens, temperature=0,
                                      extra_body={"structured_outputs": so})
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, fin = ask({"choice": ["positive", "negative", "neutral"]})
    assert text in ("positive", "negative", "neutral") and fin == "stop"
    text, fin = ask({"regex": r"[a-f]{3}-[0-9]{2}"})
    import re
    assert re.fullmatch(r"[a-f]{3}-[0-9]{2}", text) and fin == "stop"
    text, fin = ask({"json": GetWeather.model_json_schema()}, MAX)
    GetWeather.model_validate_json(text)
    text, fin = ask({"grammar": 'root ::= "yes" | "no" | "maybe " [0-9]'})
    assert text in ("yes", "no") or re.fullmatch("maybe [0-9]", text)
    # completions too
    r = c.completions.create(model=model, prompt="Pick:", max_tokens=10, temperature=0,
                             extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert r.choices[0].text in ("left", "right")


def check_tool_choice_required_and_named(base_url: str, model: str) -> list:
    c = client(base_url)
    results = []
    for choice, names in (("required", ("get_weather", "get_time")),
                          ({"type": "function", "function": {"name": "get_time"}}, ("get_time",))):
        r = c.chat.completions.create(model=model, messages=WEATHER, tools=[WEATHER_TOOL, TIME_TOOL],
                                      tool_choice=choice, max_tokens=MAX, temperature=0)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        results.append(valid_calls(ch.message.tool_calls, names))
    # one call at most without parallel tool calls
    r = c.chat.completions.create(model=model, messages=WEATHER, tools=[WEATHER_TOOL, TIME_TOOL],
                                  tool_choice="required", parallel_tool_calls=False, max_tokens=MAX, temperature=0)
    assert len(valid_calls(r.choices[0].message.tool_calls)) == 1
    return results


def check_tool_history(base_url: str, model: str) -> None:
    """The call and its result go back in the history; the model answers (a plain answer, or a new call)."""
    c = client(base_url)
    r = c.chat.completions.create(model=model, messages=WEATHER, tools=[WEATHER_TOOL], tool_choice="required",
                                  max_tokens=MAX, temperature=0)
    msg = r.choices[0].message
    history = WEATHER + [msg.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": tc.id, "content": '{"temperature": 21}'} for tc in msg.tool_calls]
    r2 = c.chat.completions.create(model=model, messages=history, tools=[WEATHER_TOOL], max_tokens=8, temperature=0)
    assert r2.choices[0].finish_reason in ("length", "stop", "tool_calls")
    # tool_choice none: plain content, no calls
    r3 = c.chat.completions.create(model=model, messages=history, tools=[WEATHER_TOOL], tool_choice="none",
                                   max_tokens=8, temperature=0)
    assert r3.choices[0].message.tool_calls is None and r3.choices[0].message.content


def check_streamed_tool_calls_reassemble(base_url: str, model: str) -> None:
    c = client(base_url)
    kw = dict(model=model, messages=WEATHER, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required",
              max_tokens=MAX, temperature=0)
    whole = c.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    chunks = list(c.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    for ch in chunks:
        for choice in ch.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    assert slot["id"] is None and d.type == "function" and d.function.name
                    slot["id"], slot["name"] = d.id, d.function.name
                slot["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls" == whole.finish_reason
    assert [(s["name"], s["arguments"]) for _, s in sorted(calls.items())] == \
        [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]
    assert all(s["id"].startswith("call_") for s in calls.values())


def check_langchain(base_url: str, model: str) -> None:
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(base_url=base_url, api_key="unused", model=model, temperature=0, max_tokens=MAX,
                     max_retries=0, timeout=600)
    for method in ("json_schema", "function_calling"):
        p = llm.with_structured_output(Person, method=method).invoke("Tell me about a person.")
        assert isinstance(p, Person), method
    bound = llm.bind_tools([GetWeather], tool_choice="GetWeather")
    msg = bound.invoke("What is the weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "GetWeather"
    GetWeather.model_validate(msg.tool_calls[0]["args"])
    msg = llm.bind_tools([GetWeather, WEATHER_TOOL], tool_choice="required").invoke("Weather in Paris?")
    assert msg.tool_calls and all(t["name"] in ("GetWeather", "get_weather") for t in msg.tool_calls)
    for t in msg.tool_calls:
        GetWeather.model_validate(t["args"])


def check_instructor(base_url: str, model: str) -> None:
    import instructor
    for mode in (instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS):
        ic = instructor.from_openai(client(base_url), mode=mode)
        p = ic.chat.completions.create(model=model, response_model=Person, messages=ASK, max_tokens=MAX,
                                       temperature=0, max_retries=0)
        assert isinstance(p, Person), mode


def check_bad_input_is_400_and_serving_goes_on(base_url: str, model: str) -> None:
    def post(body):
        return httpx.post(base_url + "/chat/completions", json={"model": model, "max_tokens": 8, **body}, timeout=300)
    cases = [
        ({"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}},
         "response_format.json_schema.schema"),
        ({"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema"),
        ({"messages": ASK, "structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"messages": ASK, "structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar"),
        ({"messages": ASK, "structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs"),
        ({"messages": WEATHER, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function",
                                                                          "function": {"name": "no_such_tool"}}},
         "tool_choice"),
        ({"messages": WEATHER, "tool_choice": "required"}, "tool_choice"),
        ({"messages": WEATHER, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}}}]},
         "tools[0].function.parameters"),
        ({"messages": WEATHER + [{"role": "tool", "tool_call_id": "call_never_made", "content": "21"}],
          "tools": [WEATHER_TOOL]}, "messages[1].tool_call_id"),
    ]
    for body, param in cases:
        r = post(body)
        assert r.status_code == 400, (param, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error", (param, err)
    r = post({"messages": ASK})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
