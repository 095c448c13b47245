"""`t2 eval`: accuracy of a running server's adaptations on tasks, through its own HTTP API.

Contract: for every task (experts.tasks format + file, with the dispatch label it belongs to) and every
variant the server offers — the base weights, each expert (`<base>:<expert>`), each profile, and the
dispatch strategies `prompt` and `classifier` on `auto` — send each example as a greedy chat request, grade
the answer with the task's own grader, and report:
- accuracy with a 95 % Wilson interval (a miniature of the paper's Tables 1 and 2);
- routing accuracy of the strategies (the first pass's label vs the task's label);
- first-pass vs second-pass time (Table 3): a separate phase after the accuracy one sends `timing` examples
  per task and strategy one at a time, so that the times are the passes' own cost (under the concurrent
  accuracy phase both passes mostly wait in the queue). First pass = the `t2` report's `first_pass_ms`;
  second pass = the request's wall time minus it (patch + generation); patch = the report's `patch_ms`.
With `limit` 0 only the timing phase runs.
With `own_task`, an expert is only run on the tasks of its label and a profile only on the task it was made
for (Table 1 of the paper is that diagonal); base and strategies always run on every task. A profile is
never scored on the examples it was searched on (its description's `shot_indices`), and its row shows the
base on the same examples. Cells not run are left out of the JSON and shown as "—".
Every cell keeps its per-example correctness (`per_example`: 1 / 0 in example order, None for an example not
answered), so each variant is compared with `base` by an exact McNemar test on the same examples (the
p-value next to the interval), and a "mixed" table pools all tasks into one unlabelled held-out set: base
against the `auto` strategies, paired over the pooled examples. Requests go out task by task in the order
given and, within a task, example by example (every variant of example i before example i + 1), so
`time_budget` (minutes: after it no new accuracy request is sent) cuts the last tasks first and leaves
cells that are still paired, each over the examples answered by then.
Writes `eval.json` (every cell with its raw counts, per-example results and times), `eval.md` (tables) and
`eval.png` (accuracy with intervals, the mixed set included) to the output folder; `load_cells(eval.json)` reads the cells back, so the report can be
redrawn without querying the server again (`t2 eval --from-json`); files written before `per_example`
existed load too, and their p-values show as "—".
Evaluating through HTTP measures what users get: dispatch, scheduling and patching included.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


STRATEGY = "T2 "                    # display names of the dispatch strategies: "T2 prompt", "T2 classifier"
MIXED = "mixed (all tasks)"         # the pooled task of the mixed table


def mcnemar(a: list[int | None], b: list[int | None]) -> tuple[float, int, int]:
    """Exact McNemar test of two paired 0/1 sequences (examples where either is None are skipped): the
    two-sided binomial p of the discordant pairs, and their counts (only-a right, only-b right)."""
    only_a = sum(1 for x, y in zip(a, b) if x is not None and y is not None and x > y)
    only_b = sum(1 for x, y in zip(a, b) if x is not None and y is not None and y > x)
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail), only_a, only_b


@dataclass
class Cell:
    task: str
    variant: str
    n: int = 0
    correct: int = 0
    routed: int = 0                 # first-pass label == task label (strategies only)
    first_ms: list[float] = field(default_factory=list)    # timing phase (sequential requests) only
    second_ms: list[float] = field(default_factory=list)
    patch_ms: list[float] = field(default_factory=list)
    per_example: list[int | None] | None = None    # 1 / 0 per example in order (None: not answered / not kept)

    @property
    def is_strategy(self) -> bool:
        return self.variant.startswith(STRATEGY)

    @property
    def acc(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def wilson(self, z: float = 1.96) -> tuple[float, float]:
        if not self.n:
            return 0.0, 0.0
        p, n = self.acc, self.n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)


def variants(models: list[dict[str, Any]]) -> dict[str, tuple[str, dict]]:
    """{display name: (model id, extra body)} from /v1/models."""
    return {name: (model, extra) for name, (model, extra, _, _) in _offered(models).items()}


Scope = tuple[str, str] | None        # ("label", x): an expert; ("task", x): a profile made for task x; None: all


def _offered(models: list[dict[str, Any]]) -> dict[str, tuple[str, dict, Scope, frozenset[int]]]:
    """{display name: (model id, extra body, scope, skipped)}; scope ("label", x) for an expert, ("task", x)
    for a profile that names its task, None for the base and the strategies; skipped: the example indices a
    profile was searched on (its description's `shot_indices`), never part of its score."""
    base = next(m["id"] for m in models if (m.get("t2") or {}).get("kind") == "base")
    out: dict[str, tuple[str, dict, Scope, frozenset[int]]] = {"base": (base, {}, None, frozenset())}
    labels = {}
    for m in models:
        t2 = m.get("t2") or {}
        if t2.get("kind") == "expert":
            label = t2.get("label")
            labels[label] = True
            if label == "classifier":
                continue
            scope: Scope = ("label", label)
            skipped: frozenset[int] = frozenset()
            if label == "profile":
                try:
                    desc = json.loads(t2.get("description") or "{}")
                    task, skipped = desc.get("task"), frozenset(int(i) for i in desc.get("shot_indices") or ())
                except (ValueError, TypeError, AttributeError):
                    task = None
                scope = ("task", task) if task else None
            out[m["id"].split(":", 1)[1]] = (m["id"], {}, scope, skipped)
    out[STRATEGY + "prompt"] = ("auto", {"t2": {"dispatch": "prompt"}}, None, frozenset())
    if labels.get("classifier"):
        out[STRATEGY + "classifier"] = ("auto", {"t2": {"dispatch": "classifier"}}, None, frozenset())
    return out


def _runs_on(scope: tuple[str, str] | None, task: Any, label: str) -> bool:
    if scope is None:
        return True
    kind, value = scope
    return value == (label if kind == "label" else task.name)


async def evaluate(url: str, tasks: list[tuple[Any, str]], limit: int, max_tokens: int, concurrency: int,
                   api_key: str | None = None, progress: bool = True, own_task: bool = False,
                   timing: int = 0, time_budget: float = 0) -> list[Cell]:
    """1. what the server offers; 2. every (task, variant, example) as a greedy request, `concurrency` at a
    time, graded; 3. the timing phase: `timing` examples per (task, strategy), one request at a time."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers) as client:
        # 1. the variants
        r = await client.get("/v1/models")
        r.raise_for_status()
        offered = _offered(r.json()["data"])
        pairs = [(t, label, v) for t, label in tasks for v, (_, _, scope, _) in offered.items()
                 if not own_task or _runs_on(scope, t, label)]
        cells = {(t.name, v): Cell(t.name, v, per_example=[None] * min(limit, len(t.examples)))
                 for t, _, v in pairs}
        strategies = [(t, label, v) for t, label, v in pairs if cells[(t.name, v)].is_strategy]

        def scored(task: Any, variant: str) -> set[int]:
            """The examples a variant is scored on: the first `limit`, less a profile's own shots (on its task)."""
            _, _, scope, skipped = offered[variant]
            own = scope is not None and scope[0] == "task" and scope[1] == task.name
            return {i for i in range(min(limit, len(task.examples))) if not (own and i in skipped)}

        asked = {(t.name, v): scored(t, v) for t, _, v in pairs}
        sem = asyncio.Semaphore(concurrency)
        done, total = 0, sum(map(len, asked.values()))
        start = time.monotonic()
        stop_at = start + time_budget * 60 if time_budget else math.inf

        async def ask(task: Any, variant: str, example: Any) -> tuple[dict, float]:
            model, extra, _, _ = offered[variant]
            body = {"model": model, "messages": task.messages(example), "temperature": 0,
                    "max_tokens": max_tokens, **extra}
            t0 = time.perf_counter()
            resp = await client.post("/v1/chat/completions", json=body)
            wall = (time.perf_counter() - t0) * 1e3
            resp.raise_for_status()
            return resp.json(), wall

        # 2. accuracy and routing
        async def one(task: Any, label: str, variant: str, i: int) -> None:
            nonlocal done
            async with sem:
                if time.monotonic() > stop_at:          # the time budget is spent: send nothing new
                    return
                out, _ = await ask(task, variant, task.examples[i])
            cell = cells[(task.name, variant)]
            ok = task.correct(out["choices"][0]["message"]["content"] or "", task.examples[i])
            cell.n += 1
            cell.correct += ok
            cell.per_example[i] = int(ok)
            rep = out.get("t2") or {}
            if rep.get("label") is not None:
                cell.routed += rep["label"] == label
            done += 1
            if progress and (done % 20 == 0 or done == total):
                rate = done / (time.monotonic() - start)
                print(f"eval {done}/{total} ({rate:.2f} answers/s, about {(total - done) / rate / 60:.0f} min "
                      f"left)", flush=True)

        # task by task in the order given; within a task every variant of example i before example i + 1
        await asyncio.gather(*(one(t, label, v, i) for t, label in tasks for i in range(min(limit, len(t.examples)))
                               for u, _, v in pairs if u is t and i in asked[(t.name, v)]))
        if progress and done < total:
            print(f"eval stopped by the time budget after {done}/{total} answers", flush=True)

        # 3. the two passes' cost, one request at a time
        for k, (task, _, variant) in enumerate(strategies):
            cell = cells[(task.name, variant)]
            for example in task.examples[:timing]:
                out, wall = await ask(task, variant, example)
                rep = out.get("t2") or {}
                cell.first_ms.append(rep["first_pass_ms"])
                cell.second_ms.append(wall - rep["first_pass_ms"])
                cell.patch_ms.append(rep["patch_ms"])
            if progress and timing:
                print(f"timing {k + 1}/{len(strategies)}", flush=True)
    return [c for c in cells.values() if c.n or c.first_ms]


def load_cells(path: Path) -> list[Cell]:
    """The cells of an eval.json written by `report`."""
    return [Cell(x["task"], x["variant"], x["n"], x["correct"], x["routed"], x["first_ms"], x["second_ms"],
                 x["patch_ms"], x.get("per_example")) for x in json.loads(Path(path).read_text())]


def paired_p(base: Cell | None, other: Cell) -> float | None:
    """McNemar p of `other` against `base` on the same examples; None when either has no per-example
    results (an eval.json from before they were kept) or they are not over the same examples."""
    if base is None or base.per_example is None or other.per_example is None:
        return None
    if len(base.per_example) != len(other.per_example):
        return None
    return mcnemar(base.per_example, other.per_example)[0]


def pooled(cells: list[Cell], variants: tuple[str, ...] = ("base", STRATEGY + "prompt", STRATEGY + "classifier")
           ) -> tuple[list[str], list[Cell]]:
    """The mixed set: (the tasks pooled, one cell per variant of `variants` that ran) over the tasks every
    one of them ran on, the per-example results concatenated in task order (None when a cell has none).
    Nothing when base or every strategy is missing."""
    by = {(c.task, c.variant): c for c in cells if c.n}
    present = [v for v in variants if any(k[1] == v for k in by)]
    tasks = [t for t in dict.fromkeys(c.task for c in cells if c.n) if all((t, v) in by for v in present)]
    if "base" not in present or len(present) < 2 or not tasks:
        return [], []
    out = []
    for v in present:
        parts = [by[(t, v)] for t in tasks]
        lists = [c.per_example for c in parts]
        out.append(Cell(MIXED, v, sum(c.n for c in parts), sum(c.correct for c in parts),
                        sum(c.routed for c in parts),
                        per_example=None if any(x is None for x in lists) else [y for x in lists for y in x]))
    return tasks, out


def _p(p: float | None) -> str:
    return "—" if p is None else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def report(cells: list[Cell], out_dir: Path, command: str = "") -> Path:
    """eval.json, eval.md and eval.png in `out_dir`; returns the markdown file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps([
        {"task": c.task, "variant": c.variant, "n": c.n, "correct": c.correct, "accuracy": c.acc,
         "ci95": c.wilson(), "routed": c.routed,
         "routing_accuracy": c.routed / c.n if c.is_strategy and c.n else None,
         "first_pass_ms": statistics.median(c.first_ms) if c.first_ms else None,
         "second_pass_ms": statistics.median(c.second_ms) if c.second_ms else None,
         "first_ms": c.first_ms, "second_ms": c.second_ms, "patch_ms": c.patch_ms,
         "per_example": c.per_example} for c in cells], indent=1))
    # 1. accuracy: variants × tasks (cells with no graded answers are not shown)
    measured = [c for c in cells if c.n]
    tasks = list(dict.fromkeys(c.task for c in measured))
    names = list(dict.fromkeys(c.variant for c in measured))
    by = {(c.task, c.variant): c for c in measured}
    lines = [f"Made by: `{command}`\n" if command else ""]

    def shown(c: Cell) -> str:
        lo, hi = c.wilson()
        return f"{100 * c.acc:.1f} [{100 * lo:.0f}, {100 * hi:.0f}] (n={c.n})"

    if measured:
        lines += ["## Accuracy (%, 95 % Wilson interval; p: exact McNemar test against base on the same "
                  "examples)\n", "| variant | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for v in names:
            row = []
            for t in tasks:
                c = by.get((t, v))
                if c is None:
                    row.append("—")
                    continue
                b = by.get((t, "base"))
                p = "" if v == "base" else f" p={_p(paired_p(b, c))}"
                if v != "base" and b is not None and c.n < b.n and b.per_example and c.per_example:
                    same = [x for x, y in zip(b.per_example, c.per_example) if x is not None and y is not None]
                    if same:        # a profile scored without its shots: the base on the same examples
                        p += f"; base on these {len(same)}: {100 * sum(same) / len(same):.1f}"
                row.append(shown(c) + p)
            lines.append(f"| {v} | " + " | ".join(row) + " |")
    # 1b. the mixed set: every task pooled, base against the auto strategies
    pooled_tasks, mixed = pooled(measured)
    if mixed:
        base = mixed[0]
        lines += [f"\n## Mixed held-out set ({', '.join(pooled_tasks)} pooled, unlabelled: `auto` decides; "
                  "p: exact McNemar test against base)\n",
                  "| variant | accuracy % [95 % CI] | vs base: only it right / only base right | McNemar p |",
                  "|---|---|---|---|"]
        for c in mixed:
            if c is base:
                lines.append(f"| {c.variant} | {shown(c)} | | |")
                continue
            if base.per_example is None or c.per_example is None:
                lines.append(f"| {c.variant} | {shown(c)} | — | — |")
                continue
            p, only_base, only_it = mcnemar(base.per_example, c.per_example)
            lines.append(f"| {c.variant} | {shown(c)} | {only_it} / {only_base} | {_p(p)} |")
    # 2. routing of the strategies
    routing = [c for c in measured if c.is_strategy]
    if routing:
        lines += ["\n## Routing accuracy (the first pass's label is the task's)\n",
                  "| task | strategy | routed right |", "|---|---|---|"]
        lines += [f"| {c.task} | {c.variant} | {100 * c.routed / c.n:.0f} % ({c.routed}/{c.n}) |" for c in routing]
    # 3. the two passes, from the sequential timing phase
    timed = [c for c in cells if c.first_ms]
    if timed:
        lines += ["\n## The cost of the two passes (median ms, one request at a time)\n",
                  "| task | strategy | requests | first pass | patch | second pass (patch + generation) | "
                  "first / second |", "|---|---|---|---|---|---|---|"]
        for c in timed:
            f, s2, pt = (statistics.median(x) for x in (c.first_ms, c.second_ms, c.patch_ms))
            lines.append(f"| {c.task} | {c.variant} | {len(c.first_ms)} | {f:.0f} | {pt:.0f} | {s2:.0f} | "
                         f"{f / s2:.2f} |")
    md = out_dir / "eval.md"
    md.write_text("\n".join(lines) + "\n")
    if not measured:
        return md
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        if mixed:                   # the mixed set as one more group of bars
            tasks = tasks + [MIXED]
            by.update({(c.task, c.variant): c for c in mixed})
        fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(tasks), 3.5))
        width = 0.8 / max(1, len(names))
        for i, v in enumerate(names):
            ks = [k for k, t in enumerate(tasks) if (t, v) in by]
            cs = [by[(tasks[k], v)] for k in ks]
            accs = [c.acc * 100 for c in cs]
            lo = [a - c.wilson()[0] * 100 for a, c in zip(accs, cs)]
            hi = [c.wilson()[1] * 100 - a for a, c in zip(accs, cs)]
            ax.bar([k + i * width for k in ks], accs, width, yerr=[lo, hi], capsize=2, label=v)
        ax.set_xticks([k + width * (len(names) - 1) / 2 for k in range(len(tasks))], tasks)
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "eval.png", dpi=100)
        plt.close(fig)
    except ImportError:
        pass
    return md
