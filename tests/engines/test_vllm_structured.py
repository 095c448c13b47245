"""Structured outputs and tool calls on the vLLM engine: the same client checks as the embedded engine's.

vLLM decodes every constraint itself (SamplingParams.structured_outputs, xgrammar, compact JSON); our tool
path hands it the whole tool call as one JSON schema, so `required` / named tool calls validate here too.
One vLLM server (tiny random Llama with 2048 positions, tool-aware ChatML) shared by the module; skipped
when vllm is not importable.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm", reason="vllm is not installed (README, section 'vLLM engine')")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from tests import structured_checks as C  # noqa: E402
from tests.conftest import make_experts, serve  # noqa: E402
from tests.server.test_structured import CHECKS, _ask  # noqa: E402
from tests.tiny_model import build_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def vtools_live(tmp_path_factory):
    model = build_tiny_llama(tmp_path_factory.mktemp("vtiny-tools") / "tiny-tools", max_position_embeddings=2048)
    experts = make_experts(model, tmp_path_factory.mktemp("vtools-experts"))
    with serve(model, experts, tmp_path_factory.mktemp("vtools-cache"), engine="vllm", dtype="float32",
               chat_template="chatml-tools", max_wait_ms=200, max_batch=16) as s:
        yield s


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__[len("check_"):])
def test_client_check(vtools_live, check):
    check(vtools_live.url + "/v1", "tiny-tools")


def test_constrained_and_free_requests_of_several_adaptations_together(vtools_live):
    """Concurrent constrained and free requests over three adaptations: each valid, each as alone."""
    client = C.client(vtools_live.url + "/v1")
    jobs = [(model, kind, i) for i, (model, kind) in enumerate(
        (m, k) for m in ("tiny-tools", "tiny-tools:math", "tiny-tools:code") for k in ("json", "free", "tool"))]
    alone = [_ask(client, *j) for j in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: _ask(client, *j), jobs))
    assert together == alone


def test_first_pass_is_blind_to_tools_and_schemas(vtools_live):
    client = C.client(vtools_live.url + "/v1")
    kw = dict(model="auto", messages=C.WEATHER, max_tokens=C.MAX, temperature=0,
              extra_body={"t2": {"dispatch": "prompt"}})
    plain = client.chat.completions.create(**kw).model_extra["t2"]
    tools = client.chat.completions.create(**kw, tools=[C.WEATHER_TOOL], tool_choice="required").model_extra["t2"]
    assert (tools["label"], tools["label_probs"]) == (plain["label"], plain["label_probs"])
