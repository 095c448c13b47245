"""The SVF rescale c = Σs / Σ(s ⊙ z): one check (experts.mix.rescale) at load, in every composition, for blends.

A degenerate z (here the probe's [1e-45, 0, …]) used to pass validation; c overflowed and the patched
weights became NaN. Now the file is refused when it is checked against the base's singular values, and a
composition that would give non-finite weights raises before anything is written.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from experts.errors import DegenerateZ, ExpertFormatError
from experts.expert import Expert, random_expert, uniform_expert
from experts.mix import C_RANGE, Adaptation, mix_z, rescale
from experts.patch import ModelPatcher, SVFMatrix
from experts.svd import Factors, decompose

R = 16


def tiny_z(r: int = R) -> torch.Tensor:
    z = torch.zeros(r)
    z[0] = 1e-45                                  # a denormal: > 0, so it passes the old checks
    return z


@pytest.fixture(scope="module")
def factors() -> dict[str, Factors]:
    g = torch.Generator().manual_seed(0)
    return decompose({"m.weight": torch.randn(24, R, generator=g)}, progress=False)


def test_rescale_of_ordinary_z_is_the_formula(factors):
    s = factors["m.weight"].s
    z = torch.rand(R, generator=torch.Generator().manual_seed(1)) + 0.1
    assert torch.allclose(rescale(s, z), s.sum() / (s * z).sum())
    assert torch.allclose(rescale(s, torch.ones(R)), torch.tensor(1.0))


@pytest.mark.parametrize("z", [tiny_z(), torch.zeros(R), torch.full((R,), 1e-5), torch.full((R,), 1e5),
                               torch.full((R,), float("nan"))], ids=["denormal", "zero", "tiny", "huge", "nan"])
def test_rescale_refuses_degenerate_z(factors, z):
    with pytest.raises(DegenerateZ, match=r"rescale c .* outside the sane range \[0.0001, 10000\]"):
        rescale(factors["m.weight"].s, z)


def test_range_edges_pass(factors):
    s = factors["m.weight"].s
    lo, hi = C_RANGE
    rescale(s, torch.full((R,), 1 / hi))           # c = 1e4
    rescale(s, torch.full((R,), 1 / lo))           # c = 1e-4


def test_check_against_refuses_the_file_naming_file_and_matrix(factors, tmp_path):
    good = random_expert("ok", {"m.weight": R}, 0.3, 1)
    bad = Expert("tiny", {"m.weight": tiny_z()})
    path = bad.save(tmp_path / "tiny.safetensors")
    loaded = Expert.load(path)                     # the file on its own is well-formed
    spectra = {"m.weight": factors["m.weight"].s}
    good.check_against({"m.weight": R}, "", spectra=spectra)
    with pytest.raises(ExpertFormatError) as e:
        loaded.check_against({"m.weight": R}, "", spectra=spectra)
    assert str(path) in str(e.value) and "'m.weight'" in str(e.value) and "rescale" in str(e.value)
    loaded.check_against({"m.weight": R}, "")      # without the spectra only the shapes are checked


def test_compose_never_returns_non_finite_weights_and_apply_writes_nothing(factors):
    w = torch.randn(24, R, generator=torch.Generator().manual_seed(0))
    live = w.clone()
    m = SVFMatrix("m.weight", live, factors["m.weight"])
    p = ModelPatcher({"m.weight": m})
    for z in (tiny_z(), torch.full((R,), float("inf"))):
        with pytest.raises(DegenerateZ, match="m.weight"):
            m.compose(z)
        with pytest.raises(DegenerateZ):
            p.apply("bad", lambda z=z: {"m.weight": z})
        assert torch.equal(live, w) and p.current == "base" and p.cached_keys == []
    # an ordinary z still composes (the guard costs nothing else)
    p.apply("ok", lambda: {"m.weight": torch.full((R,), 0.5)})
    assert torch.isfinite(live).all() and p.current == "ok"


def test_blends_of_valid_experts_are_valid(factors):
    """Σ(s⊙z') is a convex combination of the experts' Σ(s⊙z_k), so c' stays in range; checked at the edges
    (c = 1e4 and c = 1e-4), with the 6-digit rounding of three equal weights, and on random mixes."""
    s = factors["m.weight"].s
    lo, hi = C_RANGE
    edge = {"hi": uniform_expert("hi", {"m.weight": R}, 1 / hi), "lo": uniform_expert("lo", {"m.weight": R}, 1 / lo),
            "hi2": uniform_expert("hi2", {"m.weight": R}, 1 / hi), "hi3": uniform_expert("hi3", {"m.weight": R}, 1 / hi),
            "other": Expert("other", {"x.weight": torch.ones(4)})}      # covers m.weight with z = 1 (c = 1)
    for k in range(1, 4):
        for names in itertools.combinations(sorted(edge), k):
            ad = Adaptation.of({n: 1.0 for n in names})
            z = mix_z(edge, ad).get("m.weight")
            if z is not None:
                rescale(s, z)
    rnd = random.Random(0)
    pool = {f"e{i}": random_expert(f"e{i}", {"m.weight": R}, 0.9, i) for i in range(6)}
    for e in pool.values():
        rescale(s, e.z["m.weight"])
    for _ in range(50):
        ad = Adaptation.of({n: rnd.random() for n in rnd.sample(sorted(pool), rnd.randint(1, 6))})
        rescale(s, mix_z(pool, ad)["m.weight"])
