"""Structured outputs: constrained vs free decode throughput, grammar compile time, and the client checks.

Prints a markdown table (and JSON lines as it goes). Per engine (hf, vllm; one server at a time):
1. throughput (completion tokens / s over the wall time) of C concurrent clients (default 8), each sending R
   greedy chat requests: free (max_tokens T) vs constrained by a 5-field JSON schema (tests/structured_checks.py
   `Person`: a bounded string, an integer range, a boolean, an enum, an array of enums), all in one run so the
   ratio is measured on the same machine state;
2. grammar compile time of that schema and of a 2-function tool call, cold (first compile) and cached
   (a hit), through the server's own grammar cache (server/engines/structured.py), in-process;
3. with --checks: the 10 client checks of tests/structured_checks.py against our server, and with
   --plain-vllm the same checks against plain `python -m vllm.entrypoints.openai.api_server
   --enable-auto-tool-choice --tool-call-parser hermes` on the same model, side by side.

  python benchmarks/bench_structured.py                        # SmolLM2-135M-Instruct, both engines
  python benchmarks/bench_structured.py --engines hf --clients 8 --requests 2 --tokens 64
  python benchmarks/bench_structured.py --engines vllm --checks --plain-vllm
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402

from tests.live import LiveServer  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.engines.structured import Constraint, Grammars  # noqa: E402
from tests import structured_checks as C  # noqa: E402
from tests.conftest import free_port  # noqa: E402


class PlainVLLM:
    """`python -m vllm.entrypoints.openai.api_server` in a subprocess (the `vllm` command fails on vllm-cpu),
    eager on a CPU as our engine runs there."""

    def __init__(self, model_dir: Path, name: str, dtype: str, max_batch: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                    "--served-model-name", name, "--dtype", dtype, "--port", str(self.port),
                    "--host", "127.0.0.1", "--max-num-seqs", str(max_batch), "--disable-log-stats"]
        if not torch.cuda.is_available():
            self.cmd.append("--enforce-eager")

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

CHECKS = ["openai_parse", "json_schema_and_object", "max_tokens_cut_is_length", "vllm_structured_outputs",
          "tool_choice_required_and_named", "tool_history", "streamed_tool_calls_reassemble", "langchain",
          "instructor", "bad_input_is_400_and_serving_goes_on"]


def log(**kw):
    print(json.dumps(kw), flush=True)


async def throughput(url: str, model: str, clients: int, requests: int, tokens: int, constrained: bool) -> dict:
    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=1800)
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": C.Person.model_json_schema()}}
    done = []

    async def run(i: int) -> None:
        for j in range(requests):
            extra = {"response_format": rf} if constrained else {}
            r = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Describe person number {i * requests + j}."}],
                max_tokens=tokens, temperature=0, **extra)
            if constrained and r.choices[0].finish_reason == "stop":
                C.Person.model_validate_json(r.choices[0].message.content)     # every finished one validates
            done.append(r.usage.completion_tokens)

    t0 = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"tokens": sum(done), "wall_s": round(wall, 2), "tok_s": round(sum(done) / wall, 2),
            "mean_tokens": round(statistics.mean(done), 1)}


def compile_times(engine) -> dict:
    g = Grammars(engine.tokenizer, engine.grammars.vocab_size, set(engine.grammars.info.stop_token_ids))
    from server.api import protocol as P
    from server.api.tools import ToolPlan
    req = P.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                  tools=[C.WEATHER_TOOL, C.TIME_TOOL], tool_choice="required")
    out = {}
    for name, c in (("person_schema", Constraint.json_schema(C.Person.model_json_schema())),
                    ("tool_call_2_functions", ToolPlan.of(req).constraint)):
        t0 = time.perf_counter()
        g.compile(c)
        cold = time.perf_counter() - t0
        hits = []
        for _ in range(20):
            t0 = time.perf_counter()
            g.compile(c)
            hits.append(time.perf_counter() - t0)
        out[name] = {"cold_ms": round(cold * 1e3, 2), "cached_ms": round(statistics.median(hits) * 1e3, 4)}
    return out


def run_checks(url: str, model: str) -> dict:
    res = {}
    for name in CHECKS:
        try:
            getattr(C, "check_" + name)(url + "/v1", model)
            res[name] = "pass"
        except Exception as e:  # noqa: BLE001 - a benchmark reports, never stops
            res[name] = f"FAIL: {type(e).__name__}: {str(e)[:120]}"
        log(check=name, result=res[name])
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None, help="HF folder (default: the embedded SmolLM2)")
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--checks", action="store_true", help="also run the 10 client checks")
    ap.add_argument("--plain-vllm", action="store_true", help="and the same checks against plain vLLM")
    a = ap.parse_args()
    results = {}
    for engine in a.engines.split(","):
        cfg = ServerConfig(model=a.model, engine=engine, dtype="float32", port=free_port(), max_batch=16,
                           dispatch="none")
        with LiveServer(cfg, stop_timeout=60) as s:
            model = s.engine.model_name
            r = {"compile": compile_times(s.engine)}
            log(engine=engine, compile=r["compile"])
            asyncio.run(throughput(s.url, model, 2, 1, 8, True))       # warm-up (and the cache entry)
            for kind in ("free", "constrained", "free_again"):
                r[kind] = asyncio.run(throughput(s.url, model, a.clients, a.requests, a.tokens, kind == "constrained"))
                log(engine=engine, kind=kind, **r[kind])
            if a.checks:
                r["checks"] = run_checks(s.url, model)
        results[engine] = r
    if a.plain_vllm:
        from server.default_model import DEFAULT_MODEL_NAME, ensure_default_model
        model_dir = a.model or ensure_default_model(ServerConfig().resolved_cache_dir())
        name = a.model.name if a.model else DEFAULT_MODEL_NAME
        plain = PlainVLLM(model_dir, name, "float32", 16)
        plain.cmd += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
        with plain:
            results["plain-vllm"] = {"checks": run_checks(plain.url, name)}
    print(table(results, a))


def table(results: dict, a) -> str:
    lines = [f"\n{a.clients} clients × {a.requests} greedy requests, max_tokens {a.tokens}; constrained = the 5-field "
             "Person schema (compact JSON)\n",
             "| engine | free tok/s | constrained tok/s | constrained / free | mean tokens free / constrained | "
             "compile cold ms (schema, tool call) | cached ms |", "|---|---|---|---|---|---|---|"]
    for engine, r in results.items():
        if "free" not in r:
            continue
        free = (r["free"]["tok_s"] + r["free_again"]["tok_s"]) / 2
        c = r["compile"]
        lines.append(f"| {engine} | {free:.1f} | {r['constrained']['tok_s']:.1f} | "
                     f"{r['constrained']['tok_s'] / free:.2f} | {r['free']['mean_tokens']} / "
                     f"{r['constrained']['mean_tokens']} | {c['person_schema']['cold_ms']}, "
                     f"{c['tool_call_2_functions']['cold_ms']} | {c['person_schema']['cached_ms']} |")
    if any("checks" in r for r in results.values()):
        names = [e for e, r in results.items() if "checks" in r]
        lines += ["", "| check | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for chk in CHECKS:
            lines.append(f"| {chk} | " + " | ".join(results[e]["checks"][chk].split(":")[0] for e in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
