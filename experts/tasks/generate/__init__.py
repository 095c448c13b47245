"""Seeded generators of training data, written in the formats users bring (GSM8K, MBPP, ARC).

Contract: `generate(kind, n, seed)` returns n rows of one kind — `arithmetic` (GSM8K jsonl rows), `programs`
(MBPP rows), `choice` (ARC rows) — identical for identical (kind, n, seed); `write(kind, path, n, seed)` writes
them as JSON lines. The files do not depend on anything of this project: `load_gsm8k`, `load_mbpp` and
`load_arc` (experts.tasks) read them back like the published datasets, and so can other tools.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from experts.tasks.base import write_jsonl
from experts.tasks.generate.arithmetic import arithmetic_rows
from experts.tasks.generate.choice import choice_rows
from experts.tasks.generate.programs import program_rows

GENERATORS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "arithmetic": arithmetic_rows,
    "programs": program_rows,
    "choice": choice_rows,
}
FORMAT_OF = {"arithmetic": "gsm8k", "programs": "mbpp", "choice": "arc"}


def generate(kind: str, n: int, seed: int = 0, **options: Any) -> list[dict[str, Any]]:
    """n rows of `kind`; `options` go to the generator (e.g. `level` for arithmetic)."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown generator {kind!r}; choose from {sorted(GENERATORS)}")
    return GENERATORS[kind](n, seed, **options)


def write(kind: str, path: Path | str, n: int, seed: int = 0, **options: Any) -> Path:
    return write_jsonl(path, generate(kind, n, seed, **options))
