"""The vLLM worker's mapping of HF matrices onto fused, tensor-parallel parameters (vllm_worker.py).

Runs without vllm: each rank's factored layer is built as t2_init builds it (its rows of U for qkv_proj =
[q; k; v] and gate_up_proj = [gate; up]; its columns of Vh for o_proj / down_proj) from a real factor cache
on disk; its output for rows of mixed adaptations must be this rank's shard of the dense x·W'ᵀ (layouts
written out by hand here), and the row-parallel partial sums must add up to the full output.
"""

import pytest
import torch
from safetensors import safe_open

from experts.patch import SVFMatrix
from experts.svd import Factors, read_factor_slice, save_factors
from server.engines.vllm_worker import COLUMN, ROW, factored, fused_slice, local_factors

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


def _expected_rows(leaf: str, r: int, tp: int) -> tuple[int, int]:
    """This rank's rows of a column-parallel matrix, by hand: an even split, or one replicated KV head."""
    m = SHAPES[f"{P}.self_attn.{leaf}.weight" if leaf.endswith(("q_proj", "k_proj", "v_proj")) else f"{P}.mlp.{leaf}.weight"][0]
    if leaf in ("k_proj", "v_proj") and m // HEAD < tp:
        h = r * (m // HEAD) // tp
        return h * HEAD, (h + 1) * HEAD
    return r * m // tp, (r + 1) * m // tp


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_each_rank_computes_its_shard_of_the_factored_form_for_mixed_rows(factors_file, tp):
    """Per rank, the layer's buffers as vllm_worker.t2_init builds them (fused_slice → read_factor_slice →
    local_factors), run through `factored` with 2 adaptations + the base mixed per row; expected: the dense
    W'_a of experts.patch (SVFMatrix.compose), cut by hand into vLLM's per-rank layout."""
    path, weights = factors_file
    g = torch.Generator().manual_seed(1)
    zs = [{n: (1 + 0.3 * torch.randn(min(s), generator=g)).clamp_min(0.05) for n, s in SHAPES.items()}
          for _ in range(2)]
    slots = torch.tensor([0, 2, 1, 1, 2, 0, 0])                     # row → slot (2 = the base row)
    groups = {"gate_up_proj": ["gate_proj", "up_proj"], "qkv_proj": ["q_proj", "k_proj", "v_proj"],
              "down_proj": ["down_proj"], "o_proj": ["o_proj"]}
    with safe_open(str(path), framework="pt") as fh:
        dense = {}
        for n in SHAPES:
            m = SVFMatrix(n, weights[n].clone(), read_factor_slice(fh, n))
            dense[n] = [m.compose(z[n]) for z in zs] + [weights[n]]   # W' per slot, base last
        for fused, leaves in groups.items():
            sub = "self_attn" if fused in ("qkv_proj", "o_proj") else "mlp"
            names = [f"{P}.{sub}.{leaf}.weight" for leaf in leaves]
            row_parallel = fused in ("down_proj", "o_proj")
            partial_sum = 0
            x = torch.randn(len(slots), SHAPES[names[0]][1], generator=g)   # [T, n]
            for r in range(tp):
                us, vh, gains = [], [], []
                for n in names:
                    p = fused_slice(n, SHAPES, PACKED, r, tp, HEAD)
                    f = read_factor_slice(fh, n, rows=p.rows if p.kind == COLUMN else None,
                                          cols=p.cols if p.kind == ROW else None)
                    u, v = local_factors(f.U, f.s, f.Vh)
                    us.append(u)
                    vh.append(v)
                    s_ = f.s
                    gains.append(torch.stack([(s_.sum() / (s_ * z[n]).sum()) * z[n] for z in zs]
                                             + [torch.ones_like(s_)]))
                xin = x
                if row_parallel:
                    n_full = SHAPES[names[0]][1]
                    cols = (r * n_full // tp, (r + 1) * n_full // tp)
                    xin = x[:, cols[0]:cols[1]]
                y = factored(xin, torch.cat(vh), us, torch.cat(gains, 1), slots)
                if row_parallel:
                    partial_sum = partial_sum + y
                    continue
                want = torch.cat([torch.stack([dense[n][k][slice(*_expected_rows(leaf, r, tp))] @ x[t]
                                               for t, k in enumerate(slots.tolist())])
                                  for n, leaf in zip(names, leaves)], dim=1)
                torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
            if row_parallel:   # the layer's all-reduce: the ranks' partial sums add up to the full output
                want = torch.stack([dense[names[0]][k] @ x[t] for t, k in enumerate(slots.tolist())])
                torch.testing.assert_close(partial_sum, want, rtol=1e-4, atol=1e-4)


def test_local_factors_slices_rows_of_u_and_columns_of_vh():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(12, 8, generator=g, dtype=torch.float64)
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    us, vh = local_factors(U, s, Vh, rows=(3, 9))
    torch.testing.assert_close(us @ vh, W[3:9])
    us, vh = local_factors(U, s, Vh, cols=(4, 8))
    torch.testing.assert_close(us @ vh, W[:, 4:8])
