"""Numbers in free text: find them, parse them exactly, compare them.

Contract:
- `find_numbers(text)` returns every number written in `text`, in order, as written but normalised: thousands
  commas (`1,234`), a leading `$` and a trailing sentence period are removed. A `-` counts as a sign only
  where it cannot be a subtraction (`10-4` gives 10 and 4; `x = -4` gives -4). Digits glued to letters
  (`step2`, `x1`) are not numbers; units glued after are fine (`20km` gives 20).
- `parse_number(s)` reads an integer, a decimal, a simple fraction `a/b` or a percentage-free number into an
  exact `Fraction` (`5`, `5.0`, `5.00` and `10/2` are all 5), or None.
- `same_number(a, b)` is exact equality of two parsed numbers; False when either is not a number.
"""

from __future__ import annotations

import re
from fractions import Fraction

# a sign only at the start or after a character that is not a digit, letter, ')' or '.' (else: subtraction)
_NUMBER = re.compile(r"(?<![\w.)])(-?)\$?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?!\d)")
_PLAIN = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_FRACTION = re.compile(r"^[+-]?\d+\s*/\s*[+-]?\d+$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")


def find_numbers(text: str) -> list[str]:
    """All numbers in `text`, normalised (no thousands commas, no `$`), in order of appearance."""
    return [sign + body.replace(",", "") for sign, body in _NUMBER.findall(text)]


def last_number(text: str) -> str | None:
    found = find_numbers(text)
    return found[-1] if found else None


def parse_number(s: str | None) -> Fraction | None:
    """An exact value for an integer, decimal or simple fraction (`$`, commas, spaces tolerated)."""
    if s is None:
        return None
    t = s.strip().replace("$", "").replace(" ", "").rstrip(".")
    if _THOUSANDS.match(t):
        t = t.replace(",", "")
    try:
        if _PLAIN.match(t):
            return Fraction(t.rstrip(".") if t.endswith(".") else t)
        if _FRACTION.match(t):
            num, den = t.split("/")
            return Fraction(int(num), int(den)) if int(den) != 0 else None
    except (ValueError, ZeroDivisionError):
        return None
    return None


def same_number(a: str | None, b: str | None) -> bool:
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and x == y
