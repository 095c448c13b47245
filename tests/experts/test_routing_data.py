"""The held-out routing set and the classifier's training prompts: balanced, reproducible, and disjoint
(no held-out prompt, nor a near copy of one, among the generated ones; validation templates ≠ train ones)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from experts.dispatch import LABELS
from experts.tasks import load_task
from experts.tasks.generate.routing import TEMPLATES, routing_rows, templates, write_routing

HELDOUT = Path(__file__).resolve().parents[1] / "data" / "routing" / "heldout.jsonl"


def _heldout() -> list[dict]:
    return [json.loads(line) for line in HELDOUT.read_text().splitlines()]


def _words(s: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", s.lower()))


def test_the_heldout_set_is_balanced_unique_and_rebuilt_by_its_script():
    import importlib.util
    rows = _heldout()
    assert {lab: sum(r["label"] == lab for r in rows) for lab in LABELS} == {lab: 50 for lab in LABELS}
    assert len({r["prompt"] for r in rows}) == len(rows)
    assert sum(r["source"].startswith("humaneval:") for r in rows) == 20
    spec = importlib.util.spec_from_file_location("build_heldout", HELDOUT.with_name("build_heldout.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.rows() == rows                              # the committed file is what the script makes


def test_generated_prompts_are_balanced_deterministic_and_split_by_template():
    a, b = routing_rows(200, seed=3), routing_rows(200, seed=3)
    assert a == b and a != routing_rows(200, seed=4)
    assert {lab: sum(r["label"] == lab for r in a) for lab in LABELS} == {lab: 50 for lab in LABELS}
    for label in LABELS:
        train, valid = set(templates(label, "train")), set(templates(label, "valid"))
        assert valid and train and not train & valid and train | valid == set(range(len(TEMPLATES[label])))
    v = routing_rows(200, seed=3, split="valid")
    assert {r["template"] for r in v}.isdisjoint({r["template"] for r in a})


def test_no_heldout_prompt_is_among_the_generated_ones():
    generated = [r["prompt"] for split in ("train", "valid") for r in routing_rows(800, seed=1, split=split)]
    held = _heldout()
    assert not {r["prompt"] for r in held} & set(generated)
    gen_words = [_words(g) for g in generated]
    worst = max(len(_words(h["prompt"]) & g) / len(_words(h["prompt"]) | g) for h in held for g in gen_words)
    assert worst < 0.7, worst                               # no near copy (word Jaccard) either


def test_written_files_load_as_prompts_sources(tmp_path):
    paths = write_routing(tmp_path, 40, seed=0)
    t = load_task("prompts", paths["other"])
    assert len(t.examples) == 10 and all(e.prompt for e in t.examples)
