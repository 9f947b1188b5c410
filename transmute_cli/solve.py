"""Pure tensor maths of the method: streaming statistics and the ridge solve.

No hooks, no models.  Shapes: ``n``/``dz``/``delta`` are ``[tokens, d]``; statistics are
``[d, d]`` (``nn``, ``dzn``, ``dzdz``) or ``[d]`` sums, so memory is independent of the
number of examples and the sums add across batches and processes (all_reduce).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerStats:
    """Sufficient statistics of one layer's discrepancies over all aligned tokens."""

    d: int
    dtype: torch.dtype = torch.float64
    device: torch.device | str = "cpu"
    count: int = 0  # tokens
    weight: float = 0.0  # Σ of the tokens' weights (= count when every weight is 1)
    nn: torch.Tensor = field(init=False)  # Σ n nᵀ          [d, d]
    dzn: torch.Tensor = field(init=False)  # Σ dz nᵀ        [d, d]
    dzdz: torch.Tensor = field(init=False)  # Σ dz dzᵀ      [d, d]  (for the fit residual)
    delta: torch.Tensor = field(init=False)  # Σ delta      [d]
    delta_sq: torch.Tensor = field(init=False)  # Σ |delta|²  []

    def __post_init__(self) -> None:
        z = lambda *s: torch.zeros(*s, dtype=self.dtype, device=self.device)  # noqa: E731
        self.nn, self.dzn, self.dzdz = z(self.d, self.d), z(self.d, self.d), z(self.d, self.d)
        self.delta, self.delta_sq = z(self.d), z(())

    def add(self, n: torch.Tensor, n_ctx: torch.Tensor, u: torch.Tensor, u_ctx: torch.Tensor, weight: float = 1.0) -> None:
        """Accumulate tokens: ``n``/``u`` non-contextual, ``*_ctx`` contextual, all ``[tokens, d]``,
        each token counted ``weight`` times in the least-squares sums.
        Inputs may live on another device than the sums (layers spread by a device map)."""
        f = lambda t: t.to(device=self.device, dtype=self.dtype)  # noqa: E731
        n = f(n)
        dz = f(n_ctx) - n
        delta = f(u_ctx) - f(u)
        w = float(weight)
        self.nn += w * (n.T @ n)
        self.dzn += w * (dz.T @ n)
        self.dzdz += w * (dz.T @ dz)
        self.delta += w * delta.sum(0)
        self.delta_sq += w * (delta * delta).sum()
        self.count += n.shape[0]
        self.weight += w * n.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.nn, self.dzn, self.dzdz, self.delta, self.delta_sq]

    def all_reduce(self) -> None:
        """Sum the statistics over a torch.distributed process group (sharded data)."""
        _all_reduce(self.tensors(), self)


def _all_reduce(tensors: list[torch.Tensor], owner) -> None:
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t)
    c = torch.tensor([float(owner.count), float(owner.weight)], dtype=torch.float64, device=tensors[0].device)
    dist.all_reduce(c)
    owner.count, owner.weight = int(c[0].item()), float(c[1].item())


def ridge_solve(nn: torch.Tensor, dzn: torch.Tensor, rho: float) -> torch.Tensor:
    """``A = dzn (nn + ρ·s·I)⁻¹``: the input-space thought matrix, so that ``Δ(W) = W A``.

    ``argmin_M Σ_t |M n_t − W dz_t|² + ρ'|M|²`` is ``W (Σ dz nᵀ)(Σ n nᵀ + ρ' I)⁻¹`` for every
    MLP input projection W, so one d×d solve serves gate and up alike.  ρ is *relative*:
    ``ρ' = ρ·s`` with ``s = tr(Σ n nᵀ)/d`` the mean eigenvalue of the second moment, so the
    same ρ means the same shrinkage whatever the model's activation scale or the number of
    tokens.  ρ = 0 gives the minimum-norm least-squares solution (pseudo-inverse), which for
    one token is exactly the rank-one patch ``dz nᵀ / |n|²``.
    """
    d = nn.shape[0]
    nn = 0.5 * (nn + nn.T)  # symmetric to the last bit before factorising
    scale = torch.trace(nn) / d
    if scale <= 0:
        return torch.zeros_like(dzn)
    if rho > 0:
        reg = nn + (rho * scale) * torch.eye(d, dtype=nn.dtype, device=nn.device)
        chol = torch.linalg.cholesky(reg)
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


def mean_vector(stats: LayerStats) -> torch.Tensor:
    """The thought vector for this batch: the least-squares constant ``mean_t delta_t``."""
    if stats.weight <= 0:
        return torch.zeros_like(stats.delta)
    return stats.delta / stats.weight


@dataclass
class DownStats:
    """Sums for the joint solve of a down-projection thought matrix and the thought vector.

    Per token: ``a`` [f] the (scaled) input of the down projection, ``e`` [d] the gap between the
    contextual and the non-contextual layer output left after the input-side patch.
    """

    f: int
    d: int
    dtype: torch.dtype = torch.float64
    device: torch.device | str = "cpu"
    count: int = 0  # tokens
    weight: float = 0.0  # Σ of the tokens' weights
    aa: torch.Tensor = field(init=False)  # Σ a aᵀ [f, f]
    ea: torch.Tensor = field(init=False)  # Σ e aᵀ [d, f]
    a: torch.Tensor = field(init=False)  # Σ a     [f]
    e: torch.Tensor = field(init=False)  # Σ e     [d]
    ee: torch.Tensor = field(init=False)  # Σ |e|²  []

    def __post_init__(self) -> None:
        z = lambda *s: torch.zeros(*s, dtype=self.dtype, device=self.device)  # noqa: E731
        self.aa, self.ea, self.a, self.e, self.ee = z(self.f, self.f), z(self.d, self.f), z(self.f), z(self.d), z(())

    def add(self, a: torch.Tensor, e: torch.Tensor, weight: float = 1.0) -> None:
        a, e = a.to(self.device, self.dtype), e.to(self.device, self.dtype)
        w = float(weight)
        self.aa += w * (a.T @ a)
        self.ea += w * (e.T @ a)
        self.a += w * a.sum(0)
        self.e += w * e.sum(0)
        self.ee += w * (e * e).sum()
        self.count += a.shape[0]
        self.weight += w * a.shape[0]

    def all_reduce(self) -> None:
        _all_reduce([self.aa, self.ea, self.a, self.e, self.ee], self)


def ridge_intercept_solve(st: DownStats, rho: float, intercept: bool = True) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``argmin_{D, c} Σ_t |D a_t + c − e_t|² + ρ'|D|²`` (the intercept is not shrunk).

    Centering turns it into a plain ridge solve: ``D = C_ea (C_aa + ρ' I)⁻¹``, ``c = ē − D ā``,
    with the same relative ρ as ``ridge_solve`` (sums and means weighted by the tokens' weights).
    Returns (D [d, f], c [d], relative residual).
    """
    n = st.weight if st.weight > 0 else 1.0
    if intercept:
        ma, me = st.a / n, st.e / n
        caa = st.aa - n * torch.outer(ma, ma)
        cea = st.ea - n * torch.outer(me, ma)
    else:
        ma, me = torch.zeros_like(st.a), torch.zeros_like(st.e)
        caa, cea = st.aa, st.ea
    dmat = ridge_solve(caa, cea, rho)
    c = me - dmat @ ma
    # Σ|D a + c − e|² from the sums
    quad = torch.sum((dmat @ st.aa) * dmat) + 2 * c @ (dmat @ st.a) + n * (c @ c)
    cross = torch.sum(dmat * st.ea) + c @ st.e
    res = (quad - 2 * cross + st.ee).clamp_min(0)
    rel = float(torch.sqrt(res / st.ee)) if st.ee > 0 else 0.0
    return dmat, c, rel
