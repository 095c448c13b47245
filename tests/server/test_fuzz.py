"""Fuzzing the OpenAPI schema with schemathesis: thousands of generated requests, no 5xx, a healthy server after.

The server is the real one on loopback (tiny model, API key and admin key set, an admin folder with nothing
loadable). Every operation of /openapi.json is driven with schema-valid (positive) and schema-invalid
(negative) requests built by schemathesis' Hypothesis strategies; each must be answered below 500 with an
OpenAI-shaped error when it is an error. Generation is capped small (max_tokens ≤ 8) so that thousands of
requests take about a minute on 2 cores. Set T2_FUZZ_EXAMPLES to scale the run.
"""

from __future__ import annotations

import collections
import os
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.conftest import serve

KEY, ADMIN = "sk-fuzz", "adm-fuzz"
EXAMPLES = int(os.environ.get("T2_FUZZ_EXAMPLES", "350"))      # per operation and mode, for generation routes
MODELS = ["auto", "tiny-llama", "tiny-llama:math", "tiny-llama:clf"]


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, tiny_experts_dir, tmp_path_factory):
    empty = tmp_path_factory.mktemp("admin-empty")
    with serve(tiny_model_dir, tiny_experts_dir, tmp_path_factory.mktemp("cache"), max_wait_ms=20,
               api_key=KEY, admin_key=ADMIN, admin_experts_dir=empty, max_tokens_limit=8, default_max_tokens=4,
               max_n=2, max_body_bytes=256 * 1024) as s:
        yield s


def test_fuzz_the_openapi_schema_no_5xx(fuzz_server):
    url = fuzz_server.url
    schema = schemathesis.openapi.from_url(url + "/openapi.json",          # the docs need the key too
                                           headers={"Authorization": f"Bearer {KEY}"})
    statuses: collections.Counter = collections.Counter()
    per_op: dict[str, int] = {}
    t0 = time.monotonic()
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions",
                                               "GET /v1/models", "POST /admin/experts"}
    with httpx.Client(base_url=url, timeout=60) as http:
        for op in operations:
            generation = op.path in ("/v1/chat/completions", "/v1/completions")
            headers = {"Authorization": f"Bearer {ADMIN if op.path.startswith('/admin') else KEY}"}
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                n = EXAMPLES if generation else max(EXAMPLES // 5, 20)

                @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(mode), model=st.sampled_from(MODELS + [None]))
                def run(case, model):
                    if generation and model and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                        case.body["model"] = model       # often a real id, so bodies get past the model lookup
                    kw = case.as_transport_kwargs(base_url=url, headers=headers)
                    kw.pop("url", None)
                    kw["headers"] = {**{k: v for k, v in (kw.get("headers") or {}).items()
                                        if k.lower() != "authorization"}, **headers}   # always authorised
                    resp = http.request(case.method, case.formatted_path, params=kw.get("params"),
                                        headers=kw.get("headers"), json=kw.get("json"),
                                        content=kw.get("data") if "json" not in kw else None)
                    statuses[resp.status_code] += 1
                    per_op[op.label] = per_op.get(op.label, 0) + 1
                    assert resp.status_code < 500, f"{case.method} {case.formatted_path} {kw.get('json')!r}: " \
                                                   f"{resp.status_code} {resp.text[:300]}"
                    if resp.status_code >= 400 and resp.headers.get("content-type", "").startswith("application/json"):
                        err = resp.json()["error"]
                        assert set(err) == {"message", "type", "param", "code", "request_id"}

                try:
                    run()
                except Unsatisfiable:          # nothing to make invalid (an operation without inputs)
                    assert mode == GenerationMode.NEGATIVE, op.label
    took = time.monotonic() - t0
    total = sum(statuses.values())
    print(f"\nfuzz: {total} requests in {took:.0f} s; statuses {dict(sorted(statuses.items()))}; per operation {per_op}")
    assert total >= 5 * EXAMPLES
    # the server is healthy afterwards, nothing is left running, and it still answers correctly
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and h["running"] == 0 and h["waiting"] == 0 and h["in_flight"] == 0
    r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny-llama:math", "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
