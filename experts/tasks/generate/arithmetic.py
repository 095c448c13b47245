"""Arithmetic word problems in the GSM8K format: one or two operations on small whole numbers.

Contract: `arithmetic_rows(n, seed, level)` returns n GSM8K rows (`question`, `answer` = a short worked solution
ending in `#### <number>`), the same for the same (n, seed, level) on every machine (`random.Random(seed)`
only). Every answer is a non-negative integer below 1000. Levels: 1 = one addition or subtraction of numbers
up to 12 (the default), 2 = one operation of the four on numbers up to 30, 3 = as 2 but every third problem
takes two operations. Measured on SmolLM2-135M-Instruct (greedy, the GSM8K instruction, 16 problems, seed 123):
level 1 answered 3/16 right with 80 new tokens (several answers were cut off mid-reasoning, so more tokens
should score higher), level 3 2/16 with 96 (1/16 with numbers up to 60). Level 1 is the default: the base
model starts above 0 and an expert has room to improve; levels 2-3 are for stronger models and evaluation.
"""

from __future__ import annotations

import random
from typing import Callable

NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Maya", "Leo", "Zoe", "Max", "Emma", "Omar", "Ivy")
ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "cards", "balloons", "shells", "coins")

Row = dict[str, str]


def _row(question: str, steps: list[tuple[str, int]]) -> Row:
    lines = [f"{expr} = {val}" for expr, val in steps]
    return {"question": question, "answer": "\n".join(lines) + f"\n#### {steps[-1][1]}"}


def _add(r: random.Random, who: str, it: str) -> Row:
    a, b = r.randint(2, 20), r.randint(2, 20)
    return _row(f"{who} has {a} {it}. {who} gets {b} more {it}. How many {it} does {who} have now?",
                [(f"{a} + {b}", a + b)])


def _sub(r: random.Random, who: str, it: str) -> Row:
    a = r.randint(5, 30)
    b = r.randint(1, a - 1)
    return _row(f"{who} had {a} {it} and gave {b} of them to a friend. How many {it} does {who} have left?",
                [(f"{a} - {b}", a - b)])


def _mul(r: random.Random, who: str, it: str) -> Row:
    a, b = r.randint(2, 5), r.randint(2, 10)
    return _row(f"{who} has {a} bags. Each bag holds {b} {it}. How many {it} does {who} have in all?",
                [(f"{a} * {b}", a * b)])


def _div(r: random.Random, who: str, it: str) -> Row:
    b, q = r.randint(2, 5), r.randint(2, 10)
    return _row(f"{who} shares {b * q} {it} equally among {b} friends. How many {it} does each friend get?",
                [(f"{b * q} / {b}", q)])


def _add_sub(r: random.Random, who: str, it: str) -> Row:
    a, b = r.randint(5, 20), r.randint(2, 10)
    c = r.randint(1, a + b - 1)
    return _row(f"{who} has {a} {it}, buys {b} more, and then gives away {c}. How many {it} does {who} have now?",
                [(f"{a} + {b}", a + b), (f"{a + b} - {c}", a + b - c)])


def _mul_add(r: random.Random, who: str, it: str) -> Row:
    a, b, c = r.randint(2, 6), r.randint(2, 9), r.randint(1, 15)
    return _row(f"{who} buys {a} packs with {b} {it} in each pack. {who} already had {c} {it}. "
                f"How many {it} does {who} have now?", [(f"{a} * {b}", a * b), (f"{a * b} + {c}", a * b + c)])


def _change(r: random.Random, who: str, it: str) -> Row:
    price, count = r.randint(1, 9), r.randint(2, 5)
    paid = r.choice([v for v in (10, 20, 50) if v >= price * count])
    return _row(f"One of the {it} costs ${price}. {who} buys {count} of them and pays with a ${paid} bill. "
                f"How many dollars of change does {who} get?",
                [(f"{price} * {count}", price * count), (f"{paid} - {price * count}", paid - price * count)])


def _two_people(r: random.Random, who: str, it: str) -> Row:
    other = r.choice([n for n in NAMES if n != who])
    a, k = r.randint(3, 20), r.randint(2, 4)
    return _row(f"{who} has {a} {it}. {other} has {k} times as many {it} as {who}. "
                f"How many {it} do they have together?", [(f"{a} * {k}", a * k), (f"{a} + {a * k}", a + a * k)])


ONE_STEP: tuple[Callable[[random.Random, str, str], Row], ...] = (_add, _sub, _mul, _div)
TWO_STEP: tuple[Callable[[random.Random, str, str], Row], ...] = (_add_sub, _mul_add, _change, _two_people)


def _add_small(r: random.Random, who: str, it: str) -> Row:
    a, b = r.randint(1, 10), r.randint(1, 10)
    return _row(f"{who} has {a} {it}. {who} gets {b} more. How many {it} does {who} have now?",
                [(f"{a} + {b}", a + b)])


def _sub_small(r: random.Random, who: str, it: str) -> Row:
    a = r.randint(3, 12)
    b = r.randint(1, a - 1)
    return _row(f"{who} has {a} {it} and gives away {b}. How many {it} does {who} have left?",
                [(f"{a} - {b}", a - b)])


# level 1: one addition or subtraction of numbers up to 12; level 2: one operation of the four;
# level 3: two problems in three take one operation, the third two
LEVELS: dict[int, tuple[tuple[Callable[[random.Random, str, str], Row], ...], ...]] = {
    1: ((_add_small, _sub_small),),
    2: (ONE_STEP,),
    3: (ONE_STEP, ONE_STEP, TWO_STEP),
}


def arithmetic_rows(n: int, seed: int = 0, level: int = 1) -> list[Row]:
    """n GSM8K-format rows at difficulty `level` (1-3), deterministic in (n, seed, level)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level}")
    cycle = LEVELS[level]
    r = random.Random(seed)
    rows = []
    for i in range(n):
        make = r.choice(cycle[i % len(cycle)])
        rows.append(make(r, r.choice(NAMES), r.choice(ITEMS)))
    return rows
