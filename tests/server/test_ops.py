"""Operating the server: API key, admin API, CORS, limits, 429s, timeouts, disconnects, faults, metrics, SIGTERM.

Every test drives the real server on loopback (real engine on the tiny model, real openai client or raw
HTTP); faults are injected into the real engine through its test-only `fault_hook`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, serve
from tests.live import spawn_server

MSG = [{"role": "user", "content": "What is 17 + 25?"}]
KEY, ADMIN = "sk-test-key", "adm-test-key"
AUTH, ADMIN_AUTH = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {ADMIN}"}


def error_of(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code", "request_id"} and err["message"]
    return err


def wait_idle(url: str, timeout: float = 10.0) -> dict:
    """Poll /health until nothing runs, waits or is in flight; returns the last health."""
    deadline = time.monotonic() + timeout
    while True:
        h = httpx.get(url + "/health", timeout=10).json()
        if h["running"] == 0 and h["waiting"] == 0 and h["in_flight"] == 0:
            return h
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle: {h}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def admin_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A folder the admin API may load from: one good expert, one broken file; a good one outside it."""
    from experts.expert import random_expert
    from experts.svd import model_fingerprint, model_ranks
    d = tmp_path_factory.mktemp("admin")
    ranks, fp = model_ranks(tiny_model_dir), model_fingerprint(tiny_model_dir)
    random_expert("extra", ranks, 0.5, 11, label="math", base_model=tiny_model_dir.name,
                  base_fingerprint=fp).save(d / "extra.safetensors")
    (d / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    outside = tmp_path_factory.mktemp("outside")
    random_expert("outsider", ranks, 0.5, 12, base_model=tiny_model_dir.name,
                  base_fingerprint=fp).save(outside / "outsider.safetensors")
    (d / "linked.safetensors").symlink_to(outside / "outsider.safetensors")
    (d / "alias.safetensors").symlink_to(d / "extra.safetensors")     # inside: loads as "alias"
    (d / "notes.txt").write_text("not an expert")
    return d


@pytest.fixture(scope="module")
def ops(tiny_model_dir, tiny_experts_dir, admin_dir, tmp_path_factory):
    with serve(tiny_model_dir, tiny_experts_dir, tmp_path_factory.mktemp("cache"), max_wait_ms=50,
               api_key=KEY, admin_key=ADMIN, admin_experts_dir=admin_dir, cors_origins="https://ui.example",
               max_body_bytes=64 * 1024, max_tokens_limit=200, max_concurrent_requests=4) as s:
        yield s


@pytest.fixture()
def oc(ops):
    return openai.OpenAI(base_url=ops.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


# ---- auth -----------------------------------------------------------------------------------------
def test_api_key_is_required_on_v1_only(ops, oc):
    for key in ("wrong", "", KEY + "x"):
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=ops.url + "/v1", api_key=key or "none", max_retries=0).models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(ops.url + "/v1/chat/completions", json={"model": "auto", "messages": MSG})
    error_of(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"
    # no body parsing happens before the key check: bad JSON without a key is a 401, not a 400
    error_of(httpx.post(ops.url + "/v1/chat/completions", content=b"{nope"), 401)
    assert oc.chat.completions.create(model="auto", messages=MSG, max_tokens=2, temperature=0).choices[0].message.content
    assert httpx.get(ops.url + "/health").status_code == 200
    assert httpx.get(ops.url + "/metrics").status_code == 200


def test_docs_need_the_api_key_when_one_is_set(ops, live):
    for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
        error_of(httpx.get(ops.url + path), 401)
        assert httpx.get(ops.url + path, headers=AUTH).status_code == 200, path
    assert "/admin/experts" in httpx.get(ops.url + "/openapi.json", headers=AUTH).json()["paths"]
    assert httpx.get(live.url + "/openapi.json").status_code == 200        # no key set: open, as before


# ---- admin API ------------------------------------------------------------------------------------
def test_admin_api_is_off_without_an_admin_key(http):
    for method, path in (("GET", "/admin/experts"), ("POST", "/admin/experts"), ("DELETE", "/admin/experts/math")):
        error_of(http.request(method, path, json={"name": "math"}), 404)


def test_admin_load_serve_unload(ops, oc):
    h = httpx.Client(base_url=ops.url, headers=ADMIN_AUTH, timeout=60)
    error_of(httpx.get(ops.url + "/admin/experts", headers=AUTH), 401)        # the API key is not the admin key

    def ask(model):
        return oc.chat.completions.create(model=model, messages=MSG, max_tokens=12,
                                          temperature=0).choices[0].message.content

    base = ask("tiny-llama")
    with pytest.raises(openai.NotFoundError):
        ask("tiny-llama:extra")
    # 1. load: served at once, checked like a startup expert
    r = h.post("/admin/experts", json={"name": "extra"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "extra" and r.json()["label"] == "math"
    assert "extra" in [e["name"] for e in h.get("/admin/experts").json()]
    first = ask("tiny-llama:extra")
    assert first != base
    assert ask("tiny-llama:extra") == first
    mixed = oc.chat.completions.create(model="tiny-llama", messages=MSG, max_tokens=12, temperature=0,
                                       extra_body={"t2": {"experts": {"extra": 1, "math": 1}}})
    assert mixed.model_extra["t2"]["mix"] == {"extra": 0.5, "math": 0.5}
    error_of(h.post("/admin/experts", json={"name": "extra"}), 409)
    # 2. unload: gone from the API and from the patch cache (every adaptation containing it)
    assert h.delete("/admin/experts/extra").json() == {"deleted": "extra"}
    assert not [k for k in ops.engine.patcher.cached_keys if "extra" in k]
    with pytest.raises(openai.NotFoundError):
        ask("tiny-llama:extra")
    error_of(h.delete("/admin/experts/extra"), 404)
    assert ask("tiny-llama") == base
    # 3. load again: the same answer (recomposed, never stale weights)
    assert h.post("/admin/experts", json={"name": "extra"}).status_code == 201
    assert ask("tiny-llama:extra") == first
    assert h.delete("/admin/experts/extra").status_code == 200
    # a symlink inside the folder loads under the link's name (the name asked for), not its target's
    r = h.post("/admin/experts", json={"name": "alias"})
    assert r.status_code == 201 and r.json()["name"] == "alias", r.text
    assert sorted(ops.engine.experts) == ["alias", "clf", "code", "math", "reasoning"]
    assert ask("tiny-llama:alias") == first
    assert h.delete("/admin/experts/alias").status_code == 200


@pytest.mark.parametrize("name,status", [("../extra", 400), ("a/b", 400), ("..", 400), ("/etc/passwd", 400),
                                         ("extra.safetensors/../extra", 400), ("base", 400), ("", 400),
                                         ("nothere", 404), ("notes", 404), ("broken", 400), ("linked", 400),
                                         ("extra\n", 400), ("extra\r\n", 400)])
def test_admin_refuses_paths_and_bad_files(ops, name, status):
    err = error_of(httpx.post(ops.url + "/admin/experts", json={"name": name}, headers=ADMIN_AUTH), status)
    assert "Traceback" not in err["message"]
    assert sorted(ops.engine.experts) == ["clf", "code", "math", "reasoning"]


def test_cors_preflight_and_headers(ops):
    r = httpx.options(ops.url + "/v1/chat/completions", headers={
        "Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"
    r = httpx.get(ops.url + "/v1/models", headers={**AUTH, "Origin": "https://ui.example"})
    assert r.headers["access-control-allow-origin"] == "https://ui.example"
    r = httpx.get(ops.url + "/v1/models", headers={**AUTH, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


# ---- limits ---------------------------------------------------------------------------------------
def test_body_size_limit(ops):
    big = {"model": "auto", "messages": [{"role": "user", "content": "x" * 70_000}]}
    err = error_of(httpx.post(ops.url + "/v1/chat/completions", json=big, headers=AUTH), 413)
    assert err["code"] == "request_too_large"

    def chunked():                                       # no content-length: counted while read
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]
    r = httpx.post(ops.url + "/v1/chat/completions", content=chunked(),
                   headers={**AUTH, "content-type": "application/json"})
    assert error_of(r, 413)["code"] == "request_too_large"


def test_max_tokens_and_n_limits(ops):
    for body, param in (({"max_tokens": 201}, "max_tokens"), ({"max_completion_tokens": 10_000}, "max_completion_tokens"),
                        ({"max_completion_tokens": 201, "max_tokens": 5}, "max_completion_tokens"),
                        ({"max_completion_tokens": 500}, "max_completion_tokens"), ({"n": 9}, "n")):
        err = error_of(httpx.post(ops.url + "/v1/chat/completions", headers=AUTH,
                                  json={"model": "auto", "messages": MSG, **body}), 400)
        assert err["param"] == param and (err["message"].startswith(param) or f"so {param} must" in err["message"])


def _open_stream(url: str, max_tokens: int = 150):
    c = httpx.Client(timeout=60)
    req = c.build_request("POST", url + "/v1/chat/completions", headers=AUTH, json={
        "model": "tiny-llama", "messages": MSG, "max_tokens": max_tokens, "stream": True, "ignore_eos": True})
    r = c.send(req, stream=True)
    assert r.status_code == 200
    lines = r.iter_lines()
    next(lines)                                          # primed: the first token is there
    return c, r, lines


def test_concurrency_limit_gives_429_with_retry_after(ops):
    gate = threading.Event()
    ops.engine.fault_hook = lambda batch: gate.wait(30)      # hold the engine: requests stay in flight
    codes: list[int] = []

    def call():
        codes.append(httpx.post(ops.url + "/v1/chat/completions", headers=AUTH, timeout=60, json={
            "model": "tiny-llama", "messages": MSG, "max_tokens": 3}).status_code)

    threads = [threading.Thread(target=call) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while httpx.get(ops.url + "/health").json()["in_flight"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.post(ops.url + "/v1/chat/completions", headers=AUTH,
                       json={"model": "auto", "messages": MSG, "max_tokens": 2})
        err = error_of(r, 429)
        assert int(r.headers["retry-after"]) >= 0 and err["type"] == "rate_limit_error"
        assert httpx.get(ops.url + "/v1/models", headers=AUTH).status_code == 200   # only generation counts
    finally:
        gate.set()
        for t in threads:
            t.join(60)
        ops.engine.fault_hook = None
    assert codes == [200] * 4
    wait_idle(ops.url)
    assert httpx.post(ops.url + "/v1/chat/completions", headers=AUTH,
                      json={"model": "auto", "messages": MSG, "max_tokens": 2}).status_code == 200


def test_full_scheduler_queue_gives_429_with_retry_after(tiny_model_dir, tiny_experts_dir, tmp_path):
    with serve(tiny_model_dir, tiny_experts_dir, tmp_path, max_queue=2, retry_after_s=3) as s:
        r = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny-llama", "messages": MSG, "max_tokens": 4, "n": 3, "stream": True})
        err = error_of(r, 429)
        assert r.headers["retry-after"] == "3" and err["code"] == "overloaded"
        wait_idle(s.url)
        r = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny-llama", "messages": MSG, "max_tokens": 4, "n": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2


def slow_engine(engine, seconds: float = 0.01):
    """Make every forward pass of the real model take `seconds` longer (a slow device, for timing tests)."""
    fast = engine.ragged.forward

    def slow(*a, **k):
        time.sleep(seconds)
        return fast(*a, **k)
    engine.ragged.forward = slow


def test_request_timeout_aborts_and_frees(tiny_model_dir, tiny_experts_dir, tmp_path):
    with serve(tiny_model_dir, tiny_experts_dir, tmp_path, request_timeout_s=0.5) as s:
        slow_engine(s.engine, 0.1)                        # 400 tokens take ≥ 40 s
        body = {"model": "tiny-llama", "messages": MSG, "max_tokens": 400, "ignore_eos": True}
        t0 = time.monotonic()
        err = error_of(httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60), 504)
        assert err["code"] == "request_timeout" and time.monotonic() - t0 < 20     # generous, ≪ 40 s
        wait_idle(s.url, timeout=30)
        del s.engine.ragged.forward
        slow_engine(s.engine, 0.01)                       # faster: the stream starts within the 0.5 s
        with httpx.stream("POST", s.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200
            lines = [l for l in r.iter_lines() if l]
        assert len(lines) > 3                                   # it streamed, then ran out of time
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "request_timeout"
        wait_idle(s.url)
        ok = httpx.post(s.url + "/v1/chat/completions", json={**body, "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200


# ---- disconnects ----------------------------------------------------------------------------------
def test_non_stream_client_disconnect_frees_its_slot_at_once(ops):
    """A non-stream request whose client goes away is aborted: its engine row leaves the batch."""
    body = json.dumps({"model": "tiny-llama", "messages": MSG, "max_tokens": 200, "ignore_eos": True}).encode()
    host, port = ops.url.removeprefix("http://").split(":")
    before = ops.engine.health()
    slow_engine(ops.engine, 0.2)        # 200 tokens now take ≥ 40 s: only an abort frees the row in time
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 30
    while ops.engine.health().running == 0:          # wait until it really runs
        assert time.monotonic() < deadline, sock.recv(4096)
        time.sleep(0.005)
    sock.close()
    t0 = time.monotonic()
    try:
        wait_idle(ops.url, timeout=20)                  # generous for a loaded machine, far below 40 s
    finally:
        del ops.engine.ragged.forward
    freed = time.monotonic() - t0
    assert ops.engine.health().ok and before.ok
    print(f"freed {freed:.2f} s after the disconnect")


# ---- faults ---------------------------------------------------------------------------------------
def test_engine_fault_fails_the_request_flips_health_and_recovers(ops, oc):
    calls = []

    def boom(batch):
        calls.append(batch.kind)
        if len(calls) == 1:
            raise RuntimeError("injected fault")

    ops.engine.fault_hook = boom
    try:
        with pytest.raises(openai.InternalServerError) as e:
            oc.chat.completions.create(model="tiny-llama:code", messages=MSG, max_tokens=4)
        assert e.value.status_code == 503 and "injected fault" in e.value.message
        h = httpx.get(ops.url + "/health")
        assert h.status_code == 503 and "injected fault" in h.json()["fault"]
        # the server is not wedged: the next request is served and health comes back
        r = oc.chat.completions.create(model="tiny-llama:code", messages=MSG, max_tokens=4)
        assert r.choices[0].message.content
        assert httpx.get(ops.url + "/health").status_code == 200
    finally:
        ops.engine.fault_hook = None
    wait_idle(ops.url)


def test_engine_fault_mid_stream_is_an_error_event(ops):
    """A fault DURING decoding (the real model's forward raises once the stream is answering): the stream
    ends with an OpenAI error event naming the fault, then [DONE]; the server recovers."""
    fast, armed = ops.engine.ragged.forward, threading.Event()

    def faulty(*a, **k):
        if armed.is_set():
            raise RuntimeError("fault while decoding")
        time.sleep(0.005)
        return fast(*a, **k)

    ops.engine.ragged.forward = faulty
    c, r, it = _open_stream(ops.url, max_tokens=150)    # running (primed): the fault hits a decode step
    try:
        armed.set()
        lines = [l for l in it if l]
        assert lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][6:])["error"]
        assert err["code"] == "engine_unavailable" and "fault while decoding" in err["message"], err
        assert err["type"] == "server_error" and err["request_id"] == r.headers["x-request-id"]
        assert not any('"finish_reason"' in l for l in lines)    # it did not finish: it was cut by the fault
        c2 = httpx.post(ops.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                        json={"model": "tiny-llama", "messages": MSG, "max_tokens": 3, "stream": True})
        error_of(c2, 503)                                # before the first token: still a plain HTTP error
    finally:
        del ops.engine.ragged.forward                    # back to the class's forward
        r.close()
        c.close()
    httpx.post(ops.url + "/v1/chat/completions", headers=AUTH, timeout=60,
               json={"model": "tiny-llama", "messages": MSG, "max_tokens": 2}).raise_for_status()
    assert httpx.get(ops.url + "/health").status_code == 200


# ---- metrics --------------------------------------------------------------------------------------
def scrape(url: str) -> dict[str, float]:
    """{'name{label="v",...}': value} of every sample."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_metrics_count_what_happened(ops, oc):
    before = scrape(ops.url)
    m = 'model_name="tiny-llama"'
    oc.chat.completions.create(model="tiny-llama:math", messages=MSG, max_tokens=5, temperature=0)
    r = oc.chat.completions.create(model="auto", messages=MSG, max_tokens=3, temperature=0,
                                   extra_body={"t2": {"dispatch": "prompt"}})
    list(oc.chat.completions.create(model="tiny-llama", messages=MSG, max_tokens=4, stream=True,
                                    extra_body={"t2": {"experts": {"math": 1, "code": 1}}}))
    label = r.model_extra["t2"]["label"]
    after = scrape(ops.url)

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert delta(f'vllm:request_success_total{{finished_reason="length",{m}}}') == 3
    assert delta(f"vllm:generation_tokens_total{{{m}}}") == 12
    assert delta(f"vllm:prompt_tokens_total{{{m}}}") > 0
    assert delta(f"vllm:time_to_first_token_seconds_count{{{m}}}") == 3
    assert delta(f"vllm:e2e_request_latency_seconds_count{{{m}}}") == 3
    assert delta('t2_requests_total{adaptation="math",label="",strategy="explicit"}') == 1
    assert delta('t2_requests_total{adaptation="mix",label="",strategy="explicit"}') == 1
    adaptation = "base" if label == "other" else label
    assert delta(f't2_requests_total{{adaptation="{adaptation}",label="{label}",strategy="prompt"}}') == 1
    assert delta('t2_expert_requests_total{expert="math"}') == 2
    assert delta('t2_first_pass_seconds_count{strategy="prompt"}') == 1
    assert delta("t2_patch_seconds_count{}") == 3 and delta("t2_queue_wait_seconds_count{}") == 3
    assert after["t2_swaps_total{}"] >= before.get("t2_swaps_total{}", 0)
    # one request at a time: the first pass (base weights) ran dense, the expert answers factored (5 and 4
    # tokens: fewer steps than the engine waits before it patches the weights), one adaptation per forward
    assert delta('t2_steps_total{path="dense"}') >= 1 and delta('t2_steps_total{path="factored"}') >= 9
    steps = delta('t2_steps_total{path="dense"}') + delta('t2_steps_total{path="factored"}')
    assert delta("t2_step_adaptations_sum_total{}") == steps and after["t2_step_adaptations{}"] == 1
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert f"{gauge}{{{m}}}" in after
    assert after["t2_engine_healthy{}"] == 1
    httpx.post(ops.url + "/v1/chat/completions", json={"model": "auto", "messages": MSG})   # no key: 401
    assert scrape(ops.url)['t2_request_errors_total{code="401"}'] >= 1


def test_each_app_has_its_own_registry(ops, live):
    a, b = scrape(ops.url), scrape(live.url)
    assert 'vllm:num_requests_running{model_name="tiny-llama"}' in a
    assert ops.app.state.metrics.registry is not live.app.state.metrics.registry
    # counts of one app do not move the other's
    key = 't2_request_errors_total{code="404"}'
    before_ops, before_live = a.get(key, 0), b.get(key, 0)
    for _ in range(3):
        httpx.get(live.url + "/v1/nothing")
    assert scrape(live.url)[key] == before_live + 3 and scrape(ops.url).get(key, 0) == before_ops


# ---- SIGTERM --------------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_requests_then_exits_0(tiny_model_dir, tiny_experts_dir, tmp_path):
    """A real `t2 serve` process: a streaming request in flight survives SIGTERM, then the process exits 0."""
    port = free_port()
    shutil.copytree(tiny_experts_dir, tmp_path / "experts")
    env = {**os.environ, "T2_MODEL": str(tiny_model_dir), "T2_EXPERTS": str(tmp_path / "experts"),
           "T2_CACHE_DIR": str(tmp_path / "cache"), "T2_LOG_LEVEL": "warning"}
    proc, url = spawn_server(env, port)
    try:
        got: dict = {}

        def consume():
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
                    "model": "tiny-llama", "messages": MSG, "max_tokens": 400, "n": 4, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}) as r:
                got["lines"] = []
                for line in r.iter_lines():
                    if line:
                        got["lines"].append(line)
                        if len(got["lines"]) == 3:
                            got["started"] = time.monotonic()

        t = threading.Thread(target=consume)
        t.start()
        while "started" not in got:
            assert t.is_alive()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        at_signal = len(got["lines"])
        t.join(120)
        rc = proc.wait(60)
        lines = got["lines"]
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][6:])["usage"]
        assert usage["completion_tokens"] == 4 * 400
        assert at_signal < len(lines) / 2                # most of the answer came after the SIGTERM
        assert rc == 0
        with pytest.raises(httpx.ConnectError):          # and it really stopped listening
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
