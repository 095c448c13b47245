"""Few-shot adaptation: search expert mixing weights on a handful of labelled examples, save a profile.

Contract: `fewshot_profile(...)` runs CEM (experts/train/cem.py) over α — per expert, or per expert per
matrix as the reference's per_layer — scoring each α by greedy accuracy on the shots, ties broken by the mean
log-likelihood of the reference answers (the paper's objective; `score="accuracy"`), or by that
log-likelihood alone (`score="loglik"`: no generation, one forward pass per α, a score that moves with every
change of α where a model that solves none of the shots gives accuracy 0 everywhere). The best α's mixed z' is saved as an
expert file with label `profile`: since W' depends only on z', that file *is* the adaptation, so the server
serves it like any expert (model id `<base>:<profile>`, listed in /v1/models) with no per-request search.
The profile's description records the experts and weights it was mixed from, and which examples were the shots.
An expert with no z-vectors (`BASE_COMPONENT`, what `t2 fewshot --with-base` adds) counts as z = 1 in every
matrix: with it the search space holds the base weights and every blend between them and the experts, so
a search on a task the experts do not help can settle on little adaptation instead of the least bad blend.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from experts.expert import Expert
from experts.svd import Factors
from experts.train.cem import CEMConfig, CEMResult, MixSpace, cem, mixed_z
from experts.train.rollout import Rollouts, patched_weights

PROFILE_LABEL = "profile"
BASE_COMPONENT = "base"         # an expert with no z-vectors: z' = 1, the base weights, as one more mix component


def fewshot_profile(model: Any, tokenizer: Any, factors: Mapping[str, Factors], experts: Mapping[str, Expert],
                    shots: Any, name: str, *, per_matrix: bool = False, config: CEMConfig = CEMConfig(),
                    max_new_tokens: int = 96, log: bool = True, score: str = "accuracy",
                    shot_indices: Sequence[int] | None = None) -> tuple[Expert, CEMResult]:
    """1. the objective over α; 2. the base's score on the shots, then CEM; 3. the best α's z' as a profile
    expert. `shot_indices` (the shots' positions in the full task) go into the description, so that `t2 eval`
    can keep them out of the profile's score."""
    if score not in ("accuracy", "loglik"):
        raise ValueError(f"score must be 'accuracy' or 'loglik', got {score!r}")
    # 1. objective
    rollouts = Rollouts(model, tokenizer, max_new_tokens, 0.0, batch_size=max(1, len(shots.examples)))
    params = dict(model.named_parameters())
    base = {n: params[n].data for n in factors}
    space = MixSpace.of(experts, per_matrix)
    answers = [shots.reference_text(e) for e in shots.examples]

    calls = 0

    def objective(alpha: np.ndarray) -> tuple[float, float]:
        nonlocal calls
        z = mixed_z(space, experts, alpha)
        with torch.no_grad():
            w = patched_weights(base, factors, z) if z else None
            ll = rollouts.answer_loglik(shots, shots.examples, w, answers)
            value = (rollouts.accuracy(shots, w), ll) if score == "accuracy" else (ll, 0.0)
        calls += 1
        if log:                 # one evaluation is len(shots) generations: minutes on a CPU, so say each one
            print(f"cem evaluation {calls}/{config.population * config.iterations}  "
                  + (f"accuracy {value[0]:.3f}  " if score == "accuracy" else "") + f"loglik {ll:+.4f}",
                  file=sys.stderr, flush=True)
        return value

    # 2. the base weights' score on the same shots (the bar a profile has to clear), then the search
    with torch.no_grad():
        base_ll = rollouts.answer_loglik(shots, shots.examples, None, answers)
        base_score = (rollouts.accuracy(shots, None), base_ll) if score == "accuracy" else (base_ll, 0.0)
    if log:
        print(f"base weights: {score} on the shots {base_score[0]:+.4f}", file=sys.stderr, flush=True)
    result = cem(objective, space.dim, config, log=log)
    # 3. profile
    z = mixed_z(space, experts, result.alpha)
    table = space.weights(result.alpha)
    desc = {"task": shots.name, "experts": list(space.experts), "per_matrix": per_matrix,
            "shots": len(shots.examples), "score": score, score + "_on_shots": result.score[0],
            "base_" + score + "_on_shots": base_score[0], "weights": table["*"] if not per_matrix else "per matrix"}
    if shot_indices is not None:
        desc["shot_indices"] = [int(i) for i in shot_indices]
    any_expert = next((e for e in experts.values() if e.z), next(iter(experts.values())))   # not the base component
    profile = Expert(name=name, z={n: t.float().cpu() for n, t in z.items()}, label=PROFILE_LABEL,
                     description=json.dumps(desc), base_model=any_expert.base_model,
                     base_fingerprint=any_expert.base_fingerprint)
    return profile, result
