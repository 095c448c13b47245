"""Mixed adaptations in one batch (embedded engine, tiny model, fp32).

- Greedy answers of 48 concurrent requests over 9 adaptations (base, the four test experts, three blends,
  and the classifier's first pass) equal the same requests served one at a time — through the real HTTP
  server and openai client — and the concurrent run really mixed adaptations in its steps.
- In one forward, the factored logits of a batch of rows of different adaptations equal each row's dense
  logits (weights patched to its adaptation) within 1e-4 relative; the test reports argmax differences.
- Slot recycling under load: more adaptations than slots, answers still equal the serial ones.
- An expert unloaded while its rows run: new requests 404 at once, queued ones 404, the running row
  finishes every token, and the unload returns only after it has.
Mutation check (done once, see the report of the branch): gathering slot (idx + 1) % slots in
`StepPath.factored` makes the first three tests fail.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch
from openai import AsyncOpenAI

from experts.mix import Adaptation
from tests.conftest import serve

PROMPTS = ["Hi", "What is 17 + 25?", "Write a function that sorts a list of numbers in Python, please.",
           "Why is the sky blue? Explain it to a child in two or three short sentences about light and air."]
BLENDS = [{"math": 1, "code": 1}, {"reasoning": 2, "clf": 1}, {"math": 1, "code": 1, "reasoning": 2}]
VARIANTS = ([dict(model="tiny-llama")] + [dict(model=f"tiny-llama:{e}") for e in ("math", "code", "reasoning", "clf")]
            + [dict(model="tiny-llama", extra_body={"t2": {"experts": b}}) for b in BLENDS]
            + [dict(model="auto", extra_body={"t2": {"dispatch": "classifier"}}),
               dict(model="auto", extra_body={"t2": {"dispatch": "prompt"}})])


async def ask(client, prompt, variant, max_tokens):
    r = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], temperature=0,
                                             max_tokens=max_tokens, **variant)
    t2 = r.model_extra["t2"]
    return r.choices[0].message.content, t2["adaptation"], t2["path"]


def cases(n: int):
    out = []
    for i in range(n):
        v = VARIANTS[i % len(VARIANTS)]
        out.append((PROMPTS[(i // len(VARIANTS)) % len(PROMPTS)], v, 8 + 5 * (i % 5)))
    return out


def serial_and_concurrent(server, todo):
    async def main():
        async with AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300) as client:
            serial = [await ask(client, *c) for c in todo]
            h0 = server.engine.health().to_json()
            concurrent = await asyncio.gather(*(ask(client, *c) for c in todo))
            return serial, concurrent, h0, server.engine.health().to_json()
    return asyncio.run(main())


@pytest.fixture(scope="module")
def mixed(tiny_model_dir, tiny_experts_dir, tmp_path_factory):
    with serve(tiny_model_dir, tiny_experts_dir, tmp_path_factory.mktemp("cache"), max_batch=16) as s:
        yield s


def test_48_concurrent_requests_over_9_adaptations_equal_serial_answers(mixed):
    todo = cases(48)
    serial, concurrent, h0, h1 = serial_and_concurrent(mixed, todo)
    assert [c[:2] for c in concurrent] == [s[:2] for s in serial]
    # first passes (classifier: the clf expert; prompt: base) + answers: at least 8 adaptations in play
    assert len({a for _, a, _ in serial} | {"clf", "base"}) >= 8
    steps = (h1["steps_dense"] + h1["steps_factored"]) - (h0["steps_dense"] + h0["steps_factored"])
    mean_adaptations = (h1["step_adaptations_sum"] - h0["step_adaptations_sum"]) / steps
    assert mean_adaptations > 2, mean_adaptations                  # the steps really mixed adaptations
    assert h1["steps_factored"] > h0["steps_factored"]
    assert any(p == "factored" for *_, p in concurrent)
    assert h1["swaps"] - h0["swaps"] < len(todo)                   # no swap per adaptation change


def test_factored_logits_of_a_mixed_batch_equal_each_rows_dense_logits(mixed):
    """One ragged forward, 9 prompts of 9 lengths and 9 adaptations (slots of the engine), vs each prompt alone
    through the model's own forward with patched weights."""
    eng = mixed.engine
    adaptations = [Adaptation.of(None)] + [Adaptation.of({e: 1}) for e in ("math", "code", "reasoning", "clf")] \
        + [Adaptation.of(b) for b in BLENDS] + [Adaptation.of({"math": 3, "clf": 1})]
    words = "Explain why the sky is blue and why sunsets are red".split()
    prompts = [eng.tokenizer(" ".join(words[:3 + i]))["input_ids"] for i in range(len(adaptations))]  # ragged

    def work():
        from server.engines.scheduler import Job, JobKind
        jobs = [Job(JobKind.SCORE, a, payload=None) for a in adaptations]
        assert all(eng._admit(j) for j in jobs)
        try:
            idx = torch.tensor([j.slot for j, p in zip(jobs, prompts) for _ in p], device=eng.device)   # [T]
            eng.path.factored(idx)
            fact = eng.ragged.forward([eng.ragged.new_kv() for _ in prompts], prompts)   # [9, vocab], one forward
            dense = []
            for a, p in zip(adaptations, prompts):          # each row alone: patched weights, the model's own forward
                eng._apply(a)
                eng.path.dense()
                dense.append(eng.model(input_ids=torch.tensor([p], device=eng.device)).logits[0, -1].float())
            eng._apply(Adaptation.of(None))
            return fact, torch.stack(dense)
        finally:
            for j in jobs:
                eng._release(j)

    async def main():
        return await eng._in_worker(work)
    fact, dense = asyncio.run(main())
    rel = ((fact - dense).norm(dim=-1) / dense.norm(dim=-1)).max().item()
    flips = int((fact.argmax(-1) != dense.argmax(-1)).sum())
    print(f"\nfactored vs dense logits: max relative error {rel:.2e}, argmax differs in {flips}/{len(dense)} rows")
    assert rel < 1e-4 and flips == 0
    assert not torch.allclose(dense[1], dense[2])                  # the experts really differ


def test_slots_are_recycled_under_load_and_answers_stay_exact(tiny_model_dir, tiny_experts_dir, tmp_path):
    """8 distinct answer adaptations through 2 slots (+ base): requests wait for a slot, never share one."""
    with serve(tiny_model_dir, tiny_experts_dir, tmp_path, max_batch=8, max_adaptations=2) as s:
        todo = [c for c in cases(32) if c[1]["model"] != "auto"]
        serial, concurrent, h0, h1 = serial_and_concurrent(s, todo)
        assert [c[:2] for c in concurrent] == [x[:2] for x in serial]
        assert h1["slot_fills"] - h0["slot_fills"] > 2               # slots were recycled for other gains
        assert h1["slots"] == 2 and h1["slots_held"] == 0 and h1["slots_used"] <= 2


def test_unload_while_its_rows_run(tiny_model_dir, tiny_experts_dir, tmp_path):
    admin = {"Authorization": "Bearer adm"}
    msg = [{"role": "user", "content": "Tell me a long story."}]
    with serve(tiny_model_dir, tiny_experts_dir, tmp_path, max_batch=1, admin_key="adm") as s:
        fast = s.engine.ragged.forward

        def slow(*a, **k):                         # a slow device: the running row stays a while
            time.sleep(0.01)
            return fast(*a, **k)
        s.engine.ragged.forward = slow
        url = s.url + "/v1/chat/completions"
        body = {"model": "tiny-llama:math", "messages": msg, "max_tokens": 60, "ignore_eos": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", url, json={**body, "stream": True}) as stream:
            lines = stream.iter_lines()
            first = next(l for l in lines if l.startswith("data:"))           # it runs
            queued: list[int] = []
            qt = threading.Thread(target=lambda: queued.append(httpx.post(url, json=body, timeout=60).status_code))
            qt.start()                                                         # waits: max_batch 1
            deadline = time.monotonic() + 10
            while s.engine.scheduler.waiting() == 0:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            done: list[bool] = []

            def unload():
                httpx.delete(s.url + "/admin/experts/math", headers=admin, timeout=60).raise_for_status()
                done.append(any("math" in r.job.adaptation.experts for r in list(s.engine._rows)))
            ut = threading.Thread(target=unload)
            ut.start()
            while "math" not in s.engine._unloading:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            refused = httpx.post(url, json=body, timeout=60)
            assert refused.status_code == 404                                  # new: refused at once
            assert not done                                                    # still waiting for the row
            qt.join(30)
            assert queued == [404]                                             # queued: 404
            rest = [l for l in lines if l.startswith("data:")]
        ut.join(30)
        assert rest[-1] == "data: [DONE]" and first
        chunks = [json.loads(l[6:]) for l in [first] + rest[:-1]]
        finish = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
        finish = [f for f in finish if f]
        assert finish[-1] == "length"                                          # the running row finished
        assert done == [False]                                                 # unload returned after it
        assert "math" not in s.engine.experts and s.engine.health().details["slots_held"] == 0
        del s.engine.ragged.forward
        ok = httpx.post(url, json={**body, "model": "tiny-llama:code", "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200
