"""SVF REINFORCE on the tiny model: a short real run moves accuracy on an easy task; only z trains; resume."""

import collections

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from experts.expert import Expert
from experts.svd import load_factors, model_fingerprint
from experts.tasks.base import Example, Task
from experts.train.reinforce import TrainConfig, Trainer

WORDS = "apple river stone cloud tiger green music paper light ocean forest garden window silver candle dragon".split()


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    factors, fp = load_factors(tiny_model_dir, tmp_path_factory.mktemp("f"), progress=False)
    prompts = [f"{a} {b}" for a in WORDS for b in WORDS[:3]]
    # the easy task: start the answer with the first character the base model most often starts with
    tok.padding_side = "left"
    text = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts]
    enc = tok(text, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
    target = collections.Counter(tok.batch_decode(out[:, -1:])).most_common(1)[0][0]
    task = Task("first-token", "test", [Example(p, target) for p in prompts], lambda t, e: t.startswith(e.answer))
    return model, tok, factors, fp, task.split(32)


def make(setup, run_dir, **kw):
    model, tok, factors, fp, (train, valid) = setup
    cfg = TrainConfig(**{**dict(steps=10, batch_size=8, lr=0.05, grad_clip=1.0, max_new_tokens=2, val_every=5,
                                val_size=16), **kw})
    return Trainer(model, tok, factors, train, valid, cfg, run_dir, expert_name="first", label="test",
                   base_model="tiny-llama", base_fingerprint=fp)


def test_short_run_moves_accuracy_and_trains_only_z(setup, tmp_path, tiny_model_dir):
    model = setup[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = make(setup, tmp_path / "run")
    history = t.fit(progress=False)
    base_acc = history[0]["val_acc"]
    assert 0 < base_acc < 1
    assert t.best_acc > base_acc                                     # the run improved validation accuracy
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())   # the model is untouched
    assert (tmp_path / "run" / "log.jsonl").exists() and len(history) == 11
    e = Expert.load(t.save_expert(tmp_path / "first.safetensors"))
    e.check_against({n: f.rank for n, f in setup[2].items()}, model_fingerprint(tiny_model_dir))
    assert t.accuracy(t.valid, z=e.z) == t.best_acc                 # the saved z is the best one


def test_kl_penalty_and_resume(setup, tmp_path):
    t = make(setup, tmp_path / "run", steps=5, kl_coef=0.1)
    t.fit(progress=False)
    assert all(h["kl"] >= 0 for h in t.history if "kl" in h) and any(h["kl"] > 0 for h in t.history if "kl" in h)
    p5 = [p.detach().clone() for p in t.policy.p]
    again = make(setup, tmp_path / "run", steps=7, kl_coef=0.1)         # resumes at step 5
    assert again.step_no == 5 and all(torch.equal(a, b.detach()) for a, b in zip(p5, again.policy.p))
    again.fit(progress=False)
    assert again.step_no == 7 and [h["step"] for h in again.history][-2:] == [6, 7]


def test_the_mean_baseline_gives_no_update_when_every_answer_is_wrong(setup, tmp_path):
    """All rewards −1: the reference's estimator still pushes (down) on what the model said; ours does not."""
    from dataclasses import replace
    model, tok, factors, fp, (train, valid) = setup
    hopeless = replace(train, grader=lambda text, example: False)
    rows = {}
    for baseline in (True, False):
        t = Trainer(model, tok, factors, hopeless, valid, TrainConfig(steps=2, batch_size=4, max_new_tokens=2,
                    baseline=baseline), tmp_path / f"run-{baseline}", expert_name="x", label="test")
        rows[baseline] = [t.step() for _ in range(2)]
    assert all(r["reward"] == -1 and r["grad_norm"] == 0 and r["loss"] == 0 for r in rows[True])
    assert all(r["reward"] == -1 and r["grad_norm"] > 0 for r in rows[False])


def _classifier_task(label: str):
    from experts.train.classifier import classification_task
    prompts = Task("words", label, [Example(f"{a} {b} {c}", "") for a in WORDS for b in WORDS[:4] for c in WORDS[:2]],
                   lambda t, e: False)
    return classification_task([prompts])


def test_choice_logprobs_with_the_shared_prefix_match_one_prompt_at_a_time(setup):
    from experts.dispatch import LABELS
    from experts.train.rollout import Rollouts
    model, tok, factors, fp, _ = setup
    task = _classifier_task("math")
    r = Rollouts(model, tok)
    prompts = r.prompts(task.examples[:5], task)
    first = r.choice_tokens(prompts[0], LABELS)
    batched = r.choice_logprobs(prompts, first, None)                                    # [5, 4]
    with torch.no_grad():
        single = torch.stack([torch.log_softmax(model(**tok(p, return_tensors="pt", add_special_tokens=False)
                                                      ).logits[0, -1, first].float(), -1) for p in prompts])
    assert torch.allclose(batched.detach(), single, atol=1e-4)


def test_the_labels_objective_trains_the_choice_the_server_makes(setup, tmp_path):
    """Cross-entropy over the labels' first tokens: a label the base rarely picks becomes the pick."""
    from experts.dispatch import LABELS
    from experts.train.rollout import Rollouts
    model, tok, factors, fp, _ = setup
    probe = _classifier_task("math")
    r = Rollouts(model, tok)
    prompts = r.prompts(probe.examples[:16], probe)
    picks = r.choice_logprobs(prompts, r.choice_tokens(prompts[0], LABELS), None).argmax(-1).tolist()
    rare = min(LABELS, key=lambda lab: picks.count(LABELS.index(lab)))
    train, valid = _classifier_task(rare).split(16)
    t = Trainer(model, tok, factors, train, valid, TrainConfig(steps=8, batch_size=8, lr=0.1, grad_clip=1.0,
                val_every=4, val_size=16, objective="labels"), tmp_path / "run", expert_name="clf", label="classifier")
    history = t.fit(progress=False)
    assert history[0]["val_acc"] < 0.5 and t.best_acc > history[0]["val_acc"]
    assert all(h["loss"] > 0 for h in history if "loss" in h)


def test_the_likelihood_objective_raises_the_references_likelihood(setup, tmp_path):
    """Supervised next-token likelihood of the task's reference answers (no rollouts): after a few steps
    the references, end-of-turn token included, are likelier under the trained z than under the base;
    the model's own weights stay untouched and validation still selects by greedy accuracy."""
    from dataclasses import replace
    model, tok, factors, fp, (train, valid) = setup
    before_w = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = replace(train, reference=lambda e: "ocean forest ocean")        # an answer the base does not give
    t = Trainer(model, tok, factors, train, valid, TrainConfig(steps=6, batch_size=8, lr=0.05, grad_clip=1.0,
                max_new_tokens=2, val_every=3, val_size=16, objective="likelihood"), tmp_path / "run",
                expert_name="ref", label="test")
    enc, ids = t.rollouts.encode_answers(t.rollouts.prompts(train.examples[:8], train),
                                         [train.reference_text(e) for e in train.examples[:8]], end=True)
    assert (ids[:, -1] == tok.convert_tokens_to_ids(tok.eos_token)).all()   # the end of turn is scored
    _, _, m = t.rollouts.token_logprobs(enc, ids, None)
    assert int(m[0].sum()) == ids.shape[1]                                  # every reference token, eos too

    def loglik(weights):
        with torch.no_grad():
            logp, _, m = t.rollouts.token_logprobs(enc, ids, weights)
        return float((logp * m).sum() / m.sum())

    base = loglik(None)
    history = t.fit(progress=False)
    trained = loglik({n: w.detach() for n, w in t.policy.patched().items()})
    assert trained > base + 0.5, (base, trained)
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 6 and steps[-1]["reward"] > steps[0]["reward"]     # logged: the likelihood rises
    assert all("val_acc" in h for h in history if h["step"] in (0, 3, 6))
    assert all(torch.equal(p, before_w[n]) for n, p in model.named_parameters())
