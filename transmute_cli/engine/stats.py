"""The streaming statistics a layer's solve reads (the solves themselves: ``solve.py``).

No hooks, no models.  Shapes: ``n``/``dz``/``delta`` are ``[tokens, d]``.  A layer's statistics
are its token rows while they are few (the solve then runs in token space and its matrices come
out as exact low-rank factors), else ``[d, d]`` (``sum_nn``, ``sum_dzn``, ``sum_dzdz``) and ``[d]`` sums,
whose memory is independent of the number of examples and which add across batches and
processes (all_reduce).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from transmute_cli.engine.lowrank import LowRank
from transmute_cli.engine.solve import ridge_solve, centred_rank


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
        return max(sq, 0.0) / max(1, min(dim, centred_rank(tokens, centred)))


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
    sum_nn: torch.Tensor | None = field(init=False, default=None)  # Σ n nᵀ          [d, d]
    sum_dzn: torch.Tensor | None = field(init=False, default=None)  # Σ dz nᵀ        [d, d]
    sum_dzdz: torch.Tensor | None = field(init=False, default=None)  # Σ dz dzᵀ      [d, d]  (fit residual)
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
        self.sum_nn, self.sum_dzn = z(), z()
        self.sum_dzdz = z() if self.residual else None

    def _fold_moment(self) -> None:
        if self.moment is not None:
            self.sum_nn.add_(self.moment)
            self.moment = None

    def _add_sums(self, n: torch.Tensor, dz: torch.Tensor, w: float) -> None:
        self.sum_nn.addmm_(n.T, n, alpha=w)  # in place: no d×d temporaries
        self.sum_dzn.addmm_(dz.T, n, alpha=w)
        if self.sum_dzdz is not None:
            self.sum_dzdz.addmm_(dz.T, dz, alpha=w)

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

    def add_moments(self, n_moment: torch.Tensor, count: int, weight: float) -> None:
        """Tokens whose target is the original model (``dz = 0``, ``delta = 0``) given by their
        second moment ``Σ n nᵀ`` alone (``moments.Moments``), each weighted ``weight``: they add
        to ``Σ n nᵀ`` and the token count, nothing else.  With the token rows kept the moment is
        held beside them (the solve stays factored: ``solve_matrix``); else added to the sums."""
        n_moment = n_moment.to(self.device, self.dtype) * weight
        if self.rows is not None:
            self.moment = n_moment if self.moment is None else self.moment + n_moment
        else:
            self.sum_nn.add_(n_moment)
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
            self.sum_nn = p @ self.sum_nn @ p
            self.sum_dzn = self.sum_dzn @ p

    def finite(self) -> bool:
        """No NaN or Inf among the tokens taken in (rows or sums)."""
        kept = [t for r in self.rows for t in r[:2]] if self.rows is not None else [self.sum_nn, self.sum_dzn]
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
        return ridge_solve(self.sum_nn, self.sum_dzn, rho, rank=self.count, scale=self.task_scale(self.d, False))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.sum_nn, self.sum_dzn, self.sum_dzdz, self.delta, self.delta_sq) if t is not None]

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
    sum_aa: torch.Tensor | None = field(init=False, default=None)  # Σ a aᵀ [f, f]
    sum_ea: torch.Tensor | None = field(init=False, default=None)  # Σ e aᵀ [d, f]
    sum_a: torch.Tensor | None = field(init=False, default=None)  # Σ a     [f]
    sum_e: torch.Tensor | None = field(init=False, default=None)  # Σ e     [d]
    sum_ee: torch.Tensor | None = field(init=False, default=None)  # Σ |e|²  []
    # (weighted Σ a aᵀ [f, f], Σ a [f], their weight) of tokens with e = 0 held beside the rows
    moment: tuple[torch.Tensor, torch.Tensor, float] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.rows = [] if self.keep_rows else None
        if not self.keep_rows:
            self._zero_sums()

    def _zero_sums(self) -> None:
        z = lambda *s: torch.zeros(*s, dtype=self.dtype, device=self.device)  # noqa: E731
        self.sum_aa, self.sum_ea, self.sum_a, self.sum_e, self.sum_ee = z(self.f, self.f), z(self.d, self.f), z(self.f), z(self.d), z(())

    def _add_sums(self, a: torch.Tensor, e: torch.Tensor, w: float) -> None:
        self.sum_aa.addmm_(a.T, a, alpha=w)  # in place: an f×f temporary is 32 MB on Gemma 3 270M
        self.sum_ea.addmm_(e.T, a, alpha=w)
        self.sum_a += w * a.sum(0)
        self.sum_e += w * e.sum(0)
        self.sum_ee += w * (e * e).sum()

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
            self.sum_aa.add_(aa)
            self.sum_a.add_(a)
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
            self.sum_aa, self.sum_ea, self.sum_a = p @ self.sum_aa @ p, self.sum_ea @ p, p @ self.sum_a

    def _fold_moment(self) -> None:
        if self.moment is not None:
            self.sum_aa.add_(self.moment[0])
            self.sum_a.add_(self.moment[1])
            self.moment = None

    def all_reduce(self) -> None:
        self.fold()
        _all_reduce([self.sum_aa, self.sum_ea, self.sum_a, self.sum_e, self.sum_ee], self)
