"""LaTeX answers (the MATH dataset): the last `\\boxed{...}` and equivalence of two final answers.

Contract:
- `last_boxed(text)` returns the content of the last `\\boxed{...}` or `\\fbox{...}` with nested braces
  balanced (`\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`), also the brace-less `\\boxed 5`; None when there
  is none or its braces never close.
- `normalize_answer(s)` rewrites an answer into a canonical string: no spaces, `\\left`/`\\right`, `\\!`,
  `$`, degrees (`^\\circ`), `\\%`, trailing period; `\\dfrac`/`\\tfrac` → `\\frac`; `\\frac{a}{b}` and
  `\\frac12` → `a/b` (parenthesised when a or b is compound); `\\sqrt2` → `\\sqrt{2}`; `\\text{...}` (and
  `\\mbox`, `\\mathrm`, `\\textbf`) unwrapped, or dropped when it is a unit after a value (`5\\text{ cm}`);
  a leading single-variable assignment (`x = 5`) dropped; thousands commas dropped from plain numbers.
- `equivalent(a, b)`: the normalised strings are equal, or both are numbers (integers, decimals, simple
  fractions, and arithmetic over them) with the same exact value (`5` = `5.0` = `10/2`, `0.5` =
  `\\frac{1}{2}`, `\\frac{1}{\\frac{1}{2}}` = `2`), or both are
  tuples/intervals with the same brackets whose elements are pairwise equivalent. No sympy: symbolic
  equality beyond these rewrites (`2\\sqrt{2}` vs `\\sqrt{8}`) is not recognised and counts as different.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOX_CMDS = ("\\boxed", "\\fbox")


def _balanced(text: str, start: int) -> int | None:
    """Index just after the `}` matching the `{` at `start`, or None."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "\\":            # an escaped brace \{ or \} does not count
            continue
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces balanced), else None."""
    best = -1
    cmd_len = 0
    for cmd in _BOX_CMDS:
        i = text.rfind(cmd)
        if i > best:
            best, cmd_len = i, len(cmd)
    if best < 0:
        return None
    j = best + cmd_len
    if j < len(text) and text[j] == "{":
        end = _balanced(text, j)
        return text[j + 1:end - 1].strip() if end is not None else None
    m = re.match(r"\s+([^\s$]+)", text[j:])       # \boxed 5
    return m.group(1) if m else None


# -- normalisation ------------------------------------------------------------------------------------------

_TEXT_CMDS = ("\\text", "\\textbf", "\\mbox", "\\mathrm", "\\textnormal", "\\mathbf")
_UNIT_AFTER_VALUE = re.compile(r"^(.*?[0-9}).])\s*\\(?:text|mbox|mathrm|textnormal)\s*\{\s*[A-Za-z][A-Za-z .^{}0-9]*\}$")
_ASSIGN = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(?=\S)")


def _unwrap(s: str, cmd: str) -> str:
    """Replace every `cmd{X}` with `X` (braces balanced; an unclosed one is left as it is)."""
    while True:
        j = s.find(cmd + "{")
        if j < 0:
            return s
        end = _balanced(s, j + len(cmd))
        if end is None:
            return s
        s = s[:j] + s[j + len(cmd) + 1:end - 1] + s[end:]


def _group(s: str, i: int) -> tuple[str, int] | None:
    """The argument starting at s[i]: `{...}` (content) or one character; with the index after it."""
    if i >= len(s):
        return None
    if s[i] == "{":
        end = _balanced(s, i)
        return (s[i + 1:end - 1], end) if end is not None else None
    return s[i], i + 1


def _simple(x: str) -> bool:
    return re.fullmatch(r"-?[\w.]+|\\?[A-Za-z]+(\{[^{}]*\})?|\\sqrt\{[^{}]*\}", x) is not None


def _fracs(s: str) -> str:
    """`\\frac{a}{b}` → `a/b` (or `(a)/(b)`), innermost first so nested fractions work."""
    while True:
        j = s.rfind("\\frac")
        if j < 0:
            return s
        num = _group(s, j + 5)
        den = _group(s, num[1]) if num else None
        if not num or not den:
            return s.replace("\\frac", "", 1)   # malformed: drop the command, keep the rest
        a, b = num[0], den[0]
        a = a if _simple(a) else f"({a})"
        b = b if _simple(b) else f"({b})"
        s = s[:j] + f"{a}/{b}" + s[den[1]:]


def normalize_answer(s: str) -> str:
    """A canonical form of a final answer (see the module contract)."""
    t = s.strip()
    # 1. whitespace-like commands and delimiters
    for old, new in (("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", ""), ("~", ""),
                     ("\\left", ""), ("\\right", ""), ("\\displaystyle", ""), ("\\$", ""), ("$", ""),
                     ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cdot", "*"), ("\\times", "*"),
                     ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\\degree", ""), ("°", ""),
                     ("\\%", ""), ("%", "")):
        t = t.replace(old, new)
    t = re.sub(r"\\(?:[,;:!]|\s)", "", t)
    # 2. units written as text after a value, then the remaining text wrappers
    m = _UNIT_AFTER_VALUE.match(t.strip())
    if m:
        t = m.group(1)
    for cmd in _TEXT_CMDS:
        t = _unwrap(t, cmd)
    # 3. a leading single-variable assignment: x = 5, y_1 = 3
    t = _ASSIGN.sub("", t.strip(), count=1)
    # 4. \sqrt2 → \sqrt{2}; fractions → a/b
    t = re.sub(r"\\sqrt(?![{\[])\s*(\w)", r"\\sqrt{\1}", t)
    t = _fracs(t)
    # 5. spaces, trailing period, thousands commas in a plain number
    t = re.sub(r"\s+", "", t).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", t):
        t = t.replace(",", "")
    if t.startswith("{") and t.endswith("}") and _balanced(t, 0) == len(t):
        t = t[1:-1]
    return t


_TOKEN = re.compile(r"\s*(\d+\.?\d*|\.\d+|[-+*/()])")


def _as_number(s: str) -> Fraction | None:
    """Exact value of an arithmetic expression over numbers (+ − * /, parentheses, unary minus), else None."""
    tokens: list[str] = []
    pos = 0
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m:
            return None
        tokens.append(m.group(1))
        pos = m.end()
    if not tokens or len(tokens) > 64:
        return None
    i = 0

    def peek() -> str | None:
        return tokens[i] if i < len(tokens) else None

    def atom() -> Fraction:
        nonlocal i
        t = peek()
        i += 1
        if t == "-":
            return -atom()
        if t == "+":
            return atom()
        if t == "(":
            v = expr()
            if peek() != ")":
                raise ValueError("unbalanced")
            i += 1
            return v
        if t is None or t in "*/)":
            raise ValueError("syntax")
        return Fraction(t)

    def term() -> Fraction:
        nonlocal i
        v = atom()
        while peek() in ("*", "/"):
            op = tokens[i]
            i += 1
            w = atom()
            v = v * w if op == "*" else v / w
        return v

    def expr() -> Fraction:
        nonlocal i
        v = term()
        while peek() in ("+", "-"):
            op = tokens[i]
            i += 1
            w = term()
            v = v + w if op == "+" else v - w
        return v

    try:
        v = expr()
    except (ValueError, ZeroDivisionError):
        return None
    return v if i == len(tokens) else None


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def _equal_normalized(a: str, b: str) -> bool:
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        return x == y
    # tuples / intervals: same brackets, same arity, elementwise equivalent
    if len(a) > 2 and len(b) > 2 and a[0] == b[0] and a[-1] == b[-1] and a[0] in "([" and a[-1] in ")]":
        pa, pb = _split_top(a[1:-1]), _split_top(b[1:-1])
        if len(pa) == len(pb) > 1:
            return all(_equal_normalized(p, q) for p, q in zip(pa, pb))
    if "," in a and "," in b and a[0] not in "([" and b[0] not in "([":   # bare lists: 1,2 vs 1, 2.0
        pa, pb = _split_top(a), _split_top(b)
        if len(pa) == len(pb) > 1:
            return all(_equal_normalized(p, q) for p, q in zip(pa, pb))
    return False


def equivalent(a: str | None, b: str | None) -> bool:
    """Whether two final answers are the same (see the module contract); None is never equivalent."""
    if a is None or b is None:
        return False
    na, nb = normalize_answer(a), normalize_answer(b)
    return bool(na) and _equal_normalized(na, nb)
