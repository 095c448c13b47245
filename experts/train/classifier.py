"""The classification task: the dispatch prompt, answered with the right category, as an SVF training task.

Contract: `classification_task(tasks)` turns labelled tasks (each with `.label` in code / math / reasoning /
other and examples with a `.prompt`) into one Task whose examples ask the paper's classification prompt
(experts.dispatch: system prompt + `QUESTION_PREFIX` + the question) with the answer started as the server's first pass
starts it (`ANSWER_PREFIX`, "Classification: \\boxed{"), so training shapes exactly the choice the server
scores; the grader is right iff the completion closes that box with the label. Trained with the same REINFORCE recipe, the result is the `classifier` expert
the `classifier` dispatch strategy patches in for the first pass. Examples are interleaved per label so that
a prefix of the task (a batch, a validation split) is balanced.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Iterable

from experts.dispatch import ANSWER_PREFIX, LABELS, SYSTEM_PROMPT, classification_messages, parse_label
from experts.tasks.base import Example, Task


def _grade(completion: str, example: Example) -> bool:
    return parse_label(ANSWER_PREFIX + completion) == example.answer


def classification_task(tasks: Iterable[Task], seed: int = 0, name: str = "classifier") -> Task:
    per_label: dict[str, list[Example]] = {}
    for t in tasks:
        if t.label not in LABELS:
            raise ValueError(f"task {t.name!r} has label {t.label!r}; the dispatch labels are {LABELS}")
        per_label.setdefault(t.label, []).extend(
            Example(classification_messages(e.prompt)[1]["content"], t.label) for e in t.examples)
    rng = random.Random(seed)
    for exs in per_label.values():
        rng.shuffle(exs)
    mixed = [e for group in itertools.zip_longest(*per_label.values()) for e in group if e is not None]
    return ClassifierTask(name, "classifier", mixed, _grade, system=SYSTEM_PROMPT, answer_prefix=ANSWER_PREFIX)


@dataclass
class ClassifierTask(Task):
    """The classification task; `choices` (the labels) let the trainer's `labels` objective score them."""

    choices: tuple[str, ...] = LABELS
