"""Benchmark of the two-pass server on the embedded default model (issue 2's numbers).

Starts `t2 serve` (the real server, another process) on SmolLM2-135M-Instruct with three random
plumbing experts, then measures over HTTP:
  1. first-pass vs second-pass time, prompt strategy, for a short (16 tokens) and a long (256) answer;
  2. one swap (patch) — cold (compose from factors), hot (copy of cached W'), restore — vs one decode step;
  3. throughput (completion tokens/s) of 8 concurrent clients, all on one expert vs each on another expert.
Prints a markdown table and writes JSON. Ratios are measured within one run (this machine is noisy).

    python benchmarks/bench_two_pass.py [--out benchmarks/results/two_pass_cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experts.expert import random_expert  # noqa: E402
from experts.svd import model_fingerprint, model_ranks  # noqa: E402
from server.default_model import DEFAULT_MODEL_NAME, ensure_default_model  # noqa: E402

EXPERTS = {"math": 1, "code": 2, "reasoning": 3}
QUESTION = "A farmer has 12 cows and buys 7 more. Each cow gives 3 litres of milk a day. How much milk a day?"


def start_server(experts_dir: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--experts", str(experts_dir),
                             "--port", str(port), "--log-level", "warning", "--max-batch", "8"],
                            cwd=ROOT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("server exited")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


async def chat(client: httpx.AsyncClient, model: str, max_tokens: int, t2: dict | None = None,
               content: str = QUESTION) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    if t2:
        body["t2"] = t2
    t0 = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    out = r.json()
    out["wall_ms"] = (time.perf_counter() - t0) * 1e3
    return out


async def two_pass(client: httpx.AsyncClient, max_tokens: int, reps: int = 3) -> dict:
    rows = [await chat(client, "auto", max_tokens) for _ in range(reps)]
    first = statistics.median(r["t2"]["first_pass_ms"] for r in rows)
    second = statistics.median(r["wall_ms"] - r["t2"]["first_pass_ms"] for r in rows)
    return {"max_tokens": max_tokens, "first_pass_ms": round(first, 1), "second_pass_ms": round(second, 1),
            "first_over_second": round(first / second, 3), "label": rows[0]["t2"]["label"]}


async def throughput(client: httpx.AsyncClient, mixed: bool, clients: int = 8, per_client: int = 3,
                     max_tokens: int = 32) -> dict:
    names = list(EXPERTS)

    async def one(i: int) -> int:
        total = 0
        for k in range(per_client):
            expert = names[(i + k) % len(names)] if mixed else names[0]
            r = await chat(client, f"{DEFAULT_MODEL_NAME}:{expert}", max_tokens, content=f"{QUESTION} ({i}.{k})")
            total += r["usage"]["completion_tokens"]
        return total

    h0 = (await client.get("/health")).json()
    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(clients))))
    dt = time.perf_counter() - t0
    h1 = (await client.get("/health")).json()
    return {"mixed": mixed, "clients": clients, "requests": clients * per_client, "tokens": tokens,
            "seconds": round(dt, 2), "tokens_per_s": round(tokens / dt, 1), "swaps": h1["swaps"] - h0["swaps"]}


def swap_vs_decode(model_dir: Path, experts_dir: Path, cache: Path) -> dict:
    """In-process: the engine's own patch path, and one decode step of a single sequence."""
    from experts.mix import BASE, Adaptation
    from server.engines.hf import HFEngine

    eng = HFEngine(model_dir, name=DEFAULT_MODEL_NAME, experts_dir=experts_dir, cache_dir=cache)
    eng.load()
    cold, hot, restore = [], [], []
    for name in EXPERTS:                                   # cold: composed from the factors
        cold.append(eng._apply(Adaptation.of({name: 1})).ms)
        restore.append(eng._apply(BASE).ms)
    for _ in range(3):
        for name in EXPERTS:                               # hot: copies of cached W'
            hot.append(eng._apply(Adaptation.of({name: 1})).ms)
            restore.append(eng._apply(BASE).ms)
    # one decode step: 64 greedy tokens after a short prefill, single sequence
    import torch
    ids = eng.tokenizer(QUESTION)["input_ids"]
    with torch.no_grad():
        kv = eng.ragged.new_kv()
        logits = eng.ragged.forward([kv], [ids])                     # the engine's own forward: prefill
        steps = []
        for _ in range(64):
            tok = int(logits[0].argmax())
            t0 = time.perf_counter()
            logits = eng.ragged.forward([kv], [[tok]])               # one decode step
            steps.append((time.perf_counter() - t0) * 1e3)
    step = statistics.median(steps)
    med = statistics.median
    mlp_bytes = sum(m.base.numel() * m.base.element_size() for m in eng.patcher.matrices.values())
    return {"matrices": len(eng.patcher.matrices), "patched_mb": round(mlp_bytes / 2**20, 1),
            "cold_ms": round(med(cold), 2), "hot_ms": round(med(hot), 2), "restore_ms": round(med(restore), 2),
            "decode_step_ms": round(step, 2), "cold_in_steps": round(med(cold) / step, 2),
            "hot_in_steps": round(med(hot) / step, 2)}


async def http_part(port: int) -> dict:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        await chat(client, "auto", 4)                      # warm-up
        for name in EXPERTS:
            await chat(client, f"{DEFAULT_MODEL_NAME}:{name}", 2)
        res = {"short": await two_pass(client, 16), "long": await two_pass(client, 256, reps=2)}
        await throughput(client, mixed=False, per_client=1, max_tokens=8)   # warm-up batches
        res["single"] = await throughput(client, mixed=False)
        res["mixed"] = await throughput(client, mixed=True)
        res["single_again"] = await throughput(client, mixed=False)
        return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "two_pass_cpu.json")
    ap.add_argument("--port", type=int, default=8731)
    args = ap.parse_args()
    from server.default_model import default_cache_dir
    cache = default_cache_dir()
    model_dir = ensure_default_model(cache)
    experts_dir = Path(tempfile.mkdtemp(prefix="t2-bench-experts-"))
    ranks, fp = model_ranks(model_dir), model_fingerprint(model_dir)
    for name, seed in EXPERTS.items():
        random_expert(name, ranks, 0.3, seed, label=name, base_model=DEFAULT_MODEL_NAME,
                      base_fingerprint=fp).save(experts_dir / f"{name}.safetensors")
    swap = swap_vs_decode(model_dir, experts_dir, cache)
    proc = start_server(experts_dir, args.port)
    try:
        res = asyncio.run(http_part(args.port))
    finally:
        proc.terminate()
        proc.wait(30)
    res["swap"] = swap
    res["machine"] = f"{os.cpu_count()} CPU cores, no GPU"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    s, m, sa = res["single"], res["mixed"], res["single_again"]
    print(f"\n## Two-pass server, {DEFAULT_MODEL_NAME}, {res['machine']}\n")
    print("| answer | first pass (ms) | second pass (ms) | first/second |\n|---|---|---|---|")
    for k in ("short", "long"):
        r = res[k]
        print(f"| {r['max_tokens']} tokens | {r['first_pass_ms']} | {r['second_pass_ms']} | {r['first_over_second']} |")
    print(f"\n| swap ({swap['matrices']} MLP matrices, {swap['patched_mb']} MB) | ms | in decode steps |\n|---|---|---|")
    print(f"| cold (compose) | {swap['cold_ms']} | {swap['cold_in_steps']} |")
    print(f"| hot (cached W') | {swap['hot_ms']} | {swap['hot_in_steps']} |")
    print(f"| restore base | {swap['restore_ms']} | |")
    print(f"| one decode step (batch 1) | {swap['decode_step_ms']} | 1 |")
    print("\n| 8 clients | requests | tokens/s | swaps |\n|---|---|---|---|")
    for r, name in ((s, "single expert"), (m, "mixed experts"), (sa, "single expert (again)")):
        print(f"| {name} | {r['requests']} | {r['tokens_per_s']} | {r['swaps']} |")
    ref = (s["tokens_per_s"] + sa["tokens_per_s"]) / 2
    print(f"\nmixed / single throughput: {m['tokens_per_s'] / ref:.3f}\nwritten: {args.out}")


if __name__ == "__main__":
    main()
