"""experts/dispatch.py: the classification prompt, label parsing and routing."""

from __future__ import annotations

import pytest

from experts.dispatch import (
    ANSWER_PREFIX,
    LABEL_SUFFIX,
    LABELS,
    SYSTEM_PROMPT,
    Strategy,
    classification_messages,
    experts_by_label,
    parse_label,
    route,
)


# -- parse_label ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, label", [
    ("Classification: \\boxed{math}", "math"),
    ("\\boxed{code}", "code"),
    ("Classification: \\boxed{reasoning}.", "reasoning"),
    ("Classification: \\boxed{other}", "other"),
    ("Classification: \\boxed{MATH}", "math"),                       # case
    ("Classification: \\boxed{ Code }", "code"),                     # spaces
    ("Classification: \\boxed{Reasoning}\n", "reasoning"),
    ("I think \\boxed{code} but maybe \\boxed{math}", "code"),       # the first box wins
    ("\\boxed{math}\\boxed{code}", "math"),
    ("Classification: \\boxed{physics}", "other"),                   # unknown label
    ("Classification: \\boxed{}", "other"),
    ("Classification: \\boxed{math problem}", "other"),
    ("Classification: math", "other"),                               # no box
    ("", "other"),
    ("boxed{math}", "other"),                                        # no backslash: not a box
    ("Classification: \\boxed{math", "other"),                       # unclosed
])
def test_parse_label(text, label):
    assert parse_label(text) == label


def test_parse_label_of_every_constrained_answer():
    # what an engine scores: the answer prefix, then label + "}"
    for label in LABELS:
        assert parse_label(ANSWER_PREFIX + label + LABEL_SUFFIX) == label


# -- route / experts_by_label ---------------------------------------------------------------------------------------

def test_experts_by_label_first_name_wins():
    labels = {"math-b": "math", "math-a": "math", "coder": "code", "zz-reason": "reasoning",
              "clf": "classifier", "a-reason": "reasoning"}
    by = experts_by_label(labels)
    assert by == {"math": "math-a", "code": "coder", "reasoning": "a-reason", "classifier": "clf"}
    assert experts_by_label({}) == {}
    # insertion order does not matter
    assert experts_by_label(dict(reversed(list(labels.items())))) == by


def test_route():
    by = {"math": "m", "code": "c", "reasoning": "r", "classifier": "clf"}
    assert route("math", by) == "m"
    assert route("code", by) == "c"
    assert route("reasoning", by) == "r"
    assert route("other", by) is None                                 # base weights, never a leftover expert
    assert route("other", {**by, "other": "o"}) is None
    assert route("classifier", by) is None                            # not a dispatch label
    assert route("physics", by) is None
    assert route("math", {"code": "c"}) is None                       # label without an expert → base
    assert route("math", {}) is None


def test_parse_then_route():
    by = experts_by_label({"gsm": "math", "mbpp": "code"})
    assert route(parse_label("Classification: \\boxed{Math}"), by) == "gsm"
    assert route(parse_label("Classification: \\boxed{reasoning}"), by) is None
    assert route(parse_label("no idea"), by) is None


# -- classification prompt ---------------------------------------------------------------------------------------

def test_classification_messages():
    q = "  What is 17 * 23? Show your work.\n"
    msgs = classification_messages(q)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in msgs)
    assert q.strip() in msgs[-1]["content"]
    text = "\n".join(m["content"] for m in msgs)
    for label in ("code", "math", "reasoning", "other"):
        assert f"'{label}'" in text and f"- {label}:" in text
    assert "\\boxed{" in text
    assert msgs[0]["content"] == SYSTEM_PROMPT
    assert classification_messages("another question")[-1]["content"] != msgs[-1]["content"]


def test_labels_and_strategies():
    assert LABELS == ("code", "math", "reasoning", "other")
    assert ANSWER_PREFIX.endswith("\\boxed{") and LABEL_SUFFIX == "}"
    assert {s.value for s in Strategy} == {"explicit", "prompt", "classifier", "none"}
    assert Strategy("prompt") is Strategy.PROMPT and Strategy.NONE == "none"
