"""Probing item 2: a degenerate expert (z = [1e-45, 0, …]: c = Σs / Σ(s⊙z) overflows) is refused at
startup and through the admin API with an error naming the file and the matrix; /health stays ok."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from experts.expert import Expert, random_expert
from experts.svd import ensure_factors, model_fingerprint, model_ranks
from tests.conftest import serve

ADMIN = {"Authorization": "Bearer adm"}


def degenerate(model_dir: Path, out: Path) -> tuple[Path, str]:
    """An expert that passes the file checks (finite, ≥ 0, not all 0) but whose first matrix has c ≈ 1e46."""
    ranks = model_ranks(model_dir)
    first = next(iter(ranks))
    z = {n: torch.ones(r) for n, r in ranks.items()}
    z[first] = torch.zeros(ranks[first])
    z[first][0] = 1e-45
    e = Expert("tiny", z, label="math", base_model=model_dir.name, base_fingerprint=model_fingerprint(model_dir))
    return e.save(out / "tiny.safetensors"), first


def test_startup_with_a_degenerate_expert_fails_with_one_line_naming_file_and_matrix(tiny_model_dir, tmp_path):
    from tests.test_startup import one_line_error, serve as cli_serve
    d = tmp_path / "experts"
    path, matrix = degenerate(tiny_model_dir, d)
    # the factor cache as a previous start left it (an uncached start also shows the SVD's progress bar)
    ensure_factors(tiny_model_dir, tmp_path / "cache" / "factors" / tiny_model_dir.name, progress=False)
    line = one_line_error(cli_serve("--model", tiny_model_dir, "--experts", d, "--cache-dir", tmp_path / "cache"),
                          allow_logs=True)
    assert str(path) in line and repr(matrix) in line and "rescale c" in line, line


@pytest.fixture(scope="module")
def guarded(tiny_model_dir, tiny_experts_dir, tmp_path_factory):
    admin = tmp_path_factory.mktemp("admin-degenerate")
    degenerate(tiny_model_dir, admin)
    random_expert("fine", model_ranks(tiny_model_dir), 0.5, 9, label="code", base_model=tiny_model_dir.name,
                  base_fingerprint=model_fingerprint(tiny_model_dir)).save(admin / "fine.safetensors")
    with serve(tiny_model_dir, tiny_experts_dir, tmp_path_factory.mktemp("cache"), admin_key="adm",
               admin_experts_dir=admin) as s:
        yield s


def test_admin_api_refuses_a_degenerate_expert_and_health_stays_ok(guarded):
    r = httpx.post(guarded.url + "/admin/experts", json={"name": "tiny"}, headers=ADMIN, timeout=60)
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert "tiny.safetensors" in msg and "rescale c" in msg and ".weight'" in msg
    assert "tiny" not in guarded.engine.experts
    assert httpx.get(guarded.url + "/health", timeout=30).json()["status"] == "ok"
    # the server goes on serving, and a sound expert still loads beside it
    assert httpx.post(guarded.url + "/admin/experts", json={"name": "fine"}, headers=ADMIN, timeout=60).status_code == 201
    out = httpx.post(guarded.url + "/v1/chat/completions", timeout=120, json={
        "model": "tiny-llama:fine", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "temperature": 0})
    assert out.status_code == 200, out.text
    assert httpx.get(guarded.url + "/health", timeout=30).json()["status"] == "ok"
