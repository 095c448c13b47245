"""The scheduling invariant: no token of a request is computed under another request's adaptation.

Many concurrent greedy requests with different experts, mixes, strategies and prompt lengths must each get
exactly the answer the same request gets when served alone (a token computed under other weights, or a
padding or batching bug, would change it), and the server must have grouped them (fewer swaps than requests).
"""

import asyncio
import itertools

from openai import AsyncOpenAI

PROMPTS = ["Hi", "What is 17 + 25?", "Write a function that sorts a list of numbers in Python, please.",
           "Why is the sky blue? Explain it to a child in two or three short sentences about light and air."]
VARIANTS = [dict(model="tiny-llama"), dict(model="tiny-llama:math"), dict(model="tiny-llama:code"),
            dict(model="auto", extra_body={"t2": {"dispatch": "prompt"}}),
            dict(model="auto", extra_body={"t2": {"dispatch": "classifier"}}),
            dict(model="tiny-llama", extra_body={"t2": {"experts": {"math": 1, "reasoning": 1}}})]


async def ask(client, prompt, variant, max_tokens):
    r = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], temperature=0,
                                             max_tokens=max_tokens, **variant)
    return r.choices[0].message.content, r.model_extra["t2"]["adaptation"]


def test_concurrent_mixed_expert_answers_equal_serial_answers(live):
    cases = [(p, v, 6 + 3 * (i % 4)) for i, (p, v) in enumerate(itertools.product(PROMPTS, VARIANTS))]

    async def main():
        async with AsyncOpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=300) as client:
            serial = [await ask(client, *c) for c in cases]
            swaps_before = live.engine.patcher.swaps
            concurrent = await asyncio.gather(*(ask(client, *c) for c in cases * 2))
            return serial, concurrent, live.engine.patcher.swaps - swaps_before

    serial, concurrent, swaps = asyncio.run(main())
    assert concurrent == serial * 2
    assert len({a for _, a in serial}) >= 4                 # the mix really had several adaptations
    assert swaps < len(concurrent)                           # requests were grouped, not swapped one by one


def test_requests_join_a_running_batch_of_their_adaptation_and_answer_as_if_alone(live):
    """Continuous batching: newcomers of the running adaptation join between steps (their KV cache merged,
    left-padded); each answer still equals the answer served alone."""
    long_case = (PROMPTS[3], dict(model="tiny-llama:reasoning"), 150)
    short = [(p, dict(model="tiny-llama:reasoning"), 5 + 4 * i) for i, p in enumerate(PROMPTS)]

    async def main():
        async with AsyncOpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=300) as client:
            serial = [await ask(client, *c) for c in [long_case] + short]
            joined_before = live.engine.joined
            stream = await client.chat.completions.create(
                messages=[{"role": "user", "content": long_case[0]}], temperature=0, max_tokens=long_case[2],
                stream=True, **long_case[1])
            text, others = "", None
            async for chunk in stream:
                text += chunk.choices[0].delta.content or "" if chunk.choices else ""
                if others is None and text:            # the long answer is running: send the others now
                    others = asyncio.gather(*(ask(client, *c) for c in short))
            return serial, [(text, "reasoning")] + await others, live.engine.joined - joined_before

    serial, concurrent, joined = asyncio.run(main())
    assert concurrent == serial
    assert joined >= 1
