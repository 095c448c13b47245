"""The clients against the real server on loopback: T2Client helpers, `t2 chat`, `t2 bench` (library and CLI)."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from clients.bench import format_summary, make_requests, parse_targets, run_bench, target_body
from clients.chat import run_chat
from clients.t2client import T2Client, parse_mix, report, t2_options


@pytest.fixture(scope="module")
def t2(live):
    return T2Client(live.url + "/v1", max_retries=0, timeout=120)


def test_t2_options_build_and_refuse():
    assert t2_options(expert="math") == {"experts": {"math": 1.0}}
    assert t2_options(experts={"math": 0.7, "code": 0.3}) == {"experts": {"math": 0.7, "code": 0.3}}
    assert t2_options(dispatch="classifier") == {"dispatch": "classifier"}
    assert t2_options() == {}
    for bad in (dict(expert="a", experts={"b": 1}), dict(expert="a", dispatch="prompt"), dict(dispatch="bogus"),
                dict(experts={"a": -1}), dict(experts={})):
        with pytest.raises(ValueError):
            t2_options(**bad)
    assert parse_mix("math=0.7, code=0.3") == {"math": 0.7, "code": 0.3} and parse_mix("math") == {"math": 1.0}


def test_client_helpers_choose_the_adaptation_and_read_the_report(t2):
    assert t2.base_model() == "tiny-llama"
    assert set(t2.experts()) == {"math", "code", "reasoning", "clf"} and t2.experts()["clf"]["label"] == "classifier"
    r = t2.chat("What is 2 + 2?", expert="math", max_tokens=4, temperature=0)
    rep = report(r)
    assert rep.strategy == "explicit" and rep.mix == {"math": 1.0} and rep.adaptation == "math"
    r = t2.chat("What is 2 + 2?", experts={"math": 3, "code": 1}, max_tokens=4, temperature=0)
    assert report(r).mix == {"code": 0.25, "math": 0.75}
    r = t2.chat("What is 2 + 2?", dispatch="prompt", max_tokens=4, temperature=0)
    assert report(r).label in ("code", "math", "reasoning", "other") and report(r).first_pass_ms > 0
    assert "label=" in report(r).summary()
    c = t2.complete("The sky is", expert="code", max_tokens=3, temperature=0)
    assert report(c).mix == {"code": 1.0}
    pieces = list(t2.stream_chat("What is 2 + 2?", expert="code", max_tokens=5, temperature=0))
    plain = t2.chat("What is 2 + 2?", expert="code", max_tokens=5, temperature=0).choices[0].message.content
    assert "".join(pieces) == plain


def test_chat_repl_streams_answers_and_reports(t2):
    stdin = io.StringIO("/experts\nHello\n/expert math\nWhat is 2 + 2?\n/mix math=1,code=1\nAgain?\n"
                        "/dispatch prompt\nOnce more\n/expert nope\nFails?\n/reset\n/quit\n")
    out = io.StringIO()
    assert run_chat(t2, max_tokens=4, temperature=0, stdin=stdin, stdout=out) == 0
    text = out.getvalue()
    assert "clf" in text and "[explicit → math×1" in text and "math×0.5" in text
    assert "[prompt label=" in text
    assert "error:" in text and "(conversation cleared)" in text       # a bad expert: one line, goes on


def test_bench_library_measures_a_mixed_workload(live):
    targets = parse_targets("math=2,auto=1,base=1,code+reasoning=1")
    reqs = make_requests(24, input_len=12, output_len=10, range_ratio=0.5, targets=targets, seed=3)
    assert {r.target for r in reqs} <= {"math", "auto", "base", "code+reasoning"}
    assert target_body("code+reasoning", "b") == {"model": "b", "t2": {"experts": {"code": 1.0, "reasoning": 1.0}}}
    s = asyncio.run(run_bench(live.url + "/v1", reqs, max_concurrency=6, ignore_eos=True, percentiles=[50, 99]))
    assert s["completed"] == 24 and s["failed"] == 0
    assert s["total_output_tokens"] == sum(r.output_len for r in reqs)                 # ignore_eos + max_tokens
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(s[key]) == {"mean", "median", "std", "p50", "p99"} and s[key]["p99"] >= s[key]["p50"] > 0
    assert s["e2el_ms"]["mean"] >= s["ttft_ms"]["mean"]
    assert s["request_throughput"] > 0 and s["output_throughput"] > 0
    assert sum(t["requests"] for t in s["targets"].values()) == 24
    assert "Time to First Token" in format_summary(s)


def test_bench_cli_writes_json(live, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 3 + 4?"}\n{"text": "Write a haiku."}\nplain line prompt\n')
    out = tmp_path / "result.json"
    p = subprocess.run([sys.executable, "-m", "server.cli", "bench", "--base-url", live.url + "/v1",
                        "--num-prompts", "6", "--dataset", "file", "--dataset-path", str(prompts), "--output-len", "5",
                        "--request-rate", "50", "--experts", "math,prompt", "--ignore-eos", "--result-file", str(out)],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Serving Benchmark Result" in p.stdout
    s = json.loads(out.read_text())
    assert s["completed"] == 6 and s["total_output_tokens"] == 30 and len(s["results"]) == 6
