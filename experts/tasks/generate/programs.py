"""Tiny programming tasks in the MBPP format: one short function, three asserts.

Contract: `program_rows(n, seed)` returns n MBPP rows (`task_id`, `text`, `code` = a reference solution,
`test_list` = 3 asserts, `test_setup_code` = "", `challenge_test_list` = []), the same for the same
(n, seed) (`random.Random(seed)` only). Each row comes from one of the specs below: a request, a reference
solution, and an input sampler; the expected values are computed by evaluating the reference solution's
trusted twin (`ref`, written here, never model output) on the sampled inputs, so the reference code passes
its tests by construction (the tests check it anyway). Task ids count up from 1 per file; the prompt text
names the function, as MBPP's does, so graders can find it.
Difficulty: SmolLM2-135M-Instruct (greedy, 128 new tokens) solved 12/16 tasks drawn from the first 16 specs
(the one-liners); the 7 specs marked "a little harder" were added after that measurement to pull the base
rate further from 100 % and are not measured yet.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Spec:
    name: str                                    # the function to write
    text: str                                    # the request (MBPP "text")
    code: str                                    # reference solution (source)
    ref: Callable[..., Any]                      # the same function, trusted, used to compute expectations
    sample: Callable[[random.Random], tuple]     # one argument tuple


def _ints(r: random.Random, lo: int = -9, hi: int = 20, n: tuple[int, int] = (2, 6)) -> list[int]:
    return [r.randint(lo, hi) for _ in range(r.randint(*n))]


def _word(r: random.Random) -> str:
    return r.choice(("level", "python", "noon", "banana", "racecar", "apple", "kayak", "hello", "stats",
                     "tiger", "radar", "moon", "refer", "table", "civic", "orange"))


def _distinct_ints(r: random.Random) -> list[int]:
    nums = _ints(r, -5, 20, (3, 6))
    while len(set(nums)) < 2:
        nums.append(r.randint(-5, 20))
    return nums


def _sentence(r: random.Random) -> str:
    return " ".join(_word(r) for _ in range(r.randint(2, 5)))


def _mean_list(r: random.Random) -> list[int]:
    """2-4 integers whose mean is a whole number (so every correct way of computing it gives the same float)."""
    nums = _ints(r, 0, 20, (2, 4))
    nums[-1] += (-sum(nums)) % len(nums)
    return nums


SPECS: tuple[Spec, ...] = (
    Spec("sum_list", "Write a function sum_list(nums) that returns the sum of a list of numbers.",
         "def sum_list(nums):\n    total = 0\n    for x in nums:\n        total += x\n    return total\n",
         lambda nums: sum(nums), lambda r: (_ints(r),)),
    Spec("max_of_list", "Write a function max_of_list(nums) that returns the largest number in a non-empty list.",
         "def max_of_list(nums):\n    return max(nums)\n", lambda nums: max(nums), lambda r: (_ints(r),)),
    Spec("min_of_list", "Write a function min_of_list(nums) that returns the smallest number in a non-empty list.",
         "def min_of_list(nums):\n    return min(nums)\n", lambda nums: min(nums), lambda r: (_ints(r),)),
    Spec("count_even", "Write a function count_even(nums) that returns how many numbers in a list are even.",
         "def count_even(nums):\n    return sum(1 for x in nums if x % 2 == 0)\n",
         lambda nums: sum(1 for x in nums if x % 2 == 0), lambda r: (_ints(r, 0, 30, (3, 7)),)),
    Spec("reverse_string", "Write a function reverse_string(s) that returns the string s reversed.",
         "def reverse_string(s):\n    return s[::-1]\n", lambda s: s[::-1], lambda r: (_word(r),)),
    Spec("is_palindrome", "Write a function is_palindrome(s) that returns True if the string s reads the same "
         "forwards and backwards, and False otherwise.",
         "def is_palindrome(s):\n    return s == s[::-1]\n", lambda s: s == s[::-1], lambda r: (_word(r),)),
    Spec("square", "Write a function square(n) that returns n multiplied by itself.",
         "def square(n):\n    return n * n\n", lambda n: n * n, lambda r: (r.randint(-12, 12),)),
    Spec("is_even", "Write a function is_even(n) that returns True if the integer n is even and False otherwise.",
         "def is_even(n):\n    return n % 2 == 0\n", lambda n: n % 2 == 0, lambda r: (r.randint(0, 99),)),
    Spec("count_vowels", "Write a function count_vowels(s) that returns the number of vowels (a, e, i, o, u) "
         "in the lowercase string s.",
         "def count_vowels(s):\n    return sum(1 for c in s if c in 'aeiou')\n",
         lambda s: sum(1 for c in s if c in "aeiou"), lambda r: (_word(r),)),
    Spec("double_all", "Write a function double_all(nums) that returns a new list with every number doubled.",
         "def double_all(nums):\n    return [2 * x for x in nums]\n", lambda nums: [2 * x for x in nums],
         lambda r: (_ints(r, 0, 15),)),
    Spec("product_list", "Write a function product_list(nums) that returns the product of all numbers in a list.",
         "def product_list(nums):\n    result = 1\n    for x in nums:\n        result *= x\n    return result\n",
         lambda nums: math.prod(nums), lambda r: (_ints(r, 1, 6, (2, 4)),)),
    Spec("abs_difference", "Write a function abs_difference(a, b) that returns the absolute difference of a and b.",
         "def abs_difference(a, b):\n    return abs(a - b)\n", lambda a, b: abs(a - b),
         lambda r: (r.randint(-20, 20), r.randint(-20, 20))),
    Spec("last_element", "Write a function last_element(items) that returns the last element of a non-empty list.",
         "def last_element(items):\n    return items[-1]\n", lambda items: items[-1], lambda r: (_ints(r),)),
    Spec("count_char", "Write a function count_char(s, c) that returns how many times the character c appears "
         "in the string s.",
         "def count_char(s, c):\n    return s.count(c)\n", lambda s, c: s.count(c),
         lambda r: (lambda w: (w, r.choice(w + "z")))(_word(r))),
    Spec("average", "Write a function average(nums) that returns the average (arithmetic mean) of a non-empty "
         "list of numbers.",
         "def average(nums):\n    return sum(nums) / len(nums)\n", lambda nums: sum(nums) / len(nums),
         lambda r: (_mean_list(r),)),
    # a little harder: a loop with state, a second condition, or an edge to get right
    Spec("second_largest", "Write a function second_largest(nums) that returns the second largest distinct "
         "number in a list (the list has at least two different numbers).",
         "def second_largest(nums):\n    return sorted(set(nums))[-2]\n", lambda nums: sorted(set(nums))[-2],
         lambda r: (_distinct_ints(r),)),
    Spec("remove_duplicates", "Write a function remove_duplicates(items) that returns a new list without "
         "repeated elements, keeping the first occurrence of each in the original order.",
         "def remove_duplicates(items):\n    seen = []\n    for x in items:\n        if x not in seen:\n"
         "            seen.append(x)\n    return seen\n", lambda items: list(dict.fromkeys(items)),
         lambda r: (_ints(r, 0, 5, (4, 8)),)),
    Spec("sum_digits", "Write a function sum_digits(n) that returns the sum of the decimal digits of a "
         "non-negative integer n.",
         "def sum_digits(n):\n    return sum(int(d) for d in str(n))\n", lambda n: sum(int(d) for d in str(n)),
         lambda r: (r.randint(0, 99999),)),
    Spec("is_prime", "Write a function is_prime(n) that returns True if the integer n is a prime number and "
         "False otherwise.",
         "def is_prime(n):\n    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n"
         "        if n % d == 0:\n            return False\n    return True\n",
         lambda n: n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1)), lambda r: (r.randint(0, 60),)),
    Spec("count_words", "Write a function count_words(s) that returns the number of words in the string s, "
         "where words are separated by spaces.",
         "def count_words(s):\n    return len(s.split())\n", lambda s: len(s.split()), lambda r: (_sentence(r),)),
    Spec("capitalize_words", "Write a function capitalize_words(s) that returns the string s with the first "
         "letter of every word in upper case and the other letters unchanged (s is lowercase words separated "
         "by single spaces).",
         "def capitalize_words(s):\n    return ' '.join(w[0].upper() + w[1:] for w in s.split(' '))\n",
         lambda s: " ".join(w[0].upper() + w[1:] for w in s.split(" ")), lambda r: (_sentence(r),)),
    Spec("running_total", "Write a function running_total(nums) that returns the list of running sums: the "
         "i-th element is the sum of the first i+1 numbers.",
         "def running_total(nums):\n    out = []\n    total = 0\n    for x in nums:\n        total += x\n"
         "        out.append(total)\n    return out\n",
         lambda nums: [sum(nums[:i + 1]) for i in range(len(nums))], lambda r: (_ints(r, -5, 10, (2, 6)),)),
    Spec("first_n_squares", "Write a function first_n_squares(n) that returns the list of the squares of 1, 2, "
         "..., n.",
         "def first_n_squares(n):\n    return [i * i for i in range(1, n + 1)]\n",
         lambda n: [i * i for i in range(1, n + 1)], lambda r: (r.randint(1, 6),)),
)


def _assert(name: str, args: tuple, expected: Any) -> str:
    call = f"{name}({', '.join(repr(a) for a in args)})"
    return f"assert {call} == {expected!r}"


def program_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n MBPP-format rows with 3 distinct asserts each, deterministic in (n, seed)."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        spec = SPECS[r.randrange(len(SPECS))]
        tests: list[str] = []
        for _ in range(50):                       # distinct tests; the samplers have enough variety
            args = spec.sample(r)
            t = _assert(spec.name, args, spec.ref(*args))
            if t not in tests:
                tests.append(t)
            if len(tests) == 3:
                break
        rows.append({"task_id": i + 1, "text": spec.text, "code": spec.code, "test_list": tests,
                     "test_setup_code": "", "challenge_test_list": []})
    return rows
