"""Issue 25: defects found in review, each with a check that fails without its fix."""

from __future__ import annotations

import pytest
import torch

from transmute_cli.lowrank import LowRank, apply, stored
from transmute_cli.solve import DownStats, LayerStats, ridge_intercept_solve


def _ill_rows(t: int, d: int, seed: int = 0) -> torch.Tensor:
    """Token rows like a model's: a few outlier dimensions ~1000× the rest, and near-repeats."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(t, d, generator=g, dtype=torch.float64)
    n[:, :3] *= 1000.0
    n[t // 2 :] = n[: t - t // 2] + 1e-4 * torch.randn(t - t // 2, d, generator=g, dtype=torch.float64)
    return n


def _rel(stored_m, exact_m, x: torch.Tensor) -> float:
    got = apply(stored_m, x.float()).double()
    want = apply(exact_m, x)
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("rho", [0.0, 0.03])
def test_stored_matrix_factors_keep_float32_precision(rho):
    """A's factors from ill-conditioned rows, stored as the patch keeps them (float32), give
    ``A n`` as precisely as the dense float32 matrix does, on the rows themselves and on fresh
    ones (the raw factors in float32: 4e-5 at ρ = 0.03, 3e5 at ρ = 0 on these rows)."""
    d, t = 64, 20
    n = _ill_rows(t, d)
    st = LayerStats(d)
    dz = 0.1 * torch.randn(t, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    st.add(n, n + dz, torch.zeros(t, d), torch.zeros(t, d))
    a = st.solve_matrix(rho)
    assert isinstance(a, LowRank)
    s = stored(a)
    assert isinstance(s, LowRank) and s.left.dtype == torch.float32
    assert torch.allclose(s.right.double() @ s.right.double().T, torch.eye(s.rank, dtype=torch.float64), atol=1e-6)
    fresh = _ill_rows(8, d, seed=2)
    for x in (n, fresh):
        assert _rel(s, a, x) <= 2 * _rel(a.dense().float(), a, x) + 1e-6
    if rho > 0:
        assert _rel(s, a, n) < 1e-6


def test_stored_down_factors_keep_float32_precision():
    f, d, t = 96, 32, 24
    a = _ill_rows(t, f)
    e = torch.randn(t, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    st = DownStats(f, d)
    st.add(a, e)
    dmat, _vec, _rel_res = ridge_intercept_solve(st, 0.0, intercept=True, consume=False)
    assert isinstance(dmat, LowRank)
    assert _rel(stored(dmat), dmat, a) <= 2 * _rel(dmat.dense().float(), dmat, a) + 1e-6
