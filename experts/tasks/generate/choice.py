"""Multiple-choice reasoning questions in the ARC format: comparisons and simple facts, 3–4 options.

Contract: `choice_rows(n, seed)` returns n ARC rows (`id`, `question: {stem, choices: [{label, text}]}`,
`answerKey`), the same for the same (n, seed) (`random.Random(seed)` only). Labels are A, B, C[, D]; the
correct option's position is uniform. Three kinds, in turn: number comparisons (largest / smallest of 3-4
numbers), comparisons of everyday quantities written below (which is heavier, longer, ...), and science /
common-sense facts written below with hand-made distractors. All facts were written for this file.
Difficulty: SmolLM2-135M-Instruct (greedy, the ARC instruction, 64 new tokens) answered 2/16 right — below
chance: it mostly states a letter at once (often (B), sometimes a literal "(X)") without weighing the
options. Other instructions tried gave 1/16 and 3/16 (the latter biased towards the letter of its example).
So the base starts near 0 here; what an expert can learn first is to commit to the right letter.
"""

from __future__ import annotations

import random
from typing import Any

# (question, correct answer, distractors): simple science and common-sense facts
FACTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("What do plants need from sunlight to make their food?", "energy", ("sound", "salt", "wind")),
    ("Which gas do people need to breathe in to stay alive?", "oxygen", ("helium", "smoke", "steam")),
    ("What happens to water when it is cooled below 0 degrees Celsius?", "it freezes into ice",
     ("it boils", "it turns into sand", "it becomes hotter")),
    ("Which part of a plant takes in water from the soil?", "the roots", ("the flowers", "the fruit", "the petals")),
    ("Which of these is a source of light?", "the Sun", ("the Moon's rocks", "a mirror", "a shadow")),
    ("What force pulls objects toward the ground?", "gravity", ("magnetism of wood", "friction of air", "light")),
    ("Which animal is a mammal?", "a dog", ("a snake", "a frog", "a shark")),
    ("Which material is attracted to a magnet?", "iron", ("wood", "glass", "paper")),
    ("What is the main job of the heart?", "to pump blood through the body",
     ("to digest food", "to help us see", "to store memories")),
    ("Which of these is a liquid at room temperature?", "water", ("ice", "a rock", "a wooden spoon")),
    ("Why do people wear coats in winter?", "to keep warm", ("to get wet", "to feel hotter in summer", "to run slower")),
    ("Where does rain come from?", "clouds", ("the ground", "trees", "mountains of sand")),
    ("Which sense do we use to hear music?", "hearing", ("smell", "taste", "touch")),
    ("What do bees collect from flowers?", "nectar", ("sand", "milk", "stones")),
    ("Which season usually has the coldest weather?", "winter", ("summer", "spring", "autumn")),
    ("What is the best way to find out how heavy a bag of apples is?", "weigh it on a scale",
     ("measure it with a ruler", "look at its color", "count the letters on the bag")),
    ("What does a thermometer measure?", "temperature", ("distance", "weight", "time")),
    ("Which of these can a seed grow into?", "a plant", ("a rock", "a cloud", "a bird")),
    ("What do you use to cut paper?", "scissors", ("a spoon", "a pillow", "a sponge")),
    ("If a glass falls on a hard floor, what will most likely happen?", "it breaks",
     ("it grows", "it melts", "it floats up")),
    ("Which planet do we live on?", "Earth", ("Mars", "Jupiter", "Venus")),
    ("What do caterpillars turn into?", "butterflies", ("spiders", "fish", "birds")),
    ("Which of these is needed to make a fire burn?", "oxygen", ("ice", "sand", "water")),
    ("What is the Moon?", "a natural satellite of Earth", ("a star", "a planet with oceans", "a cloud")),
    ("Where should you keep milk so that it stays fresh?", "in the refrigerator",
     ("in the sun", "in the oven", "on a hot stove")),
    ("Which tool helps us see things that are very far away?", "a telescope", ("a spoon", "a hammer", "a ladder")),
    ("What do we call frozen rain that falls as small balls of ice?", "hail", ("fog", "dew", "steam")),
    ("Which animal lives in water and breathes with gills?", "a fish", ("a cow", "a cat", "an eagle")),
    ("What happens to a puddle on a hot sunny day?", "the water evaporates",
     ("the water turns to ice", "the puddle gets bigger", "the water turns into sand")),
    ("Which of these is a renewable source of energy?", "wind", ("coal", "oil", "natural gas")),
)

# things with a size to compare: (noun, weight in kg, length in m) — rough, chosen far apart
THINGS: tuple[tuple[str, float, float], ...] = (
    ("an ant", 0.000003, 0.004), ("a mouse", 0.02, 0.08), ("a cat", 4, 0.5), ("a dog", 25, 0.9),
    ("a horse", 500, 2.4), ("an elephant", 5000, 6), ("a blue whale", 150000, 25), ("a pencil", 0.01, 0.18),
    ("a car", 1300, 4.5), ("a bus", 12000, 12),
)
QUANTITIES = (("heaviest", "lightest", 1), ("longest", "shortest", 2))


def _numbers(r: random.Random, k: int) -> tuple[str, str, list[str]]:
    nums = r.sample(range(1, 100), k)
    if r.random() < 0.5:
        return "Which number is the largest?", str(max(nums)), [str(x) for x in nums if x != max(nums)]
    return "Which number is the smallest?", str(min(nums)), [str(x) for x in nums if x != min(nums)]


def _things(r: random.Random, k: int) -> tuple[str, str, list[str]]:
    big, small, idx = r.choice(QUANTITIES)
    chosen = r.sample(THINGS, k)
    for _ in range(20):       # avoid near ties: each value at least 3x the next
        vals = sorted(t[idx] for t in chosen)
        if all(b >= 3 * a for a, b in zip(vals, vals[1:])):
            break
        chosen = r.sample(THINGS, k)
    if r.random() < 0.5:
        best = max(chosen, key=lambda t: t[idx])
        stem = f"Which of these is usually the {big}?"
    else:
        best = min(chosen, key=lambda t: t[idx])
        stem = f"Which of these is usually the {small}?"
    return stem, best[0], [t[0] for t in chosen if t is not best]


def _fact(r: random.Random, k: int) -> tuple[str, str, list[str]]:
    stem, right, wrong = r.choice(FACTS)
    return stem, right, r.sample(list(wrong), k - 1)


KINDS = (_numbers, _things, _fact)


def choice_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n ARC-format rows, deterministic in (n, seed)."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        k = r.choice((3, 4))
        stem, right, wrong = KINDS[i % len(KINDS)](r, k)
        options = wrong[:k - 1]
        pos = r.randrange(len(options) + 1)
        options.insert(pos, right)
        labels = "ABCD"[:len(options)]
        rows.append({"id": f"gen-{seed}-{i}",
                     "question": {"stem": stem, "choices": [{"label": lab, "text": t} for lab, t in zip(labels, options)]},
                     "answerKey": labels[pos]})
    return rows
