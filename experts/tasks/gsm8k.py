"""GSM8K: grade-school word problems whose answer is one number.

Contract:
- File format (JSON lines, as published): `question`, `answer` = worked solution ending in `#### <number>`.
  `load_gsm8k(path)` gives a `Task` (label `math`); each example's `answer` is the normalised number after
  `####` (commas and `$` removed) and `metadata["solution"]` the full worked solution.
- `gsm8k_reference(example)`: the worked solution as the instruction asks for it: its lines before `####`,
  then "The answer is N." (the task's `reference`, for likelihood training).
- Grading (the paper's rule): correct iff the last number in the completion equals the reference exactly,
  as numbers (`1,000` = `1000`, `$5` = `5`, `5.0` = `5`); text after the number does not matter.
"""

from __future__ import annotations

from pathlib import Path

from experts.tasks.base import Example, Task, read_jsonl, require
from experts.tasks.numbers import last_number, same_number

INSTRUCTION = ("Solve the problem step by step. End with the final answer as a single number, "
               "in the form: The answer is <number>.")


def gsm8k_answer(solution: str) -> str:
    """The number after the last `####` of a worked solution, normalised; ValueError when absent."""
    if "####" not in solution:
        raise ValueError("a GSM8K answer must end with '#### <number>'")
    tail = solution.rsplit("####", 1)[1].strip()
    num = last_number(tail)
    if num is None:
        raise ValueError(f"no number after '####' in {tail!r}")
    return num


def gsm8k_reference(example: Example) -> str:
    steps = str(example.metadata.get("solution", "")).rsplit("####", 1)[0].strip()
    final = f"The answer is {example.answer}."
    return f"{steps}\n{final}" if steps else final


def grade_gsm8k(completion: str, example: Example) -> bool:
    return same_number(last_number(completion), example.answer)


def gsm8k_example(row: dict, where: str = "row") -> Example:
    require(row, ("question", "answer"), where)
    return Example(prompt=str(row["question"]), answer=gsm8k_answer(str(row["answer"])),
                   metadata={"solution": str(row["answer"])})


def gsm8k_task(examples: list[Example], name: str = "gsm8k") -> Task:
    return Task(name=name, label="math", examples=examples, grader=grade_gsm8k, instruction=INSTRUCTION,
                reference=gsm8k_reference)


def load_gsm8k(path: Path | str, name: str | None = None) -> Task:
    path = Path(path)
    rows = read_jsonl(path)
    return gsm8k_task([gsm8k_example(r, f"{path} row {i + 1}") for i, r in enumerate(rows)], name or path.stem)
