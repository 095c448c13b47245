"""The real server on loopback, driven by the official `openai` client and raw HTTP."""

import json

import openai
import pytest

from experts.dispatch import LABELS

MSG = [{"role": "user", "content": "What is 17 + 25?"}]


def test_models_lists_base_auto_and_every_expert(client):
    ids = {m.id for m in client.models.list()}
    assert ids == {"tiny-llama", "auto", "tiny-llama:math", "tiny-llama:code", "tiny-llama:reasoning",
                   "tiny-llama:clf"}
    assert client.models.retrieve("tiny-llama:math").id == "tiny-llama:math"


def test_chat_explicit_expert_reports_the_dispatch(client):
    r = client.chat.completions.create(model="tiny-llama:math", messages=MSG, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    t2 = r.model_extra["t2"]
    assert t2["strategy"] == "explicit" and t2["mix"] == {"math": 1.0} and t2["label"] is None
    assert r.usage.model_extra["dispatch_tokens"] == 0


@pytest.mark.parametrize("strategy", ["prompt", "classifier"])
def test_first_pass_strategies_pick_a_label_and_its_expert(client, strategy):
    r = client.chat.completions.create(model="auto", messages=MSG, max_tokens=4, temperature=0,
                                       extra_body={"t2": {"dispatch": strategy}})
    t2 = r.model_extra["t2"]
    assert t2["strategy"] == strategy and t2["label"] in LABELS
    assert set(t2["label_probs"]) == set(LABELS) and abs(sum(t2["label_probs"].values()) - 1) < 1e-3
    assert t2["label"] == max(t2["label_probs"], key=t2["label_probs"].get)
    expected = {} if t2["label"] == "other" else {t2["label"]: 1.0}
    assert t2["mix"] == expected
    assert r.usage.model_extra["dispatch_tokens"] > 0 and t2["first_pass_ms"] > 0


def test_base_model_id_means_no_adaptation(client):
    r = client.chat.completions.create(model="tiny-llama", messages=MSG, max_tokens=4, temperature=0)
    assert r.model_extra["t2"]["strategy"] == "none" and r.model_extra["t2"]["mix"] == {}


def test_expert_changes_the_answer_and_base_comes_back_identical(client):
    def ask(model, **kw):
        return client.chat.completions.create(model=model, messages=MSG, max_tokens=16, temperature=0,
                                              **kw).choices[0].message.content
    base = ask("tiny-llama")
    assert ask("tiny-llama:math") != base
    assert ask("tiny-llama", extra_body={"t2": {"experts": {"code": 1, "math": 3}}}) != base
    assert ask("tiny-llama") == base


def test_stream_one_token_per_chunk_with_usage_and_report_last(client):
    stream = client.chat.completions.create(model="auto", messages=MSG, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert 1 <= len(content) <= 8
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert last.model_extra["t2"]["strategy"] == "prompt"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    again = client.chat.completions.create(model="auto", messages=MSG, max_tokens=8, temperature=0)
    assert text == again.choices[0].message.content


def test_stream_ends_with_done_and_report_on_last_chunk_without_usage(http):
    with http.stream("POST", "/v1/chat/completions", json={
            "model": "tiny-llama:code", "messages": MSG, "max_tokens": 3, "stream": True, "n": 2}) as r:
        lines = [l for l in r.iter_lines() if l]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(l[6:]) for l in lines[:-1]]
    assert "t2" in events[-1] and all("t2" not in e for e in events[:-1])
    assert {c["index"] for e in events for c in e["choices"]} == {0, 1}


def test_n_seed_temperature_top_p(client):
    kw = dict(model="tiny-llama", messages=MSG, max_tokens=10, temperature=1.0, top_p=0.9, n=3)
    a = client.chat.completions.create(seed=7, **kw)
    b = client.chat.completions.create(seed=7, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1
    assert a.usage.completion_tokens == 30


def test_stop_strings_and_max_completion_tokens(client):
    full = client.chat.completions.create(model="tiny-llama", messages=MSG, max_completion_tokens=20,
                                          temperature=0).choices[0].message.content
    assert len(full) > 6
    stop = full[3:6]
    cut = client.chat.completions.create(model="tiny-llama", messages=MSG, max_completion_tokens=20,
                                         temperature=0, stop=[stop, "\x00never"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[:full.index(stop)]
    one = client.chat.completions.create(model="tiny-llama", messages=MSG, max_completion_tokens=20,
                                         temperature=0, stop=stop)
    assert one.choices[0].message.content == cut.choices[0].message.content


def test_completions_plain_and_stream(client):
    r = client.completions.create(model="tiny-llama:reasoning", prompt="The sky is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens == 6 and r.choices[0].text
    chunks = list(client.completions.create(model="tiny-llama:reasoning", prompt="The sky is", max_tokens=6,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6


# ---- bad input: OpenAI-shaped 4xx, never a 500 ----
def error_of(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_json_and_wrong_types(http):
    error_of(http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    err = error_of(http.post("/v1/chat/completions", json={"model": "auto", "messages": "hi"}), 400)
    assert err["param"] == "messages" and err["type"] == "invalid_request_error"
    err = error_of(http.post("/v1/chat/completions", json={"model": "auto", "messages": MSG, "max_tokens": "ten"}), 400)
    assert err["param"] == "max_tokens"
    error_of(http.post("/v1/chat/completions", json=[1, 2]), 400)
    error_of(http.post("/v1/chat/completions", json={"messages": MSG}), 400)


@pytest.mark.parametrize("field,value", [("temperature", 2.5), ("temperature", -1), ("top_p", 0), ("top_p", 1.5),
                                         ("n", 0), ("n", 99), ("max_tokens", 0), ("max_tokens", 10**6),
                                         ("stop", ["x"] * 17), ("logprobs", True), ("presence_penalty", 1.0),
                                         ("stream_options", {"include_usage": True})])
def test_out_of_range_values(http, field, value):
    err = error_of(http.post("/v1/chat/completions", json={"model": "auto", "messages": MSG, field: value}), 400)
    assert err["param"] == field or err["code"] == "context_length_exceeded"


def test_unknown_model_and_expert(http, client):
    err = error_of(http.post("/v1/chat/completions", json={"model": "gpt-4", "messages": MSG}), 404)
    assert err["code"] == "model_not_found"
    error_of(http.post("/v1/chat/completions", json={"model": "tiny-llama:nope", "messages": MSG}), 404)
    err = error_of(http.post("/v1/chat/completions", json={"model": "auto", "messages": MSG,
                                                            "t2": {"experts": {"nope": 1}}}), 400)
    assert err["param"] == "t2.experts"
    for bad in ({"experts": {"math": -1}}, {"experts": {"math": 0}}, {"dispatch": "explicit"},
                {"dispatch": "bogus"}, {"dispatch": "prompt", "experts": {"math": 1}}):
        error_of(http.post("/v1/chat/completions", json={"model": "auto", "messages": MSG, "t2": bad}), 400)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)
    error_of(http.get("/v1/nothing"), 404)


def test_unknown_extra_fields_are_ignored(http):
    r = http.post("/v1/chat/completions", json={"model": "auto", "messages": MSG, "max_tokens": 2,
                                                "frobnicate": True, "metadata": {"x": 1}})
    assert r.status_code == 200, r.text


def test_context_length_is_checked(http):
    err = error_of(http.post("/v1/completions", json={"model": "tiny-llama", "prompt": "word " * 2000}), 400)
    assert err["code"] == "context_length_exceeded"


def test_health(http):
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["engine"] == "hf"


def test_first_pass_fits_the_context_even_for_a_long_question(client, live):
    """A prompt that fits the model but whose classification prompt would not: the question is cut."""
    tok, limit = live.engine.tokenizer, live.engine.max_model_len
    ids = tok("the quick brown fox jumps over the lazy dog " * 200, add_special_tokens=False)["input_ids"]
    long = tok.decode(ids[:limit - 20])
    assert len(tok(long, add_special_tokens=False)["input_ids"]) < limit - 2
    r = client.completions.create(model="auto", prompt=long, max_tokens=2, temperature=0)
    assert r.model_extra["t2"]["label"] in LABELS
    assert r.usage.model_extra["dispatch_tokens"] <= live.engine.max_model_len


def test_a_tiny_temperature_is_greedy_not_a_fault(client, live):
    """Found by the schema fuzzer: temperature 5e-324 made the logits inf/NaN and failed the batch."""
    greedy = client.chat.completions.create(model="tiny-llama", messages=MSG, max_tokens=6, temperature=0)
    tiny = client.chat.completions.create(model="tiny-llama", messages=MSG, max_tokens=6, temperature=5e-324,
                                          top_p=5e-324)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content
    assert live.engine.health().ok
