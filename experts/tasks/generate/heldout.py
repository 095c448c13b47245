"""Held-out test sets for the three families, written by another method than the training generators.

Contract: `heldout_rows(kind, n, seed)` returns n rows (no question twice, as far as the templates allow) of `arithmetic` (GSM8K), `programs` (MBPP) or `choice`
(ARC) in the same file formats as `experts.tasks.generate` (so `load_gsm8k` / `load_mbpp` / `load_arc` read
them), the same for the same (kind, n, seed) (`random.Random(seed)` only). They are for evaluation only:
never train on them. What makes them held out, besides the seed:
- arithmetic: the same difficulty as the training generator's level 1 (one addition or subtraction of small
  whole numbers) but other sentences: 14 situations written for this file (passengers, pages, points,
  temperatures, ages, ...), other names, no "has / gets more / gives away" template of the training set;
- programs: parametrised specs (a constant, a letter or a suffix in the request and in the function's name:
  `count_above_7`, `remove_letter_e`, ...), none of them a training spec, so the requests themselves differ
  (the training generator repeats 23 fixed requests with new asserts); the first rows take distinct
  (spec, parameter) pairs, so up to `len(PROGRAM_PARAMS)` requests are all different;
- choice: number questions in other words ("greatest", "closest to 50", "even"), comparisons of other
  quantities (speed, temperature, age) and 36 science / common-sense facts written for this file, none of
  them among the training generator's.
`tests/experts/test_tasks_heldout.py` checks that no held-out question or request is among (or a near copy
of) 2,000 rows of the training generators, and that every reference program passes its own tests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable

# ---------------------------------------------------------------- arithmetic (GSM8K format)
NAMES = ("Priya", "Carlos", "Hana", "Noah", "Fatima", "Jonas", "Aiko", "Diego", "Nadia", "Felix", "Rosa", "Yusuf")

# (question with {who}, {a}, {b}; operation): a + b or a - b
SITUATIONS: tuple[tuple[str, str], ...] = (
    ("A bus had {a} passengers. At the next stop {b} passengers got off. How many passengers are on the bus "
     "now?", "-"),
    ("{who} read {a} pages on Saturday and {b} pages on Sunday. How many pages did {who} read over the "
     "weekend?", "+"),
    ("A basketball team scored {a} points in the first half and {b} points in the second half. How many "
     "points did the team score in the whole game?", "+"),
    ("In the morning the thermometer showed {a} degrees. By noon it was {b} degrees warmer. What did the "
     "thermometer show at noon?", "+"),
    ("{who} is {a} years old. How old will {who} be in {b} years?", "+"),
    ("There were {a} birds sitting on a fence. Then {b} of them flew away. How many birds are still on the "
     "fence?", "-"),
    ("A class has {a} girls and {b} boys. How many children are in the class?", "+"),
    ("A baker made {a} muffins, and {b} of them were sold before lunch. How many muffins were not sold "
     "before lunch?", "-"),
    ("A parking lot had {a} cars in it. Later, {b} cars drove away. How many cars were left in the lot?", "-"),
    ("{who} planted {a} tulips in the spring and {b} roses in the summer. How many flowers did {who} plant "
     "in all?", "+"),
    ("A library lent out {a} books on Monday and {b} books on Tuesday. How many books did it lend out on the "
     "two days together?", "+"),
    ("A jar held {a} candies. The children ate {b} of them. How many candies remain in the jar?", "-"),
    ("{who} walked {a} kilometres this week, which is {b} kilometres more than last week. How many "
     "kilometres did {who} walk last week?", "-"),
    ("A farmer collected {a} eggs from the hens and then found {b} more in the barn. How many eggs did the "
     "farmer collect altogether?", "+"),
)


def _arithmetic(r: random.Random, i: int) -> dict[str, str]:
    text, op = SITUATIONS[i % len(SITUATIONS)] if i < len(SITUATIONS) else r.choice(SITUATIONS)
    if op == "+":
        a, b = r.randint(2, 15), r.randint(2, 15)
        value = a + b
    else:
        a = r.randint(5, 20)
        b = r.randint(1, a - 1)
        value = a - b
    question = text.format(who=r.choice(NAMES), a=a, b=b)
    return {"question": question, "answer": f"{a} {op} {b} = {value}\n#### {value}"}


# ---------------------------------------------------------------- programs (MBPP format)
@dataclass(frozen=True)
class ParamSpec:
    name: str                                           # the function's name, with {p}
    text: str                                           # the request, with {name} and {p}
    code: str                                           # reference solution, with {name} and {p}
    ref: Callable[[Any], Callable[..., Any]]            # p -> the same function, trusted
    sample: Callable[[random.Random, Any], tuple]       # (r, p) -> one argument tuple
    params: tuple[Any, ...]


def _nums(r: random.Random, lo: int = -5, hi: int = 25, k: tuple[int, int] = (3, 7)) -> list[int]:
    return [r.randint(lo, hi) for _ in range(r.randint(*k))]


def _text(r: random.Random) -> str:
    return r.choice(("garden", "window", "teacher", "river", "pepper", "sister", "letter", "orange", "tomato",
                     "bottle", "seven", "needle", "street", "rooster", "eleven", "carpet"))


def _words(r: random.Random) -> str:
    return " ".join(_text(r) if r.random() < 0.7 else r.choice(("a", "sun", "tea", "map", "be")) for _ in
                    range(r.randint(2, 5)))


LETTERS = ("a", "e", "i", "o", "r", "s", "t", "n", "l", "p")
KS = (2, 3, 4, 5, 6, 7, 8, 9, 10, 11)

PROGRAM_SPECS: tuple[ParamSpec, ...] = (
    ParamSpec("add_{p}_to_each", "Write a function {name}(nums) that returns a new list with {p} added to every "
              "number of the list nums.", "def {name}(nums):\n    return [x + {p} for x in nums]\n",
              lambda p: lambda nums: [x + p for x in nums], lambda r, p: (_nums(r),), KS),
    ParamSpec("count_above_{p}", "Write a function {name}(nums) that returns the number of elements of nums "
              "that exceed {p}.", "def {name}(nums):\n    return sum(1 for x in nums if x > {p})\n",
              lambda p: lambda nums: sum(1 for x in nums if x > p), lambda r, p: (_nums(r, 0, 15, (4, 8)),), KS),
    ParamSpec("times_{p}", "Write a function {name}(nums) that returns a new list in which every number of nums "
              "is multiplied by {p}.", "def {name}(nums):\n    return [x * {p} for x in nums]\n",
              lambda p: lambda nums: [x * p for x in nums], lambda r, p: (_nums(r),), KS),
    ParamSpec("repeat_{p}_times", "Write a function {name}(s) that returns the string s repeated {p} times, "
              "with nothing between the copies.", "def {name}(s):\n    return s * {p}\n",
              lambda p: lambda s: s * p, lambda r, p: (r.choice(("ab", "x", "hi", "ok", "z9")),), KS),
    ParamSpec("multiples_of_{p}", "Write a function {name}(nums) that returns the numbers of the list nums that "
              "are divisible by {p}, in their original order.",
              "def {name}(nums):\n    return [x for x in nums if x % {p} == 0]\n",
              lambda p: lambda nums: [x for x in nums if x % p == 0], lambda r, p: (_nums(r, 0, 40, (4, 8)),), KS),
    ParamSpec("first_{p}_items", "Write a function {name}(items) that returns a list of the first {p} elements "
              "of the list items (all of them if it has fewer).", "def {name}(items):\n    return items[:{p}]\n",
              lambda p: lambda items: items[:p], lambda r, p: (_nums(r, 0, 9, (1, 12)),), KS),
    ParamSpec("remove_letter_{p}", "Write a function {name}(s) that returns the string s with every letter "
              "'{p}' removed.", "def {name}(s):\n    return s.replace('{p}', '')\n",
              lambda p: lambda s: s.replace(p, ""), lambda r, p: (_text(r),), LETTERS),
    ParamSpec("starts_with_{p}", "Write a function {name}(word) that returns True if the string word begins "
              "with the letter '{p}', and False otherwise.", "def {name}(word):\n    return word.startswith('{p}')\n",
              lambda p: lambda w: w.startswith(p), lambda r, p: (r.choice((p + _text(r), _text(r))),), LETTERS),
    ParamSpec("cap_at_{p}", "Write a function {name}(nums) that returns a new list where every number of nums "
              "larger than {p} is replaced by {p}.", "def {name}(nums):\n    return [min(x, {p}) for x in nums]\n",
              lambda p: lambda nums: [min(x, p) for x in nums], lambda r, p: (_nums(r, 0, 15),), KS),
    ParamSpec("power_{p}", "Write a function {name}(n) that returns n raised to the power {p}.",
              "def {name}(n):\n    return n ** {p}\n", lambda p: lambda n: n ** p,
              lambda r, p: (r.randint(-4, 6),), KS[:8]),
    ParamSpec("words_starting_with_{p}", "Write a function {name}(sentence) that returns how many words of the "
              "string sentence (words separated by single spaces) begin with the letter '{p}'.",
              "def {name}(sentence):\n    return sum(1 for w in sentence.split(' ') if w.startswith('{p}'))\n",
              lambda p: lambda s: sum(1 for w in s.split(" ") if w.startswith(p)), lambda r, p: (_words(r),), LETTERS),
    ParamSpec("divisible_by_{p}", "Write a function {name}(n) that checks whether n is a multiple of {p} "
              "(a boolean result).", "def {name}(n):\n    return n % {p} == 0\n",
              lambda p: lambda n: n % p == 0, lambda r, p: (r.choice((p * r.randint(0, 12), r.randint(0, 99))),),
              KS[1:] + (12,)),     # not 2: that is the training set's is_even
    ParamSpec("last_{p}_chars", "Write a function {name}(s) that returns the last {p} characters of the string "
              "s (the whole string if it is shorter).", "def {name}(s):\n    return s[-{p}:]\n",
              lambda p: lambda s: s[-p:], lambda r, p: (_words(r),), KS),
    ParamSpec("zero_out_{p}", "Write a function {name}(nums) that returns a new list in which every number of "
              "nums equal to {p} is replaced by 0.", "def {name}(nums):\n    return [0 if x == {p} else x for x in nums]\n",
              lambda p: lambda nums: [0 if x == p else x for x in nums],
              lambda r, p: ([r.choice((p, r.randint(0, 12))) for _ in range(r.randint(3, 7))],), KS),
    ParamSpec("words_longer_than_{p}", "Write a function {name}(sentence) that returns how many words of the "
              "string sentence (words separated by single spaces) have more than {p} letters.",
              "def {name}(sentence):\n    return sum(1 for w in sentence.split(' ') if len(w) > {p})\n",
              lambda p: lambda s: sum(1 for w in s.split(" ") if len(w) > p), lambda r, p: (_words(r),), KS[:6]),
    ParamSpec("add_suffix_{p}", "Write a function {name}(words) that returns a new list with the text '{p}' "
              "appended to every string of the list words.", "def {name}(words):\n    return [w + '{p}' for w in words]\n",
              lambda p: lambda ws: [w + p for w in ws], lambda r, p: ([_text(r) for _ in range(r.randint(1, 4))],),
              ("ing", "ed", "er", "s", "ly", "ful", "ness", "est", "able", "less")),
    ParamSpec("sum_below_{p}", "Write a function {name}(nums) that returns the sum of the numbers in the list "
              "nums that are smaller than {p} (0 if there are none).",
              "def {name}(nums):\n    return sum(x for x in nums if x < {p})\n",
              lambda p: lambda nums: sum(x for x in nums if x < p), lambda r, p: (_nums(r, 0, 20, (3, 7)),), KS),
    ParamSpec("minus_{p}_each", "Write a function {name}(nums) that returns a new list with {p} subtracted from "
              "every number of the list nums.", "def {name}(nums):\n    return [x - {p} for x in nums]\n",
              lambda p: lambda nums: [x - p for x in nums], lambda r, p: (_nums(r),), KS),
    ParamSpec("index_of_letter_{p}", "Write a function {name}(s) that returns the position (0-based) of the first "
              "letter '{p}' in the string s, or -1 if s has none.", "def {name}(s):\n    return s.find('{p}')\n",
              lambda p: lambda s: s.find(p), lambda r, p: (_text(r),), LETTERS),
    ParamSpec("ends_with_{p}", "Write a function {name}(word) that returns True if the string word ends with the "
              "letter '{p}', and False otherwise.", "def {name}(word):\n    return word.endswith('{p}')\n",
              lambda p: lambda w: w.endswith(p), lambda r, p: (r.choice((_text(r) + p, _text(r))),), LETTERS),
    ParamSpec("mod_{p}_all", "Write a function {name}(nums) that returns a new list with the remainder of every "
              "number of the list nums divided by {p}.", "def {name}(nums):\n    return [x % {p} for x in nums]\n",
              lambda p: lambda nums: [x % p for x in nums], lambda r, p: (_nums(r, 0, 50),), KS),
)
PROGRAM_PARAMS: tuple[tuple[int, Any], ...] = tuple((i, p) for i, s in enumerate(PROGRAM_SPECS) for p in s.params)


def _program(r: random.Random, i: int, order: list[tuple[int, Any]]) -> dict[str, Any]:
    k, p = order[i] if i < len(order) else r.choice(order)
    spec = PROGRAM_SPECS[k]
    name = spec.name.format(p=p)
    fn = spec.ref(p)
    tests: list[str] = []
    for _ in range(60):
        args = spec.sample(r, p)
        t = f"assert {name}({', '.join(repr(a) for a in args)}) == {fn(*args)!r}"
        if t not in tests:
            tests.append(t)
        if len(tests) == 3:
            break
    return {"task_id": i + 1, "text": spec.text.format(name=name, p=p), "code": spec.code.format(name=name, p=p),
            "test_list": tests, "test_setup_code": "", "challenge_test_list": []}


# ---------------------------------------------------------------- choice (ARC format)
# (question, correct answer, distractors), written for this file
FACTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Which organ do people use to breathe?", "the lungs", ("the stomach", "the knees", "the ears")),
    ("What covers most of the surface of the Earth?", "water", ("sand", "ice cream", "grass")),
    ("Which of these animals can fly?", "a bat", ("a whale", "a horse", "a turtle")),
    ("What is the boiling point of water at sea level?", "100 degrees Celsius",
     ("10 degrees Celsius", "0 degrees Celsius", "500 degrees Celsius")),
    ("Which of these is a vegetable?", "a carrot", ("a stone", "a spoon", "a shoe")),
    ("What makes a shadow?", "an object blocking light", ("a loud sound", "warm air", "a strong smell")),
    ("How many legs does an insect have?", "six", ("two", "ten", "twenty")),
    ("Which of these is a metal?", "copper", ("cotton", "rubber", "paper")),
    ("Which animal is known for building dams in rivers?", "the beaver", ("the owl", "the camel", "the parrot")),
    ("What is the closest star to the Earth?", "the Sun", ("the Moon", "Mars", "the North Pole")),
    ("What do we call an animal that eats only plants?", "a herbivore", ("a carnivore", "a volcano", "a fossil")),
    ("What do roots do for a tree?", "hold it in the ground and take up water",
     ("make it fly", "turn it into stone", "make it sing")),
    ("Which of these takes the longest to happen?", "a child growing into an adult",
     ("a blink of an eye", "a sneeze", "a clap of the hands")),
    ("Which body part pumps blood?", "the heart", ("the hair", "the teeth", "the nails")),
    ("What happens to ice when it is left in a warm room?", "it melts", ("it grows", "it turns to rock",
                                                                          "it gets colder")),
    ("Which of these objects would float on water?", "a wooden block", ("an iron nail", "a rock", "a brick")),
    ("What does a compass help you find?", "direction", ("the time", "the weight of a box", "the temperature")),
    ("Which of these is a young frog?", "a tadpole", ("a calf", "a kitten", "a chick")),
    ("Which gas do plants take in from the air to make food?", "carbon dioxide", ("helium", "neon", "steam")),
    ("What kind of animal is a penguin?", "a bird", ("a fish", "an insect", "a reptile")),
    ("Why do we see lightning before we hear thunder?", "light travels faster than sound",
     ("sound travels faster than light", "thunder is quieter", "lightning is closer")),
    ("What do we call the path the Earth takes around the Sun?", "an orbit", ("a tunnel", "a river", "a fence")),
    ("Which of these lets electricity flow through it easily?", "a copper wire",
     ("a rubber band", "a wooden stick", "a plastic cup")),
    ("What do people use their teeth for?", "chewing food", ("hearing sounds", "seeing colours", "breathing")),
    ("Which of these needs water to live?", "a tree", ("a rock", "a glass bottle", "a metal key")),
    ("What causes day and night on Earth?", "the Earth spinning", ("the Moon shrinking", "clouds moving",
                                                                     "the wind blowing")),
    ("Which part of the body helps you smell?", "the nose", ("the elbow", "the foot", "the shoulder")),
    ("Which of these is the hardest?", "a diamond", ("a feather", "a sponge", "butter")),
    ("What do spiders make to catch insects?", "webs", ("nests of mud", "honey", "shells")),
    ("Which of these is a natural source of water?", "a lake", ("a plastic bag", "a brick wall", "a book")),
    ("Which season comes after winter?", "spring", ("autumn", "summer", "winter again")),
    ("What should you do before crossing a busy street?", "look both ways", ("close your eyes", "run without "
                                                                              "looking", "read a book")),
    ("What is a group of stars that forms a picture in the sky called?", "a constellation",
     ("a continent", "an ocean", "a valley")),
    ("Which of these animals hibernates in winter?", "a bear", ("a goldfish", "a parrot", "a cow")),
    ("Which of these helps a plant make seeds?", "its flowers", ("its shadow", "the pot", "the fence")),
    ("Which material is best for keeping a drink cold?", "an insulated flask", ("a thin paper cup",
                                                                                 "a metal pan on a stove",
                                                                                 "an open bowl in the sun")),
)

# things with a quantity to compare, chosen far apart: (noun, speed km/h, temperature °C, typical age years)
SPEEDS: tuple[tuple[str, float], ...] = (("a snail", 0.05), ("a person walking", 5), ("a bicycle", 20),
                                         ("a car on a highway", 110), ("a passenger jet", 900))
TEMPERATURES: tuple[tuple[str, float], ...] = (("an ice cube", -5), ("tap water", 15), ("a cup of hot tea", 70),
                                               ("a pizza oven", 400), ("the surface of the Sun", 5500))
AGES: tuple[tuple[str, float], ...] = (("a newborn baby", 0), ("a first-grade pupil", 6),
                                       ("a university student", 21), ("a grandparent", 70),
                                       ("an ancient redwood tree", 1500))
COMPARISONS = ((SPEEDS, "fastest", "slowest"), (TEMPERATURES, "hottest", "coldest"), (AGES, "oldest", "youngest"))


def _number_question(r: random.Random, k: int) -> tuple[str, str, list[str]]:
    kind = r.randrange(4)
    if kind == 0:
        nums = r.sample(range(10, 999), k)
        return "Which of these numbers is the greatest?", str(max(nums)), [str(x) for x in nums if x != max(nums)]
    if kind == 1:
        nums = r.sample(range(10, 999), k)
        return "Which of these numbers is less than all the others?", str(min(nums)), [
            str(x) for x in nums if x != min(nums)]
    if kind == 2:
        odd = r.sample(range(1, 99, 2), k - 1)
        even = r.randrange(2, 99, 2)
        return "Which of these numbers is even?", str(even), [str(x) for x in odd]
    target = 50
    nums = r.sample([x for x in range(1, 100) if x != target], k)
    dist = sorted(abs(x - target) for x in nums)
    while dist[0] == dist[1]:
        nums = r.sample([x for x in range(1, 100) if x != target], k)
        dist = sorted(abs(x - target) for x in nums)
    best = min(nums, key=lambda x: abs(x - target))
    return f"Which of these numbers is closest to {target}?", str(best), [str(x) for x in nums if x != best]


def _comparison(r: random.Random, k: int) -> tuple[str, str, list[str]]:
    things, big, small = r.choice(COMPARISONS)
    chosen = r.sample(things, k)
    if r.random() < 0.5:
        best, word = max(chosen, key=lambda t: t[1]), big
    else:
        best, word = min(chosen, key=lambda t: t[1]), small
    return f"Which one is normally the {word}?", best[0], [t[0] for t in chosen if t is not best]


def _fact(r: random.Random, k: int, i: int) -> tuple[str, str, list[str]]:
    stem, right, wrong = FACTS[(i // 3) % len(FACTS)] if i // 3 < len(FACTS) else r.choice(FACTS)
    return stem, right, r.sample(list(wrong), k - 1)


def _choice(r: random.Random, i: int, seed: int) -> dict[str, Any]:
    k = r.choice((3, 4))
    if i % 3 == 0:
        stem, right, wrong = _number_question(r, k)
    elif i % 3 == 1:
        stem, right, wrong = _comparison(r, k)
    else:
        stem, right, wrong = _fact(r, k, i)
    options = wrong[:k - 1]
    pos = r.randrange(len(options) + 1)
    options.insert(pos, right)
    labels = "ABCD"[:len(options)]
    return {"id": f"heldout-{seed}-{i}",
            "question": {"stem": stem, "choices": [{"label": lab, "text": t} for lab, t in zip(labels, options)]},
            "answerKey": labels[pos]}


def heldout_rows(kind: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n held-out rows of `kind` (arithmetic | programs | choice), deterministic in (kind, n, seed)."""
    r = random.Random(seed)
    if kind == "arithmetic":
        make, key = (lambda i: _arithmetic(r, i)), (lambda row: row["question"])
    elif kind == "programs":
        order = list(PROGRAM_PARAMS)
        r.shuffle(order)
        make, key = (lambda i: _program(r, i, order)), (lambda row: row["text"])
    elif kind == "choice":
        make, key = (lambda i: _choice(r, i, seed)), (lambda row: json.dumps(row["question"]))
    else:
        raise ValueError(f"unknown held-out kind {kind!r}; choose from ['arithmetic', 'choice', 'programs']")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i in range(n):
        for _ in range(50):                 # no question twice (while the templates have room for more)
            row = make(i)
            if key(row) not in seen:
                break
        seen.add(key(row))
        rows.append(row)
    return rows
