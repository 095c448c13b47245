"""experts/train/cem.py: CEM on synthetic objectives with a known optimum, and the mixing spaces it searches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experts.expert import Expert
from experts.mix import Adaptation, mix_z
from experts.train.cem import CEMConfig, MixSpace, cem, mixed_z, random_search

TARGET = np.array([0.15, 0.8, 0.55, 0.95, 0.3, 0.65])


def quadratic(alpha: np.ndarray) -> tuple[float, float]:
    return -float(np.sum((alpha - TARGET) ** 2)), 0.0


def test_cem_defaults_are_the_papers():
    c = CEMConfig()
    assert (c.population, c.elite_ratio, c.init_std, c.n_elite) == (32, 0.2, 0.5, 6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cem_beats_random_search_at_the_same_budget(seed):
    cfg = CEMConfig(iterations=15, seed=seed)                # the reference's settings: σ = elite std, no floor
    res = cem(quadratic, TARGET.size, cfg)
    rnd = random_search(quadratic, TARGET.size, budget=cfg.population * cfg.iterations, seed=seed)
    assert res.evaluations == rnd.evaluations == 480
    err, rnd_err = np.abs(res.alpha - TARGET).max(), np.abs(rnd.alpha - TARGET).max()
    dist2, rnd_dist2 = -res.score[0], -rnd.score[0]          # scores are −distance²
    assert dist2 < rnd_dist2 / 4 and err < rnd_err, (dist2, rnd_dist2, err, rnd_err)
    assert np.all((res.alpha >= 0) & (res.alpha <= 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cem_with_a_std_floor_finds_the_optimum(seed):
    # with σ free to collapse, 6 elites in 6 dimensions can stall short of the optimum (seed 1 stops 0.09 away
    # in one coordinate); a small floor keeps exploring and reaches it
    res = cem(quadratic, TARGET.size, CEMConfig(iterations=15, seed=seed, min_std=0.02))
    assert np.abs(res.alpha - TARGET).max() < 0.02, res.alpha


def test_cem_keeps_the_best_and_respects_the_box():
    seen = []

    def edge(alpha):            # optimum on the boundary: clamping must let CEM reach it exactly
        seen.append(alpha.copy())
        return float(alpha[0] - alpha[1]), 0.0

    res = cem(edge, 2, CEMConfig(iterations=8, seed=3))
    assert all(((a >= 0) & (a <= 1)).all() for a in seen)
    assert len(seen) % 32 == 0 and len(seen) <= 8 * 32     # stops early once the elite all sit on the corner
    assert res.score[0] == pytest.approx(1.0) and res.alpha.tolist() == [1.0, 0.0]
    assert res.score == max((float(a[0] - a[1]), 0.0) for a in seen)          # the best ever evaluated


def test_cem_uses_the_tiebreak_on_a_discrete_score():
    # accuracy-like score in steps of 0.1 (flat almost everywhere); the tiebreak carries the gradient
    def stepped(alpha):
        d = float(np.sum((alpha - TARGET[:3]) ** 2))
        return round(max(0.0, 1 - d) * 10) / 10, -d

    res = cem(stepped, 3, CEMConfig(iterations=15, seed=0))
    assert res.score[0] == 1.0 and np.abs(res.alpha - TARGET[:3]).max() < 0.05


def test_cem_is_deterministic_and_reports_progress():
    seen = []
    a = cem(quadratic, TARGET.size, CEMConfig(iterations=4, seed=11), progress=seen.append)
    b = cem(quadratic, TARGET.size, CEMConfig(iterations=4, seed=11))
    assert np.array_equal(a.alpha, b.alpha) and a.score == b.score
    assert [h.iteration for h in seen] == [1, 2, 3, 4] and seen == a.history
    assert [h.evaluations for h in seen] == [32, 64, 96, 128]
    assert all(x.best <= y.best for x, y in zip(seen, seen[1:]))              # best-so-far never drops
    assert seen[-1].std.mean() < 0.5                                          # σ shrank from its start


def test_cem_stops_at_the_target_score_and_logs(capsys):
    res = cem(lambda a: (1.0, 0.0), 2, CEMConfig(iterations=50, stop_score=1.0), log=True)
    assert len(res.history) == 1 and res.evaluations == 32
    assert "cem   1/50" in capsys.readouterr().err


def test_cem_rejects_bad_setups():
    with pytest.raises(ValueError):
        cem(quadratic, 0)
    with pytest.raises(ValueError):
        cem(quadratic, 2, CEMConfig(elite_ratio=0))


# ================================================ mix spaces ================================================

M1, M2, M3 = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def experts():
    g = torch.Generator().manual_seed(0)
    z = lambda n: torch.rand(n, generator=g) + 0.5  # noqa: E731
    return {"code": Expert("code", {M1: z(4), M2: z(3)}),
            "math": Expert("math", {M1: z(4), M2: z(3), M3: z(5)})}


def test_per_expert_mix_equals_the_servers_mix(experts):
    space = MixSpace.of(experts)
    assert space.experts == ("code", "math") and space.dim == 2
    alpha = np.array([0.25, 0.75])
    ours = mixed_z(space, experts, alpha)
    server = mix_z(experts, space.adaptation(alpha))
    assert space.adaptation(alpha) == Adaptation.of({"code": 1, "math": 3})
    assert set(ours) == set(server) == {M1, M2, M3}
    for m in ours:
        torch.testing.assert_close(ours[m], server[m])
    # M3 is covered by math only: code counts as z = 1 there
    torch.testing.assert_close(ours[M3], 0.25 + 0.75 * experts["math"].z[M3])
    # the scale of α does not matter (the SVF rescale makes it irrelevant), zeros give the base weights
    for m, t in mixed_z(space, experts, alpha * 0.1).items():
        torch.testing.assert_close(t, ours[m])
    assert mixed_z(space, experts, np.zeros(2)) == {}


def test_per_matrix_mix_weights_each_matrix(experts):
    space = MixSpace.of(experts, per_matrix=True)
    assert space.matrices == tuple(sorted((M1, M2, M3))) and space.dim == 6
    # matrix-major: [m0: code, math], [m1: code, math], [m2: code, math]
    alpha = np.array([1.0, 0.0,   0.0, 0.0,   0.5, 0.5])
    w = space.weights(alpha)
    assert w[space.matrices[0]] == {"code": 1.0, "math": 0.0}
    z = mixed_z(space, experts, alpha)
    m0, m1, m2 = space.matrices
    torch.testing.assert_close(z[m0], experts["code"].z[m0])                 # code only
    assert m1 not in z                                                       # all weights 0: base
    assert (m0, m1, m2) == (M2, M1, M3)
    torch.testing.assert_close(z[m2], 0.5 * 1.0 + 0.5 * experts["math"].z[m2])    # code does not cover M3: z = 1
    with pytest.raises(ValueError, match="not an Adaptation"):
        space.adaptation(alpha)
    with pytest.raises(ValueError, match="6"):
        space.weights(np.ones(4))
    assert space.key(alpha) == space.key(alpha.copy()) != space.key(np.ones(6))


def test_cem_over_a_mix_space_recovers_a_target_mix(experts):
    # a synthetic "task": the closer z' is to a hidden 30/70 blend, the better
    space = MixSpace.of(experts)
    want = mix_z(experts, Adaptation.of({"code": 0.3, "math": 0.7}))

    def objective(alpha):
        z = mixed_z(space, experts, alpha)
        if not z:
            return -1e9, 0.0
        # a matrix absent from z' keeps the base weights: z' = 1 there
        return -sum(float(((z.get(m, torch.ones_like(want[m])) - want[m]) ** 2).sum()) for m in want), 0.0

    res = cem(objective, space.dim, CEMConfig(iterations=12, seed=0))
    got = space.adaptation(res.alpha).as_dict()
    assert got["code"] == pytest.approx(0.3, abs=0.03) and got["math"] == pytest.approx(0.7, abs=0.03)


def test_a_small_population_keeps_two_elites_and_a_collapsed_search_stops():
    # population 6 × elite ratio 0.2 would be one elite, whose std is 0: σ collapses after one iteration
    assert CEMConfig(population=6).n_elite == 2 and CEMConfig(population=1).n_elite == 1
    res = cem(quadratic, TARGET.size, CEMConfig(population=6, iterations=5, seed=0))
    assert res.history[0].std.mean() > 0                    # two elites: the search still explores
    calls = []

    def flat(alpha):
        calls.append(alpha.copy())
        return 0.0, 0.0

    one = cem(flat, 2, CEMConfig(population=1, iterations=10, seed=0))
    assert len(one.history) == 1 and len(calls) == 1        # σ = 0 after the first refit: nothing left to try
