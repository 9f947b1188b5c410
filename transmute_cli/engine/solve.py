"""Pure maths of one layer's patch: the ridge solves (thought matrix, and the down matrix with its
intercept), in token space or on d×d sums, fit residuals, the null-space projector, spectra."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from transmute_cli.engine.lowrank import LowRank, apply

if TYPE_CHECKING:  # the statistics' types (engine/stats.py builds them on these solves)
    from transmute_cli.engine.stats import DownStats, LayerStats


def ridge_solve(nn: torch.Tensor, dzn: torch.Tensor, rho: float, overwrite: bool = False, dim: int | None = None,
                rank: int | None = None, scale: float | None = None) -> torch.Tensor:
    """``A = dzn (nn + ρ·s·I)⁻¹``: the input-space thought matrix, so that ``Δ(W) = W A``.

    ``argmin_M Σ_t |M n_t − W dz_t|² + ρ'|M|²`` is ``W (Σ dz nᵀ)(Σ n nᵀ + ρ' I)⁻¹`` for every
    MLP input projection W, so one d×d solve serves gate and up alike.  ρ is *relative*:
    ``ρ' = ρ·s`` with ``s = tr(Σ n nᵀ)/r`` the mean *non-zero* eigenvalue of the second moment,
    ``r = min(rank, d)`` where ``rank`` bounds its rank (the number of tokens T: with T < d only
    T eigenvalues are non-zero, and ``tr/d`` would shrink T/d times less than it says).  So
    ρ = 1 shrinks every direction the data span as much as an average one of them is worth,
    whatever the model's activation scale, its width or the number of tokens.  ρ = 0 gives the
    minimum-norm least-squares solution (pseudo-inverse), which for one token is exactly the
    rank-one patch ``dz nᵀ / |n|²``.

    Only the lower triangle of ``nn`` is read (Cholesky and eigh both use it).  ``overwrite``
    lets the solve add the ridge to ``nn`` and factor it in place instead of copying it (f×f on
    the joint path): ``nn`` is then spent.
    ``dim`` is the dimension the mean eigenvalue and the pseudo-inverse cut-off refer to, when
    ``nn`` is the token-space Gram ``X Xᵀ`` of an f-dimensional problem (same nonzero spectrum).
    ``scale``: s given instead (``_RowsThenSums.task_scale``: tokens given by moments beside the rows).
    """
    d = nn.shape[0] if dim is None else dim
    if scale is not None:
        scale = torch.tensor(float(scale), dtype=nn.dtype)
    else:
        scale = torch.trace(nn) / max(1, min(d, rank if rank is not None else d))
    if scale <= 0:
        return torch.zeros_like(dzn)
    if rho > 0:
        reg = nn if overwrite else nn.clone()
        reg.diagonal().add_(rho * scale)
        # overwritten by its own factor: no second f×f matrix (3.3 GB in float64 at f = 14336)
        chol = torch.linalg.cholesky(reg, out=reg)
        # A reg = dzn  <=>  reg A^T = dzn^T   (reg symmetric)
        return torch.cholesky_solve(dzn.T, chol).T
    evals, evecs = torch.linalg.eigh(nn)
    tol = evals.max() * d * torch.finfo(nn.dtype).eps
    inv = torch.where(evals > tol, 1.0 / evals.clamp_min(tol), torch.zeros_like(evals))
    return ((dzn @ evecs) * inv) @ evecs.T


def fit_residual(stats: LayerStats, matrix: torch.Tensor, gram: torch.Tensor) -> tuple[float, float]:
    """Numerator and denominator of ``|M N − W dZ|² / |W dZ|²`` with ``M = W A`` from sums only.

    ``gram = Σ_W WᵀW`` over the MLP input projections [d, d].  Expanding the Frobenius norm:
    ``|W(A N − dZ)|² = tr(G (A S_nn Aᵀ − A S_ndz − S_dzn Aᵀ + S_dzdz))``.
    """
    g = gram.to(stats.dtype)
    matrix = matrix.to(stats.dtype)
    inner = matrix @ stats.sum_nn @ matrix.T - matrix @ stats.sum_dzn.T - stats.sum_dzn @ matrix.T + stats.sum_dzdz
    num = torch.sum(g * inner).clamp_min(0).item()
    den = torch.sum(g * stats.sum_dzdz).item()
    return num, den


def fit_residual_rows(stats: LayerStats, matrix, weights: list[torch.Tensor]) -> tuple[float, float]:
    """The same two figures from the kept token rows: ``Σ_W |(N Aᵀ − dZ) Wᵀ|²`` and
    ``Σ_W |dZ Wᵀ|²`` (√weight-scaled rows), T·d·f per projection instead of the sums' d²·f + d³.
    A figure, not the solve: float32 products."""
    n, dz = stats.scaled_rows()
    r = (apply(matrix.to(n.dtype), n) - dz).float()
    dz = dz.float()
    num = den = 0.0
    for w in weights:
        w = w.detach().float().to(r.device)
        num += float((r @ w.T).pow(2).sum())
        den += float((dz @ w.T).pow(2).sum())
    return num, den


def ridge_intercept_solve(st: DownStats, rho: float, intercept: bool = True, consume: bool = False,
                          matrix: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, float]:
    """``argmin_{D, c} Σ_t w_t |D a_t + c − e_t|² + ρ'|D|²`` (the intercept is not shrunk).

    Centering turns it into a plain ridge solve: ``D = C_ea (C_aa + ρ' I)⁻¹``, ``c = ē − D ā``,
    with the same relative ρ as ``ridge_solve`` (sums and means weighted by the tokens' weights).
    With the token rows kept, the same D comes from the T×T system (push-through identity):
    ``D = Yᵀ (X Xᵀ + ρ' I)⁻¹ X`` for the centred, √w-scaled rows X [T, f] and Y [T, d].
    Returns (D [d, f], c [d], relative residual); D is a ``LowRank`` (rank T) from the rows.  ``consume``: the f×f sums are centred and
    regularised in place (no f×f copy: 32 MB each on Gemma 3 270M) and ``st`` is spent.
    ``matrix=False``: the intercept alone (D is None), the weighted mean of ``e``.
    """
    if not matrix:
        return (None, *_intercept_only(st))
    if st.rows is not None and st.rows and st.moment is not None:
        return _ridge_intercept_rows_moment(st, rho, intercept)
    if st.rows is not None and st.rows:
        return _ridge_intercept_rows(st, rho, intercept)
    st.fold()
    wsum = st.weight if st.weight > 0 else 1.0  # Σ of the tokens' weights
    if intercept:
        ma, me = st.sum_a / wsum, st.sum_e / wsum
    else:
        ma, me = torch.zeros_like(st.sum_a), torch.zeros_like(st.sum_e)
    caa = (st.sum_aa if consume else st.sum_aa.clone()).addr_(ma, ma, alpha=-wsum)
    cea = (st.sum_ea if consume else st.sum_ea.clone()).addr_(me, ma, alpha=-wsum)
    cee = st.sum_ee - wsum * (me @ me)
    # the residual Σ_t w|D a_t + c − e_t|² = Σ_t w|D ã_t − ẽ_t|² (centred) = tr(D C_aa Dᵀ) − 2⟨D, C_ea⟩ + C_ee,
    # and the solve's own equation D (C_aa + λI) = C_ea turns tr(D C_aa Dᵀ) into ⟨D, C_ea⟩ − λ|D|²: no
    # product with C_aa, which the solve overwrites with its Cholesky factor
    rank = centred_rank(st.count, intercept)
    given = st.task_scale(st.f, intercept)
    s = given if given is not None else float(torch.trace(caa)) / max(1, min(caa.shape[0], rank))
    lam = rho * s if rho > 0 else 0.0
    dmat = ridge_solve(caa, cea, rho, overwrite=True, scale=s)
    res = cee - torch.sum(dmat * cea) - lam * torch.sum(dmat * dmat)
    c = me - dmat @ ma
    rel = math.sqrt(max(float(res), 0.0) / float(st.sum_ee)) if st.sum_ee > 0 else 0.0
    if consume:
        st.sum_aa = st.sum_ea = None  # centred and regularised: no longer the sums
    return dmat, c, rel


def _intercept_only(st: DownStats) -> tuple[torch.Tensor, float]:
    """``argmin_c Σ_t w_t |c − e_t|²`` = the weighted mean of e, and its relative residual."""
    if st.rows is not None:
        w = [r[2] for r in st.rows]
        se = sum(wi * r[1].sum(0) for wi, r in zip(w, st.rows))
        ee = sum(wi * (r[1] * r[1]).sum() for wi, r in zip(w, st.rows))
    else:
        se, ee = st.sum_e, st.sum_ee
    wsum = st.weight if st.weight > 0 else 1.0
    c = se / wsum
    res = float(ee) - wsum * float(c @ c)
    rel = math.sqrt(max(res, 0.0) / float(ee)) if float(ee) > 0 else 0.0
    return c, rel


def centred_rank(tokens: int, intercept: bool) -> int:
    """A bound on the rank of the (centred) second moment of ``tokens`` rows: centring on the
    mean takes one dimension away."""
    return max(1, tokens - 1 if intercept else tokens)


def _ridge_intercept_rows(st: DownStats, rho: float, intercept: bool) -> tuple[LowRank, torch.Tensor, float]:
    a, e, w = st.stacked()
    wsum = float(w.sum()) if float(w.sum()) > 0 else 1.0
    if intercept:
        ma, me = (w @ a) / wsum, (w @ e) / wsum
    else:
        ma, me = torch.zeros(st.f, dtype=a.dtype, device=a.device), torch.zeros(st.d, dtype=a.dtype, device=a.device)
    sw = w.sqrt()[:, None]
    x, y = sw * (a - ma), sw * (e - me)
    # Yᵀ (X Xᵀ + ρ' I)⁻¹ X with ρ' from tr(X Xᵀ) = tr(C_aa): ridge_solve's scale and cut-off;
    # kept as its factors (rank T): the left one solved, the right one the centred rows
    dmat = LowRank(ridge_solve(x @ x.T, y.T, rho, overwrite=True, dim=st.f, rank=centred_rank(st.count, intercept)), x)
    c = me - dmat.left @ (dmat.right @ ma)
    r = apply(dmat, a) + c - e
    res = float(w @ (r * r).sum(1))
    tot = float(w @ (e * e).sum(1))
    rel = math.sqrt(max(res, 0.0) / tot) if tot > 0 else 0.0
    return dmat, c, rel


def _ridge_intercept_rows_moment(st: DownStats, rho: float, intercept: bool) -> tuple[LowRank, torch.Tensor, float]:
    """The ridge with intercept over the kept rows *and* tokens given by their moments
    (``add_moments``: gap 0), kept factored.  With the weighted means ``ā``, ``ē`` over all of
    them: ``C_aa = Σ w a aᵀ + M − W ā āᵀ`` (f×f), and ``C_ea = Σ w e aᵀ − W ē āᵀ = L R`` with
    ``L = [Yᵀ, −W ē]`` [d, T+1] and ``R = [X; āᵀ]`` [T+1, f] (√w-scaled rows): the moments hold
    no gap, so D = L (R (C_aa + ρ'I)⁻¹) has rank T + 1 — one f×f solve with T + 1 right-hand
    sides instead of d."""
    a, e, w = st.stacked()
    mom_aa, mom_a, mom_w = st.moment
    total = float(w.sum()) + mom_w
    wsum = total if total > 0 else 1.0
    if intercept:
        ma, me = (w @ a + mom_a) / wsum, (w @ e) / wsum
    else:
        ma, me = torch.zeros(st.f, dtype=a.dtype, device=a.device), torch.zeros(st.d, dtype=a.dtype, device=a.device)
    sw = w.sqrt()[:, None]
    x, y = sw * a, sw * e
    caa = mom_aa.clone().addmm_(x.T, x)
    if intercept:
        caa.addr_(ma, ma, alpha=-wsum)
    left = torch.cat([y.T, -wsum * me[:, None]], 1)  # [d, T+1]
    right = torch.cat([x, ma[None, :]], 0)  # [T+1, f]
    solved = ridge_solve(caa, right, rho, overwrite=True, scale=st.task_scale(st.f, intercept))  # R K⁻¹
    dmat = LowRank(left, solved)
    c = me - dmat.left @ (dmat.right @ ma)
    r = apply(dmat, a) + c - e  # the rows' residual; the moments' tokens' (target 0) from their sums
    res = float(w @ (r * r).sum(1))
    da = (mom_a @ dmat.right.T) @ dmat.left.T  # D Σa  [d]
    g = dmat.right @ mom_aa @ dmat.right.T  # [T+1, T+1]: tr(D M Dᵀ) = tr(L G Lᵀ)
    res += float(((dmat.left @ g) * dmat.left).sum()) + 2 * float(c @ da) + mom_w * float(c @ c)
    tot = float(w @ (e * e).sum(1))
    rel = math.sqrt(max(res, 0.0) / tot) if tot > 0 else 0.0
    return dmat, c, rel


def null_projector(moment: torch.Tensor, energy: float) -> torch.Tensor:
    """``I − U Uᵀ`` for ``U`` the leading eigenvectors of a second moment (``Σ x xᵀ`` of broad
    text) that hold ``energy`` of its trace: the projector onto the directions that text barely
    uses (AlphaEdit's null space, with the cut set by energy rather than an absolute eigenvalue)."""
    m = moment.double()
    evals, evecs = torch.linalg.eigh(m)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    share = torch.cumsum(evals, 0) / evals.sum().clamp_min(1e-300)
    k = int(torch.searchsorted(share, torch.tensor(float(energy), dtype=share.dtype)).item()) + 1
    u = evecs[:, :min(k, m.shape[0])]
    return torch.eye(m.shape[0], dtype=m.dtype, device=m.device) - u @ u.T


def spectrum(m: torch.Tensor, left_vectors: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Singular values of a matrix (descending, float64) and, on request, its left singular
    vectors, from the eigendecomposition of the smaller Gram matrix (``m mᵀ`` for the vectors):
    4-5x faster than an SVD of a 2048 × 640 matrix, and in float64 the values are exact to
    ~1e-8·s_max (``diffstats`` ranks cut far above that; ``export.lora_pair`` drops directions
    below 1e-7·s_max).  Stays on ``m``'s device."""
    m = m.detach().double()
    rows = left_vectors or m.shape[0] <= m.shape[1]
    gram = m @ m.T if rows else m.T @ m
    if left_vectors:
        values, vectors = torch.linalg.eigh(gram)
        return values.flip(0).clamp_min(0).sqrt(), vectors.flip(1)
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt(), None


def rms_scaled(a: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    """``a / rms(m)`` per token: with a post-norm ``s ⊙ m / rms(m)`` whose rms is frozen per token,
    what joins the residual is linear in ``D a / rms(m)``."""
    return a / torch.sqrt(m.pow(2).mean(-1, keepdim=True) + eps)


def unscale_rows(mat, scale: torch.Tensor):
    """Divide row i of a solution fitted *after* a post-norm scale by ``scale[i]``; a channel
    whose scale is ~0 cannot be moved at all, so its row stays 0.  A factored solution has its
    rows in the left factor."""
    if isinstance(mat, LowRank):
        return LowRank(unscale_rows(mat.left, scale), mat.right)
    live = scale.abs() > 1e-3 * scale.abs().max()
    return torch.where(live[:, None], mat / torch.where(live, scale, 1.0)[:, None], 0.0)
