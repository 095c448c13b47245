"""clients/routing.py against the real server on loopback (tiny model, random experts incl. a classifier):
every prompt routed by both strategies, the label read from the server's own report, tables and files."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from clients.routing import load_rows, main, route_all, summarise
from experts.dispatch import LABELS

ROWS = [{"prompt": p, "label": lab, "source": "test"} for lab, p in
        (("code", "write a function"), ("math", "what is 2 + 2"), ("reasoning", "why is ice cold"),
         ("other", "hello there"), ("math", "15% of 80"))]


def test_routes_every_prompt_with_the_servers_own_label(live, tmp_path):
    results = asyncio.run(route_all(live.url, ROWS, ["prompt", "classifier"], concurrency=2, progress=False))
    for strategy, answers in results.items():
        assert [a["prompt"] for a in answers] == [r["prompt"] for r in ROWS]
        assert all(a["routed"] in LABELS and set(a["probs"]) == set(LABELS) for a in answers)
        # the label is the one the server reports for the same request (greedy first pass: deterministic)
        body = {"model": "auto", "messages": [{"role": "user", "content": ROWS[1]["prompt"]}], "max_tokens": 1,
                "temperature": 0, "t2": {"dispatch": strategy}}
        assert httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120).json()["t2"]["label"] \
            == answers[1]["routed"]
        m = summarise(answers)
        assert sum(sum(row.values()) for row in m["confusion"].values()) == len(ROWS)
        right = sum(a["routed"] == a["label"] for a in answers)
        assert m["accuracy"] == right / len(ROWS) and m["ci95"][0] <= m["accuracy"] <= m["ci95"][1]


def test_the_command_writes_tables_and_refuses_bad_rows(live, tmp_path, capsys):
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert main(["--url", live.url, "--data", str(data), "--strategy", "prompt", "--out", str(tmp_path / "o")]) == 0
    out = json.loads((tmp_path / "o" / "routing.json").read_text())
    assert list(out["summary"]) == ["prompt"] and out["summary"]["prompt"]["n"] == len(ROWS)
    assert "Confusion matrix, `prompt`" in (tmp_path / "o" / "routing.md").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "label": "poetry", "source": "t"}) + "\n")
    with pytest.raises(ValueError, match="label outside"):
        load_rows(bad)


@pytest.mark.slow
def test_serve_starts_t2_serve_on_the_embedded_model(tmp_path, capsys):
    """--serve: `t2 serve` as a child process (the default model and the shipped set), routed through it."""
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    assert main(["--serve", "--data", str(data), "--strategy", "classifier", "--out", str(tmp_path / "o")]) == 0
    out = json.loads((tmp_path / "o" / "routing.json").read_text())
    assert [a["prompt"] for a in out["answers"]["classifier"]] == [r["prompt"] for r in ROWS[:2]]
