"""Routing accuracy of a t2 server's first pass on a labelled prompt set, through its own HTTP API.

Contract: for every row of a JSONL file (`prompt`, `label` in code / math / reasoning / other, `source`) and
every dispatch strategy asked for (`prompt`, `classifier`), send the prompt as one user message to model
`auto` with `t2.dispatch` set, greedy, `max_tokens` 1 (only the first pass matters), and read the label the
server chose from the response's `t2` report. Report per strategy: overall accuracy with a 95 % Wilson
interval, accuracy per label, per source kind, and the 4 × 4 confusion matrix (rows: true label, columns:
routed label). Writes `routing.json` (every answer and its label probabilities), `routing.md` (tables) and
`routing.png` (the confusion matrices) to the output folder.

    python -m clients.routing --url http://127.0.0.1:8000 --data tests/data/routing/heldout.jsonl --out DIR
    python -m clients.routing --serve [--experts FOLDER] ...     (starts `t2 serve` on the embedded model)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx

from clients.t2client import stop_process, wait_ready
from experts.dispatch import LABELS


@contextlib.contextmanager
def _served(experts: Path | None, start_timeout: float = 600.0) -> Iterator[str]:
    """`t2 serve` (the embedded default model; `experts` instead of the shipped set) as a child process on a
    free loopback port; yields its URL once /health answers, stops it (SIGTERM) afterwards."""
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"] + (["--experts", str(experts)] if experts else [])
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, proc, start_timeout)
        except (RuntimeError, TimeoutError) as e:       # a one-line message for the command line
            raise SystemExit(f"t2 serve: {e}") from None
        yield url
    finally:
        stop_process(proc)


def load_rows(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    bad = [r for r in rows if r.get("label") not in LABELS or not r.get("prompt")]
    if bad:
        raise ValueError(f"{path}: {len(bad)} rows without a prompt or with a label outside {LABELS}")
    return rows


async def route_all(url: str, rows: list[dict[str, Any]], strategies: list[str], concurrency: int = 4,
                    api_key: str | None = None, progress: bool = True) -> dict[str, list[dict[str, Any]]]:
    """{strategy: [{prompt, label, source, routed, probs}]} in the rows' order."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    out: dict[str, list[dict[str, Any]]] = {s: [None] * len(rows) for s in strategies}  # type: ignore[list-item]
    done = 0
    total = len(rows) * len(strategies)
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers) as client:
        async def one(strategy: str, i: int) -> None:
            nonlocal done
            row = rows[i]
            body = {"model": "auto", "messages": [{"role": "user", "content": row["prompt"]}],
                    "temperature": 0, "max_tokens": 1, "t2": {"dispatch": strategy}}
            async with sem:
                r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            rep = r.json()["t2"]
            out[strategy][i] = {**row, "routed": rep["label"], "probs": rep.get("label_probs")}
            done += 1
            if progress and (done % 25 == 0 or done == total):
                print(f"routing {done}/{total}", file=sys.stderr, flush=True)

        await asyncio.gather(*(one(s, i) for s in strategies for i in range(len(rows))))
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if not n:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarise(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """accuracy, Wilson interval, per-label accuracy, per-source-kind accuracy, confusion[true][routed]."""
    conf = {t: {r: 0 for r in LABELS} for t in LABELS}
    kinds: dict[str, list[int]] = {}
    for a in answers:
        conf[a["label"]][a["routed"]] += 1
        kind = f"{a['label']}/{a['source'].split(':')[0]}"
        k = kinds.setdefault(kind, [0, 0])
        k[0] += a["routed"] == a["label"]
        k[1] += 1
    right = sum(conf[t][t] for t in LABELS)
    n = len(answers)
    return {"n": n, "accuracy": right / n if n else 0.0, "ci95": wilson(right, n),
            "per_label": {t: conf[t][t] / max(1, sum(conf[t].values())) for t in LABELS},
            "per_source": {k: v[0] / v[1] for k, v in sorted(kinds.items())},
            "confusion": conf}


def report(results: dict[str, list[dict[str, Any]]], out_dir: Path, command: str = "") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {s: summarise(a) for s, a in results.items()}
    (out_dir / "routing.json").write_text(json.dumps({"summary": summary, "answers": results}, indent=1))
    lines = [f"Made by: `{command}`\n" if command else ""]
    lines += ["## Routing accuracy (%)\n", "| strategy | all [95 % CI] | " + " | ".join(LABELS) + " |",
              "|---|---|" + "---|" * len(LABELS)]
    for s, m in summary.items():
        lo, hi = m["ci95"]
        lines.append(f"| {s} | {100 * m['accuracy']:.1f} [{100 * lo:.0f}, {100 * hi:.0f}] (n={m['n']}) | "
                     + " | ".join(f"{100 * m['per_label'][t]:.0f}" for t in LABELS) + " |")
    for s, m in summary.items():
        lines += [f"\n## Confusion matrix, `{s}` (rows: true label, columns: routed)\n",
                  "| true \\ routed | " + " | ".join(LABELS) + " |", "|---|" + "---|" * len(LABELS)]
        lines += [f"| {t} | " + " | ".join(str(m["confusion"][t][r]) for r in LABELS) + " |" for t in LABELS]
        lines += ["", "By source: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in m["per_source"].items())]
    md = out_dir / "routing.md"
    md.write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(summary), figsize=(3.6 * len(summary), 3.4), squeeze=False)
        for ax, (s, m) in zip(axes[0], summary.items()):
            grid = [[m["confusion"][t][r] for r in LABELS] for t in LABELS]
            ax.imshow(grid, cmap="Blues", vmin=0, vmax=max(1, max(max(g) for g in grid)))
            for i in range(len(LABELS)):
                for j in range(len(LABELS)):
                    ax.text(j, i, grid[i][j], ha="center", va="center", fontsize=9)
            ax.set_xticks(range(len(LABELS)), LABELS, fontsize=8)
            ax.set_yticks(range(len(LABELS)), LABELS, fontsize=8)
            ax.set_xlabel("routed")
            ax.set_ylabel("true")
            ax.set_title(f"{s}: {100 * m['accuracy']:.0f} %", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "routing.png", dpi=100)
        plt.close(fig)
    except ImportError:
        pass
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=None, help="A running t2 server (default: --serve).")
    ap.add_argument("--serve", action="store_true", help="Start the embedded default server in-process.")
    ap.add_argument("--experts", type=Path, default=None, help="With --serve: the expert folder.")
    ap.add_argument("--data", type=Path, default=Path("tests/data/routing/heldout.jsonl"))
    ap.add_argument("--strategy", action="append", choices=["prompt", "classifier"],
                    help="Repeat; default both.")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("routing"))
    args = ap.parse_args(argv)
    rows = load_rows(args.data)
    strategies = args.strategy or ["prompt", "classifier"]
    command = "python -m clients.routing " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.url and not args.serve:
        results = asyncio.run(route_all(args.url, rows, strategies, args.concurrency))
    else:
        with _served(args.experts) as url:
            results = asyncio.run(route_all(url, rows, strategies, args.concurrency))
    print(report(results, args.out, command).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
