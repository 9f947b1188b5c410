"""Pure tensor maths of the method: streaming statistics and the ridge solve.

No hooks, no models.  Shapes: ``n``/``dz``/``delta`` are ``[tokens, d]``.  A layer's statistics
are its token rows while they are few (the solve then runs in token space and its matrices come
out as exact low-rank factors), else ``[d, d]`` (``nn``, ``dzn``, ``dzdz``) and ``[d]`` sums,
whose memory is independent of the number of examples and which add across batches and
processes (all_reduce).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .lowrank import LowRank, apply


@dataclass
class _RowsThenSums:
    """Token rows kept while there are at most ``limit`` of them (the solve then runs in token
    space), folded into sums past that or before an all_reduce (rows freed as they go, so rows
    and sums are never both whole).  Subclasses define ``rows``, ``count``, ``weight``,
    ``_zero_sums``, ``_add_sums`` and ``_fold_moment``; tokens given by their moments
    (``add_moments``) are counted here (``_count_moments``)."""

    row_limit: int | None = field(default=None, kw_only=True)  # None: the subclass's default (d/2, f/2)
    task_sq: float = field(init=False, default=0.0)  # Σ w |x|² over the row tokens: the ridge's scale
    task_sum: torch.Tensor | None = field(init=False, default=None)  # Σ w x  over them
    moment_count: int = field(init=False, default=0)  # tokens given by their moments
    moment_weight: float = field(init=False, default=0.0)

    def _keep(self, x: torch.Tensor, y: torch.Tensor, w: float, limit: int) -> None:
        limit = self.row_limit if self.row_limit is not None else limit
        self.task_sq += w * float((x * x).sum())
        self.task_sum = w * x.sum(0) if self.task_sum is None else self.task_sum + w * x.sum(0)
        if self.rows is not None and self.count + x.shape[0] > limit:
            self.fold()
        if self.rows is not None:
            self.rows.append((x, y, w))
        else:
            self._add_sums(x, y, w)
        self.count += x.shape[0]
        self.weight += w * x.shape[0]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kept rows as one batch: (x [T, ·], y [T, ·], each token's weight [T])."""
        x = torch.cat([r[0] for r in self.rows])
        w = torch.cat([torch.full((r[0].shape[0],), r[2], dtype=x.dtype, device=x.device) for r in self.rows])
        return x, torch.cat([r[1] for r in self.rows]), w

    def fold(self) -> None:
        """Turn the kept rows into sums (from here on every token goes into the sums)."""
        if self.rows is None:
            return
        rows, self.rows = self.rows, None
        self._zero_sums()
        while rows:
            x, y, w = rows.pop(0)
            self._add_sums(x, y, w)
            del x, y
        self._fold_moment()

    def _fold_moment(self) -> None:
        """Moments held beside the rows (``add_moments``) join the sums."""

    def _count_moments(self, count: int, weight: float) -> None:
        """``count`` tokens of weight ``weight`` given by their moments join the totals."""
        self.count += count
        self.weight += weight * count
        self.moment_count += count
        self.moment_weight += weight * count

    def task_scale(self, dim: int, centred: bool) -> float | None:
        """The ridge's scale when moments were added (None: none were, and the solve takes it
        from its own matrix as always): the mean non-zero eigenvalue of the *row* tokens' second
        moment alone (centred on their weighted mean for a solve with intercept), so that ρ means
        what it means without moments and ``broad_weight`` alone sets how much they count."""
        if not self.moment_count:
            return None
        tokens = self.count - self.moment_count
        sq = self.task_sq
        if centred and self.task_sum is not None:
            tw = self.weight - self.moment_weight
            sq -= float(self.task_sum @ self.task_sum) / tw if tw > 0 else 0.0
        return max(sq, 0.0) / max(1, min(dim, _centred_rank(tokens, centred)))


@dataclass
class LayerStats(_RowsThenSums):
    """Sufficient statistics of one layer's discrepancies over all aligned tokens.

    While there are at most ``d/2`` tokens (a recipe of tens of examples: ~10² tokens against
    d = 640 on Gemma 3 270M) the token rows ``n``, ``dz`` themselves are kept: the solve then runs
    in token space and returns the thought matrix as exact factors of rank T (``solve_matrix``),
    and no d×d sum is ever built.  Past that, or before an all_reduce, the rows are folded into
    the sums (freed as they go), where the dense d×d solve is the smaller one anyway.
    ``residual`` keeps ``Σ dz dzᵀ`` too (only the sums' fit residual needs it: a d×d product per
    batch that costs as much as the solve, so it is paid only when asked for).
    """

    d: int
    dtype: torch.dtype = torch.float64
    device: torch.device | str = "cpu"
    keep_rows: bool = True
    residual: bool = True
    count: int = 0  # tokens
    weight: float = 0.0  # Σ of the tokens' weights (= count when every weight is 1)
    rows: list[tuple[torch.Tensor, torch.Tensor, float]] | None = field(init=False)  # (n, dz, weight)
    nn: torch.Tensor | None = field(init=False, default=None)  # Σ n nᵀ          [d, d]
    dzn: torch.Tensor | None = field(init=False, default=None)  # Σ dz nᵀ        [d, d]
    dzdz: torch.Tensor | None = field(init=False, default=None)  # Σ dz dzᵀ      [d, d]  (fit residual)
    delta: torch.Tensor = field(init=False)  # Σ delta      [d]
    delta_sq: torch.Tensor = field(init=False)  # Σ |delta|²  []
    # weighted Σ n nᵀ of tokens with dz = 0 held beside the kept rows (add_moments)  [d, d]
    moment: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.delta = torch.zeros(self.d, dtype=self.dtype, device=self.device)
        self.delta_sq = torch.zeros((), dtype=self.dtype, device=self.device)
        self.rows = [] if self.keep_rows else None
        if not self.keep_rows:
            self._zero_sums()

    def _zero_sums(self) -> None:
        z = lambda: torch.zeros(self.d, self.d, dtype=self.dtype, device=self.device)  # noqa: E731
        self.nn, self.dzn = z(), z()
        self.dzdz = z() if self.residual else None

    def _fold_moment(self) -> None:
        if self.moment is not None:
            self.nn.add_(self.moment)
            self.moment = None

    def _add_sums(self, n: torch.Tensor, dz: torch.Tensor, w: float) -> None:
        self.nn.addmm_(n.T, n, alpha=w)  # in place: no d×d temporaries
        self.dzn.addmm_(dz.T, n, alpha=w)
        if self.dzdz is not None:
            self.dzdz.addmm_(dz.T, dz, alpha=w)

    def add(self, n: torch.Tensor, n_ctx: torch.Tensor, u: torch.Tensor, u_ctx: torch.Tensor, weight: float = 1.0) -> None:
        """Accumulate tokens: ``n``/``u`` non-contextual, ``*_ctx`` contextual, all ``[tokens, d]``,
        each token counted ``weight`` times in the least-squares sums.  Every difference is
        taken in the statistics' dtype (float64), whatever the model's (bf16 activations).
        Inputs may live on another device than the sums (layers spread by a device map)."""
        f = lambda t: t.to(device=self.device, dtype=self.dtype)  # noqa: E731
        n = f(n)
        dz = f(n_ctx) - n
        delta = f(u_ctx) - f(u)
        w = float(weight)
        self.delta += w * delta.sum(0)
        self.delta_sq += w * (delta * delta).sum()
        self._keep(n, dz, w, self.d // 2)

    def add_moments(self, nn: torch.Tensor, count: int, weight: float) -> None:
        """Tokens whose target is the original model (``dz = 0``, ``delta = 0``) given by their
        second moment ``Σ n nᵀ`` alone (``moments.Moments``), each weighted ``weight``: they add
        to ``Σ n nᵀ`` and the token count, nothing else.  With the token rows kept the moment is
        held beside them (the solve stays factored: ``solve_matrix``); else added to the sums."""
        nn = nn.to(self.device, self.dtype) * weight
        if self.rows is not None:
            self.moment = nn if self.moment is None else self.moment + nn
        else:
            self.nn.add_(nn)
        self._count_moments(count, weight)

    def project(self, p: torch.Tensor) -> None:
        """Every input ``n`` taken in (rows, held moment, or sums) replaced by ``P n`` for a
        symmetric projector ``P`` [d, d] (``null_projector``): the solve's ``A`` then acts on the
        projected space only (AlphaEdit's null-space constraint)."""
        p = p.to(self.device, self.dtype)
        if self.rows is not None:
            self.rows = [(n @ p, dz, w) for n, dz, w in self.rows]
            if self.moment is not None:
                self.moment = p @ self.moment @ p
        else:
            self.nn = p @ self.nn @ p
            self.dzn = self.dzn @ p

    def finite(self) -> bool:
        """No NaN or Inf among the tokens taken in (rows or sums)."""
        kept = [t for r in self.rows for t in r[:2]] if self.rows is not None else [self.nn, self.dzn]
        return all(bool(torch.isfinite(t).all()) for t in kept)

    def scaled_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept rows scaled by √weight: (N [T, d], dZ [T, d]) with ``Σ w dz nᵀ = dZᵀ N``."""
        n, dz, w = self.stacked()
        sw = w.sqrt()[:, None]
        return sw * n, sw * dz

    def solve_matrix(self, rho: float):
        """The input-space thought matrix ``A`` (``ridge_solve``'s): exact factors
        ``A = [dZᵀ (N Nᵀ + ρ'I)⁻¹] · N`` of rank T from the kept rows (push-through identity,
        a T×T system), or dense from the sums."""
        if self.rows and self.moment is not None:
            # A = dZᵀ N K⁻¹, K = NᵀN + M + ρ'I: a d×d solve with T right-hand sides, still rank T
            n, dz = self.scaled_rows()
            k = self.moment.clone().addmm_(n.T, n)
            right = ridge_solve(k, n, rho, overwrite=True, scale=self.task_scale(self.d, False))  # N K⁻¹ [T, d]
            return LowRank(dz.T.contiguous(), right)
        if self.rows:
            n, dz = self.scaled_rows()
            left = ridge_solve(n @ n.T, dz.T, rho, overwrite=True, dim=self.d, rank=self.count)
            return LowRank(left, n)
        self.fold()
        return ridge_solve(self.nn, self.dzn, rho, rank=self.count, scale=self.task_scale(self.d, False))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.nn, self.dzn, self.dzdz, self.delta, self.delta_sq) if t is not None]

    def all_reduce(self) -> None:
        """Sum the statistics over a torch.distributed process group (sharded data)."""
        self.fold()
        _all_reduce(self.tensors(), self)


def _all_reduce(tensors: list[torch.Tensor], owner) -> None:
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t)
    # the row tokens' Σ w|x|² and Σ w x too: the ridge's scale when moments are added (task_scale)
    c = torch.tensor([float(owner.count), float(owner.weight), float(owner.task_sq)], dtype=torch.float64,
                     device=tensors[0].device)
    dist.all_reduce(c)
    owner.count, owner.weight, owner.task_sq = int(c[0].item()), float(c[1].item()), float(c[2].item())
    if owner.task_sum is None:  # a rank without rows of its own
        owner.task_sum = torch.zeros(tensors[0].shape[-1], dtype=tensors[0].dtype, device=tensors[0].device)
    dist.all_reduce(owner.task_sum)


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


def fit_residual(stats: LayerStats, a: torch.Tensor, gram: torch.Tensor) -> tuple[float, float]:
    """Numerator and denominator of ``|M N − W dZ|² / |W dZ|²`` with ``M = W A`` from sums only.

    ``gram = Σ_W WᵀW`` over the MLP input projections [d, d].  Expanding the Frobenius norm:
    ``|W(A N − dZ)|² = tr(G (A S_nn Aᵀ − A S_ndz − S_dzn Aᵀ + S_dzdz))``.
    """
    g = gram.to(stats.dtype)
    a = a.to(stats.dtype)
    inner = a @ stats.nn @ a.T - a @ stats.dzn.T - stats.dzn @ a.T + stats.dzdz
    num = torch.sum(g * inner).clamp_min(0).item()
    den = torch.sum(g * stats.dzdz).item()
    return num, den


def fit_residual_rows(stats: LayerStats, a, weights: list[torch.Tensor]) -> tuple[float, float]:
    """The same two figures from the kept token rows: ``Σ_W |(N Aᵀ − dZ) Wᵀ|²`` and
    ``Σ_W |dZ Wᵀ|²`` (√weight-scaled rows), T·d·f per projection instead of the sums' d²·f + d³.
    A figure, not the solve: float32 products."""
    n, dz = stats.scaled_rows()
    r = (apply(a.to(n.dtype), n) - dz).float()
    dz = dz.float()
    num = den = 0.0
    for w in weights:
        w = w.detach().float().to(r.device)
        num += float((r @ w.T).pow(2).sum())
        den += float((dz @ w.T).pow(2).sum())
    return num, den


def mean_vector(stats: LayerStats) -> torch.Tensor:
    """The thought vector for this batch: the least-squares constant ``mean_t delta_t``."""
    if stats.weight <= 0:
        return torch.zeros_like(stats.delta)
    return stats.delta / stats.weight


@dataclass
class DownStats(_RowsThenSums):
    """Statistics for the joint solve of a down-projection thought matrix and the thought vector.

    Per token: ``a`` [f] the (scaled) input of the down projection, ``e`` [d] the gap between the
    contextual and the non-contextual layer output left after the input-side patch.

    While there are at most ``f/2`` tokens (a recipe of tens of examples: ~10² tokens against
    f = 2048 on Gemma 3 270M) the token rows themselves are kept and the solve runs in token
    space (a T×T system instead of f×f, and no f×f sums to build); past that, or before an
    all_reduce, the rows are folded into the sums (freed as they go), so memory stays O(f²).
    """

    f: int
    d: int
    dtype: torch.dtype = torch.float64
    device: torch.device | str = "cpu"
    keep_rows: bool = True
    count: int = 0  # tokens
    weight: float = 0.0  # Σ of the tokens' weights
    # token rows (a, e, weight) while they are at most f/2; None once folded into the sums
    rows: list[tuple[torch.Tensor, torch.Tensor, float]] | None = field(init=False)
    aa: torch.Tensor | None = field(init=False, default=None)  # Σ a aᵀ [f, f]
    ea: torch.Tensor | None = field(init=False, default=None)  # Σ e aᵀ [d, f]
    a: torch.Tensor | None = field(init=False, default=None)  # Σ a     [f]
    e: torch.Tensor | None = field(init=False, default=None)  # Σ e     [d]
    ee: torch.Tensor | None = field(init=False, default=None)  # Σ |e|²  []
    # (weighted Σ a aᵀ [f, f], Σ a [f], their weight) of tokens with e = 0 held beside the rows
    moment: tuple[torch.Tensor, torch.Tensor, float] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.rows = [] if self.keep_rows else None
        if not self.keep_rows:
            self._zero_sums()

    def _zero_sums(self) -> None:
        z = lambda *s: torch.zeros(*s, dtype=self.dtype, device=self.device)  # noqa: E731
        self.aa, self.ea, self.a, self.e, self.ee = z(self.f, self.f), z(self.d, self.f), z(self.f), z(self.d), z(())

    def _add_sums(self, a: torch.Tensor, e: torch.Tensor, w: float) -> None:
        self.aa.addmm_(a.T, a, alpha=w)  # in place: an f×f temporary is 32 MB on Gemma 3 270M
        self.ea.addmm_(e.T, a, alpha=w)
        self.a += w * a.sum(0)
        self.e += w * e.sum(0)
        self.ee += w * (e * e).sum()

    def add(self, a: torch.Tensor, e: torch.Tensor, weight: float = 1.0) -> None:
        a, e = a.to(self.device, self.dtype), e.to(self.device, self.dtype)
        self._keep(a, e, float(weight), self.f // 2)

    def add_moments(self, aa: torch.Tensor, a: torch.Tensor, count: int, weight: float) -> None:
        """Tokens whose gap is 0 (the original model is their target) given by ``Σ a aᵀ`` and
        ``Σ a`` (``moments.Moments``), each weighted ``weight``; held beside the kept rows (the
        solve stays factored) or added to the sums."""
        aa, a = aa.to(self.device, self.dtype) * weight, a.to(self.device, self.dtype) * weight
        if self.rows is not None:
            held = self.moment
            self.moment = (aa, a, weight * count) if held is None else (held[0] + aa, held[1] + a, held[2] + weight * count)
        else:
            self.aa.add_(aa)
            self.a.add_(a)
        self._count_moments(count, weight)

    def project(self, p: torch.Tensor) -> None:
        """Every input ``a`` taken in replaced by ``P a`` (``LayerStats.project``) [f, f]."""
        p = p.to(self.device, self.dtype)
        if self.rows is not None:
            self.rows = [(a @ p, e, w) for a, e, w in self.rows]
            if self.moment is not None:
                aa, a, w = self.moment
                self.moment = (p @ aa @ p, p @ a, w)
        else:
            self.aa, self.ea, self.a = p @ self.aa @ p, self.ea @ p, p @ self.a

    def _fold_moment(self) -> None:
        if self.moment is not None:
            self.aa.add_(self.moment[0])
            self.a.add_(self.moment[1])
            self.moment = None

    def all_reduce(self) -> None:
        self.fold()
        _all_reduce([self.aa, self.ea, self.a, self.e, self.ee], self)


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
    n = st.weight if st.weight > 0 else 1.0
    if intercept:
        ma, me = st.a / n, st.e / n
    else:
        ma, me = torch.zeros_like(st.a), torch.zeros_like(st.e)
    caa = (st.aa if consume else st.aa.clone()).addr_(ma, ma, alpha=-n)
    cea = (st.ea if consume else st.ea.clone()).addr_(me, ma, alpha=-n)
    cee = st.ee - n * (me @ me)
    # the residual Σ_t w|D a_t + c − e_t|² = Σ_t w|D ã_t − ẽ_t|² (centred) = tr(D C_aa Dᵀ) − 2⟨D, C_ea⟩ + C_ee,
    # and the solve's own equation D (C_aa + λI) = C_ea turns tr(D C_aa Dᵀ) into ⟨D, C_ea⟩ − λ|D|²: no
    # product with C_aa, which the solve overwrites with its Cholesky factor
    rank = _centred_rank(st.count, intercept)
    given = st.task_scale(st.f, intercept)
    s = given if given is not None else float(torch.trace(caa)) / max(1, min(caa.shape[0], rank))
    lam = rho * s if rho > 0 else 0.0
    dmat = ridge_solve(caa, cea, rho, overwrite=True, scale=s)
    res = cee - torch.sum(dmat * cea) - lam * torch.sum(dmat * dmat)
    c = me - dmat @ ma
    rel = math.sqrt(max(float(res), 0.0) / float(st.ee)) if st.ee > 0 else 0.0
    if consume:
        st.aa = st.ea = None  # centred and regularised: no longer the sums
    return dmat, c, rel


def _intercept_only(st: DownStats) -> tuple[torch.Tensor, float]:
    """``argmin_c Σ_t w_t |c − e_t|²`` = the weighted mean of e, and its relative residual."""
    if st.rows is not None:
        w = [r[2] for r in st.rows]
        se = sum(wi * r[1].sum(0) for wi, r in zip(w, st.rows))
        ee = sum(wi * (r[1] * r[1]).sum() for wi, r in zip(w, st.rows))
    else:
        se, ee = st.e, st.ee
    n = st.weight if st.weight > 0 else 1.0
    c = se / n
    res = float(ee) - n * float(c @ c)
    rel = math.sqrt(max(res, 0.0) / float(ee)) if float(ee) > 0 else 0.0
    return c, rel


def _centred_rank(tokens: int, intercept: bool) -> int:
    """A bound on the rank of the (centred) second moment of ``tokens`` rows: centring on the
    mean takes one dimension away."""
    return max(1, tokens - 1 if intercept else tokens)


def _ridge_intercept_rows(st: DownStats, rho: float, intercept: bool) -> tuple[LowRank, torch.Tensor, float]:
    a, e, w = st.stacked()
    n = float(w.sum()) if float(w.sum()) > 0 else 1.0
    if intercept:
        ma, me = (w @ a) / n, (w @ e) / n
    else:
        ma, me = torch.zeros(st.f, dtype=a.dtype, device=a.device), torch.zeros(st.d, dtype=a.dtype, device=a.device)
    sw = w.sqrt()[:, None]
    x, y = sw * (a - ma), sw * (e - me)
    # Yᵀ (X Xᵀ + ρ' I)⁻¹ X with ρ' from tr(X Xᵀ) = tr(C_aa): ridge_solve's scale and cut-off;
    # kept as its factors (rank T): the left one solved, the right one the centred rows
    dmat = LowRank(ridge_solve(x @ x.T, y.T, rho, overwrite=True, dim=st.f, rank=_centred_rank(st.count, intercept)), x)
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
    n = total if total > 0 else 1.0
    if intercept:
        ma, me = (w @ a + mom_a) / n, (w @ e) / n
    else:
        ma, me = torch.zeros(st.f, dtype=a.dtype, device=a.device), torch.zeros(st.d, dtype=a.dtype, device=a.device)
    sw = w.sqrt()[:, None]
    x, y = sw * a, sw * e
    caa = mom_aa.clone().addmm_(x.T, x)
    if intercept:
        caa.addr_(ma, ma, alpha=-n)
    left = torch.cat([y.T, -n * me[:, None]], 1)  # [d, T+1]
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
