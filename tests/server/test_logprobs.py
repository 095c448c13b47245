"""Item 5: logprobs / top_logprobs / echo / logit_bias on the embedded engine, through the real server and the
openai client, checked against the model scored directly with transformers (raw log-softmax, the base
weights); and the 400s for what we do not implement."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL = "tiny-llama"
MSG = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def direct(tiny_model_dir):
    """The tiny model scored directly: (tokenizer, f(ids) → log-softmax [T, vocab])."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def logp(ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0].float(), -1)

    return tok, logp


def greedy(logp, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(logp(ids)[-1].argmax()))
    return ids


def chat_ids(tok) -> list[int]:
    text = tok.apply_chat_template(MSG, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_logprobs_are_the_raw_model_log_probabilities(client, direct):
    tok, logp = direct
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert r.choices[0].finish_reason == "length" and len(content) == 6 == r.usage.completion_tokens
    prompt = chat_ids(tok)
    full = greedy(logp, prompt, 6)
    lp = logp(full)
    assert "".join(c.token for c in content) == r.choices[0].message.content == tok.decode(full[len(prompt):])
    for k, c in enumerate(content):
        t = len(prompt) + k
        assert c.token == tok.decode([full[t]]) and c.bytes == list(c.token.encode())
        assert c.logprob == pytest.approx(float(lp[t - 1, full[t]]), abs=1e-4)
        vals, ids = lp[t - 1].topk(3)
        assert [x.token for x in c.top_logprobs] == [tok.decode([i]) for i in ids.tolist()]
        assert [x.logprob for x in c.top_logprobs] == pytest.approx(vals.tolist(), abs=1e-4)
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6)   # greedy: the best one
    # logprobs without top_logprobs: the tokens' own, no alternatives; without logprobs: none
    r0 = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=6, temperature=0, logprobs=True)
    # (abs 1e-4: either request may run dense or factored, which differ by fp32 rounding only)
    assert [c.logprob for c in r0.choices[0].logprobs.content] == pytest.approx([c.logprob for c in content], abs=1e-4)
    assert all(c.top_logprobs == [] for c in r0.choices[0].logprobs.content)
    assert client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, temperature=0).choices[0].logprobs is None


def test_chat_stream_carries_the_same_logprobs(client):
    kw = dict(model=MODEL, messages=MSG, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [x for ch in client.chat.completions.create(stream=True, **kw) for c in ch.choices
                if c.logprobs is not None for x in c.logprobs.content]
    assert [(x.token, round(x.logprob, 4)) for x in streamed] == [(x.token, round(x.logprob, 4)) for x in whole]
    assert [[t.token for t in x.top_logprobs] for x in streamed] == [[t.token for t in x.top_logprobs] for x in whole]


def test_completion_echo_scores_the_prompt_like_the_model(client, direct):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, max_tokens 0 or 1, logprobs 1."""
    tok, logp = direct
    ids = tok("The sea is deep and the sky is blue", add_special_tokens=False)["input_ids"]
    lp = logp(ids)
    want = [None] + [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]
    r = client.completions.create(model=MODEL, prompt=[ids], echo=True, max_tokens=0, logprobs=1, temperature=0)
    c = r.choices[0]
    assert c.text == tok.decode(ids) and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    got = c.logprobs.token_logprobs
    assert got[0] is None and c.logprobs.top_logprobs[0] is None and len(got) == len(ids)
    assert got[1:] == pytest.approx(want[1:], abs=1e-4)
    assert c.logprobs.tokens == [tok.decode([i]) for i in ids]
    assert c.logprobs.text_offset == [sum(len(tok.decode([i])) for i in ids[:k]) for k in range(len(ids))]
    for t in range(1, len(ids)):      # the top entry is the model's best next token (lm-eval's is_greedy)
        top = c.logprobs.top_logprobs[t]
        best = int(lp[t - 1].argmax())
        assert max(top.values()) == pytest.approx(float(lp[t - 1, best]), abs=1e-4)
        assert tok.decode([ids[t]]) in top
    # max_tokens=1: the prompt, then one generated token with its logprob (what lm-eval slices off)
    r1 = client.completions.create(model=MODEL, prompt=[ids], echo=True, max_tokens=1, logprobs=1, temperature=0)
    l1 = r1.choices[0].logprobs
    nxt = int(lp[-1].argmax())
    assert len(l1.token_logprobs) == len(ids) + 1 and l1.token_logprobs[1:-1] == pytest.approx(want[1:], abs=1e-4)
    assert l1.tokens[-1] == tok.decode([nxt]) and l1.token_logprobs[-1] == pytest.approx(float(lp[-1, nxt]), abs=1e-4)
    assert r1.choices[0].text == tok.decode(ids) + tok.decode([nxt])
    # a text prompt gives the same as its token ids
    rt = client.completions.create(model=MODEL, prompt=tok.decode(ids), echo=True, max_tokens=0, logprobs=1)
    assert rt.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want[1:], abs=1e-4)


def test_completion_logprobs_without_echo_and_streamed(client, direct):
    tok, logp = direct
    ids = tok("Once upon a time", add_special_tokens=False)["input_ids"]
    full = greedy(logp, ids, 5)
    lp = logp(full)
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
    r = client.completions.create(**kw)
    l = r.choices[0].logprobs
    assert l.tokens == [tok.decode([i]) for i in full[len(ids):]] and "".join(l.tokens) == r.choices[0].text
    assert l.token_logprobs == pytest.approx([float(lp[t - 1, full[t]]) for t in range(len(ids), len(full))], abs=1e-4)
    assert all(len(d) == 2 for d in l.top_logprobs)            # greedy: the token is one of its top 2
    assert l.text_offset == [sum(len(x) for x in l.tokens[:k]) for k in range(len(l.tokens))]
    l0 = client.completions.create(model=MODEL, prompt="Once", max_tokens=3, logprobs=0).choices[0].logprobs
    assert l0.top_logprobs == [{t: v} for t, v in zip(l0.tokens, l0.token_logprobs)]   # logprobs=0: the token only
    # the stream: the same tokens and values, echo first, offsets continuing across chunks
    for echo in (False, True):
        whole = client.completions.create(echo=echo, **kw).choices[0]
        chunks = [c for ch in client.completions.create(stream=True, echo=echo, **kw) for c in ch.choices]
        assert "".join(c.text for c in chunks) == whole.text
        toks = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
        vals = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
        offs = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
        assert toks == whole.logprobs.tokens and offs == whole.logprobs.text_offset
        assert [v is None for v in vals] == [v is None for v in whole.logprobs.token_logprobs]
        assert [v for v in vals if v is not None] == pytest.approx(
            [v for v in whole.logprobs.token_logprobs if v is not None], abs=1e-4)


def test_logit_bias_steers_sampling_but_not_the_reported_logprobs(client, direct):
    tok, logp = direct
    prompt = chat_ids(tok)
    lp = logp(prompt)
    plain = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1, temperature=0, logprobs=True)
    best = int(lp[-1].argmax())
    assert plain.choices[0].logprobs.content[0].token == tok.decode([best])
    # -100 bans the greedy token; +100 forces a chosen one (also under sampling), reported with its raw log p
    banned = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1, temperature=0, logprobs=True,
                                            logit_bias={str(best): -100})
    second = int(lp[-1].topk(2).indices[1])
    assert banned.choices[0].logprobs.content[0].token == tok.decode([second])
    forced_id = int(lp[-1].argmin())
    for temp in (0, 1.0):
        forced = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=3, temperature=temp,
                                                logprobs=True, logit_bias={str(forced_id): 100})
        content = forced.choices[0].logprobs.content
        assert [c.token for c in content] == [tok.decode([forced_id])] * 3
        assert content[0].logprob == pytest.approx(float(lp[-1, forced_id]), abs=1e-4) and content[0].logprob < -1
    r = client.completions.create(model=MODEL, prompt="Once", max_tokens=2, temperature=0,
                                  logit_bias={str(forced_id): 100})
    assert r.choices[0].text == tok.decode([forced_id]) * 2


@pytest.mark.parametrize("path,body,param", [
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("chat", {"logit_bias": {"3": 101}}, "logit_bias"),
    ("chat", {"logit_bias": {"999999": 1}}, "logit_bias"),
    ("chat", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", {"store": True}, "store"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("chat", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("chat", {"reasoning_effort": "high"}, "reasoning_effort"),
    ("chat", {"service_tier": "flex"}, "service_tier"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"suffix": "x"}, "suffix"),
    ("completions", {"prompt": [[1, 2], [3]]}, "prompt"),
    ("completions", {"prompt": [10 ** 7]}, "prompt"),
])
def test_unimplemented_or_bad_fields_are_a_400_naming_them(http, path, body, param):
    base = ({"model": MODEL, "messages": MSG, "max_tokens": 2} if path == "chat"
            else {"model": MODEL, "prompt": "Once", "max_tokens": 2})
    r = http.post(f"/v1/{'chat/completions' if path == 'chat' else 'completions'}", json={**base, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_neutral_values_and_the_structured_helpers_fields_still_pass(http):
    r = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": MSG, "max_tokens": 2, "store": False, "modalities": ["text"],
        "service_tier": "auto", "logprobs": False, "parallel_tool_calls": True, "tool_choice": "none",
        "response_format": {"type": "text"}})
    assert r.status_code == 200, r.text
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 2, "best_of": 1})
    assert r.status_code == 200, r.text
