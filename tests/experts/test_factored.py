"""experts/factored.py: the factored form equals the dense W' = W + svf_delta, per row, in any mix.

Precision against the dense W'_a (computed in fp32 as `SVFMatrix.compose` does), for SmolLM2-like MLP
shapes (scaled down) and 16 adaptations mixed in one batch:
- fp32: relative error ≤ 1e-5 (measured ~1e-6);
- bf16: the factored form's error is of the order of the dense bf16 matmul's own (both vs the fp32 W'),
  at most 3× it (measured: benchmarks/bench_factored.py prints both).
"""

from __future__ import annotations

import pytest
import torch

from experts.factored import FactoredMatrix, GainTable, factored_matmul, gains, gains_of, relative_error
from experts.patch import SVFMatrix, svf_delta
from experts.svd import Factors


def _matrix(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g) / n ** 0.5


def _factors(W: torch.Tensor) -> Factors:
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    return Factors(U.contiguous(), s.contiguous(), Vh.contiguous())


def _zs(r: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.sigmoid(torch.randn(k, r, generator=g)) * 2        # z' in (0, 2), like trained experts


def test_gains_reproduce_svf_delta():
    W = _matrix(48, 32, 0)
    f = _factors(W)
    z = _zs(f.rank, 1, 1)[0]
    dense = W + svf_delta(f.U, f.s, f.Vh, z)                           # [m, n] fp32
    fm = FactoredMatrix(f.U, f.s, f.Vh, torch.float32)
    assert relative_error(fm.dense(gains(f.s, z)), dense) < 1e-5
    assert relative_error(fm.dense(), W) < 1e-5                        # g = 1: the base
    assert torch.allclose(gains(f.s, torch.ones(f.rank)), torch.ones(f.rank))


@pytest.mark.parametrize("shape", [(192, 72), (72, 192)])             # gate/up and down, SmolLM2 ÷ 8
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, None)])
def test_mixed_batch_matches_each_rows_dense_w(shape, dtype, bound):
    m, n = shape
    W = _matrix(m, n, 2)
    f = _factors(W)
    mat = SVFMatrix("w", W.to(dtype).clone(), f)
    k, T = 16, 64                                                      # 16 adaptations, 64 rows
    zs = _zs(f.rank, k, 3)
    table = GainTable({"w": f.rank}, k + 1)
    for a in range(k):
        table.write(a + 1, {"w": gains(f.s, zs[a])})
    idx = torch.arange(T) % (k + 1)                                    # slot 0 (base) included
    x = torch.randn(T, 5, n, generator=torch.Generator().manual_seed(4))   # [B, T, n]
    fm = FactoredMatrix(f.U, f.s, f.Vh, dtype)
    y = factored_matmul(x.to(dtype), fm.Us, fm.Vh, table.rows(idx, dtype))    # [B, T, m]
    errs, dense_errs = [], []
    for t in range(T):
        a = int(idx[t])
        Wa = W if a == 0 else W + svf_delta(f.U, f.s, f.Vh, zs[a - 1])   # fp32 reference W'
        ref = x[t] @ Wa.T
        errs.append(relative_error(y[t].float(), ref))
        dense = mat.base if a == 0 else mat.compose(zs[a - 1])          # what the dense path would use
        dense_errs.append(relative_error((x[t].to(dtype) @ dense.T).float(), ref))
    if bound is not None:
        assert max(errs) < bound, max(errs)
    else:
        assert max(errs) < 3 * max(dense_errs) and max(errs) < 0.05, (max(errs), max(dense_errs))


def test_gain_table_gathers_each_rows_slot_and_keeps_slot_zero_base():
    table = GainTable({"a": 3, "b": 2}, 4)
    assert table.slice_of("a") == (0, 3) and table.slice_of("b") == (3, 2)
    table.write(2, {"a": torch.tensor([2.0, 3.0, 4.0])})                  # b not named: ones
    rows = table.rows(torch.tensor([2, 0, 2]), torch.float32)            # [3, 5]
    assert rows.tolist() == [[2, 3, 4, 1, 1], [1, 1, 1, 1, 1], [2, 3, 4, 1, 1]]
    table.write(1, {"b": torch.tensor([5.0, 6.0])})
    idx = torch.tensor([1, 2, 0])
    assert table.rows(idx, torch.float32, table.slice_of("b")).tolist() == [[5, 6], [1, 1], [1, 1]]   # one matrix
    assert table.rows(idx, torch.float32, (2, 3)).tolist() == [[1, 5, 6], [4, 1, 1], [1, 1, 1]]   # a column span
    with pytest.raises(AssertionError):
        table.write(0, {})
    s = {"a": torch.ones(3), "b": torch.ones(2)}
    assert set(gains_of(s, {"a": torch.ones(3)})) == {"a"}
