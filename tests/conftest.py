"""Shared fixtures: a tiny random Llama with test experts, and the real server on loopback.

Tests run without real weights (the tiny model loads in milliseconds); one module (test_smollm2.py)
runs the embedded SmolLM2 model end to end.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from experts.expert import random_expert  # noqa: E402
from experts.svd import model_fingerprint, model_ranks  # noqa: E402
from tests.live import LiveServer  # noqa: E402
from tests.tiny_model import build_tiny_llama  # noqa: E402

TEST_EXPERTS = {"math": ("math", 1), "code": ("code", 2), "reasoning": ("reasoning", 3), "clf": ("classifier", 4)}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def make_experts(model_dir: Path, out: Path, scale: float = 0.5) -> Path:
    """Random experts (z = 1 + scale·N) with labels, tied to the model's fingerprint."""
    ranks, fp = model_ranks(model_dir), model_fingerprint(model_dir)
    for name, (label, seed) in TEST_EXPERTS.items():
        random_expert(name, ranks, scale, seed, label=label, base_model=model_dir.name,
                      base_fingerprint=fp, description=f"test expert {name}").save(out / f"{name}.safetensors")
    return out


@pytest.fixture(scope="session")
def tiny_experts_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_experts(tiny_model_dir, tmp_path_factory.mktemp("experts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_dir: Path, experts_dir: Path | None, cache_dir: Path, **overrides) -> LiveServer:
    from server.config import ServerConfig
    cfg = ServerConfig(model=model_dir, experts=experts_dir, cache_dir=cache_dir, port=free_port(),
                       **overrides)
    return LiveServer(cfg)


@pytest.fixture(scope="session")
def live(tiny_model_dir, tiny_experts_dir, tmp_path_factory):
    with serve(tiny_model_dir, tiny_experts_dir, tmp_path_factory.mktemp("cache"), max_wait_ms=200) as s:
        yield s


@pytest.fixture(scope="session")
def client(live):
    from openai import OpenAI
    return OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def http(live):
    with httpx.Client(base_url=live.url, timeout=120) as c:
        yield c
