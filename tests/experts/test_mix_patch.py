"""experts/mix.py and experts/patch.py: adaptation keys, mixing, the SVF formula and in-place patching."""

from __future__ import annotations

import math
import random
from collections import OrderedDict

import pytest
import torch
from transformers import AutoModelForCausalLM

from experts.errors import ExpertError, ExpertNotFound
from experts.expert import Expert, random_expert
from experts.mix import BASE, Adaptation, mix_z
from experts.patch import BASE_KEY, ModelPatcher, SVFMatrix, svf_delta
from experts.svd import Factors, decompose, load_factors

N1, N2, N3 = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"


# ================================================ Adaptation ================================================

def test_adaptation_normalises_to_one_key():
    assert Adaptation.of({"a": 2}) == Adaptation.of({"a": 1}) == Adaptation.of({"a": 0.01})
    assert Adaptation.of({"a": 2}).key == Adaptation.of({"a": 1}).key == "a"
    assert Adaptation.of({"a": 2}).mix == (("a", 1.0),)
    ab = Adaptation.of({"b": 3, "a": 1})
    assert ab == Adaptation.of({"a": 2, "b": 6}) and hash(ab) == hash(Adaptation.of({"a": 2, "b": 6}))
    assert ab.key == Adaptation.of({"a": 0.5, "b": 1.5}).key
    assert ab.mix == (("a", 0.25), ("b", 0.75))            # sorted by name, sum 1
    assert ab.experts == ("a", "b")
    assert ab.as_dict() == {"a": 0.25, "b": 0.75}
    assert ab.key != Adaptation.of({"a": 1, "b": 1}).key != Adaptation.of({"a": 1}).key
    thirds = Adaptation.of({"x": 1, "y": 1, "z": 1})
    assert math.isclose(sum(w for _, w in thirds.mix), 1.0, abs_tol=1e-5)
    assert thirds.key == Adaptation.of({"z": 7, "x": 7, "y": 7}).key
    assert not ab.is_base
    assert {ab: 1}[Adaptation.of({"a": 10, "b": 30})] == 1  # usable as a dict key


def test_adaptation_drops_zeros_and_base_is_empty():
    assert Adaptation.of({"a": 0, "b": 1}) == Adaptation.of({"b": 1})
    assert Adaptation.of({"a": 0.0, "b": 1}).key == "b"
    for empty in (None, {}, {"a": 0}, {"a": 0.0, "b": 0}):
        a = Adaptation.of(empty)
        assert a == BASE and a.is_base and a.key == "base" == BASE_KEY
        assert a.mix == () and a.experts == () and a.as_dict() == {}
    assert Adaptation() == BASE


def test_adaptation_drops_weights_that_round_to_zero():
    assert Adaptation.of({"a": 1e-7, "b": 1.0}).key == Adaptation.of({"b": 1.0}).key


@pytest.mark.parametrize("weights", [{"a": float("inf")}, {"a": float("nan")}, {"a": -1.0, "b": 1.0}])
def test_adaptation_rejects_non_finite_and_negative_weights(weights):
    with pytest.raises(ValueError):
        Adaptation.of(weights)


def test_adaptation_normalises_huge_weights_without_overflow():
    # 1e308 + 1e308 overflows to inf: the weights are scaled by the largest before they are summed
    a = Adaptation.of({"a": 1e308, "b": 1e308, "c": 5e307})
    assert a.mix == (("a", 0.4), ("b", 0.4), ("c", 0.2)), a.mix


# ================================================== mix_z ==================================================

def _experts() -> dict[str, Expert]:
    g = torch.Generator().manual_seed(0)
    r = lambda: torch.rand(6, generator=g) + 0.2  # noqa: E731
    return {"a": Expert("a", {N1: r(), N2: r()}),
            "b": Expert("b", {N1: r()}),
            "c": Expert("c", {N3: r()})}


def test_mix_z_single_expert_is_its_z():
    ex = _experts()
    z = mix_z(ex, Adaptation.of({"a": 5}))
    assert set(z) == {N1, N2}
    assert torch.equal(z[N1], ex["a"].z[N1]) and torch.equal(z[N2], ex["a"].z[N2])
    assert mix_z(ex, BASE) == {}


def test_mix_z_is_weighted_sum_with_missing_as_one():
    ex = _experts()
    z = mix_z(ex, Adaptation.of({"a": 1, "b": 3}))
    assert set(z) == {N1, N2}                              # N3: no expert of the mix covers it
    torch.testing.assert_close(z[N1], 0.25 * ex["a"].z[N1] + 0.75 * ex["b"].z[N1])
    torch.testing.assert_close(z[N2], 0.25 * ex["a"].z[N2] + 0.75 * torch.ones(6))
    z = mix_z(ex, Adaptation.of({"a": 1, "b": 1, "c": 2}))
    assert set(z) == {N1, N2, N3}
    torch.testing.assert_close(z[N1], 0.25 * ex["a"].z[N1] + 0.25 * ex["b"].z[N1] + 0.5)
    torch.testing.assert_close(z[N2], 0.25 * ex["a"].z[N2] + 0.75)
    torch.testing.assert_close(z[N3], 0.5 + 0.5 * ex["c"].z[N3])
    assert all(t.dtype == torch.float32 and t.shape == (6,) for t in z.values())


def test_mix_z_unknown_expert():
    with pytest.raises(ExpertNotFound) as info:
        mix_z(_experts(), Adaptation.of({"a": 1, "nope": 1}))
    assert "nope" in str(info.value) and not str(info.value).startswith('"')
    assert isinstance(info.value, KeyError) and isinstance(info.value, ExpertError)


# ================================================ svf_delta ================================================

def _spectrum_matrix(m: int, n: int, seed: int, dtype=torch.float64):
    """A random W = U·diag(s)·Vh with a decaying spectrum, and its exact factors."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = 10.0 * 0.85 ** torch.arange(r, dtype=torch.float64)
    W = (U * s) @ V.T
    return W.to(dtype), U.to(dtype), s.to(dtype), V.T.contiguous().to(dtype)


def _reference(U, s, Vh, z):
    """The reference code's recomposition: U·diag(s⊙z)·Vh·(Σs/Σ(s⊙z))."""
    return U @ torch.diag(s * z) @ Vh * (s.sum() / (s * z).sum())


@pytest.mark.parametrize("m, n", [(48, 32), (32, 48), (40, 40)])
def test_svf_delta_matches_reference_float64(m, n):
    W, U, s, Vh = _spectrum_matrix(m, n, seed=m + n)
    g = torch.Generator().manual_seed(7)
    z = (1 + 0.3 * torch.randn(min(m, n), generator=g)).clamp_min(0.05)          # fp32
    delta = svf_delta(U, s, Vh, z)
    assert delta.shape == (m, n) and delta.dtype == torch.float64
    ref = _reference(U, s, Vh, z.to(torch.float64))
    # svf_delta takes z in fp32 and (a 0-dim float64 c times an fp32 z stays fp32) forms c·z − 1 in fp32,
    # so even float64 factors give fp32-level accuracy: |error| ≲ s_max · 2⁻²³ ≈ 1.2e-6 here. A wrong formula
    # (no rescale, s instead of s⊙z, ...) is off by more than 1e-2.
    torch.testing.assert_close(W + delta, ref, rtol=0, atol=1e-6)
    assert (W + delta - W).abs().max() > 1e-2                                      # a real change
    # only the shape of z matters
    torch.testing.assert_close(svf_delta(U, s, Vh, 4 * z), delta, rtol=0, atol=1e-6)
    # the nuclear norm is kept
    torch.testing.assert_close(torch.linalg.svdvals(W + delta).sum(), s.sum(), rtol=1e-6, atol=0)
    # and without the rescale it would not match
    no_rescale = U @ torch.diag(s * z.double()) @ Vh
    assert (no_rescale - ref).abs().max() > 1e-2


def test_svf_delta_fp32_from_decompose():
    W64, *_ = _spectrum_matrix(64, 96, seed=3)
    W = W64.to(torch.float32)
    f = decompose({"w": W}, progress=False)["w"]
    z = (1 + 0.2 * torch.randn(64, generator=torch.Generator().manual_seed(1))).clamp_min(0.05)
    delta = svf_delta(f.U, f.s, f.Vh, z)
    assert delta.dtype == torch.float32
    ref = _reference(f.U.double(), f.s.double(), f.Vh.double(), z.double())
    torch.testing.assert_close((W + delta).double(), ref, rtol=0, atol=5e-5)


def test_svf_delta_uniform_z_is_identity():
    W, U, s, Vh = _spectrum_matrix(48, 32, seed=1)
    for value in (0.3, 1.0, 2.5):
        z = torch.full((32,), value)
        assert svf_delta(U, s, Vh, z).abs().max() < 2e-6            # fp32 c·z − 1 (see above)
    W32 = W.float()
    f = decompose({"w": W32}, progress=False)["w"]
    assert svf_delta(f.U, f.s, f.Vh, torch.full((32,), 0.7)).abs().max() < 1e-5
    # z ≡ 1 is exactly the identity: c = 1, so Δ = 0 and W' = W bit for bit
    assert torch.count_nonzero(svf_delta(f.U, f.s, f.Vh, torch.ones(32))) == 0
    m = SVFMatrix("w", W32.clone(), f)
    assert torch.equal(m.compose(torch.ones(32)), W32)


def test_svf_delta_is_differentiable_in_z():
    _, U, s, Vh = _spectrum_matrix(24, 16, seed=2, dtype=torch.float32)
    z = torch.rand(16, generator=torch.Generator().manual_seed(0)).add(0.5).requires_grad_()
    target = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))
    (svf_delta(U, s, Vh, z) * target).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().max() > 0


def test_svf_matrix_compose_casts_once():
    W64, *_ = _spectrum_matrix(32, 16, seed=5)
    Wb = W64.to(torch.bfloat16)
    f = decompose({"w": Wb}, progress=False)["w"]
    m = SVFMatrix("w", Wb.clone(), f)
    z = torch.linspace(0.5, 1.5, 16)
    out = m.compose(z)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (Wb.float() + svf_delta(f.U, f.s, f.Vh, z)).to(torch.bfloat16))
    with pytest.raises(AssertionError):
        SVFMatrix("w", Wb.T.clone(), f)                                  # shape mismatch


# ============================================ ModelPatcher on the tiny model ============================================

@pytest.fixture(scope="module")
def factors(tiny_model_dir, tmp_path_factory) -> dict[str, Factors]:
    f, _ = load_factors(tiny_model_dir, tmp_path_factory.mktemp("factors"), progress=False)
    return f


def _load(model_dir, dtype):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def _patched_model(model_dir, dtype, factors, cache_bytes):
    model = _load(model_dir, dtype)
    params = dict(model.named_parameters())
    original = {n: p.detach().clone() for n, p in params.items()}
    matrices = {n: SVFMatrix(n, params[n], factors[n]) for n in factors}
    return model, params, original, ModelPatcher(matrices, cache_bytes=cache_bytes)


def _test_experts(ranks) -> dict[str, Expert]:
    ex = {f"e{i}": random_expert(f"e{i}", ranks, scale=0.3 + 0.1 * i, seed=10 + i) for i in range(4)}
    some = [N1, N3]                                                # an expert covering two matrices only
    ex["part"] = Expert("part", {n: random_expert("p", ranks, 0.5, seed=99).z[n] for n in some})
    return ex


def _adaptations(names, rng: random.Random) -> list[Adaptation]:
    out = [BASE] + [Adaptation.of({n: 1.0}) for n in names]
    for _ in range(5):
        k = rng.randint(2, 3)
        out.append(Adaptation.of({n: rng.uniform(0.1, 1.0) for n in rng.sample(names, k)}))
    out.append(Adaptation.of({"e0": 1, "part": 1}))
    assert len({a.key for a in out}) == len(out)
    return out


def _expected(factors, original, experts, a: Adaptation) -> dict[str, torch.Tensor]:
    """A fresh composition of `a`, with SVFMatrix objects of its own over copies of the original weights."""
    z = mix_z(experts, a)
    out = {}
    for n in factors:
        fresh = SVFMatrix(n, original[n].clone(), factors[n])
        out[n] = fresh.compose(z[n]) if n in z else original[n]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("budget", ["small", "large"])
def test_random_swaps_are_exact(tiny_model_dir, factors, dtype, budget):
    model, params, original, patcher = _patched_model(tiny_model_dir, dtype, factors, 0)
    experts = _test_experts(patcher.ranks)
    rng = random.Random(f"{dtype}-{budget}")
    adaptations = _adaptations(list(experts), rng)
    expected = {a.key: _expected(factors, original, experts, a) for a in adaptations}
    z_sizes = {a.key: sum(original[n].numel() * original[n].element_size() for n in mix_z(experts, a))
               for a in adaptations}
    full = sum(original[n].numel() * original[n].element_size() for n in factors)
    patcher.cache_bytes = int(2.5 * full) if budget == "small" else 1 << 30

    lru: OrderedDict[str, int] = OrderedDict()          # a model of the LRU cache: key → bytes
    hows, composed_per_key = [], {}
    for step in range(64):
        a = rng.choice(adaptations)
        calls = []
        prev = patcher.current
        swaps = patcher.swaps
        report = patcher.apply(a.key, lambda a=a: calls.append(a.key) or mix_z(experts, a))
        hows.append(report.how)
        assert report.key == a.key and report.ms >= 0
        # the way it took
        if a.key == prev:
            assert report.how == "noop" and patcher.swaps == swaps
        elif a.is_base:
            assert report.how == "restore"
        elif a.key in lru:
            assert report.how == "cached"
            lru.move_to_end(a.key)
        else:
            assert report.how == "composed"
            composed_per_key[a.key] = composed_per_key.get(a.key, 0) + 1
            size = z_sizes[a.key]
            if size <= patcher.cache_bytes:
                while lru and sum(lru.values()) + size > patcher.cache_bytes:
                    lru.popitem(last=False)
                lru[a.key] = size
        assert calls == ([a.key] if report.how == "composed" else [])
        assert patcher.current == a.key
        if report.how != "noop":
            assert patcher.swaps == swaps + 1
        assert patcher.cached_keys == list(lru)
        assert patcher.cached_bytes() <= patcher.cache_bytes
        assert patcher.cached_bytes() == sum(lru.values())
        # the live weights are exactly a fresh composition of the adaptation
        for n in factors:
            assert torch.equal(params[n].detach(), expected[a.key][n]), (step, a.key, report.how, n)
            assert params[n].dtype == dtype
        if a.is_base:
            for n, p in params.items():
                assert torch.equal(p.detach(), original[n]), (step, n)
        else:
            for n, p in params.items():                                  # nothing else is touched
                if n not in factors:
                    assert torch.equal(p.detach(), original[n]), (step, n)
    assert "restore" in hows and "composed" in hows
    if budget == "small":
        assert len(lru) <= 2
        assert max(composed_per_key.values()) > 1                         # evicted, then composed again
    else:
        assert "cached" in hows
        assert max(composed_per_key.values()) == 1                        # composed once, then cached
    # every non-base adaptation differs from the base (the test can see a missed write)
    for a in adaptations:
        if not a.is_base:
            assert any(not torch.equal(expected[a.key][n], original[n]) for n in factors), a.key


def test_apply_current_key_is_noop(tiny_model_dir, factors):
    model, params, original, patcher = _patched_model(tiny_model_dir, torch.float32, factors, 1 << 30)
    experts = _test_experts(patcher.ranks)
    assert patcher.apply(BASE_KEY).how == "noop" and patcher.swaps == 0
    r = patcher.apply("e1", lambda: mix_z(experts, Adaptation.of({"e1": 1})))
    assert r.how == "composed" and patcher.swaps == 1
    snapshot = {n: params[n].detach().clone() for n in factors}
    boom = lambda: (_ for _ in ()).throw(AssertionError("z_of must not be called"))  # noqa: E731
    r = patcher.apply("e1", boom)
    assert r == type(r)("e1", "noop", 0.0)
    assert patcher.swaps == 1 and patcher.current == "e1"
    assert all(torch.equal(params[n].detach(), snapshot[n]) for n in factors)
    assert patcher.apply(BASE_KEY).how == "restore"
    assert patcher.apply("e1", boom).how == "cached"                      # cached: z_of not needed


def test_oversized_adaptation_is_applied_not_cached(tiny_model_dir, factors):
    model, params, original, patcher = _patched_model(tiny_model_dir, torch.float32, factors, 1000)
    experts = _test_experts(patcher.ranks)
    a = Adaptation.of({"e2": 1})
    exp = _expected(factors, original, experts, a)
    assert patcher.apply(a.key, lambda: mix_z(experts, a)).how == "composed"
    assert patcher.cached_keys == [] and patcher.cached_bytes() == 0
    assert all(torch.equal(params[n].detach(), exp[n]) for n in factors)
    patcher.apply(BASE_KEY)
    assert patcher.apply(a.key, lambda: mix_z(experts, a)).how == "composed"


def test_forget_drops_cached_weights(tiny_model_dir, factors):
    model, params, original, patcher = _patched_model(tiny_model_dir, torch.float32, factors, 1 << 30)
    experts = _test_experts(patcher.ranks)
    for k in ("e0", "e1", "e2"):
        patcher.apply(k, lambda k=k: mix_z(experts, Adaptation.of({k: 1})))
    assert patcher.cached_keys == ["e0", "e1", "e2"]
    patcher.forget("e1")
    patcher.forget("not-there")
    assert patcher.cached_keys == ["e0", "e2"]
    assert patcher.apply("e1", lambda: mix_z(experts, Adaptation.of({"e1": 1}))).how == "composed"
    patcher.forget()
    assert patcher.cached_keys == [] and patcher.cached_bytes() == 0


def test_forget_current_key_then_reapply_uses_new_z(tiny_model_dir, factors):
    model, params, original, patcher = _patched_model(tiny_model_dir, torch.float32, factors, 1 << 30)
    ranks = patcher.ranks
    old, new = random_expert("m", ranks, 0.3, seed=1), random_expert("m", ranks, 0.3, seed=2)
    patcher.apply("m", lambda: mix_z({"m": old}, Adaptation.of({"m": 1})))
    patcher.forget("m")                                               # "an expert was unloaded" ... and reloaded
    patcher.apply("m", lambda: mix_z({"m": new}, Adaptation.of({"m": 1})))
    exp = _expected(factors, original, {"m": new}, Adaptation.of({"m": 1}))
    assert all(torch.equal(params[n].detach(), exp[n]) for n in factors)


def test_expert_named_base_is_not_the_base_weights(tiny_model_dir, factors, tmp_path):
    model, params, original, patcher = _patched_model(tiny_model_dir, torch.float32, factors, 1 << 30)
    path = random_expert("base", patcher.ranks, 0.5, seed=1).save(tmp_path / "base.safetensors")
    try:
        e = Expert.load(path)
    except ExpertError:
        return                                                        # refusing the name is a fix too
    a = Adaptation.of({e.name: 1.0})
    patcher.apply(a.key, lambda: mix_z({e.name: e}, a))
    assert any(not torch.equal(params[n].detach(), original[n]) for n in factors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_under_expert_and_back_to_base(tiny_model_dir, factors, dtype):
    model, params, original, patcher = _patched_model(tiny_model_dir, dtype, factors, 1 << 30)
    experts = _test_experts(patcher.ranks)
    ids = torch.tensor([[1, 5, 42, 77, 100, 200, 300, 17, 9, 250]])
    with torch.no_grad():
        base = model(ids).logits.clone()
        for key in ("e3", "e0"):
            patcher.apply(key, lambda key=key: mix_z(experts, Adaptation.of({key: 1})))
            adapted = model(ids).logits
            assert (adapted - base).abs().max() > 1e-2, key
            patcher.apply(BASE_KEY)
            assert torch.equal(model(ids).logits, base)
        # cached path gives the same logits as the composed path
        patcher.apply("e3")
        again = model(ids).logits
        fresh_model, fresh_params, _, fresh_patcher = _patched_model(tiny_model_dir, dtype, factors, 0)
        fresh_patcher.apply("e3", lambda: mix_z(experts, Adaptation.of({"e3": 1})))
        assert torch.equal(fresh_model(ids).logits, again)
        patcher.apply(BASE_KEY)
        assert torch.equal(model(ids).logits, base)
