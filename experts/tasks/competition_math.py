"""MATH (Hendrycks et al.): competition problems whose final answer is written in `\\boxed{}`.

Contract:
- File format (JSON lines): `problem`, `solution` (worked, with the answer in its last `\\boxed{...}`),
  optional `level` (e.g. "Level 3") and `type` (e.g. "Algebra"). `load_math(path)` gives a `Task` (label
  `math`); each example's `answer` is the last boxed content of the solution, `metadata` keeps `level`,
  `type` and `solution`. A row whose solution has no `\\boxed{}` raises ValueError.
- Grading: correct iff the completion has a `\\boxed{...}` and its last one is `equivalent` to the reference
  (experts.tasks.latex: fractions, `\\dfrac`, spaces, `\\left`/`\\right`, degrees, percent, text units,
  `x =`, `5` vs `5.0`, exact value of simple numeric expressions).
"""

from __future__ import annotations

from pathlib import Path

from experts.tasks.base import Example, Task, read_jsonl, require
from experts.tasks.latex import equivalent, last_boxed

INSTRUCTION = "Solve the problem step by step. Put the final answer in \\boxed{}."


def grade_math(completion: str, example: Example) -> bool:
    return equivalent(last_boxed(completion), example.answer)


def math_example(row: dict, where: str = "row") -> Example:
    require(row, ("problem", "solution"), where)
    answer = last_boxed(str(row["solution"]))
    if answer is None:
        raise ValueError(f"{where}: the solution has no \\boxed{{...}} answer")
    meta = {"solution": str(row["solution"]), "level": str(row.get("level", "")), "type": str(row.get("type", ""))}
    return Example(prompt=str(row["problem"]), answer=answer, metadata=meta)


def math_task(examples: list[Example], name: str = "math") -> Task:
    return Task(name=name, label="math", examples=examples, grader=grade_math, instruction=INSTRUCTION)


def load_math(path: Path | str, name: str | None = None) -> Task:
    path = Path(path)
    rows = read_jsonl(path)
    return math_task([math_example(r, f"{path} row {i + 1}") for i, r in enumerate(rows)], name or path.stem)
