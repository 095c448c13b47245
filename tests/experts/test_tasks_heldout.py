"""The held-out test sets (experts/tasks/generate/heldout.py): reproducible, gradable by the tasks' own
graders, right by construction, and disjoint from the training generators by text, not only by seed."""

from __future__ import annotations

import collections
import re

import pytest

from experts.tasks import load_task
from experts.tasks.base import write_jsonl
from experts.tasks.generate import FORMAT_OF, generate
from experts.tasks.generate.heldout import PROGRAM_PARAMS, heldout_rows
from experts.tasks.programs import entry_point_of, program_for
from experts.tasks.sandbox import run_many

KINDS = ("arithmetic", "programs", "choice")


def _text(kind: str, row: dict) -> str:
    if kind == "arithmetic":
        return row["question"]
    if kind == "programs":
        return row["text"]
    return row["question"]["stem"] + " " + " ".join(c["text"] for c in row["question"]["choices"])


def _words(s: str) -> frozenset[str]:
    return frozenset(re.sub(r"\d+", "#", w) for w in re.findall(r"[a-z0-9']+", s.lower()))   # numbers blanked


@pytest.mark.parametrize("kind", KINDS)
def test_heldout_rows_are_deterministic_and_load_with_the_tasks_graders(tmp_path, kind):
    rows = heldout_rows(kind, 200, seed=7)
    assert rows == heldout_rows(kind, 200, seed=7) and rows != heldout_rows(kind, 200, seed=8)
    task = load_task(FORMAT_OF[kind], write_jsonl(tmp_path / f"{kind}.jsonl", rows))
    assert len(task) == 200 and len({_text(kind, r) for r in rows}) == 200      # no question twice
    if kind == "arithmetic":
        for ex in task:
            assert task.correct(f"The answer is {ex.answer}.", ex) and not task.correct(f"{int(ex.answer) + 1}", ex)
            lhs = ex.metadata["solution"].split("=")[0]
            assert eval(lhs) == int(ex.answer)  # noqa: S307 - our own "a + b" strings
    if kind == "choice":
        for ex in task:
            wrong = next(lab for lab in ex.metadata["labels"] if lab != ex.answer)
            assert task.correct(f"The answer is ({ex.answer}).", ex) and not task.correct(f"The answer is ({wrong}).", ex)
            assert len(set(ex.metadata["texts"])) == len(ex.metadata["labels"])
        assert len(collections.Counter(ex.answer for ex in task)) >= 3


def test_heldout_number_questions_are_right():
    for row in heldout_rows("choice", 300, seed=3):
        q = row["question"]
        nums = {c["label"]: c["text"] for c in q["choices"]}
        key = nums[row["answerKey"]]
        if "greatest" in q["stem"]:
            assert int(key) == max(map(int, nums.values()))
        elif "less than all" in q["stem"]:
            assert int(key) == min(map(int, nums.values()))
        elif "even" in q["stem"]:
            assert [int(v) % 2 == 0 for v in nums.values()].count(True) == 1 and int(key) % 2 == 0
        elif "closest to 50" in q["stem"]:
            d = sorted(abs(int(v) - 50) for v in nums.values())
            assert abs(int(key) - 50) == d[0] < d[1]


def test_heldout_programs_are_distinct_requests_whose_references_pass():
    rows = heldout_rows("programs", len(PROGRAM_PARAMS), seed=7)
    assert len(PROGRAM_PARAMS) >= 200 and len({r["text"] for r in rows}) == len(rows)   # all different
    assert all(len(set(r["test_list"])) == 3 for r in rows)
    good = [program_for(r["code"], r["test_list"]) for r in rows]
    bad = [program_for(f"def {entry_point_of(r['test_list'][0])}(*args):\n    return None\n", r["test_list"])
           for r in rows[:20]]
    results = run_many(good + bad, workers=2)
    assert [r.status for r in results[:len(good)]] == ["passed"] * len(good), [r.stderr for r in results if r.status != "passed"][:3]
    assert all(r.status == "failed" for r in results[len(good):])


@pytest.mark.parametrize("kind", KINDS)
def test_no_heldout_row_is_a_training_row_or_a_near_copy_of_one(kind):
    options = [{"level": lv} for lv in (1, 2, 3)] if kind == "arithmetic" else [{}]
    train = {_text(kind, r) for seed in (1, 2) for o in options for r in generate(kind, 1000, seed, **o)}
    held = {_text(kind, r) for r in heldout_rows(kind, 200, seed=7)}
    assert not held & train
    train_words = {_words(t) for t in train}
    held_words = {_words(h) for h in held}
    worst = max(len(h & t) / len(h | t) for h in held_words for t in train_words)
    assert worst < 0.7, worst                       # word Jaccard, numbers blanked


def test_the_committed_test_files_are_what_the_generator_makes():
    from pathlib import Path

    from experts.tasks.base import read_jsonl
    data = Path(__file__).resolve().parents[2] / "experts" / "recipes" / "eval-smollm2-n200" / "data"
    for kind, name in (("arithmetic", "math"), ("programs", "code"), ("choice", "reasoning")):
        assert read_jsonl(data / f"{name}.jsonl") == heldout_rows(kind, 200, seed=3)
