"""experts.tasks: what a model is trained and evaluated on — tasks, their rewards, and a code sandbox.

Modules, one concern each:
- base: `Example`, `Task` (grader, reward ±1, chat messages), JSON-lines I/O;
- numbers / latex: reading numbers and LaTeX answers out of free text, and comparing them;
- gsm8k, competition_math (MATH), arc, programs (MBPP and code extraction), humaneval: loaders + graders;
- sandbox: running untrusted code in a confined subprocess;
- generate: seeded training data in the GSM8K, MBPP and ARC formats, and the classifier's prompts;
- `prompts`: bare prompts (JSONL rows with `prompt`), the classifier's own sources.

`load_task(format, path)` reads a file of a known format; `FORMATS` lists them. Never imports the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from experts.tasks.arc import load_arc
from experts.tasks.base import Example, Task, read_jsonl, write_jsonl
from experts.tasks.competition_math import load_math
from experts.tasks.gsm8k import load_gsm8k
from experts.tasks.programs import load_mbpp



def load_prompts(path: Path | str, name: str | None = None) -> Task:
    """Bare prompts (JSON lines with a `prompt`), for tasks that only need the question: the classifier's
    sources. No answers, so the grader rejects everything; the label is the source's."""
    rows = read_jsonl(path)
    if any(not isinstance(r.get("prompt"), str) or not r["prompt"].strip() for r in rows):
        raise ValueError(f"{path}: every row needs a non-empty 'prompt'")
    return Task(name or Path(path).stem, "", [Example(r["prompt"], "") for r in rows], lambda *_: False)


FORMATS: dict[str, Callable[..., Task]] = {"gsm8k": load_gsm8k, "math": load_math, "arc": load_arc,
                                           "mbpp": load_mbpp, "prompts": load_prompts}


def load_task(fmt: str, path: Path | str | None = None, name: str | None = None) -> Task:
    """A task from a file of format `fmt` (gsm8k, math, arc, mbpp), or HumanEval (`humaneval`, no path needed)."""
    if fmt == "humaneval":
        from experts.tasks.humaneval import load_humaneval
        return load_humaneval(path, name or "humaneval")
    if fmt not in FORMATS:
        raise ValueError(f"unknown task format {fmt!r}; choose from {sorted(FORMATS) + ['humaneval']}")
    if path is None:
        raise ValueError(f"format {fmt!r} needs a file")
    return FORMATS[fmt](path, name)


__all__ = ["Example", "Task", "FORMATS", "load_task", "read_jsonl", "write_jsonl"]
