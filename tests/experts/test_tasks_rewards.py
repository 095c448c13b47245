"""experts.tasks graders: GSM8K numbers, MATH boxed answers, ARC letters, code extraction; loaders of each format."""

from __future__ import annotations

import json

import pytest

from experts.tasks import load_task
from experts.tasks.arc import chosen_label, load_arc
from experts.tasks.base import Example, read_jsonl
from experts.tasks.competition_math import load_math
from experts.tasks.gsm8k import gsm8k_answer, load_gsm8k
from experts.tasks.latex import equivalent, last_boxed, normalize_answer
from experts.tasks.numbers import find_numbers, parse_number
from experts.tasks.programs import entry_point_of, extract_code


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ================================================== GSM8K ==================================================

@pytest.fixture
def gsm8k(tmp_path):
    rows = [{"question": "Tom has 1,200 apples and buys 34 more. How many?", "answer": "1200+34=1234\n#### 1,234"},
            {"question": "A pen costs $3. What do 5 pens cost?", "answer": "3*5=15\n#### 15"},
            {"question": "What is 7 - 10?", "answer": "#### -3"}]
    return load_gsm8k(_jsonl(tmp_path / "gsm8k.jsonl", rows))


def test_gsm8k_loader_normalises_the_reference(gsm8k):
    assert gsm8k.name == "gsm8k" and gsm8k.label == "math" and len(gsm8k) == 3
    assert [e.answer for e in gsm8k] == ["1234", "15", "-3"]
    assert gsm8k.examples[0].metadata["solution"].endswith("#### 1,234")
    with pytest.raises(ValueError, match="####"):
        gsm8k_answer("no marker 42")


def test_gsm8k_reference_is_the_solution_in_the_instructions_form(gsm8k):
    """The likelihood objective's target: the worked lines, then the instruction's "The answer is N."."""
    apples, pens, neg = gsm8k.examples
    assert gsm8k.reference_text(apples) == "1200+34=1234\nThe answer is 1234."
    assert gsm8k.reference_text(pens) == "3*5=15\nThe answer is 15."
    assert gsm8k.reference_text(neg) == "The answer is -3."                 # no worked lines
    assert "The answer is <number>." in gsm8k.instruction
    assert all(gsm8k.correct(gsm8k.reference_text(e), e) for e in gsm8k)   # the grader accepts every reference


@pytest.mark.parametrize("completion, ok", [
    ("1200 + 34 = 1234. The answer is 1234.", True),
    ("The answer is 1,234", True),                       # thousands comma
    ("So he has $1,234.00 in total.", True),             # dollar sign, trailing .00
    ("The answer is 1234 apples, which is a lot!", True),  # text after the number
    ("1234.0", True),
    ("The answer is 1234. Wait, 1200 + 35 = 1235.", False),  # the last number counts
    ("The answer is 12,34", False),
    ("I do not know.", False),
    ("", False),
])
def test_gsm8k_last_number(gsm8k, completion, ok):
    ex = gsm8k.examples[0]
    assert gsm8k.correct(completion, ex) is ok
    assert gsm8k.reward(completion, ex) == (1.0 if ok else -1.0)


def test_gsm8k_money_and_negative_numbers(gsm8k):
    pens, neg = gsm8k.examples[1], gsm8k.examples[2]
    assert gsm8k.correct("5 pens cost $15.", pens)
    assert not gsm8k.correct("5 pens cost $15 and 1 pen costs $3.", pens)
    assert gsm8k.correct("7 - 10 = -3", neg)
    assert not gsm8k.correct("The answer is 3", neg)
    assert not gsm8k.correct("10-3", neg)                 # a subtraction, not the number -3


def test_numbers_helpers():
    assert find_numbers("x = -4, 10-4, step2, $1,000.5, 20km.") == ["-4", "10", "4", "1000.5", "20"]
    assert parse_number("5.0") == parse_number("5") == parse_number("10/2") == 5
    assert parse_number("1,000") == 1000 and parse_number("seven") is None and parse_number("1/0") is None


# =================================================== MATH ==================================================

def test_last_boxed_nested_braces():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{\sqrt{3}}{2}} end") == r"\frac{\sqrt{3}}{2}"
    assert last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert last_boxed(r"so \fbox{7}") == "7"
    assert last_boxed(r"\boxed 5$") == "5"
    assert last_boxed(r"\boxed{\frac{1}{2}") is None        # never closed
    assert last_boxed("no box") is None


@pytest.mark.parametrize("a, b", [
    (r"\frac{1}{2}", "1/2"), (r"\dfrac{3}{4}", "0.75"), (r"\tfrac12", "0.5"), (r"\frac{1}{\frac{1}{2}}", "2"),
    ("5", "5.0"), ("x = 5", "5"), (r"y=\frac{2}{3}", r"\frac{2}{3}"), (r"\left( 1, 2 \right)", "(1,2)"),
    (r"(1, \frac{1}{2})", "(1.0, 0.5)"), (r"90^\circ", "90"), (r"90^{\circ}", "90"), (r"50\%", "50"),
    (r"10\text{ cm}", "10"), (r"10 \text{ inches}", "10"), (r"\text{Monday}", "Monday"), (r"\$18.90", "18.9"),
    (r"\frac{\sqrt{3}}{2}", r"\sqrt{3}/2"), (r"\sqrt2", r"\sqrt{2}"), ("1,000", "1000"), ("-\\frac{1}{3}", "-1/3"),
    (r"\frac{-1}{3}", "-1/3"), (r"\frac{x+1}{2}", "(x+1)/2"), ("3 \\cdot 4", "12"), (r"\mathbf{7}", "7"),
])
def test_math_equivalent(a, b):
    assert equivalent(a, b) and equivalent(b, a), (normalize_answer(a), normalize_answer(b))


@pytest.mark.parametrize("a, b", [
    ("1/2", "0.49"), ("(1,2)", "[1,2]"), ("(1,2)", "(2,1)"), (r"2\sqrt{2}", r"\sqrt{8}"),  # no symbolic algebra
    ("5", "6"), ("x", "y"), ("0.333", r"\frac{1}{3}"), (r"\frac{1}{0}", "1"), ("", ""), (None, "1"),
])
def test_math_not_equivalent(a, b):
    assert not equivalent(a, b)


def test_math_loader_and_grader(tmp_path):
    rows = [{"problem": "Compute 1/2 + 1/4.", "solution": r"We get $\boxed{\frac{3}{4}}$.", "level": "Level 1",
             "type": "Prealgebra"},
            {"problem": "Angle?", "solution": r"The angle is $\boxed{90^\circ}$.", "level": "Level 2", "type": "Geometry"}]
    task = load_math(_jsonl(tmp_path / "math.jsonl", rows))
    frac, angle = task.examples
    assert frac.answer == r"\frac{3}{4}" and frac.metadata["level"] == "Level 1" and frac.metadata["type"] == "Prealgebra"
    assert task.correct(r"So the sum is \boxed{0.75}.", frac)
    assert task.correct(r"... \boxed{\dfrac{3}{4}}", frac)
    assert task.correct(r"maybe \boxed{1} no wait \boxed{3/4}", frac)      # the last box counts
    assert not task.correct(r"\boxed{3/4} hmm, actually \boxed{1}", frac)
    assert not task.correct("The answer is 3/4", frac)                      # no box: wrong
    assert task.correct(r"\boxed{90}", angle) and task.correct(r"\boxed{90^{\circ}}", angle)
    assert not task.correct(r"\boxed{180}", angle)
    with pytest.raises(ValueError, match="boxed"):
        load_math(_jsonl(tmp_path / "bad.jsonl", [{"problem": "p", "solution": "no box"}]))


# =================================================== ARC ===================================================

@pytest.fixture
def arc(tmp_path):
    rows = [{"id": "q1", "question": {"stem": "Which is a mammal?", "choices": [
        {"label": "A", "text": "a snake"}, {"label": "B", "text": "a dog"}, {"label": "C", "text": "a frog"},
        {"label": "D", "text": "a shark"}]}, "answerKey": "B"},
            {"id": "q2", "question": {"stem": "Pick two.", "choices": [
                {"label": "1", "text": "one"}, {"label": "2", "text": "two"}, {"label": "3", "text": "three"}]},
             "answerKey": "2"}]
    return load_arc(_jsonl(tmp_path / "arc.jsonl", rows))


def test_arc_prompt_lists_the_choices(arc):
    ex = arc.examples[0]
    assert ex.prompt == "Which is a mammal?\n(A) a snake\n(B) a dog\n(C) a frog\n(D) a shark"
    assert ex.answer == "B" and ex.metadata["labels"] == ["A", "B", "C", "D"] and ex.metadata["id"] == "q1"
    msgs = arc.messages(ex)
    assert msgs[-1]["role"] == "user" and "(D) a shark" in msgs[-1]["content"] and "The answer is (X)" in msgs[-1]["content"]


@pytest.mark.parametrize("completion, ok", [
    ("Dogs are mammals. The answer is (B).", True),
    ("the answer is: **B**", True),
    ("Answer is B.", True),
    ("The answer is (B) because (A) is a reptile.", True),
    ("First I thought the answer is (A). On reflection the answer is (B).", True),   # the last statement
    ("Dogs feed their young with milk.\n(B)", True),
    ("B", True),
    ("The answer is (A) or (B).", False),
    ("The answer is B and C", False),
    ("The answer is (A), (B)", False),
    ("The answer is A/B", False),
    ("The answer is either (A) or (B).", False),
    ("The answer is (B)... no wait, the answer is (C).", False),
    ("(B) is likely, but (A) too", False),
    ("The answer is (E).", False),           # not a choice
    ("The answer is (b).", False),
    ("A dog is a mammal.", False),           # no answer statement, last line is not a lone label
    ("", False),
])
def test_arc_strict_answers(arc, completion, ok):
    assert arc.correct(completion, arc.examples[0]) is ok


def test_arc_numeric_labels(arc):
    ex = arc.examples[1]
    assert arc.correct("The answer is (2).", ex)
    assert not arc.correct("The answer is (2) or (3).", ex) and not arc.correct("The answer is 12.", ex)
    assert chosen_label("The answer is (3)", ["1", "2", "3"]) == "3"


def test_arc_loader_rejects_a_key_that_is_not_a_choice(tmp_path):
    row = {"question": {"stem": "s", "choices": [{"label": "A", "text": "x"}]}, "answerKey": "Z"}
    with pytest.raises(ValueError, match="row 1"):
        load_arc(_jsonl(tmp_path / "bad.jsonl", [row]))


# ============================================ code extraction ===============================================

def test_extract_code_from_fences():
    text = "Here you go:\n```python\ndef f(x):\n    return x + 1\n```\nThis adds one."
    assert extract_code(text) == "def f(x):\n    return x + 1\n"
    two = "```\nprint('usage')\n```\nand\n```py\ndef g():\n    return 2\n```"
    assert extract_code(two, entry_point="g") == "def g():\n    return 2\n"   # the block that defines it
    assert extract_code(two) == "print('usage')\n"
    truncated = "```python\ndef h():\n    return 3\n"                             # fence never closed
    assert extract_code(truncated) == "def h():\n    return 3\n"


def test_extract_code_stray_closing_fence_and_truncation():
    stray = "def f(x):\n    return x * 3\n```\n\nThis function triples x. It uses `*`."
    assert extract_code(stray, "f") == "def f(x):\n    return x * 3\n"
    cut = "```python\ndef f(x):\n    y = x + 1\n    return y\n\ndef g(x):\n    return (x +"   # cut mid-line
    assert extract_code(cut, "f") == "def f(x):\n    y = x + 1\n    return y\n"


def test_extract_code_raw_text_cuts_prose():
    text = "Sure! Here is the function:\ndef f(x):\n    return x * 2\nThis function doubles x."
    code = extract_code(text)
    assert code == "def f(x):\n    return x * 2\n"
    compile(code, "t", "exec")


def test_entry_point_of_tests():
    assert entry_point_of("assert sum_list([1, 2]) == 3") == "sum_list"
    assert entry_point_of("assert set(similar(a, b)) == {1}") == "similar"
    assert entry_point_of("assert math.isclose(area(2), 12.56)") == "area"


def test_jsonl_errors_name_the_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"x.jsonl:3"):
        read_jsonl(p)
    with pytest.raises(ValueError, match="unknown task format"):
        load_task("squad", p)


def test_grader_exceptions_count_as_wrong():
    from experts.tasks.base import Task

    def boom(completion: str, example: Example) -> bool:
        raise RuntimeError("grader bug")

    t = Task("t", "math", [Example("q", "1")], boom)
    assert t.correct("1", t.examples[0]) is False and t.reward("1", t.examples[0]) == -1.0
