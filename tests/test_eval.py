"""`t2 eval` against the real server on loopback (tiny model, test experts): tables, intervals, routing."""

import json
import math

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
        assert len(x["per_example"]) == 4 and set(x["per_example"]) <= {0, 1}    # in example order
        assert sum(x["per_example"]) == x["correct"]
        if strategy:            # the timing phase: 2 sequential requests per task and strategy
            assert len(x["first_ms"]) == len(x["second_ms"]) == len(x["patch_ms"]) == 2
            assert x["first_pass_ms"] > 0 and x["second_pass_ms"] > 0
        else:
            assert x["first_ms"] == [] and x["first_pass_ms"] is None
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "Routing accuracy" in md and "| T2 classifier |" in md and "one request at a time" in md
    assert "Mixed held-out set (math, arc pooled" in md and " p=" in md
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 0

    # the report redrawn from eval.json alone: the same tables, the command of the run that measured them
    r2 = CliRunner().invoke(app, ["eval", "--from-json", str(tmp_path / "eval" / "eval.json"),
                                  "--out", str(tmp_path / "again")])
    assert r2.exit_code == 0, r2.output
    assert (tmp_path / "again" / "eval.md").read_text() == md
    assert json.loads((tmp_path / "again" / "eval.json").read_text()) == rows


def test_a_spent_time_budget_sends_nothing_more(live, tmp_path):
    import asyncio

    from clients.evaluate import evaluate
    from experts.tasks import load_task
    from experts.tasks.generate import write
    task = load_task("gsm8k", write("arithmetic", tmp_path / "math.jsonl", 4, seed=0))
    cells = asyncio.run(evaluate(live.url, [(task, "math")], 4, 3, 2, progress=False, time_budget=1e-9))
    assert cells == []                                   # the budget was over before the first request


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


def test_a_profile_is_never_scored_on_its_own_shots(tiny_model_dir, tmp_path):
    """A profile's description names the examples CEM searched on; `t2 eval` leaves them out of its cell,
    pairs it with the base on the rest, and shows the base on those same examples."""
    from experts.expert import random_expert
    from experts.tasks.generate import write
    from experts.svd import model_fingerprint, model_ranks
    from tests.conftest import make_experts, serve
    experts = make_experts(tiny_model_dir, tmp_path / "experts")
    random_expert("prof", model_ranks(tiny_model_dir), 0.3, 9, label="profile",
                  description=json.dumps({"task": "math", "shot_indices": [1, 3]}),
                  base_fingerprint=model_fingerprint(tiny_model_dir)).save(experts / "prof.safetensors")
    write("arithmetic", tmp_path / "math.jsonl", 6, seed=0)
    with serve(tiny_model_dir, experts, tmp_path / "cache") as s:
        r = CliRunner().invoke(app, ["eval", "--url", s.url, "--task", f"math:gsm8k:{tmp_path / 'math.jsonl'}",
                                     "--limit", "5", "--max-tokens", "4", "--own-task", "--timing-samples", "0",
                                     "--out", str(tmp_path / "eval")])
    assert r.exit_code == 0, r.output
    rows = {x["variant"]: x for x in json.loads((tmp_path / "eval" / "eval.json").read_text())}
    prof, base = rows["prof"], rows["base"]
    assert base["n"] == 5 and None not in base["per_example"]
    assert prof["n"] == 3 and [i for i, x in enumerate(prof["per_example"]) if x is None] == [1, 3]
    same = [base["per_example"][i] for i in (0, 2, 4)]
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert f"base on these 3: {100 * sum(same) / 3:.1f}" in md


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


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs():
    from clients.evaluate import mcnemar
    # 0 vs 5 discordant: 2 * (1/2)^5; 1 vs 9: 2 * (1 + 10) / 2^10; concordant pairs change nothing
    assert mcnemar([1, 1, 1, 1, 1], [0, 0, 0, 0, 0]) == (0.0625, 5, 0)
    p, only_a, only_b = mcnemar([0] * 9 + [1] + [1, 0] * 20, [1] * 9 + [0] + [1, 0] * 20)
    assert (only_a, only_b) == (1, 9) and p == 2 * 11 / 1024
    assert mcnemar([1, 0, 1], [1, 0, 1]) == (1.0, 0, 0)                 # no discordant pair: p = 1
    assert mcnemar([1, 0, 1, 0], [0, 1, 0, 1])[0] == 1.0                 # a tie is capped at 1
    assert mcnemar([1, None, 1, 1], [0, 1, None, 0])[1:] == (2, 0)        # unanswered examples skipped
    # 3 vs 11 (a textbook case), against the closed form and, where installed, scipy's binomial test
    a = [1] * 3 + [0] * 11 + [1] * 30
    b = [0] * 3 + [1] * 11 + [1] * 30
    p = mcnemar(a, b)[0]
    assert abs(p - 2 * sum(math.comb(14, k) for k in range(4)) / 2 ** 14) < 1e-15
    assert abs(p - 0.0574) < 1e-4
    try:
        from scipy.stats import binomtest
    except ImportError:
        return
    for x, y in ((3, 11), (0, 7), (12, 30), (50, 71)):
        ours = mcnemar([1] * x + [0] * y, [0] * x + [1] * y)[0]
        assert abs(ours - binomtest(x, x + y, 0.5).pvalue) < 1e-12


def _cell(task, variant, results, routed=0):
    """One row of an eval.json as `report` writes it."""
    return {"task": task, "variant": variant, "n": len(results), "correct": sum(results), "accuracy": 0,
            "ci95": [0, 0], "routed": routed, "routing_accuracy": None, "first_pass_ms": None,
            "second_pass_ms": None, "first_ms": [], "second_ms": [], "patch_ms": [], "per_example": results}


def test_the_mixed_table_pools_every_task_and_pairs_the_examples(tmp_path):
    from clients.evaluate import load_cells, pooled
    # task a: base right on the first 4 of 10; the strategy also right on 6 more of them across both tasks
    base_a, base_b = [1] * 4 + [0] * 6, [0] * 10
    prompt_a, prompt_b = [1] * 4 + [1] * 3 + [0] * 3, [1] * 3 + [0] * 7
    clf_a, clf_b = [0] + [1] * 3 + [0] * 6, [0] * 10
    rows = [_cell("a", "base", base_a), _cell("b", "base", base_b), _cell("a", "T2 prompt", prompt_a, 8),
            _cell("b", "T2 prompt", prompt_b, 9), _cell("a", "T2 classifier", clf_a, 10),
            _cell("b", "T2 classifier", clf_b, 10), _cell("a", "math", [1] * 10)]
    (tmp_path / "eval.json").write_text(json.dumps(rows))
    tasks, mixed = pooled(load_cells(tmp_path / "eval.json"))
    assert tasks == ["a", "b"] and [c.variant for c in mixed] == ["base", "T2 prompt", "T2 classifier"]
    assert [(c.n, c.correct, c.routed) for c in mixed] == [(20, 4, 0), (20, 10, 17), (20, 3, 20)]
    assert mixed[1].per_example == prompt_a + prompt_b
    r = CliRunner().invoke(app, ["eval", "--from-json", str(tmp_path / "eval.json"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "o" / "eval.md").read_text()
    # the per-task table: p next to the interval (the math expert 10/10 vs base 4/10: 6 vs 0, p = 2/64)
    assert "100.0 [72, 100] (n=10) p=0.031" in md
    # mixed: prompt 6 only-it-right vs 0 (p = 0.031), classifier 0 vs 1 (p = 1)
    assert "| T2 prompt | 50.0 [30, 70] (n=20) | 6 / 0 | 0.031 |" in md
    assert "| T2 classifier | 15.0 [5, 36] (n=20) | 0 / 1 | 1.000 |" in md
    assert "Mixed held-out set (a, b pooled" in md
    assert (tmp_path / "o" / "eval.png").stat().st_size > 0
    again = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert [x["per_example"] for x in again] == [x["per_example"] for x in rows]


def test_an_eval_json_without_per_example_results_still_redraws_with_no_p_values(tmp_path):
    rows = [_cell("a", "base", [1, 0, 0, 0]), _cell("a", "T2 prompt", [1, 1, 0, 0]), _cell("a", "math", [1, 1, 1, 0])]
    for x in rows:
        del x["per_example"]
    (tmp_path / "eval.json").write_text(json.dumps(rows))
    r = CliRunner().invoke(app, ["eval", "--from-json", str(tmp_path / "eval.json"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "o" / "eval.md").read_text()
    assert "75.0 [30, 95] (n=4) p=—" in md
    assert "| T2 prompt | 50.0 [15, 85] (n=4) | — | — |" in md
