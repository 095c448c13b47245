"""Dense vs factored forward of the embedded engine, in process (no HTTP): the measurement behind the engine's
choice of path, and the precision of the factored form.

For the model (default: the embedded SmolLM2-135M-Instruct, fp32, CPU) it loads the real HFEngine (factors,
factored layers, gain slots), fills `--adaptations` random gain slots, and times (min of `--repeat`):
- prefill of B × 64 tokens and one decode step at batch B (the engine's ragged forward and KV pool), for
  B in `--batches`:
  dense (weights patched to one adaptation) / factored, one adaptation / factored, B rows over all slots;
- the patch (swap) itself: composing W' and copying a cached W' — what going dense costs;
- precision: one MLP matrix, factored vs the dense W' (fp32 reference), in fp32 and bf16, next to the dense
  bf16 matmul's own error.
Usage: python benchmarks/bench_factored.py [--model DIR] [--batches 1 8 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from experts.expert import random_expert
from experts.factored import FactoredMatrix, factored_matmul, gains, relative_error
from experts.mix import Adaptation
from experts.patch import svf_delta


def best(fn, repeat: int) -> float:
    fn()
    out = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path.home() / ".cache/t2/models/SmolLM2-135M-Instruct")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--adaptations", type=int, default=8)
    p.add_argument("--repeat", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    from server.engines.hf import HFEngine
    eng = HFEngine(a.model, device="cpu", dtype="float32", cache_dir=Path.home() / ".cache/t2",
                   max_adaptations=a.adaptations)
    eng.load()
    ranks = eng.patcher.ranks
    eng.experts = {f"r{i}": random_expert(f"r{i}", ranks, 0.05, i) for i in range(a.adaptations)}
    adaptations = [Adaptation.of({f"r{i}": 1}) for i in range(a.adaptations)]
    from server.engines.scheduler import Job, JobKind
    jobs = [Job(JobKind.GENERATE, x, payload=None) for x in adaptations]
    assert all(eng._admit(j) for j in jobs)
    eng._apply(adaptations[0])                                # dense = the first adaptation's W'
    print(f"model {a.model.name}, fp32, {a.threads} threads, {a.adaptations} adaptations in the gain table")
    print("| rows | prefill 64 tok: dense / factored 1 / factored mixed (ms) | decode step: dense / factored 1 / "
          "factored mixed (ms) | decode factored/dense |")
    print("|---|---|---|---|")
    for B in a.batches:
        prompts = torch.randint(100, 4000, (B, 64)).tolist()
        nxt = [[t] for t in torch.randint(100, 4000, (B,)).tolist()]
        per_token = lambda slots, n: torch.tensor([s for s in slots for _ in range(n)], dtype=torch.long)  # noqa: E731
        one = [jobs[0].slot] * B
        mixed = [jobs[i % len(jobs)].slot for i in range(B)]
        res = {}
        for tag, slots in (("dense", None), ("f1", one), ("fmix", mixed)):
            def set_path(n: int, slots=slots) -> None:
                eng.path.dense() if slots is None else eng.path.factored(per_token(slots, n))

            def prefill() -> list:
                set_path(64)
                kvs = [eng.ragged.new_kv() for _ in range(B)]
                eng.ragged.forward(kvs, prompts)
                return kvs
            pre = best(prefill, max(2, a.repeat // 4))
            kvs = prefill()

            def step() -> None:
                set_path(1)                                  # the per-step gather is part of the cost
                eng.ragged.forward(kvs, nxt)
            res[tag] = (pre, best(step, a.repeat))
            for kv in kvs:
                kv.release()
        d, f1, fm = res["dense"], res["f1"], res["fmix"]
        print(f"| {B} | {d[0]:.0f} / {f1[0]:.0f} / {fm[0]:.0f} | {d[1]:.1f} / {f1[1]:.1f} / {fm[1]:.1f} | "
              f"{fm[1] / d[1]:.2f} |")
    # the swap: compose W' from the factors, or copy a cached one
    eng.patcher.forget()
    x = adaptations[1]
    t = time.perf_counter()
    eng._apply(x)
    compose = (time.perf_counter() - t) * 1e3
    eng._apply(Adaptation.of(None))
    t = time.perf_counter()
    eng._apply(x)
    cached = (time.perf_counter() - t) * 1e3
    print(f"swap: compose W' {compose:.0f} ms, cached W' copy {cached:.0f} ms")
    # precision on one real matrix
    name = next(n for n in eng.patcher.matrices if n.endswith("mlp.down_proj.weight"))
    m = eng.patcher.matrices[name]
    z = eng.experts["r1"].z[name]
    ref_w = m.base.float() + svf_delta(m.U, m.s, m.Vh, z)
    xin = torch.randn(64, ref_w.shape[1])
    ref = xin @ ref_w.T
    for dt in (torch.float32, torch.bfloat16):
        fm = FactoredMatrix(m.U, m.s, m.Vh, dt)
        y = factored_matmul(xin.to(dt), fm.Us, fm.Vh, gains(m.s, z).to(dt))
        yd = xin.to(dt) @ ref_w.to(dt).T
        print(f"precision {str(dt).split('.')[-1]} ({name}): factored {relative_error(y.float(), ref):.1e}, "
              f"dense {relative_error(yd.float(), ref):.1e} (relative to the fp32 dense W')")


if __name__ == "__main__":
    main()
