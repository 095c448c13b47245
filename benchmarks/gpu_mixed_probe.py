"""Mixed adaptations on a GPU, torch + transformers only (no vLLM, no weights from anywhere): the embedded
engine's factored form on CUDA in bf16 with a Llama-3-8B config and random weights built on the device.

1. build LlamaForCausalLM(Llama-3-8B config, `--layers` of them) in bf16 on the device, random weights;
2. decompose every MLP matrix there (fp32 SVD), install the engine's layers (server/engines/hf_factored.py:
   dense through the patched weights, factored with a per-row gain slot), `--adaptations` random gain rows;
3. time one decode step of the engine's ragged forward (KV of `--context` tokens) at 1, 8, 64, 256 rows: dense (weights patched to one
   adaptation), factored with one adaptation, factored with every row's slot different (mixed), and print
   factored/dense and mixed/one;
4. the bf16 error of the factored form against the dense W' (fp32 reference), next to the dense bf16 error.
Prints a markdown table and one JSON line. Runs in a few minutes on one H200 at the default 8 layers
(`--layers 32` for the whole model: the SVD then takes most of the time).
CPU check of the script itself:  python benchmarks/gpu_mixed_probe.py --tiny
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from experts.factored import FactoredMatrix, GainTable, factored_matmul, gains, relative_error
from experts.patch import ModelPatcher, SVFMatrix, svf_delta
from experts.svd import Factors, target_names
from server.engines.hf_ragged import RaggedForward

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            max_position_embeddings=512)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median ms of `repeat` calls after two warm-ups."""
    fn(), fn()
    out = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t) * 1e3)
    return sorted(out)[len(out) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny config on the CPU (checks the script)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--adaptations", type=int, default=16)
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    # 1. the model, random weights, on the device
    cfg = LlamaConfig(num_hidden_layers=a.layers if not a.tiny else 2, **(TINY if a.tiny else LLAMA3_8B))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    build_s = time.perf_counter() - t0
    # 2. factors of the MLP, the engine's factored layers, random gain rows
    names = target_names([n for n, _ in model.named_parameters()])
    t1 = time.perf_counter()
    matrices = {}
    for n in names:
        W = model.get_parameter(n).data
        U, s, Vh = torch.linalg.svd(W.float(), full_matrices=False)        # [m, r], [r], [r, n] fp32
        matrices[n] = SVFMatrix(n, W, Factors(U, s, Vh))
    sync(device)
    svd_s = time.perf_counter() - t1
    patcher = ModelPatcher(matrices, 0)
    from server.engines.hf_factored import install
    table = GainTable(patcher.ranks, a.adaptations + 1, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    zs = []
    for slot in range(1, a.adaptations + 1):
        z = {n: (1 + 0.05 * torch.randn(m.rank, generator=g)).to(device) for n, m in matrices.items()}
        zs.append(z)
        table.write(slot, {n: gains(matrices[n].s, z[n]) for n in z})
    path = install(model, patcher, table, dtype)
    patcher.apply("a1", lambda: zs[0])                                   # dense = adaptation 1's W'
    # 3. decode steps
    results = []
    ragged = RaggedForward(model)                                      # the embedded engine's forward
    for B in a.rows:
        prompts = torch.randint(100, cfg.vocab_size - 1, (B, a.context)).tolist()
        nxt = [[t] for t in torch.randint(100, cfg.vocab_size - 1, (B,)).tolist()]
        row = {"rows": B}
        for tag, slots in (("dense", None), ("factored_one", [1] * B),
                           ("factored_mixed", [i % a.adaptations + 1 for i in range(B)])):
            def set_path(n: int, slots=slots) -> None:
                if slots is None:
                    path.dense()
                else:
                    path.factored(torch.tensor([s for s in slots for _ in range(n)], device=device))
            kvs = [ragged.new_kv() for _ in range(B)]
            set_path(a.context)
            ragged.forward(kvs, prompts)

            def step():
                set_path(1)                                            # the per-step gather counts
                ragged.forward(kvs, nxt)
                for kv in kvs:                                         # keep the context length fixed
                    kv.length = a.context
            row[tag] = round(timed(step, device, a.repeat), 3)
            for kv in kvs:
                kv.release()
        ragged.pool.trim()
        row["factored/dense"] = round(row["factored_mixed"] / row["dense"], 3)
        row["mixed/one"] = round(row["factored_mixed"] / row["factored_one"], 3)
        results.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # 4. bf16 error of the factored form, one down_proj
    n = next(x for x in names if x.endswith("mlp.down_proj.weight"))
    m = matrices[n]
    ref_w = m.base.float() + svf_delta(m.U, m.s, m.Vh, zs[1][n])
    x = torch.randn(64, ref_w.shape[1], device=device)
    ref = x @ ref_w.T
    fm = FactoredMatrix(m.U, m.s, m.Vh, dtype)
    err_f = relative_error(factored_matmul(x.to(dtype), fm.Us, fm.Vh, gains(m.s, zs[1][n]).to(dtype)).float(), ref)
    err_d = relative_error((x.to(dtype) @ ref_w.to(dtype).T).float(), ref)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, Llama-3-8B config{' (tiny)' if a.tiny else ''}, {cfg.num_hidden_layers} layers, bf16, "
          f"{a.adaptations} adaptations, context {a.context}; build {build_s:.0f} s, SVD {svd_s:.0f} s")
    print("| rows | dense (ms) | factored, one (ms) | factored, mixed (ms) | factored/dense | mixed/one |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']} | {r['dense']} | {r['factored_one']} | {r['factored_mixed']} | {r['factored/dense']} "
              f"| {r['mixed/one']} |")
    print(f"bf16 error vs the fp32 dense W' ({n}): factored {err_f:.2e}, dense bf16 {err_d:.2e}")
    print(json.dumps({"device": name, "layers": cfg.num_hidden_layers, "steps": results, "bf16_error_factored": err_f,
                      "bf16_error_dense": err_d, "build_s": build_s, "svd_s": svd_s}))


if __name__ == "__main__":
    main()
