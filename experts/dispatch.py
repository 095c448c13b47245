"""Dispatch, the first pass: the strategies and the classification prompt, independent of any engine.

Contract:
- `Strategy`: explicit (the request names experts), prompt (the base model classifies the prompt),
  classifier (the same prompt with the classification expert patched in), none (base weights).
- `classification_messages(question)` builds the paper's classification prompt (the user turn starts with
  `QUESTION_PREFIX`, not the reference's "Question: "), and `ANSWER_PREFIX` is the
  start of the answer the label completes; an engine scores each candidate `label + "}"` after that prefix
  (constrained, one prefill) instead of sampling free text.
- `parse_label(text)` reads the first `\\boxed{...}` of a free-text answer (for training and evaluation);
  anything that is not a known label is `other`.
- `route(label, experts_by_label)` maps a label to an expert name or None (base weights): code→code expert,
  math→math expert, reasoning→reasoning expert, other (or a label without an expert)→base. Unlike the
  reference code, `other` never keeps a previous expert: it is the base weights.
"""

from __future__ import annotations

import enum
import re
from typing import Mapping

LABELS: tuple[str, ...] = ("code", "math", "reasoning", "other")
CLASSIFIER_LABEL = "classifier"

SYSTEM_PROMPT = (
    "Analyze the given question and classify it into exactly one of four categories: "
    "'code', 'math', 'reasoning' or 'other'.\n"
    "- code: questions about programming, writing or fixing functions, algorithms, software.\n"
    "- math: calculations, arithmetic, algebra, formulas, statistics, word problems with numbers.\n"
    "- reasoning: logic, science, common sense, critical analysis, multiple-choice questions.\n"
    "- other: anything that fits none of the categories above.\n"
    "Answer with the category only, in the form: Classification: \\boxed{category}"
)
# The user turn before the question. "Question to classify: " (not the reference's "Question: ") makes
# SmolLM2's fixed prefix (chat template + system prompt + this) exactly 128 tokens, two whole 64-token KV
# blocks, so every first pass reuses both from vLLM's prefix cache instead of one (tests/test_smollm2.py).
QUESTION_PREFIX = "Question to classify: "
ANSWER_PREFIX = "Classification: \\boxed{"
LABEL_SUFFIX = "}"

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


class Strategy(str, enum.Enum):
    EXPLICIT = "explicit"
    PROMPT = "prompt"
    CLASSIFIER = "classifier"
    NONE = "none"


def classification_messages(question: str) -> list[dict[str, str]]:
    """Chat messages of the first pass for one question (the text of the request to classify)."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": QUESTION_PREFIX + question.strip()}]


def parse_label(text: str) -> str:
    m = _BOXED.search(text)
    label = m.group(1).strip().lower() if m else ""
    return label if label in LABELS else "other"


def experts_by_label(labels: Mapping[str, str]) -> dict[str, str]:
    """{expert name: label} → {label: expert name}; with several experts per label, the first by name wins."""
    out: dict[str, str] = {}
    for name in sorted(labels):
        out.setdefault(labels[name], name)
    return out


def route(label: str, by_label: Mapping[str, str]) -> str | None:
    """The expert that serves `label`, or None for the base weights."""
    if label == "other" or label not in LABELS:
        return None
    return by_label.get(label)
