"""Code tasks: extract a program from a completion, and MBPP (write a function that passes asserts).

Contract:
- `extract_code(completion, entry_point=None)`: the Python code of a completion. Among the fenced blocks
  (```python, ```py or bare ```) that compile, the first that defines `entry_point` (when given), else the
  first; a fence left open at the end (a truncated answer) runs to the end. Without such a block (no fences,
  or only a stray closing fence after unfenced code), the text without its fence lines from the first line
  that starts code (`def`, `class`, `import`, `from`, `@`) or, failing that, the whole text; trailing prose
  that does not compile is cut off line by line. Compiling is checked with `compile()`, which never executes
  anything.
- MBPP file format (JSON lines, as published): `task_id`, `text` (the request), `code` (a reference
  solution), `test_list` (assert statements), optional `test_setup_code` and `challenge_test_list`.
  `load_mbpp(path)` gives a `Task` (label `code`); each example's prompt is the request plus its first test
  (MBPP's own prompt format, so the model learns the function name), `answer` the reference code,
  `metadata` the tests, the setup code and the entry point (the function the first test calls).
- Grading runs `setup + code + tests` in the sandbox (experts.tasks.sandbox); correct iff every assert
  passes within the limits. `program_for` builds that program and is what graders and tests share.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from experts.tasks.base import Example, Task, read_jsonl, require
from experts.tasks.sandbox import Limits, run_python

INSTRUCTION = "Write the Python function in a ```python code block. Your code must pass this test:"
DEFAULT_LIMITS = Limits(timeout_s=10.0, cpu_s=5, memory_mb=1024)

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_START = re.compile(r"^(def |class |import |from \S+ import |@|async def )", re.MULTILINE)


def _compiles(code: str) -> bool:
    try:
        compile(code, "<completion>", "exec")
        return True
    except (SyntaxError, ValueError):
        return False


def _trim_to_compilable(code: str) -> str:
    """The longest prefix of whole lines that compiles (the whole text when it does)."""
    if _compiles(code):
        return code
    lines = code.splitlines()
    for n in range(len(lines) - 1, 0, -1):
        head = "\n".join(lines[:n])
        if _compiles(head):
            return head
    return code


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The program a completion contains (see the module contract)."""
    # 1. fenced blocks that can be Python (```python, ```py, bare ```); prose between two stray fences
    #    (code, then a lone closing fence, then an explanation) does not compile and is passed over
    blocks = [body for lang, body in _FENCE.findall(completion) if lang.lower() in ("python", "py", "python3", "")]
    usable = [b for b in blocks if b.strip() and _compiles(b)]
    if entry_point:
        defining = [b for b in usable if _defines(b, entry_point)]
        if defining:
            return defining[0].rstrip() + "\n"
    if usable:
        return usable[0].rstrip() + "\n"
    # 2. no usable block: raw text without fence lines, from the first line that starts code
    text = "\n".join(line for line in completion.splitlines() if not line.lstrip().startswith("```"))
    m = _CODE_START.search(text)
    code = text[m.start():] if m else text
    return _trim_to_compilable(code.rstrip()).rstrip() + "\n"


def program_for(code: str, tests: Sequence[str], setup: str = "") -> str:
    """The program the sandbox runs: setup, the candidate code, then each test statement."""
    parts = [setup.strip(), code.rstrip(), "", *[t.strip() for t in tests]]
    return "\n".join(p for p in parts if p is not None).strip() + "\n"


def run_tests(code: str, tests: Sequence[str], setup: str = "", limits: Limits = DEFAULT_LIMITS) -> bool:
    return run_python(program_for(code, tests, setup), limits).passed


def grade_mbpp(completion: str, example: Example) -> bool:
    meta = example.metadata
    code = extract_code(completion, meta.get("entry_point"))
    return run_tests(code, meta["tests"], meta.get("setup", ""))


def entry_point_of(test: str) -> str | None:
    """The function a test calls first: `assert f(1) == 2` → f."""
    m = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:set\(|sorted\(|math\.isclose\()?\s*([A-Za-z_]\w*)\s*\(", test)
    return m.group(1) if m else None


def mbpp_prompt(text: str, tests: Sequence[str]) -> str:
    return f"{text.strip()}\n{INSTRUCTION}\n{tests[0].strip()}" if tests else text.strip()


def mbpp_example(row: dict, where: str = "row") -> Example:
    require(row, ("text", "code", "test_list"), where)
    tests = [str(t) for t in row["test_list"]]
    if not tests:
        raise ValueError(f"{where}: 'test_list' is empty")
    meta = {"tests": tests, "setup": str(row.get("test_setup_code") or ""), "task_id": row.get("task_id"),
            "entry_point": entry_point_of(tests[0]),
            "challenge_tests": [str(t) for t in row.get("challenge_test_list") or []]}
    return Example(prompt=mbpp_prompt(str(row["text"]), tests), answer=str(row["code"]), metadata=meta)


def mbpp_task(examples: list[Example], name: str = "mbpp") -> Task:
    # the instruction is part of each prompt (it precedes the example test), so Task.instruction stays empty
    return Task(name=name, label="code", examples=examples, grader=grade_mbpp)


def load_mbpp(path: Path | str, name: str | None = None) -> Task:
    path = Path(path)
    rows = read_jsonl(path)
    return mbpp_task([mbpp_example(r, f"{path} row {i + 1}") for i, r in enumerate(rows)], name or path.stem)
