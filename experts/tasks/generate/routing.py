"""Seeded training prompts for the dispatch classifier: every label (code, math, reasoning, other), many
phrasings and lengths, balanced, from templates written for this file.

Contract: `routing_rows(n, seed, split)` returns n rows (`prompt`, `label`, `template`), n/4 per label in
turn (code, math, reasoning, other, code, ...), the same for the same arguments (`random.Random(seed)` only).
Each label has its own list of templates (a format string with slots, and the fillers of each slot);
`split="train"` draws from every template but the validation ones, `split="valid"` only from those (every
`VALID_EVERY`-th template of each label), so a validation split is disjoint by template, not only by example.
`"all"` draws from all. `write_routing(folder, n, seed, split)` writes one `<label>.jsonl` per label (rows
`prompt`, `template`), the files `t2 train-classifier --source LABEL:prompts:FILE` reads.

Labels follow experts.dispatch.SYSTEM_PROMPT: code = programming of any kind (writing, fixing, explaining
code, tools such as git/SQL/shell); math = anything whose answer is computed (arithmetic, percentages,
algebra, geometry, probability, calculus, statistics, proofs); reasoning = questions answered by thinking
rather than computing: science explanations, commonsense, logic and deduction, multiple choice; other =
everything else: writing and creative tasks, translation, conversation, advice, facts and definitions,
opinions, planning.
These prompts are independent of the held-out routing set (tests/data/routing/), which is hand-written and
HumanEval; `tests/experts/test_routing_data.py` checks that no held-out prompt appears here.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from experts.tasks.base import write_jsonl

VALID_EVERY = 5

LANGS = ["Python", "JavaScript", "TypeScript", "Java", "C", "C++", "C#", "Go", "Rust", "Ruby", "PHP", "Kotlin",
         "Swift", "Scala", "Haskell", "Lua", "R", "Perl", "Bash"]
CODE_TASKS = ["removes duplicates from an array", "counts the vowels in a string", "returns the n-th prime",
              "flattens a nested list", "checks whether a number is a power of two", "sorts a list of "
              "dictionaries by a key", "finds the longest word in a sentence", "converts Roman numerals to "
              "integers", "validates an IPv4 address", "computes the moving average of a list",
              "groups words that are anagrams", "reads a text file and prints the most common word",
              "merges two dictionaries", "rotates a matrix by 90 degrees", "checks if brackets are balanced",
              "returns the Levenshtein distance of two strings", "generates all permutations of a string",
              "chunks a list into pieces of size k", "parses a date string into a date object",
              "implements a least-recently-used cache", "converts camelCase to snake_case",
              "detects a cycle in a linked list", "serializes a binary tree", "debounces a callback"]
ERRORS = ["IndexError: list index out of range", "KeyError: 'name'", "NullPointerException",
          "undefined is not a function", "ModuleNotFoundError: No module named 'requests'",
          "segmentation fault (core dumped)", "error[E0382]: use of moved value", "StackOverflowError",
          "SyntaxError: unexpected EOF while parsing", "ZeroDivisionError: division by zero",
          "TypeError: can only concatenate str (not \"int\") to str", "cannot find symbol",
          "permission denied (publickey)", "CORS policy: No 'Access-Control-Allow-Origin' header"]
SNIPPETS = ["for i in range(len(a)):\n    if a[i] = 0:\n        print(i)",
            "def area(r):\n    return 3.14 * r ** 2\nprint(area('5'))",
            "const xs = [1, 2, 3];\nxs.map(x => { x * 2 });",
            "SELECT * FROM orders WHERE date > '2024-01-01' ORDER date DESC",
            "int main() {\n  int arr[5];\n  for (int i = 0; i <= 5; i++) arr[i] = i;\n}",
            "while True:\n    line = input()\n    if line == 'q': break\nprint(lines)",
            "public static void main(String args) { System.out.println(\"hi\"); }",
            "let mut v = Vec::new();\nlet first = &v[0];\nv.push(1);",
            "x = {'a': 1}\nfor k, v in x:\n    print(k, v)",
            "UPDATE users SET active = 0",
            "ls *.txt | xargs rm",
            "import numpy as np\nm = np.zeros(3, 3)"]
TOOLS = ["git", "Docker", "Kubernetes", "npm", "pip", "conda", "Makefiles", "CMake", "SQL joins",
         "regular expressions", "async/await", "unit tests", "a REST API", "GraphQL", "websockets",
         "a linked list", "recursion", "a binary heap", "dynamic programming", "threads", "pointers",
         "generics", "closures", "decorators", "virtual environments", "cron jobs", "SSH keys"]

CODE = [
    ("Write a {lang} function that {task}.", {}),
    ("{lang}: {task} -- can you show me the code?", {}),
    ("I need a small {lang} program which {task}. Keep it simple please.", {}),
    ("How would I write something in {lang} that {task}?", {}),
    ("Getting `{err}` when I run my script. How do I fix it?", {}),
    ("What is wrong with this code?\n\n{snippet}", {}),
    ("This doesn't work, please debug:\n{snippet}", {}),
    ("Can you explain how {tool} work in programming, with a short example?", {}),
    ("Give me a quick tutorial on {tool} for a beginner developer.", {}),
    ("Refactor this to be more readable:\n{snippet}", {}),
    ("implement a function that {task} in {lang}, with comments", {}),
    ("Write a class in {lang} that {task}, and show how to use it.", {}),
    ("My program crashes with {err}. Here is the code:\n{snippet}", {}),
    ("Best practices for {tool} in a {lang} project?", {}),
    ("Translate this snippet into {lang}:\n{snippet}", {}),
    ("Is there a built-in way in {lang} to do this: {task}?", {}),
    ("Write a shell command to {shell}.", {"shell": ["find all files larger than 100 MB", "kill the process "
                                                     "listening on port 8080", "replace foo with bar in every "
                                                     ".txt file", "show the 10 biggest folders",
                                                     "compress a folder into a tar.gz",
                                                     "list the last 5 commits of a git repo"]}),
    ("Write an SQL query that {sql}.", {"sql": ["lists customers who never placed an order", "counts orders "
                                                "per month", "finds duplicate emails in a users table",
                                                "returns the top 3 products by revenue",
                                                "joins employees with their managers"]}),
    ("Code review please, anything to improve?\n```\n{snippet}\n```", {}),
    ("What's the time and space complexity of a function that {task}?", {}),
]

NAMES = ["Maria", "Ahmed", "Liu", "Sofia", "Kofi", "Priya", "Jonas", "Emma", "Diego", "Aisha", "Noah", "Yuki"]
ITEMS = ["apples", "books", "stickers", "pencils", "cupcakes", "tickets", "stamps", "shells", "coins", "cards"]
MATH = [
    ("Calculate {a} * {b} + {c}.", {}),
    ("What do you get if you divide {big} by {d}?", {}),
    ("{name} buys {a} {item} at ${p} each and pays with a ${bill} note. How much change does {name} get?", {}),
    ("Increase {b} by {pct} percent. What is the result?", {}),
    ("A jacket priced at ${big} is discounted by {pct}%. How much do I save?", {}),
    ("Solve the equation {a}y - {c} = {b}.", {}),
    ("Find x if x/{d} + {a} = {b}.", {}),
    ("What is the perimeter of a square with side {a} meters?", {}),
    ("Compute the area of a triangle with base {a} and height {b}.", {}),
    ("A bag has {a} red and {b} blue marbles. If I draw one at random, what is the chance it is blue?", {}),
    ("Differentiate f(x) = {a}x^{e} - {c}x + {d}.", {}),
    ("Evaluate the integral of {a}x^{e} from 0 to {d}.", {}),
    ("What is the average of {a}, {b}, {c} and {d}?", {}),
    ("{name} reads {a} pages a day. How many days to finish a {big}-page novel?", {}),
    ("If {a} machines make {b} parts in an hour, how many parts do {c} machines make in {d} hours?", {}),
    ("Convert {big} grams into kilograms.", {}),
    ("How many hours are {big} minutes?", {}),
    ("What is {a} squared minus {c} cubed?", {}),
    ("Find the least common multiple of {a} and {b}.", {}),
    ("Factor the polynomial x^2 + {s}x + {pq}.", {}),
    ("Let $f(x) = {a}x + {c}$. Find $f^{{-1}}({b})$.", {}),
    ("How many different {k}-letter codes can be made from {a} distinct letters without repetition?", {}),
    ("The price of a stock went from ${a} to ${b}. By what percentage did it change?", {}),
    ("A car uses {d} liters of fuel per 100 km. How much fuel for a {big} km trip?", {}),
    ("Show that {a}^2 - {c}^2 equals ({a} - {c})({a} + {c}).", {}),
    ("A savings account pays {pct}% simple interest a year. How much interest does ${big} earn in {d} years?",
     {}),
]

SCIENCE = ["magnets attract some metals but not others", "the Moon has phases", "metal expands when heated",
           "plants grow toward the light", "we get sunburned", "boats made of steel can float",
           "rainbows appear after rain", "the ocean is salty", "our breath is visible on cold days",
           "birds migrate south", "a compass points north", "bubbles are round", "onions make us cry",
           "stars twinkle", "wet clothes dry faster on a windy day", "fruit turns brown after cutting",
           "volcanoes erupt", "earthquakes happen", "popcorn pops", "the desert is cold at night"]
CHOICES = [("Which of these is a living thing?", "a mushroom", ["a rock", "a cloud", "a river"]),
           ("Which tool is best for looking at tiny cells?", "a microscope", ["a telescope", "a magnifying "
            "mirror", "a thermometer"]),
           ("What makes a shadow?", "an object blocking light", ["light passing through glass",
            "sound bouncing", "heat rising"]),
           ("Which is a renewable resource?", "wind", ["coal", "oil", "natural gas"]),
           ("Which animal is a predator?", "a wolf", ["a rabbit", "a deer", "a sheep"]),
           ("Why does a ball stop rolling on grass?", "friction", ["gravity pushes up", "magnetism",
            "the grass is cold"]),
           ("What is the best way to keep ice from melting?", "wrap it in a towel in a cooler",
            ["leave it in the sun", "put it on a hot pan", "blow warm air on it"]),
           ("Which state of matter has a fixed shape?", "solid", ["liquid", "gas", "steam"])]
PEOPLE = ["Ravi", "Lena", "Omar", "Greta", "Tariq", "Ines", "Paul", "Mei"]
REASONING = [
    ("Why is it that {sci}?", {}),
    ("Can you explain the science behind why {sci}?", {}),
    ("My kid asked me why {sci}. What should I tell her?", {}),
    ("{q} (A) {o1} (B) {o2} (C) {o3} (D) {o4}", {}),
    ("Question: {q}\nOptions: {o1}; {o2}; {o3}; {o4}", {}),
    ("{p1} is older than {p2}, and {p3} is younger than {p2}. Who is the oldest?", {}),
    ("If every {x} is a {y} and no {y} is a {w}, can a {x} be a {w}? Explain.", {}),
    ("Some {x}s are {y}s. All {y}s are {w}s. Does it follow that some {x}s are {w}s?", {}),
    ("{p1} always lies and {p2} always tells the truth. {p1} says '{p2} is a liar.' Who is telling the truth?",
     {}),
    ("What would most likely happen if {event}?", {}),
    ("Think it through: {event}. What is the most probable consequence?", {}),
    ("Is this reasoning sound? 'All {x}s have wings. {p1} has wings. So {p1} is a {x}.'", {}),
    ("A detective finds {clue}. What can she reasonably infer?", {}),
    ("What is the cause and what is the effect here: {event}?", {}),
    ("Complete the analogy: {an} ", {}),
    ("Which conclusion is best supported? {event}.", {}),
    ("{p1}, {p2} and {p3} each own one pet: a cat, a dog or a fish. {p1} is allergic to fur and {p2} "
     "walks his pet every day. Who owns the cat?", {}),
    ("Why is it a bad idea to {bad}?", {}),
    ("What is the logical flaw in saying '{fallacy}'?", {}),
    ("How do scientists know that {sci}? What evidence supports it?", {}),
]
XS = ["glorp", "zib", "mammal", "square", "teacher", "robot", "tulip", "planet", "violin", "dragon"]
EVENTS = ["a town cut down all the trees on a hillside", "a lake froze solid in winter", "the bees in an orchard "
          "disappeared", "you left milk out of the fridge for two days", "a city doubled its bus routes",
          "the power went out in a freezer for a day", "a river was dammed upstream", "the school clock is "
          "five minutes fast", "a plant was watered with salt water", "everyone in a room started yawning"]
CLUES = ["muddy footprints leading from the garden to the kitchen", "a half-eaten sandwich that is still warm",
         "a broken window with the glass on the outside", "two coffee cups in the sink of a man who lives alone"]
ANALOGIES = ["hot is to cold as up is to ...", "bird is to nest as bee is to ...", "pen is to writer as "
             "brush is to ...", "fish is to water as camel is to ...", "glove is to hand as sock is to ..."]
BAD = ["mix bleach and ammonia", "swim during a thunderstorm", "leave a candle burning overnight",
       "touch a pan right out of the oven", "park under a dead tree in a storm"]
FALLACIES = ["everyone is buying it, so it must be good", "I wore my lucky socks and we won, so the socks "
             "work", "if we allow one exception, soon there will be no rules at all", "he is not a "
             "scientist, so his argument about recycling is wrong"]

TOPICS = ["the sea", "a rainy Monday", "friendship", "my cat", "the first snow", "coffee", "the city at night",
          "growing old", "a lost key", "spring flowers", "a long road trip", "the mountains"]
WORDS = ["serendipity", "melancholy", "ubiquitous", "resilient", "nostalgia", "candid", "meticulous",
         "whimsical", "pragmatic", "eloquent"]
PHRASES = ["I would like a cup of tea", "See you tomorrow", "How much does this cost?", "My name is Anna",
           "The weather is lovely today", "Where is the nearest pharmacy?", "I am learning to cook",
           "Happy new year to all of you"]
TONGUES = ["Italian", "Portuguese", "Dutch", "Korean", "Chinese", "Arabic", "Russian", "Turkish", "Swedish",
           "Polish", "Hindi", "Greek"]
OTHER = [
    ("Write a poem about {topic}.", {}),
    ("Compose a few lines of verse about {topic}, please", {}),
    ("Could you write a short story set in {place}?", {}),
    ("Translate into {tongue}: {phrase}", {}),
    ("How do you say '{phrase}' in {tongue}?", {}),
    ("{greet}", {"greet": ["Hello there!", "hey", "Good morning :)", "What's up?", "Nice to meet you!",
                           "Are you a robot?", "I'm bored, talk to me", "lol ok", "See you later!",
                           "Can we chat for a bit?"]}),
    ("What's the meaning of the word '{word}'?", {}),
    ("Use '{word}' in a sentence.", {}),
    ("Give me some tips for {activity}.", {}),
    ("I want to get better at {activity}. Where should I start?", {}),
    ("Recommend a {media} for someone who likes {genre}.", {}),
    ("Write a cover letter for a job as a {job}.", {}),
    ("Draft a message to my {rel} saying I'll be late for dinner.", {}),
    ("Who was {person}?", {"person": ["Cleopatra", "Frida Kahlo", "Genghis Khan", "Nelson Mandela",
                                      "Ada Lovelace", "Leonardo da Vinci", "Joan of Arc", "Confucius"]}),
    ("What country is {city} in?", {"city": ["Marrakesh", "Kyoto", "Lima", "Krakow", "Nairobi", "Porto",
                                             "Auckland", "Montreal"]}),
    ("Tell me about the history of {place}.", {}),
    ("What should I cook tonight with {food}?", {}),
    ("Plan a weekend itinerary for {place}.", {}),
    ("Summarize this in one sentence: {passage}", {}),
    ("Make this sound friendlier: '{rude}'", {}),
    ("What do you think about {opinion}?", {}),
    ("Write a {form} for {occasion}.", {}),
    ("Suggest a name for my new {thing}.", {}),
    ("I'm feeling {mood} today.", {}),
    ("What is {fact}?", {"fact": ["the tallest building in the world", "the official language of Brazil",
                                  "the largest desert on Earth", "the currency of Japan", "the longest river "
                                  "in Europe", "the most spoken language"]}),
]
PLACES = ["Lisbon", "a small fishing village", "Tokyo", "the Scottish Highlands", "a space station", "Istanbul",
          "an old library", "Buenos Aires", "a desert oasis", "Vienna"]
ACTIVITIES = ["public speaking", "sleeping better", "learning the guitar", "running a 10k", "making friends "
              "in a new city", "writing a novel", "saving money", "gardening on a balcony", "drawing portraits"]
MEDIA = ["book", "movie", "TV series", "podcast", "video game", "album"]
GENRES = ["science fiction", "cozy mysteries", "historical drama", "jazz", "fantasy", "true crime", "comedy"]
JOBS = ["barista", "nurse", "graphic designer", "librarian", "sales assistant", "park ranger"]
RELS = ["mom", "partner", "roommate", "boss", "best friend"]
FOODS = ["rice, eggs and spinach", "chickpeas and tomatoes", "leftover chicken", "pasta and mushrooms",
         "potatoes and cheese"]
PASSAGES = ["The meeting was moved from Tuesday to Thursday because the manager is travelling, and everyone "
            "should bring their quarterly notes.", "Our library will close early on Friday for renovations "
            "and will reopen on Monday with a new children's section.", "After years of training, the young "
            "runner finally won the city marathon, thanking her coach and her family."]
RUDE = ["Send me the file now.", "Your order is late, deal with it.", "Stop calling me.", "I need this fixed "
        "today."]
OPINIONS = ["pineapple on pizza", "working from home", "reading on an e-reader", "modern art", "social media"]
FORMS = ["speech", "toast", "card message", "short note", "blog post"]
OCCASIONS = ["my sister's graduation", "a retirement party", "a friend's new baby", "our team's win",
             "my parents' anniversary"]
THINGS = ["bakery", "podcast", "hamster", "band", "sailboat", "YouTube channel"]
MOODS = ["a bit lonely", "really happy", "tired", "nervous about tomorrow", "grateful"]

FILLERS: dict[str, Any] = {
    "lang": LANGS, "task": CODE_TASKS, "err": ERRORS, "snippet": SNIPPETS, "tool": TOOLS,
    "name": NAMES, "item": ITEMS, "sci": SCIENCE, "event": EVENTS, "clue": CLUES, "an": ANALOGIES, "bad": BAD,
    "fallacy": FALLACIES, "x": XS, "y": XS, "w": XS, "p1": PEOPLE, "p2": PEOPLE, "p3": PEOPLE,
    "topic": TOPICS, "word": WORDS, "phrase": PHRASES, "tongue": TONGUES, "place": PLACES,
    "activity": ACTIVITIES, "media": MEDIA, "genre": GENRES, "job": JOBS, "rel": RELS, "food": FOODS,
    "passage": PASSAGES, "rude": RUDE, "opinion": OPINIONS, "form": FORMS, "occasion": OCCASIONS,
    "thing": THINGS, "mood": MOODS,
}
TEMPLATES: dict[str, list[tuple[str, dict[str, list[str]]]]] = {
    "code": CODE, "math": MATH, "reasoning": REASONING, "other": OTHER}


def _numbers(rng: random.Random) -> dict[str, Any]:
    a, b = rng.randint(2, 40), rng.randint(2, 60)
    p, q = rng.randint(1, 9), rng.randint(1, 9)
    return {"a": a, "b": b, "c": rng.randint(1, 20), "d": rng.randint(2, 12), "e": rng.randint(2, 5),
            "k": rng.randint(2, 4), "big": rng.choice([120, 250, 480, 960, 1500, 2400, 3600, 7200]),
            "p": rng.randint(2, 15), "bill": rng.choice([50, 100, 200]), "pct": rng.choice([5, 10, 12, 15, 20,
                                                                                           25, 30, 40]),
            "s": p + q, "pq": p * q}


def _fill(rng: random.Random, text: str, own: dict[str, list[str]], label: str) -> str:
    values: dict[str, Any] = _numbers(rng)
    for slot, options in {**FILLERS, **own}.items():
        values[slot] = rng.choice(options)
    if label == "reasoning":
        q, right, wrong = rng.choice(CHOICES)
        opts = [right, *wrong]
        rng.shuffle(opts)
        values.update(q=q, o1=opts[0], o2=opts[1], o3=opts[2], o4=opts[3])
        p1, p2, p3 = rng.sample(PEOPLE, 3)
        x, y, w = rng.sample(XS, 3)
        values.update(p1=p1, p2=p2, p3=p3, x=x, y=y, w=w)
    return text.format(**values)


def templates(label: str, split: str = "train") -> list[int]:
    """Indices of the templates of `label` that `split` draws from."""
    n = len(TEMPLATES[label])
    if split == "all":
        return list(range(n))
    valid = [i for i in range(n) if i % VALID_EVERY == VALID_EVERY - 1]
    if split == "valid":
        return valid
    if split == "train":
        return [i for i in range(n) if i not in valid]
    raise ValueError(f"split must be train, valid or all, not {split!r}")


def routing_rows(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    labels = list(TEMPLATES)
    attempts = 0
    while len(rows) < n and attempts < 50 * n:
        attempts += 1
        label = labels[len(rows) % len(labels)]
        idx = rng.choice(templates(label, split))
        text, own = TEMPLATES[label][idx]
        prompt = _fill(rng, text, own, label)
        if rng.random() < 0.2:                                   # casual writing: lower case, no final stop
            prompt = prompt[0].lower() + prompt[1:].rstrip(".")
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "label": label, "template": f"{label}-{idx}"})
    return rows


def write_routing(folder: Path | str, n: int, seed: int = 0, split: str = "train") -> dict[str, Path]:
    """One `<label>.jsonl` per label under `folder`; returns {label: path}."""
    rows = routing_rows(n, seed, split)
    out = {}
    for label in TEMPLATES:
        out[label] = write_jsonl(Path(folder) / f"{label}.jsonl",
                                 [{"prompt": r["prompt"], "template": r["template"]} for r in rows
                                  if r["label"] == label])
    return out
