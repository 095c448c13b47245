"""Where the embedded engine's time goes: its own steps, timed in process (no HTTP), next to the same decode
forward of a plain HF model outside the engine.

    .venv/bin/python benchmarks/hf_step_breakdown.py [--requests 32] [--clients 8] [--max-tokens 64] [--rounds 2]

1. The engine (fp32, the default model, base weights only: the dense path) serves `requests` greedy requests
   of `max-tokens` tokens (ignore_eos), `clients` at a time, through `HFEngine.generate`; wrappers around its
   step methods (the step, newcomers joining, sampling, the path choice) and the ragged forward add up their
   wall time.
2. The same number of rows decodes `max-tokens` steps with a plain `AutoModelForCausalLM` and a DynamicCache,
   masked and positioned as the engine does, in this thread.
Rounds alternate 1 and 2 (this machine's noise is ±15 % from run to run). Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experts.mix import Adaptation  # noqa: E402
from server.engines import hf as H  # noqa: E402
from server.engines.base import GenerateRequest, SamplingParams  # noqa: E402

TIMED = ("_step", "_join", "_sample", "_set_path")


def instrument() -> tuple[dict, dict]:
    spent, calls = defaultdict(float), defaultdict(int)

    def timed(name, f):
        def g(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
                calls[name] += 1
        return g
    for n in TIMED:
        setattr(H.HFEngine, n, timed(n, getattr(H.HFEngine, n)))
    from server.engines import hf_ragged as R
    R.RaggedForward.forward = timed("forward", R.RaggedForward.forward)
    return spent, calls


async def engine_round(engine, prompts, args, spent, calls) -> None:
    sem = asyncio.Semaphore(args.clients)

    async def one(i: int) -> int:
        async with sem:
            req = GenerateRequest(f"r{i}", prompts[i % len(prompts)],
                                  SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True),
                                  Adaptation.of({}))
            return sum([len(c.token_ids) async for c in engine.generate(req)])
    spent.clear()
    calls.clear()
    t0 = time.perf_counter()
    n = sum(await asyncio.gather(*(one(i) for i in range(args.requests))))
    dt = time.perf_counter() - t0
    rows = args.requests * args.max_tokens / max(1, calls["_step"])
    print(f"engine: {n / dt:.1f} tok/s, {calls['_step']} steps ({rows:.1f} rows each), "
          + ", ".join(f"{k.strip('_')} {spent[k]:.2f} s ({spent[k] / calls[k] * 1e3:.1f} ms x {calls[k]})"
                      for k in spent), flush=True)


def bare_round(model, rows: int, prompt_len: int, steps: int) -> None:
    from transformers import DynamicCache
    ids = torch.randint(100, 5000, (rows, prompt_len))
    cache, mask = DynamicCache(), torch.ones(rows, prompt_len, dtype=torch.long)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, past_key_values=cache, logits_to_keep=1)
    nxt, pos = out.logits[:, -1].argmax(-1, keepdim=True), torch.full((rows, 1), prompt_len - 1)
    t0 = time.perf_counter()
    for _ in range(steps):
        mask, pos = torch.cat([mask, mask.new_ones(rows, 1)], 1), pos + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True, past_key_values=cache,
                    logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    dt = (time.perf_counter() - t0) / steps
    print(f"plain HF decode, {rows} rows after {prompt_len} tokens: {dt * 1e3:.1f} ms/step, "
          f"{rows / dt:.1f} tok/s", flush=True)


def main() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vs_transformers_serve import load_args
    args = load_args(__doc__).parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from server.default_model import default_cache_dir, ensure_default_model
    torch.set_grad_enabled(False)
    model_dir = ensure_default_model(default_cache_dir())
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for i in range(args.requests):
        p = tok.apply_chat_template([{"role": "user", "content": f"Tell me about the number {i}."}],
                                    add_generation_prompt=True, tokenize=True)
        prompts.append(list(p if isinstance(p, list) else p["input_ids"]))
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    spent, calls = instrument()

    async def run() -> None:
        engine = H.HFEngine(model_dir, dtype="float32", cache_dir=default_cache_dir(), max_batch=args.clients)
        await engine.start()
        try:
            await engine_round(engine, prompts[:1], argparse.Namespace(**{**vars(args), "requests": 1}), spent,
                               calls)                                  # warm-up
            for _ in range(args.rounds):
                await engine_round(engine, prompts, args, spent, calls)
                await asyncio.to_thread(bare_round, plain, args.clients, len(prompts[0]) + args.max_tokens // 2,
                                        args.max_tokens)
        finally:
            await engine.stop()
    asyncio.run(run())


if __name__ == "__main__":
    main()
