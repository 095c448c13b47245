"""experts/svd.py: target selection, SVD, fingerprints and the factor cache on disk."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from experts.errors import FactorCacheError
from experts.svd import (
    ATTENTION_TARGETS,
    CANDIDATE_TARGETS,
    MLP_TARGETS,
    Factors,
    checkpoint_names,
    decompose,
    factors_path,
    fingerprint,
    load_factors,
    model_fingerprint,
    model_ranks,
    read_weights,
    target_names,
)

NUM_LAYERS = 2
MLP = ("gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
LOG = "t2.svd"


def _mlp_names(layers: int = NUM_LAYERS) -> list[str]:
    return [f"model.layers.{i}.mlp.{p}.weight" for i in range(layers) for p in MLP]


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weight(model_dir: Path, name: str, index=(0, 0), delta: float = 0.25) -> torch.Tensor:
    """Change one value of one tensor in model.safetensors (keeping the 'pt' metadata); return the new W."""
    f = model_dir / "model.safetensors"
    tensors = load_file(str(f))
    w = tensors[name].clone()
    w[index] += delta
    tensors[name] = w
    save_file(tensors, str(f), metadata={"format": "pt"})
    return w


def _reconstruct(f: Factors) -> torch.Tensor:
    return (f.U * f.s) @ f.Vh


# -- target_names -----------------------------------------------------------------------------------------

def test_target_names_orders_by_layer_then_target():
    # shuffled checkpoint order, 12 layers (so that "10" < "2" as text would break a string sort)
    names = []
    for i in reversed(range(12)):
        for p in ("down_proj", "gate_proj", "up_proj"):
            names.append(f"model.layers.{i}.mlp.{p}.weight")
        for p in ATTN:
            names.append(f"model.layers.{i}.self_attn.{p}.weight")
        names.append(f"model.layers.{i}.input_layernorm.weight")
    names += ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    got = target_names(names)
    assert got == _mlp_names(12)
    # the order of `targets` decides the order inside a layer
    got = target_names(names, ("mlp.down_proj", "mlp.gate_proj"))
    assert got == [f"model.layers.{i}.mlp.{p}.weight" for i in range(12) for p in ("down_proj", "gate_proj")]


def test_target_names_attention_is_opt_in():
    names = [f"model.layers.0.self_attn.{p}.weight" for p in ATTN] + _mlp_names(1)
    assert target_names(names) == _mlp_names(1)            # default: MLP only
    assert target_names(names, MLP_TARGETS) == _mlp_names(1)
    assert target_names(names, ATTENTION_TARGETS) == [f"model.layers.0.self_attn.{p}.weight" for p in ATTN]
    both = target_names(names, CANDIDATE_TARGETS)
    assert both == _mlp_names(1) + [f"model.layers.0.self_attn.{p}.weight" for p in ATTN]


def test_target_names_ignores_biases_and_other_params():
    names = ["model.layers.0.mlp.gate_proj.bias", "model.layers.0.mlp.gate_proj.weight",
             "model.layers.0.mlp.not_gate_proj.weight", "model.layers.0.post_attention_layernorm.weight"]
    assert target_names(names) == ["model.layers.0.mlp.gate_proj.weight"]


def test_target_names_on_tiny_checkpoint(tiny_model_dir):
    names = checkpoint_names(tiny_model_dir)
    assert target_names(names) == _mlp_names()
    assert len(target_names(names, CANDIDATE_TARGETS)) == NUM_LAYERS * 7


# -- decompose ----------------------------------------------------------------------------------------------

def test_decompose_reconstructs_weights():
    g = torch.Generator().manual_seed(0)
    weights = {"wide": torch.randn(8, 20, generator=g), "tall": torch.randn(30, 6, generator=g),
               "half": torch.randn(16, 16, generator=g).to(torch.bfloat16)}
    out = decompose(weights, progress=False)
    assert list(out) == list(weights)
    for name, w in weights.items():
        f = out[name]
        m, n = w.shape
        r = min(m, n)
        assert f.U.shape == (m, r) and f.s.shape == (r,) and f.Vh.shape == (r, n)
        assert f.U.dtype == f.s.dtype == f.Vh.dtype == torch.float32
        assert f.rank == r
        assert torch.all(f.s[:-1] >= f.s[1:])           # descending
        torch.testing.assert_close(_reconstruct(f), w.to(torch.float32), rtol=1e-5, atol=1e-5)


def test_decompose_tiny_model_weights(tiny_model_dir):
    names = target_names(checkpoint_names(tiny_model_dir), CANDIDATE_TARGETS)
    weights = read_weights(tiny_model_dir, names)
    for name, f in decompose(weights, progress=False).items():
        torch.testing.assert_close(_reconstruct(f), weights[name], rtol=1e-5, atol=1e-5)


# -- fingerprint --------------------------------------------------------------------------------------------

def test_fingerprint_sensitive_to_one_value_and_not_to_order():
    g = torch.Generator().manual_seed(1)
    a = {"x": torch.randn(4, 5, generator=g), "y": torch.randn(3, 3, generator=g)}
    fp = fingerprint(a)
    assert fingerprint(dict(reversed(list(a.items())))) == fp            # dict order
    assert fingerprint({k: v.clone() for k, v in a.items()}) == fp       # same values, other storage
    b = {k: v.clone() for k, v in a.items()}
    b["y"][2, 1] = torch.nextafter(b["y"][2, 1], torch.tensor(10.0))    # one ulp in one value
    assert fingerprint(b) != fp
    # names, dtypes and shapes count too
    assert fingerprint({"x": a["x"], "z": a["y"]}) != fp
    assert fingerprint({"x": a["x"].to(torch.float64), "y": a["y"]}) != fp
    assert fingerprint({"x": a["x"].reshape(5, 4), "y": a["y"]}) != fp


def test_model_fingerprint_covers_attention(tiny_model_dir, tmp_path):
    fp = model_fingerprint(tiny_model_dir)
    assert model_fingerprint(tiny_model_dir) == fp
    d = _copy_model(tiny_model_dir, tmp_path / "m")
    _edit_weight(d, "model.layers.1.self_attn.v_proj.weight")
    assert model_fingerprint(d) != fp


# -- load_factors and its cache ------------------------------------------------------------------------------

def test_load_factors_builds_then_reuses_cache(tiny_model_dir, tmp_path, caplog):
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger=LOG)
    factors, fp = load_factors(tiny_model_dir, cache, progress=False)
    assert fp == model_fingerprint(tiny_model_dir)
    assert list(factors) == _mlp_names()
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["fingerprint"] == fp
    assert set(manifest["names"]) == set(_mlp_names())
    assert (cache / "factors.safetensors").is_file()
    assert not any("reusing" in r.getMessage() for r in caplog.records)
    weights = read_weights(tiny_model_dir, _mlp_names())
    for n, f in factors.items():
        torch.testing.assert_close(_reconstruct(f), weights[n], rtol=1e-5, atol=1e-5)

    data = cache / "factors.safetensors"
    mtime, before = data.stat().st_mtime_ns, data.read_bytes()
    caplog.clear()
    again, fp2 = load_factors(tiny_model_dir, cache, progress=False)
    assert fp2 == fp
    assert any("reusing" in r.getMessage() for r in caplog.records)
    assert not any("decomposed" in r.getMessage() for r in caplog.records)
    assert data.stat().st_mtime_ns == mtime and data.read_bytes() == before
    assert list(again) == list(factors)
    for n in factors:
        assert torch.equal(again[n].U, factors[n].U)
        assert torch.equal(again[n].s, factors[n].s)
        assert torch.equal(again[n].Vh, factors[n].Vh)


def test_load_factors_rebuilds_when_weights_change(tiny_model_dir, tmp_path, caplog):
    d = _copy_model(tiny_model_dir, tmp_path / "m")
    cache = tmp_path / "cache"
    old, fp_old = load_factors(d, cache, progress=False)
    name = "model.layers.1.mlp.up_proj.weight"
    new_w = _edit_weight(d, name, index=(3, 7), delta=0.5)
    caplog.set_level(logging.INFO, logger=LOG)
    new, fp_new = load_factors(d, cache, progress=False)
    assert fp_new != fp_old
    assert fp_new == model_fingerprint(d)
    assert not any("reusing" in r.getMessage() for r in caplog.records)
    assert any("other weights" in r.getMessage() for r in caplog.records)
    assert json.loads((cache / "manifest.json").read_text())["fingerprint"] == fp_new
    torch.testing.assert_close(_reconstruct(new[name]), new_w, rtol=1e-5, atol=1e-5)
    # the old factors no longer describe the edited matrix
    assert (_reconstruct(old[name]) - new_w).abs().max() > 0.4
    # and the rebuilt cache is the one reused next time
    caplog.clear()
    again, fp3 = load_factors(d, cache, progress=False)
    assert fp3 == fp_new and any("reusing" in r.getMessage() for r in caplog.records)
    assert torch.equal(again[name].s, new[name].s)


def test_load_factors_rebuilds_when_attention_weights_change(tiny_model_dir, tmp_path, caplog):
    # the fingerprint covers every candidate matrix, so an MLP-only cache is invalidated too
    d = _copy_model(tiny_model_dir, tmp_path / "m")
    cache = tmp_path / "cache"
    _, fp_old = load_factors(d, cache, progress=False)
    _edit_weight(d, "model.layers.0.self_attn.q_proj.weight")
    caplog.set_level(logging.INFO, logger=LOG)
    _, fp_new = load_factors(d, cache, progress=False)
    assert fp_new != fp_old
    assert not any("reusing" in r.getMessage() for r in caplog.records)


def test_mlp_cache_is_rebuilt_for_attention_targets(tiny_model_dir, tmp_path, caplog):
    cache = tmp_path / "cache"
    load_factors(tiny_model_dir, cache, progress=False)
    caplog.set_level(logging.INFO, logger=LOG)
    both, _ = load_factors(tiny_model_dir, cache, targets=CANDIDATE_TARGETS, progress=False)
    assert not any("reusing" in r.getMessage() for r in caplog.records)
    assert any("lacks some targets" in r.getMessage() for r in caplog.records)
    expected = target_names(checkpoint_names(tiny_model_dir), CANDIDATE_TARGETS)
    assert list(both) == expected
    weights = read_weights(tiny_model_dir, expected)
    for n in expected:
        torch.testing.assert_close(_reconstruct(both[n]), weights[n], rtol=1e-5, atol=1e-5)
    assert set(json.loads((cache / "manifest.json").read_text())["names"]) == set(expected)
    # a superset cache serves a subset request without a rebuild
    caplog.clear()
    mlp, _ = load_factors(tiny_model_dir, cache, targets=MLP_TARGETS, progress=False)
    assert list(mlp) == _mlp_names()
    assert any("reusing" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "missing_tensor"])
def test_corrupted_factors_file_is_rebuilt(tiny_model_dir, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    good, fp = load_factors(tiny_model_dir, cache, progress=False)
    data = cache / "factors.safetensors"
    raw = data.read_bytes()
    if damage == "garbage":
        data.write_bytes(b"\x07" * len(raw))
    elif damage == "truncated":
        data.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        data.write_bytes(b"")
    else:  # a valid safetensors file that lacks one matrix the manifest lists
        t = load_file(str(data))
        del t["model.layers.1.mlp.down_proj.weight.U"]
        save_file(t, str(data))
    caplog.set_level(logging.INFO, logger=LOG)
    again, fp2 = load_factors(tiny_model_dir, cache, progress=False)
    assert fp2 == fp
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert list(again) == list(good)
    for n in good:
        assert torch.equal(again[n].s, good[n].s)
        assert torch.equal(again[n].U, good[n].U)
    # the cache file is whole again
    t = load_file(str(data))
    assert set(t) == {f"{n}.{p}" for n in good for p in ("U", "s", "Vh")}


@pytest.mark.parametrize("damage", ["manifest_garbage", "manifest_missing", "manifest_format"])
def test_bad_manifest_means_rebuild(tiny_model_dir, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    load_factors(tiny_model_dir, cache, progress=False)
    manifest = cache / "manifest.json"
    if damage == "manifest_garbage":
        manifest.write_text("{not json")
    elif damage == "manifest_missing":
        manifest.unlink()
    else:
        body = json.loads(manifest.read_text())
        body["format"] = "something-else/9"
        manifest.write_text(json.dumps(body))
    caplog.set_level(logging.INFO, logger=LOG)
    _, fp = load_factors(tiny_model_dir, cache, progress=False)
    assert not any("reusing" in r.getMessage() for r in caplog.records)
    assert any("decomposed" in r.getMessage() for r in caplog.records)
    assert json.loads(manifest.read_text())["fingerprint"] == fp


def test_load_factors_errors(tmp_path, tiny_model_dir):
    with pytest.raises(FactorCacheError, match="no \\*.safetensors"):
        load_factors(tmp_path, tmp_path / "cache", progress=False)
    with pytest.raises(FactorCacheError, match="no matrix matches"):
        load_factors(tiny_model_dir, tmp_path / "cache", targets=("mlp.nothing",), progress=False)


# -- model_ranks ----------------------------------------------------------------------------------------------

def test_model_ranks_is_min_of_shape(tiny_model_dir, tmp_path):
    ranks = model_ranks(tiny_model_dir)
    assert list(ranks) == _mlp_names()
    weights = read_weights(tiny_model_dir, list(ranks))
    for n, r in ranks.items():
        assert r == min(weights[n].shape)
    assert set(ranks.values()) == {64}           # gate/up [128, 64], down [64, 128]
    both = model_ranks(tiny_model_dir, CANDIDATE_TARGETS)
    assert list(both) == target_names(checkpoint_names(tiny_model_dir), CANDIDATE_TARGETS)
    assert both["model.layers.0.self_attn.k_proj.weight"] == 32   # [32, 64]
    assert both["model.layers.1.self_attn.q_proj.weight"] == 64
    factors, _ = load_factors(tiny_model_dir, tmp_path / "cache", targets=CANDIDATE_TARGETS, progress=False)
    assert {n: f.rank for n, f in factors.items()} == both


def test_ensure_factors_checks_its_own_fingerprint(tiny_model_dir, tmp_path, monkeypatch):
    """ensure_factors (the vLLM front process's check) reuses a fresh cache without decomposing, and rebuilds
    one made for other weights or lacking targets; the fingerprint it returns is the model's."""
    import experts.svd as svd
    d = _copy_model(tiny_model_dir, tmp_path / "m")
    cache = tmp_path / "cache"
    calls = []
    real = svd.decompose
    monkeypatch.setattr(svd, "decompose", lambda *a, **k: calls.append(1) or real(*a, **k))
    path, fp = svd.ensure_factors(d, cache, progress=False)
    assert path == factors_path(cache) and path.is_file() and fp == model_fingerprint(d) and len(calls) == 1
    assert svd.ensure_factors(d, cache, progress=False) == (path, fp) and len(calls) == 1     # fresh: reused
    name = "model.layers.1.mlp.up_proj.weight"
    new_w = _edit_weight(d, name, index=(3, 7), delta=0.5)
    path2, fp2 = svd.ensure_factors(d, cache, progress=False)
    assert fp2 != fp and fp2 == model_fingerprint(d) and len(calls) == 2                      # other weights
    assert json.loads((cache / "manifest.json").read_text())["fingerprint"] == fp2
    torch.testing.assert_close(_reconstruct(load_factors(d, cache, progress=False)[0][name]), new_w,
                               rtol=1e-5, atol=1e-5)
    svd.ensure_factors(d, cache, targets=CANDIDATE_TARGETS, progress=False)                 # lacks targets
    assert len(calls) == 3      # load_factors above reused (no call); this one rebuilt
