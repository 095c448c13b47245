"""What an expert swap costs through OUR patch path on one GPU, vs the copy limit (torch only, no vLLM).

For a session that gets a GPU (the device has torch but no vLLM, safetensors or internet): builds
Llama-3-8B-shaped random weights on the device, laid out as vLLM's worker holds them (fused
`gate_up_proj` = [gate; up], `down_proj`, and with --attention `qkv_proj` = [q; k; v], `o_proj`), places each
HF matrix on its slice with the vLLM worker's own mapping (server/engines/vllm_worker.fused_slice; --tp N
times one rank's share of an N-way tensor-parallel model), and times experts.patch.ModelPatcher on those
views, exactly as the worker does on CUDA:
  cold   = compose W' = W + U·diag(s ⊙ (c·z − 1))·Vᵀ from the factors and copy it in place (a new expert);
  hot    = copy a cached W' in place (an expert used recently, within the patch cache);
  restore= copy the base back (exact);
  limit  = one plain device-to-device copy of the same bytes (what a hot swap cannot beat);
and a decode step's memory-bound floor (all 8B weights read once at the measured copy bandwidth).
The factors are random (timing depends on shapes only; an fp32 SVD of 8B would take minutes).
Prints a table and JSON lines.

  python benchmarks/gpu_swap_probe.py            # on the GPU: 32 layers, MLP (as the reference), bf16
  python benchmarks/gpu_swap_probe.py --attention --layers 16
  python benchmarks/gpu_swap_probe.py --small    # seconds on a CPU (tiny shapes, fp32): checks the script
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _stub_missing(names: list[str]) -> None:
    """The device may lack safetensors / tqdm, which experts/ imports but this probe never calls."""
    for name in names:
        try:
            __import__(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.__getattr__ = lambda attr, _n=name: (_ for _ in ()).throw(ImportError(f"{_n}.{attr}: stubbed"))
            sys.modules[name] = mod
            if name == "safetensors":
                sys.modules["safetensors.torch"] = mod
            if name == "tqdm":
                sys.modules["tqdm.auto"] = mod


_stub_missing(["safetensors", "tqdm"])

from experts.mix import BASE_NAME  # noqa: E402
from experts.patch import ModelPatcher, SVFMatrix  # noqa: E402
from experts.svd import Factors  # noqa: E402
from server.engines.vllm_worker import COLUMN, fused_slice  # noqa: E402

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
LLAMA3_8B = dict(hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128, layers=32)
SMALL = dict(hidden=256, inter=512, heads=4, kv_heads=2, head_dim=64, layers=2)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev, fn, n=5, warm=1) -> float:
    for _ in range(warm):
        fn()
    sync(dev)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / n * 1e3


def build(cfg: dict, attention: bool, tp: int, rank: int, dev: torch.device, dtype: torch.dtype):
    """1. HF shapes; 2. this rank's fused parameters (random); 3. SVFMatrix views with random factors."""
    h, i, d = cfg["hidden"], cfg["inter"], cfg["head_dim"]
    kinds = {"mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    if attention:
        kinds.update({"self_attn.q_proj": (cfg["heads"] * d, h), "self_attn.k_proj": (cfg["kv_heads"] * d, h),
                      "self_attn.v_proj": (cfg["kv_heads"] * d, h), "self_attn.o_proj": (h, cfg["heads"] * d)})
    shapes = {f"model.layers.{L}.{k}.weight": s for L in range(cfg["layers"]) for k, s in kinds.items()}
    places = {n: fused_slice(n, shapes, PACKED, rank, tp, d) for n in shapes}
    g = torch.Generator(device=dev).manual_seed(0)
    # 2. fused local parameters: rows of each shard stacked in order
    rows: dict[str, int] = {}
    cols: dict[str, int] = {}
    for p in places.values():
        rows[p.param_name] = max(rows.get(p.param_name, 0), p.offset + p.local_shape[0])
        cols[p.param_name] = p.local_shape[1]
    params = {pn: (torch.randn(rows[pn], cols[pn], device=dev, generator=g, dtype=torch.float32) * 0.02).to(dtype)
              for pn in rows}
    # 3. matrices on views, factors of this rank's slice (U rows / Vh columns), s whole
    matrices = {}
    for n, p in places.items():
        live = params[p.param_name]
        view = live.narrow(0, p.offset, p.local_shape[0]) if p.kind == COLUMN else live
        m, nn = shapes[n]
        r = min(m, nn)
        lm, ln = p.local_shape
        f = Factors(torch.randn(lm, r, device=dev, generator=g) / r ** 0.5,
                    torch.linspace(10, 0.1, r, device=dev),
                    torch.randn(r, ln, device=dev, generator=g) / r ** 0.5)
        matrices[n] = SVFMatrix(n, view, f)
    ranks = {n: min(s) for n, s in shapes.items()}
    return params, matrices, ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes, fp32, CPU-friendly")
    ap.add_argument("--attention", action="store_true", help="also q/k/v/o (default: MLP only, as the reference)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--tp", type=int, default=1, help="time one rank's share of an N-way tensor-parallel model")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--cache-gb", type=float, default=12.0, help="patch cache budget (holds the hot W')")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = dict(SMALL if args.small else LLAMA3_8B)
    if args.layers:
        cfg["layers"] = args.layers
    dtype = torch.float32 if args.small or dev.type == "cpu" else torch.bfloat16
    torch.set_grad_enabled(False)
    info = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__,
                dtype=str(dtype).split(".")[-1], tp=args.tp, rank=args.rank, attention=args.attention, **cfg)
    print(json.dumps({"setup": info}), flush=True)

    # 1. build
    t0 = time.perf_counter()
    params, matrices, ranks = build(cfg, args.attention, args.tp, args.rank, dev, dtype)
    sync(dev)
    build_s = time.perf_counter() - t0
    nbytes = sum(m.param.numel() * m.param.element_size() for m in matrices.values())
    patcher = ModelPatcher(matrices, int(args.cache_gb * 2**30))
    g = torch.Generator().manual_seed(1)
    experts = {k: {n: (1 + 0.05 * torch.randn(r, generator=g)).clamp_min(0.01) for n, r in ranks.items()}
               for k in ("math", "code")}

    # 2. the copy limit: the same bytes copied device to device, once
    src = [m.base for m in matrices.values()]
    dst = [m.param for m in matrices.values()]
    limit_ms = timed(dev, lambda: [d.copy_(s) for d, s in zip(dst, src)], n=args.repeats)

    # 3. cold (compose + copy; the cache is cleared each time), hot (cached copy), restore
    def cold():
        patcher.forget()
        patcher.apply(BASE_NAME)
        return patcher.apply("math", lambda: experts["math"]).ms

    colds = [cold() for _ in range(max(2, args.repeats // 2))]
    hots, restores = [], []
    for _ in range(args.repeats):
        restores.append(patcher.apply(BASE_NAME).ms)
        r = patcher.apply("math", lambda: experts["math"])
        assert r.how == "cached", r
        hots.append(r.ms)
    # exact restore of the base
    patcher.apply(BASE_NAME)
    exact = all(torch.equal(m.param, m.base) for m in matrices.values())

    # 4. a decode step's floor: the full model's weights read once at the measured copy bandwidth
    bw = 2 * nbytes / (limit_ms / 1e3)                     # bytes/s (a copy reads and writes)
    full_model_bytes = 8.03e9 * (2 if dtype == torch.bfloat16 else 4) / args.tp
    decode_ms = full_model_bytes / bw * 1e3                 # meaningful on the GPU with 8B shapes only
    res = dict(matrices=len(matrices), patched_gb=round(nbytes / 2**30, 3), build_s=round(build_s, 1),
               cold_ms=round(min(colds[1:]), 3), hot_ms=round(min(hots), 3), restore_ms=round(min(restores), 3),
               copy_limit_ms=round(limit_ms, 3), copy_bw_gbs=round(bw / 1e9, 1),
               decode_step_floor_ms=round(decode_ms, 2), base_restored_exactly=exact,
               cache_gb=round(patcher.cached_bytes() / 2**30, 2))
    print(json.dumps({"result": res}), flush=True)
    print(f"\n| {info['device']} | {info['dtype']} | {len(matrices)} matrices, {res['patched_gb']} GiB "
          f"({'MLP+attn' if args.attention else 'MLP'}, {cfg['layers']} layers, tp {args.tp}) |\n|---|---|---|")
    for k, label in (("cold_ms", "cold swap (compose + copy)"), ("hot_ms", "hot swap (cached W' copy)"),
                     ("restore_ms", "restore base (copy)"), ("copy_limit_ms", "copy limit (same bytes)"),
                     ("decode_step_floor_ms", "one decode step, 8B, memory-bound floor")):
        print(f"| {label} | {res[k]} ms | {res[k] / res['copy_limit_ms']:.2f}× the copy limit |")
    print(f"| base restored bit for bit | {exact} | |")


if __name__ == "__main__":
    main()
