"""`t2 eval` against the real server on loopback (tiny model, test experts): tables, intervals, routing."""

import json

from typer.testing import CliRunner

from server.cli import app


def test_eval_reports_every_variant_with_intervals_and_routing(live, tmp_path):
    from experts.tasks.generate import write
    write("arithmetic", tmp_path / "math.jsonl", 6, seed=0)
    write("choice", tmp_path / "arc.jsonl", 6, seed=0)
    r = CliRunner().invoke(app, ["eval", "--url", live.url, "--task", f"math:gsm8k:{tmp_path / 'math.jsonl'}",
                                 "--task", f"reasoning:arc:{tmp_path / 'arc.jsonl'}", "--limit", "4",
                                 "--max-tokens", "6", "--timing-samples", "2", "--out", str(tmp_path / "eval")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())
    variants = {x["variant"] for x in rows}
    assert variants == {"base", "math", "code", "reasoning", "T2 prompt", "T2 classifier"}
    assert {x["task"] for x in rows} == {"math", "arc"}     # tasks are named after their files
    for x in rows:
        assert x["n"] == 4 and 0 <= x["ci95"][0] <= x["accuracy"] <= x["ci95"][1] <= 1
        strategy = x["variant"].startswith("T2")
        assert (x["routing_accuracy"] is not None) == strategy
        assert x["correct"] == round(x["accuracy"] * 4)
        if strategy:            # the timing phase: 2 sequential requests per task and strategy
            assert len(x["first_ms"]) == len(x["second_ms"]) == len(x["patch_ms"]) == 2
            assert x["first_pass_ms"] > 0 and x["second_pass_ms"] > 0
        else:
            assert x["first_ms"] == [] and x["first_pass_ms"] is None
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "Routing accuracy" in md and "| T2 classifier |" in md and "one request at a time" in md
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 0

    # the report redrawn from eval.json alone: the same tables, the command of the run that measured them
    r2 = CliRunner().invoke(app, ["eval", "--from-json", str(tmp_path / "eval" / "eval.json"),
                                  "--out", str(tmp_path / "again")])
    assert r2.exit_code == 0, r2.output
    assert (tmp_path / "again" / "eval.md").read_text() == md
    assert json.loads((tmp_path / "again" / "eval.json").read_text()) == rows


def test_eval_with_limit_0_only_times_the_two_passes(live, tmp_path):
    from experts.tasks.generate import write
    write("arithmetic", tmp_path / "math.jsonl", 3, seed=0)
    r = CliRunner().invoke(app, ["eval", "--url", live.url, "--task", f"math:gsm8k:{tmp_path / 'math.jsonl'}",
                                 "--limit", "0", "--max-tokens", "3", "--timing-samples", "1",
                                 "--out", str(tmp_path / "eval")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert {x["variant"] for x in rows} == {"T2 prompt", "T2 classifier"}
    assert all(x["n"] == 0 and len(x["first_ms"]) == 1 for x in rows)
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "one request at a time" in md and "Accuracy" not in md


def test_eval_needs_a_task_or_a_json(tmp_path):
    r = CliRunner().invoke(app, ["eval", "--out", str(tmp_path)])
    assert r.exit_code == 1 and "--task" in r.output


def test_eval_own_task_runs_experts_on_their_label_and_profiles_on_their_task(live, tmp_path):
    from experts.tasks.generate import write
    write("arithmetic", tmp_path / "math.jsonl", 6, seed=0)
    write("choice", tmp_path / "arc.jsonl", 6, seed=0)
    r = CliRunner().invoke(app, ["eval", "--url", live.url, "--task", f"math:gsm8k:{tmp_path / 'math.jsonl'}",
                                 "--task", f"reasoning:arc:{tmp_path / 'arc.jsonl'}", "--limit", "2",
                                 "--max-tokens", "4", "--own-task", "--out", str(tmp_path / "eval")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())
    ran = {(x["task"], x["variant"]) for x in rows}
    everywhere = {"base", "T2 prompt", "T2 classifier"}
    assert ran == {(t, v) for t in ("math", "arc") for v in everywhere} | {("math", "math"), ("arc", "reasoning")}
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "| math | " in md and " | — |" in md and "| code |" not in md    # code: no task has its label


def test_a_profile_is_scoped_to_the_task_it_was_made_for():
    from clients.evaluate import _offered, _runs_on
    from experts.tasks.base import Example, Task
    models = [{"id": "m", "t2": {"kind": "base"}}, {"id": "auto", "t2": {"kind": "auto"}},
              {"id": "m:he", "t2": {"kind": "expert", "label": "profile", "description": '{"task": "humaneval"}'}},
              {"id": "m:old", "t2": {"kind": "expert", "label": "profile", "description": "not json"}}]
    offered = _offered(models)
    grade = lambda text, example: True
    he, gsm = Task("humaneval", "code", [Example("p", "a")], grade), Task("gsm", "math", [Example("p", "a")], grade)
    assert _runs_on(offered["he"][2], he, "code") and not _runs_on(offered["he"][2], gsm, "math")
    assert _runs_on(offered["old"][2], gsm, "math")          # a profile that names no task runs everywhere
    assert "T2 classifier" not in offered                      # no classification expert, no such strategy
