"""`t2 bench`: a load generator for OpenAI-compatible streaming servers, in the manner of `vllm bench serve`.

Contract:
- Sends `num_prompts` streaming requests (chat or completions) with `stream_options.include_usage`, at a
  Poisson `request_rate` (inf = all at once) and/or under a `max_concurrency` cap, and measures per request,
  exactly as vLLM's benchmark does: TTFT = first chunk with choices; ITL = gaps between later chunks with
  choices; E2E = last such chunk; TPOT = (E2E − TTFT) / (output tokens − 1), output tokens from the final
  usage chunk.
- Prompts: `random` (words drawn with a seed; lengths input_len·[1−r, 1+r]) or `file` (JSONL with a
  "prompt" or "text" field per line, or plain text lines). The workload's expert mix is a weighted list of
  targets: an expert name (model `<base>:<name>`), `auto` (the server's dispatch), `base`, `prompt` or
  `classifier` (that dispatch strategy), or a blend `a+b` (equal weights); each request draws one.
- Returns (and prints, and writes as JSON) a summary: counts, duration, request / token throughput,
  mean / median / std / percentiles of TTFT, TPOT, ITL and E2E latency in ms, and per-target counts with
  the first-pass labels the server reported. Failed requests are counted with their first error, not timed.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

WORDS = ("the of and to in is was for on that with as by at from his her an it are were be this which or "
         "have had not but what all when we there can one more out if about who them then some so would "
         "time has two like into only other new could its do may than first been any these most over "
         "make after also did many before must through back years where much your way well down should "
         "because each just those people how too little state good very world still own see men work long "
         "get here between both life being under never day same another know while last might us great old "
         "year off come since against go came right used take three number math code reason solve prove").split()


@dataclass
class Request:
    prompt: str
    output_len: int
    target: str


@dataclass
class Result:
    target: str
    success: bool = False
    error: str = ""
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    label: str | None = None
    adaptation: str | None = None
    first_pass_ms: float = 0.0


def parse_targets(spec: str) -> list[tuple[str, float]]:
    """'math=0.5,auto=0.3,base=0.2' → [('math', .5), ('auto', .3), ('base', .2)]; bare names weigh 1."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition("=")
        weight = float(w) if w else 1.0
        if weight < 0:
            raise ValueError(f"negative weight for {name!r}")
        out.append((name.strip(), weight))
    if not out or sum(w for _, w in out) <= 0:
        raise ValueError("the expert mix needs at least one target with a positive weight")
    return out


def target_body(target: str, base: str) -> dict[str, Any]:
    """The model id and `t2` extension of one workload target."""
    if target == "auto":
        return {"model": "auto"}
    if target == "base":
        return {"model": base}
    if target in ("prompt", "classifier", "none"):
        return {"model": "auto", "t2": {"dispatch": target}}
    if "+" in target:
        return {"model": base, "t2": {"experts": {n: 1.0 for n in target.split("+")}}}
    return {"model": f"{base}:{target}"}


def make_requests(n: int, *, dataset: str = "random", path: Path | None = None, input_len: int = 64,
                  output_len: int = 64, range_ratio: float = 0.0, targets: list[tuple[str, float]],
                  seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    names, weights = [t for t, _ in targets], [w for _, w in targets]

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))))

    prompts: list[str]
    if dataset == "file":
        if path is None:
            raise ValueError("--dataset file needs --dataset-path")
        prompts = []
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                prompts.append(obj.get("prompt") or obj.get("text") if isinstance(obj, dict) else str(obj))
            except json.JSONDecodeError:
                prompts.append(line)
        prompts = [p for p in prompts if p]
        if not prompts:
            raise ValueError(f"{path} holds no prompts")
        prompts = [prompts[i % len(prompts)] for i in range(n)]
    elif dataset == "random":
        prompts = [" ".join(rng.choice(WORDS) for _ in range(length(input_len))) for _ in range(n)]
    else:
        raise ValueError(f"unknown dataset {dataset!r} (random | file)")
    return [Request(p, length(output_len), rng.choices(names, weights)[0]) for p in prompts]


async def _one(client: httpx.AsyncClient, endpoint: str, base: str, req: Request, *, ignore_eos: bool,
               temperature: float) -> Result:
    """One streaming request, timed like vLLM's benchmark."""
    res = Result(req.target)
    body: dict[str, Any] = {**target_body(req.target, base), "stream": True, "temperature": temperature,
                            "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
    if endpoint == "chat":
        url = "/chat/completions"
        body.update(messages=[{"role": "user", "content": req.prompt}], max_completion_tokens=req.output_len)
    else:
        url = "/completions"
        body.update(prompt=req.prompt, max_tokens=req.output_len)
    st = time.perf_counter()
    last = st
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                res.error = f"HTTP {r.status_code}: {text[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if "error" in obj:
                    res.error = obj["error"].get("message", "stream error")
                    return res
                if obj.get("choices"):
                    if res.ttft == 0.0:
                        res.ttft = now - st
                    else:
                        res.itl.append(now - last)
                    last = now
                if obj.get("usage"):
                    res.output_tokens = obj["usage"].get("completion_tokens", 0)
                    res.prompt_tokens = obj["usage"].get("prompt_tokens", 0)
                if obj.get("t2"):
                    t2 = obj["t2"]
                    res.label, res.adaptation = t2.get("label"), t2.get("adaptation")
                    res.first_pass_ms = t2.get("first_pass_ms", 0.0)
        res.latency = last - st
        res.success = res.ttft > 0
        if not res.success:
            res.error = "no chunk with choices arrived"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def _stats(values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    ms = sorted(v * 1e3 for v in values_s)
    if not ms:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, **{f"p{p:g}": 0.0 for p in percentiles}}

    def pct(p: float) -> float:            # linear interpolation, as numpy.percentile
        k = (len(ms) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(ms) - 1)
        return ms[lo] + (ms[hi] - ms[lo]) * (k - lo)

    return {"mean": statistics.fmean(ms), "median": statistics.median(ms),
            "std": statistics.pstdev(ms), **{f"p{p:g}": pct(p) for p in percentiles}}


def summarize(results: list[Result], duration: float, percentiles: list[float]) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    by_target: dict[str, Any] = {}
    for r in results:
        t = by_target.setdefault(r.target, {"requests": 0, "failed": 0, "labels": {}, "e2el_ms": []})
        t["requests"] += 1
        t["failed"] += not r.success
        if r.success:
            t["e2el_ms"].append(r.latency * 1e3)
        if r.label:
            t["labels"][r.label] = t["labels"].get(r.label, 0) + 1
    for t in by_target.values():
        t["mean_e2el_ms"] = statistics.fmean(t.pop("e2el_ms")) if t["requests"] > t["failed"] else 0.0
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            errors[r.error[:120]] = errors.get(r.error[:120], 0) + 1
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "ttft_ms": _stats([r.ttft for r in ok], percentiles),
        "tpot_ms": _stats(tpots, percentiles),
        "itl_ms": _stats([x for r in ok for x in r.itl], percentiles),
        "e2el_ms": _stats([r.latency for r in ok], percentiles),
        "mean_first_pass_ms": statistics.fmean([r.first_pass_ms for r in ok]) if ok else 0.0,
        "targets": by_target, "errors": errors,
    }


async def run_bench(base_url: str, requests: list[Request], *, api_key: str | None = None, endpoint: str = "chat",
                    request_rate: float = float("inf"), max_concurrency: int | None = None,
                    ignore_eos: bool = False, temperature: float = 0.0, percentiles: list[float] | None = None,
                    seed: int = 0, timeout_s: float = 600.0) -> dict[str, Any]:
    """Run the workload; returns the summary plus the settings and per-request results."""
    percentiles = percentiles or [50, 90, 99]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency or len(requests) or 1, max_keepalive_connections=64)
    rng = random.Random(seed + 1)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout_s, connect=30)) as client:
        # 1. the base model's id (expert targets are <base>:<expert>)
        models = (await client.get("/models")).raise_for_status().json()["data"]
        base = next((m["id"] for m in models if (m.get("t2") or {}).get("kind") == "base"), models[0]["id"])

        async def limited(req: Request) -> Result:
            if sem is None:
                return await _one(client, endpoint, base, req, ignore_eos=ignore_eos, temperature=temperature)
            async with sem:
                return await _one(client, endpoint, base, req, ignore_eos=ignore_eos, temperature=temperature)

        # 2. arrivals: Poisson at request_rate (all at once when infinite)
        start = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(limited(req)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    summary = summarize(results, duration, percentiles)
    summary.update(base_url=base_url, endpoint=endpoint, num_prompts=len(requests), request_rate=request_rate,
                   max_concurrency=max_concurrency, ignore_eos=ignore_eos, temperature=temperature,
                   results=[asdict(r) for r in results])
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = ["============ Serving Benchmark Result ============"]

    def row(name: str, value: Any) -> None:
        lines.append(f"{name:<40}{value:<10.2f}" if isinstance(value, float) else f"{name:<40}{value:<10}")

    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Benchmark duration (s):", s["duration_s"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    row("Mean first pass (ms):", s["mean_first_pass_ms"])
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        lines.append(f"{title:-^50}")
        short = key.split("_")[0].upper()
        for stat, v in s[key].items():
            row(f"{stat.capitalize() if not stat.startswith('p') else stat.upper()} {short} (ms):", v)
    lines.append(f"{'Workload targets':-^50}")
    for name, t in s["targets"].items():
        labels = ", ".join(f"{k}:{v}" for k, v in sorted(t["labels"].items()))
        lines.append(f"{name:<20} {t['requests']:>5} req  {t['failed']:>3} failed  "
                     f"mean E2E {t['mean_e2el_ms']:.0f} ms  {labels}")
    for err, count in s["errors"].items():
        lines.append(f"error ×{count}: {err}")
    lines.append("=" * 50)
    return "\n".join(lines)
