"""Few-shot CEM on the tiny model: the found profile is at least as good on the shots as the best single
expert, it is a valid expert file, and served as an expert it reproduces the searched adaptation."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from experts.expert import Expert, random_expert
from experts.mix import mix_z
from experts.svd import load_factors, model_ranks
from experts.tasks.base import Example, Task
from experts.train.cem import CEMConfig, MixSpace, mixed_z
from experts.train.fewshot import PROFILE_LABEL, fewshot_profile
from experts.train.rollout import Rollouts, patched_weights

WORDS = "apple river stone cloud tiger green music paper".split()


def test_fewshot_profile(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    factors, fp = load_factors(tiny_model_dir, tmp_path / "f", progress=False)
    ranks = model_ranks(tiny_model_dir)
    experts = {n: random_expert(n, ranks, 0.6, seed, base_fingerprint=fp) for n, seed in (("a", 1), ("b", 2), ("c", 3))}
    # shots: the first character that expert "b" makes the model say (so a mix leaning on b wins)
    shots_prompts = [f"{w} {v}" for w in WORDS for v in WORDS[:1]]
    task0 = Task("probe", "test", [Example(p, "") for p in shots_prompts], lambda t, e: True)
    ro = Rollouts(model, tok, max_new_tokens=1)
    params = dict(model.named_parameters())
    base = {n: params[n].data for n in factors}
    _, firsts = ro.generate(ro.prompts(task0.examples, task0), patched_weights(base, factors, experts["b"].z))
    shots = Task("shots", "test", [Example(p, f) for p, f in zip(shots_prompts, firsts)],
                 lambda t, e: t.startswith(e.answer))
    singles = {n: ro.accuracy(shots, patched_weights(base, factors, e.z)) for n, e in experts.items()}
    base_acc = ro.accuracy(shots, base)
    # the shots discriminate (b scores 1 by construction; the others and the base must not, or a search
    # that returned anything would pass)
    assert singles["b"] == 1.0 and max(singles["a"], singles["c"], base_acc) < 1.0, (singles, base_acc)
    profile, result = fewshot_profile(model, tok, factors, experts, shots, "shots-profile", max_new_tokens=1,
                                      config=CEMConfig(population=6, iterations=3, seed=0), log=False)
    assert result.score[0] == 1.0 > max(singles["a"], singles["c"])    # the search found a mix as good as b
    assert result.evaluations <= 18 and profile.label == PROFILE_LABEL
    # a valid expert file whose z reproduces the searched mix
    loaded = Expert.load(profile.save(tmp_path / "shots-profile.safetensors"))
    loaded.check_against(ranks, fp)
    space = MixSpace.of(experts)
    want = mixed_z(space, experts, result.alpha)
    assert all(torch.allclose(loaded.z[n], want[n]) for n in want)
    assert ro.accuracy(shots, patched_weights(base, factors, loaded.z)) == result.score[0]
    # per expert, the profile is the server's Adaptation of the same weights
    server_z = mix_z(experts, space.adaptation(result.alpha))
    assert all(torch.allclose(server_z[n], want[n], atol=1e-5) for n in want)


def test_fewshot_profile_by_loglik_prefers_the_expert_that_wrote_the_answers(tiny_model_dir, tmp_path):
    import json

    import pytest
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    factors, fp = load_factors(tiny_model_dir, tmp_path / "f", progress=False)
    ranks = model_ranks(tiny_model_dir)
    experts = {n: random_expert(n, ranks, 0.6, seed, base_fingerprint=fp) for n, seed in (("a", 1), ("b", 2), ("c", 3))}
    ro = Rollouts(model, tok, max_new_tokens=4)
    params = dict(model.named_parameters())
    base = {n: params[n].data for n in factors}
    task0 = Task("probe", "test", [Example(w, "") for w in WORDS], lambda t, e: True)
    _, texts = ro.generate(ro.prompts(task0.examples, task0), patched_weights(base, factors, experts["b"].z))
    # reference answers written by expert b; the grader accepts nothing, so accuracy is 0 for every mix
    shots = Task("shots", "test", [Example(w, t) for w, t in zip(WORDS, texts)], lambda t, e: False)
    ll = {n: ro.answer_loglik(shots, shots.examples, patched_weights(base, factors, e.z), texts)
          for n, e in experts.items()}
    assert ll["b"] > max(ll["a"], ll["c"])
    profile, result = fewshot_profile(model, tok, factors, experts, shots, "ll-profile", max_new_tokens=4,
                                      config=CEMConfig(population=6, iterations=3, seed=0), log=False,
                                      score="loglik")
    # the score moved although no shot is ever solved, and the search beat the experts b did not write for
    assert result.score[0] > max(ll["a"], ll["c"])
    again = ro.answer_loglik(shots, shots.examples, patched_weights(base, factors, profile.z), texts)
    assert abs(again - result.score[0]) < 1e-4                  # the saved z is what was scored
    desc = json.loads(profile.description)
    assert desc["score"] == "loglik" and desc["loglik_on_shots"] == result.score[0]
    with pytest.raises(ValueError, match="score"):
        fewshot_profile(model, tok, factors, experts, shots, "x", score="pass@k", log=False)


def test_with_the_base_component_the_search_can_choose_the_base_weights(tiny_model_dir, tmp_path):
    """Reference answers written by the base model itself: every expert blend scores below the base, and the
    search, given the base as one more component (an expert with no z-vectors), leans on it."""
    import json
    from experts.train.fewshot import BASE_COMPONENT
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    factors, fp = load_factors(tiny_model_dir, tmp_path / "f", progress=False)
    ranks = model_ranks(tiny_model_dir)
    experts = {n: random_expert(n, ranks, 0.6, seed, base_fingerprint=fp) for n, seed in (("a", 1), ("b", 2))}
    ro = Rollouts(model, tok, max_new_tokens=4)
    params = dict(model.named_parameters())
    base = {n: params[n].data for n in factors}
    task0 = Task("probe", "test", [Example(w, "") for w in WORDS], lambda t, e: True)
    _, texts = ro.generate(ro.prompts(task0.examples, task0), base)
    shots = Task("shots", "test", [Example(w, t) for w, t in zip(WORDS, texts)], lambda t, e: False)
    base_ll = ro.answer_loglik(shots, shots.examples, None, texts)
    # the base component alone is the base weights: nothing to patch
    space = MixSpace.of({**experts, BASE_COMPONENT: Expert(BASE_COMPONENT, {})})
    assert mixed_z(space, {**experts, BASE_COMPONENT: Expert(BASE_COMPONENT, {})}, [0.0, 0.0, 1.0]) == {}
    without, r0 = fewshot_profile(model, tok, factors, experts, shots, "p0", config=CEMConfig(population=6,
                                  iterations=3, seed=0), log=False, score="loglik")
    pool = {**experts, BASE_COMPONENT: Expert(BASE_COMPONENT, {})}
    with_base, r1 = fewshot_profile(model, tok, factors, pool, shots, "p1", config=CEMConfig(population=6,
                                    iterations=3, seed=0), log=False, score="loglik")
    assert r0.score[0] < base_ll                         # no blend of the experts alone reaches the base
    assert r1.score[0] > r0.score[0]                     # the base component closes part of the gap
    desc = json.loads(with_base.description)
    assert with_base.base_fingerprint == fp and desc["weights"][BASE_COMPONENT] > 0
    assert abs(desc["base_loglik_on_shots"] - base_ll) < 1e-4      # the bar the profile had to clear, recorded
