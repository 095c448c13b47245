"""The embedded engine against plain `transformers serve --continuous-batching` (issue 10's last target).

Same model folder, same client, same requests, in one run: a plain OpenAI client (`transformers serve`
refuses the extra fields of vLLM's `bench serve`) sends N chat requests, C at a time, `max_tokens` tokens,
greedy, and the output throughput is the completion tokens (the servers' own `usage`) over the wall time.
The t2 server is asked for its base model id (no expert: the dense path, one adaptation) and, with
--mixed, also for requests spread over every served id (mixed adaptations, the factored path).

    .venv/bin/python benchmarks/vs_transformers_serve.py [--requests 32] [--clients 8] [--max-tokens 64]
        [--rounds 2] [--mixed]

Each server is started fresh per round (t2 on the embedded engine, fp32, the default model and experts);
rounds alternate the servers so that drift of this noisy machine falls on both. Prints one line per run and
the ratio t2 / transformers of the best round of each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from clients.t2client import stop_process, wait_ready  # noqa: E402
PROMPTS = [
    "Write a short poem about the sea.", "Explain how a bicycle works.", "What is 15% of 80? Show the steps.",
    "Give me three tips for learning a new language.", "Write a Python function that reverses a string.",
    "Why is the sky blue?", "Summarise the plot of Romeo and Juliet.", "How do I boil an egg?",
    "What are the planets of the solar system?", "Describe a cat to someone who has never seen one.",
    "If a train travels 60 km in 45 minutes, what is its speed in km/h?", "Translate 'good morning' to French.",
    "What is the difference between a list and a tuple in Python?", "Tell me a fun fact about octopuses.",
    "How does compound interest work?", "Write a haiku about autumn.",
]


async def drive(url: str, models: list[str], n: int, clients: int, max_tokens: int) -> tuple[float, int]:
    """(output tok/s, completion tokens) of n requests, `clients` at a time."""
    rng = random.Random(1)
    jobs = [(PROMPTS[i % len(PROMPTS)], rng.choice(models)) for i in range(n)]
    sem = asyncio.Semaphore(clients)
    async with AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=900) as client:
        async def one(prompt: str, model: str) -> int:
            async with sem:
                r = await client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens,
                                                         messages=[{"role": "user", "content": prompt}])
                return r.usage.completion_tokens
        await one(*jobs[0])                                   # warm-up (first-request costs), not counted
        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(p, m) for p, m in jobs)))
        return tokens / (time.perf_counter() - t0), tokens


def run_transformers(model_dir: Path, port: int, args, log: Path) -> float:
    cmd = [str(Path(sys.executable).parent / "transformers"), "serve", "--continuous-batching", "--port", str(port),
           "--host", "127.0.0.1", "--dtype", "float32", str(model_dir)]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        tps, tok = asyncio.run(drive(url, [str(model_dir)], args.requests, args.clients, args.max_tokens))
        print(f"transformers serve --continuous-batching: {tps:.1f} tok/s ({tok} tokens)", flush=True)
        return tps
    finally:
        stop_process(proc)


def run_t2(port: int, args, log: Path, mixed: bool) -> float:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--dtype", "float32"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        ids = [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"] if m["id"] != "auto"]
        models = ids if mixed else ids[:1]
        tps, tok = asyncio.run(drive(url, models, args.requests, args.clients, args.max_tokens))
        what = f"mixed over {len(ids)} ids" if mixed else f"one id ({ids[0]})"
        print(f"t2 serve (embedded), {what}: {tps:.1f} tok/s ({tok} tokens)", flush=True)
        return tps
    finally:
        stop_process(proc)


def load_args(doc: str) -> argparse.ArgumentParser:
    """The load both embedded-engine benchmarks use: N chat requests, C at a time, T tokens, R rounds."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    return ap


def main() -> None:
    ap = load_args(__doc__)
    ap.add_argument("--mixed", action="store_true", help="also t2 with requests spread over every served id")
    ap.add_argument("--model", type=Path, default=Path.home() / ".cache/t2/models/SmolLM2-135M-Instruct")
    args = ap.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="vs-tf-"))
    best: dict[str, float] = {}
    for r in range(args.rounds):
        order = ["tf", "t2"] if r % 2 == 0 else ["t2", "tf"]
        for who in order:
            if who == "tf":
                v = run_transformers(args.model, 18720, args, logs / f"tf{r}.log")
            else:
                v = run_t2(18721, args, logs / f"t2-{r}.log", mixed=False)
            best[who] = max(best.get(who, 0.0), v)
        if args.mixed:
            best["mixed"] = max(best.get("mixed", 0.0), run_t2(18721, args, logs / f"t2m-{r}.log", mixed=True))
    print(f"best of {args.rounds}: t2 {best['t2']:.1f} vs transformers serve {best['tf']:.1f} tok/s = "
          f"{best['t2'] / best['tf']:.2f} (target >= 1.0)"
          + (f"; t2 mixed {best['mixed']:.1f} = {best['mixed'] / best['tf']:.2f} of transformers serve"
             if "mixed" in best else "") + f"  (logs: {logs})")


if __name__ == "__main__":
    main()
