"""The task contract: examples, a grader, a reward, and the chat prompt of each example.

Contract:
- `Example` is one labelled item: `prompt` (the question as the user writes it, without instructions),
  `answer` (the reference: a number, a `\\boxed{}` content, a choice letter, or a reference program) and
  `metadata` (whatever the grader needs besides: choices, tests, entry points, level...). Frozen.
- `Task` bundles a name, a `label` (the expert family it trains: math, code, reasoning), its examples, a
  grader `(completion, example) -> bool` and an instruction appended to each prompt. `correct` grades one
  completion; `reward` maps it to +1 / −1 (the paper's reward, no baseline); `messages` builds the chat
  messages a model answers; `answer_prefix` is text the answer is forced to start with (the model continues
  it; the completion graded excludes it), as the server's first pass forces `Classification: \\boxed{`.
  `reference_text` is the answer written out as a model should write it (the likelihood objective of
  experts/train and the few-shot log-likelihood score): the task's `reference` function where it has one
  (GSM8K: the worked solution ending in the instruction's "The answer is N."), else the example's
  `metadata["solution"]`, else its `answer`.
  Graders never raise on malformed completions: anything unparsable is wrong.
- `read_jsonl` / `write_jsonl` are the only file I/O: UTF-8, one JSON object per line, blank lines skipped,
  a bad line raises ValueError naming the file and the line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

Grader = Callable[[str, "Example"], bool]
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    """One labelled item of a task."""

    prompt: str
    answer: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    """A named set of examples with its grader and prompt format."""

    name: str
    label: str                          # math | code | reasoning | ... : the expert family
    examples: list[Example]
    grader: Grader
    instruction: str = ""               # appended to every prompt, after a blank line
    system: str | None = None           # optional system message
    answer_prefix: str = ""             # the start of the assistant's answer, given, not generated
    reference: Callable[["Example"], str] | None = None   # the answer as a model should write it

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def correct(self, completion: str, example: Example) -> bool:
        """Whether `completion` answers `example` correctly; never raises on malformed text."""
        try:
            return bool(self.grader(completion, example))
        except Exception:      # a grader bug on odd input must not crash a training run: count it wrong
            return False

    def reward(self, completion: str, example: Example) -> float:
        """+1.0 when correct, −1.0 otherwise (the paper's reward)."""
        return 1.0 if self.correct(completion, example) else -1.0

    def reference_text(self, example: Example) -> str:
        """The reference answer as text a model should write after the prompt (and `answer_prefix`)."""
        if self.reference is not None:
            return self.reference(example)
        return str(example.metadata.get("solution") or example.answer)

    def user_text(self, example: Example) -> str:
        return f"{example.prompt.rstrip()}\n\n{self.instruction}" if self.instruction else example.prompt

    def messages(self, example: Example) -> Messages:
        """The chat messages the model answers for `example`."""
        out: Messages = [{"role": "system", "content": self.system}] if self.system else []
        out.append({"role": "user", "content": self.user_text(example)})
        return out

    def subset(self, indices: Iterable[int] | slice, name: str | None = None) -> "Task":
        """The same task over some of its examples (a train/validation split, a few shots)."""
        chosen = self.examples[indices] if isinstance(indices, slice) else [self.examples[i] for i in indices]
        return replace(self, name=name or self.name, examples=list(chosen))

    def split(self, n_first: int) -> tuple["Task", "Task"]:
        """(first n examples, the rest), named `<name>-train` / `<name>-valid`."""
        return (self.subset(slice(0, n_first), f"{self.name}-train"),
                self.subset(slice(n_first, None), f"{self.name}-valid"))


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Every object of a JSON-lines file, in order."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def write_jsonl(path: Path | str, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows as JSON lines (keys in insertion order, non-ASCII kept); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def require(row: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    """Raise ValueError naming the row when one of `keys` is missing."""
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
