"""Why the embedded engine does all its torch work in one thread: the same decode step, timed in the thread
that ran torch first and in threads started after it (each new thread gets its own OpenMP pool on a CPU).

    .venv/bin/python benchmarks/omp_pools.py [--order main,thread,main,thread] [--steps 30]

Loads the default model (fp32), prefills 8 rows of 100 tokens through the engine's ragged forward, then times
`--steps` 8-row decode steps in each place of `--order` and prints ms/step and the CPU seconds of the
process's two busiest threads (with a spinning pool both are busy alike; a throttled one idles between
regions). Seen here on 2 cores: main 85-90 ms, a later thread 106-135 ms (1.4-1.6x in one run).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.engines.hf_ragged import RaggedForward  # noqa: E402


def thread_cpu() -> dict[str, float]:
    out = {}
    for t in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            f = open(f"/proc/{os.getpid()}/task/{t}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        out[t] = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--order", default="main,thread,main,thread")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM
    from server.default_model import ensure_default_model
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(ensure_default_model(), dtype=torch.float32).eval()
    rf = RaggedForward(model)

    def run() -> None:
        torch.set_grad_enabled(False)
        kvs = [rf.new_kv() for _ in range(8)]
        rf.forward(kvs, [[5] * 100] * 8)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            rf.forward(kvs, [[5]] * 8)
        ms = (time.perf_counter() - t0) / args.steps * 1e3
        print(f"{threading.current_thread().name}: {ms:.1f} ms/step", end="", flush=True)

    for where in args.order.split(","):
        before = thread_cpu()
        if where == "main":
            run()
        else:
            t = threading.Thread(target=run)
            t.start()
            t.join()
        after = thread_cpu()
        busy = sorted((after[k] - before.get(k, 0.0) for k in after), reverse=True)[:2]
        print(f"  (busiest threads: {busy[0]:.1f} s, {busy[1]:.1f} s of CPU)")


if __name__ == "__main__":
    main()
