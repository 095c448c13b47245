"""ARC (AI2 Reasoning Challenge) and any multiple-choice task in its format.

Contract:
- File format (JSON lines, as AI2 publishes it): `id` (optional), `question: {stem, choices: [{label,
  text}]}`, `answerKey` (a label: `A`–`E`, or `1`–`5` in some ARC rows). `load_arc(path)` gives a `Task`
  (label `reasoning`); each example's `prompt` is the stem followed by one `(X) text` line per choice,
  `answer` the key, `metadata` the `labels`, `texts` and `id`.
- Grading is strict (`chosen_label`): the answer is read from the last `answer is` statement of the
  completion, which must be followed at once by one label (`The answer is (B)`, `the answer is: **B**.`;
  text after it may mention other choices, `(B) because (A) is too small`); failing any `answer is`, from a
  last line that is a lone `(X)` or `X`. Wrong: a second label joined to the first (`(A) or (B)`, `A and B`,
  `A/B`, `(A), (C)`), a hedge (`the answer is either (A) or (B)`), a label that is not a choice, no answer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from experts.tasks.base import Example, Task, read_jsonl, require

INSTRUCTION = ("Think briefly, then finish with the letter of the correct choice, "
               "in the form: The answer is (X).")

_ANSWER_IS = re.compile(r"answer\s+is\b", re.IGNORECASE)


def format_choices(stem: str, labels: Sequence[str], texts: Sequence[str]) -> str:
    lines = [stem.strip()] + [f"({lab}) {txt.strip()}" for lab, txt in zip(labels, texts)]
    return "\n".join(lines)


def _label_pattern(labels: Sequence[str]) -> str:
    """`(X)` or a bare `X` that is a whole word, X one of the labels; group 1 or 2 holds X."""
    alt = "|".join(re.escape(lab) for lab in sorted(labels, key=len, reverse=True))
    return rf"(?:\(\s*({alt})\s*\)|(?<![\w'’])({alt})(?![\w'’]))"


def chosen_label(completion: str, labels: Sequence[str]) -> str | None:
    """The one label a completion commits to, or None (no answer, or an ambiguous one)."""
    text = completion.strip()
    label = _label_pattern(labels)
    # 1. the last "answer is" statement: a label must follow at once (`: `, `**` tolerated) ...
    hits = list(_ANSWER_IS.finditer(text))
    if hits:
        rest = text[hits[-1].end():]
        m = re.match(rf"\s*[:\-]?\s*\**\s*{label}\s*\**", rest)
        if not m:
            return None
        # ... and no second label may be joined to it: "(A) or (B)", "A and B", "A/B", "(A), (C)"
        if re.match(rf"\s*(?:,|/|&|\bor\b|\band\b)\s*\**\s*{label}", rest[m.end():], re.IGNORECASE):
            return None
        return m.group(1) or m.group(2)
    # 2. else a last line that is a lone (X) or X
    last = text.splitlines()[-1].strip() if text else ""
    m = re.fullmatch(r"\(?\s*(\w+)\s*\)?\.?", last)
    if m and m.group(1) in labels:
        return m.group(1)
    return None


def grade_choice(completion: str, example: Example) -> bool:
    return chosen_label(completion, example.metadata["labels"]) == example.answer


def choice_example(stem: str, labels: Sequence[str], texts: Sequence[str], key: str, id: str = "") -> Example:
    if key not in labels:
        raise ValueError(f"answer key {key!r} is not one of the choices {list(labels)}")
    return Example(prompt=format_choices(stem, labels, texts), answer=key,
                   metadata={"labels": list(labels), "texts": list(texts), "id": id, "stem": stem})


def arc_example(row: dict, where: str = "row") -> Example:
    require(row, ("question", "answerKey"), where)
    q = row["question"]
    if not isinstance(q, dict) or "stem" not in q or "choices" not in q:
        raise ValueError(f"{where}: 'question' must be an object with 'stem' and 'choices'")
    labels = [str(c["label"]) for c in q["choices"]]
    texts = [str(c["text"]) for c in q["choices"]]
    try:
        return choice_example(str(q["stem"]), labels, texts, str(row["answerKey"]), str(row.get("id", "")))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def arc_task(examples: list[Example], name: str = "arc") -> Task:
    return Task(name=name, label="reasoning", examples=examples, grader=grade_choice, instruction=INSTRUCTION)


def load_arc(path: Path | str, name: str | None = None) -> Task:
    path = Path(path)
    rows = read_jsonl(path)
    return arc_task([arc_example(r, f"{path} row {i + 1}") for i, r in enumerate(rows)], name or path.stem)
