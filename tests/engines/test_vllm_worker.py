"""The vLLM worker's mapping of HF matrices onto fused, tensor-parallel parameters (vllm_worker.py).

Runs without vllm: the parameters are built here exactly as vLLM lays them out (qkv_proj = [q; k; v],
gate_up_proj = [gate; up] of this rank's rows; o_proj / down_proj = this rank's columns), the factors come
from a real factor cache on disk, and each rank patches only its own slice. Stitched together, the ranks
must hold exactly the W' that one rank composes for the full matrix.
"""

import pytest
import torch
from safetensors import safe_open

from experts.patch import SVFMatrix
from experts.svd import Factors, read_factor_slice, save_factors
from server.engines.vllm_worker import COLUMN, ROW, fused_slice

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
P = "model.layers.0"
HEAD = 8
SHAPES = {f"{P}.self_attn.q_proj.weight": (4 * HEAD, 32), f"{P}.self_attn.k_proj.weight": (1 * HEAD, 32),
          f"{P}.self_attn.v_proj.weight": (1 * HEAD, 32), f"{P}.self_attn.o_proj.weight": (32, 4 * HEAD),
          f"{P}.mlp.gate_proj.weight": (48, 32), f"{P}.mlp.up_proj.weight": (48, 32),
          f"{P}.mlp.down_proj.weight": (32, 48)}


@pytest.fixture(scope="module")
def factors_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(*s, generator=g) for n, s in SHAPES.items()}
    factors = {}
    for n, w in weights.items():
        U, s, Vh = torch.linalg.svd(w, full_matrices=False)
        factors[n] = Factors(U.contiguous(), s.contiguous(), Vh.contiguous())
    d = tmp_path_factory.mktemp("factors")
    save_factors(d, factors, {"fingerprint": "test"})
    return d / "factors.safetensors", weights


def test_placement_of_fused_and_row_parallel_matrices():
    q = fused_slice(f"{P}.self_attn.q_proj.weight", SHAPES, PACKED, 1, 2, HEAD)
    assert (q.param_name, q.kind, q.offset, q.rows) == (f"{P}.self_attn.qkv_proj.weight", COLUMN, 0, (16, 32))
    k = fused_slice(f"{P}.self_attn.k_proj.weight", SHAPES, PACKED, 1, 2, HEAD)
    assert (k.offset, k.rows) == (16, (0, 8))          # one KV head for two ranks: replicated
    v = fused_slice(f"{P}.self_attn.v_proj.weight", SHAPES, PACKED, 1, 2, HEAD)
    assert (v.offset, v.rows) == (24, (0, 8))
    up = fused_slice(f"{P}.mlp.up_proj.weight", SHAPES, PACKED, 1, 2, HEAD)
    assert (up.param_name, up.offset, up.rows) == (f"{P}.mlp.gate_up_proj.weight", 24, (24, 48))
    down = fused_slice(f"{P}.mlp.down_proj.weight", SHAPES, PACKED, 1, 2, HEAD)
    assert (down.param_name, down.kind, down.rows, down.cols) == (f"{P}.mlp.down_proj.weight", ROW, (0, 32), (24, 48))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_each_rank_patches_its_slice_and_the_ranks_together_hold_the_full_w_prime(factors_file, tp):
    path, weights = factors_file
    g = torch.Generator().manual_seed(1)
    z = {n: (1 + 0.3 * torch.randn(min(s), generator=g)).clamp_min(0.05) for n, s in SHAPES.items()}
    with safe_open(str(path), framework="pt") as fh:
        full = {n: SVFMatrix(n, weights[n].clone(), read_factor_slice(fh, n)).compose(z[n]) for n in SHAPES}
        ranks = []
        for r in range(tp):
            # 1. this rank's parameters, laid out as vLLM does
            places = {n: fused_slice(n, SHAPES, PACKED, r, tp, HEAD) for n in SHAPES}
            params = {}
            for n, p in places.items():
                part = weights[n][p.rows[0]:p.rows[1], p.cols[0]:p.cols[1]]
                params.setdefault(p.param_name, []).append((p.offset, part))
            params = {k: torch.cat([t for _, t in sorted(v, key=lambda x: x[0])]) for k, v in params.items()}
            # 2. patch through views with sliced factors, in place
            for n, p in places.items():
                live = params[p.param_name]
                view = live.narrow(0, p.offset, p.local_shape[0]) if p.kind == COLUMN else live
                f = read_factor_slice(fh, n, rows=p.rows if p.kind == COLUMN else None,
                                      cols=p.cols if p.kind == ROW else None)
                m = SVFMatrix(n, view, f)
                m.write(m.compose(z[n]))
            ranks.append((places, params))
    # 3. stitch each matrix back from the ranks and compare with the full composition
    for n in SHAPES:
        out = torch.zeros(SHAPES[n])
        for places, params in ranks:
            p = places[n]
            live = params[p.param_name]
            piece = live.narrow(0, p.offset, p.local_shape[0]) if p.kind == COLUMN else live
            out[p.rows[0]:p.rows[1], p.cols[0]:p.cols[1]] = piece
        torch.testing.assert_close(out, full[n], rtol=1e-5, atol=1e-5)
