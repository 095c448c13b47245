"""Structured outputs and tool calls on the embedded engine: the real server, the real clients.

The shared client checks (tests/structured_checks.py: openai `parse`, LangChain, instructor, vLLM's
`structured_outputs`, tool_choice required / named, streamed tool calls, bad input) run against a tiny
random Llama with room for the tool prompt (2048 positions) and the shipped tool-aware ChatML template;
then what only this engine can show: constrained and free rows of several adaptations batched together give
the answers each gives alone (a row's grammar never masks another row), the first pass is blind to tools
and schemas, the metrics count constrained requests and the grammar cache, and the hermes parser.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.api.templates import SHIPPED
from server.api.tools import HermesOutput
from tests import structured_checks as C
from tests.conftest import make_experts, serve
from tests.tiny_model import build_tiny_llama

CHECKS = [C.check_openai_parse, C.check_json_schema_and_object, C.check_max_tokens_cut_is_length,
          C.check_vllm_structured_outputs, C.check_tool_choice_required_and_named, C.check_tool_history,
          C.check_streamed_tool_calls_reassemble, C.check_langchain, C.check_instructor,
          C.check_bad_input_is_400_and_serving_goes_on]


@pytest.fixture(scope="session")
def tools_model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-tools") / "tiny-tools", max_position_embeddings=2048)


@pytest.fixture(scope="session")
def tools_live(tools_model_dir, tmp_path_factory):
    experts = make_experts(tools_model_dir, tmp_path_factory.mktemp("tools-experts"))
    with serve(tools_model_dir, experts, tmp_path_factory.mktemp("tools-cache"), chat_template="chatml-tools",
               max_wait_ms=200) as s:
        yield s


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__[len("check_"):])
def test_client_check(tools_live, check):
    check(tools_live.url + "/v1", "tiny-tools")


def _ask(client, model, kind, i):
    common = dict(model=model, temperature=0, max_tokens=C.MAX)
    if kind == "json":
        r = client.chat.completions.create(messages=[{"role": "user", "content": f"person {i}"}],
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "p", "schema": C.Person.model_json_schema()}}, **common)
        C.Person.model_validate_json(r.choices[0].message.content)
        return r.choices[0].message.content
    if kind == "tool":
        r = client.chat.completions.create(messages=[{"role": "user", "content": f"weather {i}"}],
                                           tools=[C.WEATHER_TOOL, C.TIME_TOOL], tool_choice="required", **common)
        return json.dumps(C.valid_calls(r.choices[0].message.tool_calls))
    r = client.chat.completions.create(messages=[{"role": "user", "content": f"tell me {i}"}],
                                       **{**common, "max_tokens": 40})
    return r.choices[0].message.content


def test_constrained_and_free_rows_batched_give_the_answers_alone(tools_live):
    """Each row's bitmask goes to its own logits: batched, every answer equals the one it gives alone.

    Mutation check (done once, by hand): making hf.py's _Row.step mask with the *next* row's matcher
    fails this test (free rows come back as JSON, constrained ones invalid)."""
    client = C.client(tools_live.url + "/v1")
    jobs = [(model, kind, i) for i, (model, kind) in enumerate(
        (m, k) for m in ("tiny-tools", "tiny-tools:math", "tiny-tools:code") for k in ("json", "free", "tool", "free"))]
    alone = [_ask(client, *j) for j in jobs]
    joined0 = tools_live.engine.joined
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: _ask(client, *j), jobs))
    assert together == alone
    assert tools_live.engine.joined > joined0       # rows did join running batches (shared decode steps)


@pytest.mark.parametrize("strategy", ["prompt", "classifier"])
def test_first_pass_is_blind_to_tools_and_schemas(tools_live, strategy):
    """The first pass classifies the last user message as without tools: same label, same probabilities."""
    client = C.client(tools_live.url + "/v1")
    kw = dict(model="auto", messages=C.WEATHER, max_tokens=C.MAX, temperature=0,
              extra_body={"t2": {"dispatch": strategy}})
    plain = client.chat.completions.create(**kw).model_extra["t2"]
    tools = client.chat.completions.create(**kw, tools=[C.WEATHER_TOOL], tool_choice="required").model_extra["t2"]
    schema = client.chat.completions.create(**kw, response_format={"type": "json_schema", "json_schema": {
        "name": "w", "schema": C.WEATHER_SCHEMA}}).model_extra["t2"]
    for t in (tools, schema):
        assert (t["label"], t["label_probs"], t["mix"]) == (plain["label"], plain["label_probs"], plain["mix"])


def test_metrics_count_constrained_requests_and_the_grammar_cache(tools_live):
    import httpx
    client = C.client(tools_live.url + "/v1")

    def scrape():
        text = httpx.get(tools_live.url + "/metrics").text
        vals = {}
        for line in text.splitlines():
            if line.startswith(("t2_grammar", "t2_structured_requests_total")):
                k, v = line.rsplit(" ", 1)
                vals[k] = float(v)
        return vals
    schema = {"type": "object", "properties": {"metric_probe": {"type": "boolean"}}, "required": ["metric_probe"]}
    before = scrape()
    for _ in range(2):
        client.chat.completions.create(model="tiny-tools", messages=C.ASK, max_tokens=30, temperature=0,
                                       response_format={"type": "json_schema", "json_schema": {"name": "m", "schema": schema}})
    after = scrape()
    key = 't2_structured_requests_total{kind="json_schema"}'
    assert after[key] - before.get(key, 0) == 2
    assert after["t2_grammar_compiles_total"] - before["t2_grammar_compiles_total"] == 1     # cold: compiled once
    assert after["t2_grammar_cache_hits_total"] - before["t2_grammar_cache_hits_total"] >= 2  # then cached
    assert after["t2_grammar_compile_seconds_total"] > before["t2_grammar_compile_seconds_total"]


def test_hermes_parser_streams_content_and_calls_like_the_whole_text():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>')
    whole = HermesOutput({"get_weather"})
    whole.feed(text)
    _, fin = whole.finish("stop")
    content, calls = whole.message()
    assert fin == "tool_calls" and [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert content.startswith("Let me check.") and "nope" in content    # an unknown function stays content
    for step in (1, 3, 7):                     # any split of the stream gives the same events
        s = HermesOutput({"get_weather"})
        events = [e for i in range(0, len(text), step) for e in s.feed(text[i:i + step])] + s.finish("stop")[0]
        assert "".join(e[1] for e in events if e[0] == "content") == content
        assert [(e[3], e[4]) for e in events if e[0] == "call"] == [(c.function.name, c.function.arguments) for c in calls]
    plain = HermesOutput({"get_weather"})
    # what may still become a tag, and trailing whitespace, wait for what follows
    assert plain.feed("no <tool_ call here <tool") == [("content", "no <tool_ call here")]
    assert plain.finish("length") == ([("content", " <tool")], "length")


def test_shipped_template_renders_plain_chats_like_chatml(tiny_model_dir):
    """Without tools, chatml-tools is SmolLM2's template (the tiny model's, with SmolLM2's system turn)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ours = SHIPPED["chatml-tools"].read_text()
    for msgs in ([{"role": "user", "content": "hi"}],
                 [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                  {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]):
        own = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        mine = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, chat_template=ours)
        assert mine == own.replace("You are a tiny test assistant.",
                                   "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
