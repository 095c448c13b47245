"""The classification task trains the choice the server's first pass scores: same prompt, same forced prefix."""

from transformers import AutoTokenizer

from experts.dispatch import ANSWER_PREFIX, QUESTION_PREFIX, classification_messages
from experts.tasks.base import Example, Task
from experts.train.classifier import classification_task
from experts.train.rollout import Rollouts


def _task(name, label, n):
    return Task(name, label, [Example(f"{name} question {i}", "x") for i in range(n)], lambda t, e: True)


def test_prompts_end_with_the_servers_prefix_and_grading_reads_the_closed_box(tiny_model_dir):
    t = classification_task([_task("gsm", "math", 5), _task("mbpp", "code", 2), _task("arc", "reasoning", 3)])
    assert [e.answer for e in t.examples[:6]] == ["math", "code", "reasoning"] * 2   # balanced prefix
    assert sorted(e.answer for e in t.examples) == ["code"] * 2 + ["math"] * 5 + ["reasoning"] * 3
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ex = next(e for e in t.examples if e.answer == "math")
    prompt = Rollouts(None, tok).prompts([ex], t)[0]
    question = ex.prompt.removeprefix(QUESTION_PREFIX)
    server = tok.apply_chat_template(classification_messages(question), add_generation_prompt=True,
                                     tokenize=False) + ANSWER_PREFIX       # what serving.py scores labels after
    assert prompt == server
    assert t.correct("math}", ex) and t.correct("math} because it adds", ex)
    assert not t.correct("code}", ex) and not t.correct("math", ex) and not t.correct("", ex)
    assert t.reward("reasoning}", ex) == -1 and t.reward("math}", ex) == 1
