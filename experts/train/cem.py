"""Few-shot adaptation: the cross-entropy method (CEM) over expert mixing weights α.

Contract:
- `cem(objective, dim, config)` maximises `objective(α) -> (score, tiebreak)` over α ∈ [0, 1]^dim, compared
  lexicographically (the paper: score = accuracy on the shots, tiebreak = mean log-likelihood of the correct
  answers). Each iteration samples `population` vectors α ~ N(μ, σ) clamped to [0, 1], evaluates them,
  refits μ and σ (per coordinate) to the best `int(population · elite_ratio)` (at least 2 where the population
  allows: the std of a single elite is 0, which would end the exploration after one iteration) and keeps the
  best α ever evaluated, which is what it returns (not μ). Once σ is 0 in every coordinate (a collapsed
  search with `min_std` 0) every further sample would be μ again, so the search stops there. Defaults
  follow the paper/reference: population 32, elite ratio 0.2, initial σ 0.5; μ starts at `init_mean` (0.5
  in every coordinate unless given). The sampler is `numpy.random.default_rng(seed)`: the same seed and
  objective give the same search.
  `progress(it)` is called after every iteration with a `CEMIteration`; `log=True` also prints one line per
  iteration to stderr. `stop_score` ends the search early once the best score reaches it.
- `MixSpace` maps a flat α to the mixing weights it means: per expert (`per_matrix=False`, K numbers, the
  paper's form) or per expert per matrix (`per_matrix=True`, K·M numbers, the reference's `per_layer`).
  `mixed_z(space, experts, α)` gives the z' to patch, mixing **z** (after the sigmoid) as experts/mix.py
  does: z'[m] = Σ_k w_{k,m} z_k[m] with w normalised to sum 1 per matrix (the rescale c of the SVF formula
  makes the scale of z' irrelevant, so normalising changes nothing but the numerics); an expert that does
  not cover m counts as z_k = 1 there; a matrix whose weights are all 0 keeps the base weights.
  Per expert, `space.adaptation(α)` is the equivalent `Adaptation` (one hashable key for the server).

What the reference (SakanaAI/self-adaptive-llms) does differently: it mixes the experts' **raw parameters p**
(before the sigmoid) — p' = Σ_k α_k p_k, then z' = sigmoid(p') — with α not normalised; the paper describes
mixing z. Mixing p is not the same adaptation (sigmoid is not linear, and α's scale matters there: α = 0
gives z' = 0.5 everywhere, i.e. the base after the rescale). Experts stored by this project hold z only
(experts/expert.py), so z is what we mix; `logit` of a z file would recover p where that is needed.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from experts.expert import Expert
from experts.mix import Adaptation

Score = tuple[float, float]                    # (score, tiebreak): compared lexicographically, higher is better
Objective = Callable[[np.ndarray], Score]


@dataclass(frozen=True)
class CEMConfig:
    population: int = 32
    elite_ratio: float = 0.2
    iterations: int = 50
    init_std: float = 0.5
    init_mean: float | Sequence[float] = 0.5
    min_std: float = 0.0                       # floor on σ (0: as the reference; >0 keeps exploring)
    seed: int = 0
    stop_score: float | None = None            # stop once the best score reaches this (e.g. 1.0 = all shots right)

    @property
    def n_elite(self) -> int:
        return min(self.population, max(2, int(self.population * self.elite_ratio)))


@dataclass(frozen=True)
class CEMIteration:
    iteration: int                             # 1-based
    best: Score                                # best ever, after this iteration
    elite_mean_score: float
    population_mean_score: float
    mean: np.ndarray                           # μ after the refit
    std: np.ndarray                            # σ after the refit
    evaluations: int                           # objective calls so far
    seconds: float


@dataclass
class CEMResult:
    alpha: np.ndarray                          # the best α evaluated
    score: Score
    evaluations: int
    history: list[CEMIteration] = field(default_factory=list)


def cem(objective: Objective, dim: int, config: CEMConfig = CEMConfig(),
        progress: Callable[[CEMIteration], None] | None = None, log: bool = False) -> CEMResult:
    """Maximise `objective` over [0, 1]^dim by the cross-entropy method (see the module contract)."""
    if dim < 1 or config.population < 1 or not 0 < config.elite_ratio <= 1:
        raise ValueError(f"bad CEM setup: dim={dim}, population={config.population}, elite_ratio={config.elite_ratio}")
    rng = np.random.default_rng(config.seed)
    mu = np.broadcast_to(np.asarray(config.init_mean, dtype=np.float64), (dim,)).copy()
    sigma = np.full(dim, float(config.init_std))
    best_alpha, best = mu.copy(), (-math.inf, -math.inf)
    history: list[CEMIteration] = []
    evals = 0
    t0 = time.perf_counter()
    for it in range(1, config.iterations + 1):
        # 1. sample the population, clamped to the box
        pop = np.clip(mu + sigma * rng.standard_normal((config.population, dim)), 0.0, 1.0)
        # 2. evaluate; a non-finite score counts as the worst
        scores = []
        for a in pop:
            s = objective(a.copy())
            s = (float(s[0]), float(s[1]))
            scores.append(tuple(v if math.isfinite(v) else -math.inf for v in s))
        evals += len(pop)
        # 3. rank (stable: on equal scores the earlier sample wins) and keep the best ever
        order = sorted(range(len(pop)), key=lambda i: scores[i], reverse=True)
        if scores[order[0]] > best:
            best, best_alpha = scores[order[0]], pop[order[0]].copy()
        # 4. refit μ, σ to the elite
        elite = pop[order[:config.n_elite]]
        mu = elite.mean(axis=0)
        sigma = np.maximum(elite.std(axis=0), config.min_std)
        rec = CEMIteration(it, best, float(np.mean([scores[i][0] for i in order[:config.n_elite]])),
                           float(np.mean([s[0] for s in scores])), mu.copy(), sigma.copy(), evals,
                           time.perf_counter() - t0)
        history.append(rec)
        if progress:
            progress(rec)
        if log:
            print(f"cem {it:3d}/{config.iterations}  best {best[0]:.4f} ({best[1]:+.4f})  "
                  f"elite {rec.elite_mean_score:.4f}  pop {rec.population_mean_score:.4f}  "
                  f"σ̄ {float(sigma.mean()):.3f}  {rec.seconds:.1f}s", file=sys.stderr, flush=True)
        # 5. stop early when the target is reached, or when σ collapsed (every further sample would be μ)
        if config.stop_score is not None and best[0] >= config.stop_score:
            break
        if float(sigma.max()) == 0.0:
            break
    return CEMResult(best_alpha, best, evals, history)


def random_search(objective: Objective, dim: int, budget: int, seed: int = 0) -> CEMResult:
    """Uniform samples in [0, 1]^dim, keep the best: the baseline CEM must beat at equal budget."""
    rng = np.random.default_rng(seed)
    best_alpha, best = np.zeros(dim), (-math.inf, -math.inf)
    for _ in range(budget):
        a = rng.random(dim)
        s = objective(a.copy())
        s = (float(s[0]), float(s[1]))
        if s > best:
            best, best_alpha = s, a
    return CEMResult(best_alpha, best, budget)


# ============================================== mixing weights ==============================================

@dataclass(frozen=True)
class MixSpace:
    """How a flat α maps to mixing weights: per expert (K) or per expert per matrix (K·M, matrix-major)."""

    experts: tuple[str, ...]
    matrices: tuple[str, ...] = ()             # needed (non-empty) when per_matrix
    per_matrix: bool = False

    def __post_init__(self):
        if not self.experts:
            raise ValueError("a mix space needs at least one expert")
        if self.per_matrix and not self.matrices:
            raise ValueError("per-matrix mixing needs the matrix names")

    @classmethod
    def of(cls, experts: Mapping[str, Expert], per_matrix: bool = False) -> "MixSpace":
        names = tuple(sorted(experts))
        mats = tuple(sorted({m for e in experts.values() for m in e.z}))
        return cls(names, mats, per_matrix)

    @property
    def dim(self) -> int:
        return len(self.experts) * (len(self.matrices) if self.per_matrix else 1)

    def weights(self, alpha: np.ndarray) -> dict[str, dict[str, float]]:
        """{matrix: {expert: w}} (per matrix) or {"*": {expert: w}} (per expert), raw (not normalised)."""
        a = np.asarray(alpha, dtype=np.float64).reshape(-1)
        if a.size != self.dim:
            raise ValueError(f"α has {a.size} values, the space has {self.dim}")
        k = len(self.experts)
        if not self.per_matrix:
            return {"*": dict(zip(self.experts, map(float, a)))}
        return {m: dict(zip(self.experts, map(float, a[i * k:(i + 1) * k]))) for i, m in enumerate(self.matrices)}

    def adaptation(self, alpha: np.ndarray) -> Adaptation:
        """The per-expert α as the server's `Adaptation` (weights normalised to sum 1)."""
        if self.per_matrix:
            raise ValueError("a per-matrix mix is not an Adaptation (which holds one weight per expert)")
        return Adaptation.of(self.weights(alpha)["*"])

    def key(self, alpha: np.ndarray, prefix: str = "mix") -> str:
        """A stable cache key for this α (rounded to 6 digits), usable with ModelPatcher.apply."""
        a = np.round(np.asarray(alpha, dtype=np.float64).reshape(-1), 6)
        return f"{prefix}-{hashlib.sha1(a.tobytes() + repr(self).encode()).hexdigest()[:16]}"


def mixed_z(space: MixSpace, experts: Mapping[str, Expert], alpha: np.ndarray) -> dict[str, torch.Tensor]:
    """z' per matrix for α (see the module contract): Σ_k w_k z_k with w normalised per matrix."""
    missing = [e for e in space.experts if e not in experts]
    if missing:
        raise KeyError(f"experts not loaded: {missing}")
    table = space.weights(alpha)
    mats = space.matrices or tuple(sorted({m for e in space.experts for m in experts[e].z}))
    out: dict[str, torch.Tensor] = {}
    for m in mats:
        w = table[m] if space.per_matrix else table["*"]
        if not any(experts[e].z.get(m) is not None for e in space.experts):
            continue                                          # no expert covers m: base weights
        total = sum(max(0.0, v) for v in w.values())
        if total <= 0:
            continue                                          # all weights 0: base weights
        z = None
        for e in space.experts:
            c = max(0.0, w[e]) / total
            if c == 0:
                continue
            ze = experts[e].z.get(m)
            term = c * ze if ze is not None else c            # uncovered: z_k = 1
            z = term if z is None else z + term
        if isinstance(z, torch.Tensor):
            out[m] = z
        # z a float: only experts that do not cover m have weight, i.e. z' = const: the base weights
    return out
