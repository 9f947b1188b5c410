"""Exact low-rank matrices: ``M = left @ right`` kept as its two thin factors.

Every thought matrix the ridge solve returns lies in the span of the T tokens it was fitted on
(``A = dZᵀ (N Nᵀ + ρ'I)⁻¹ N``, ``D = Yᵀ (X Xᵀ + ρ'I)⁻¹ X``), so its rank is at most T, and while
T is small against the matrix's sides the factors are smaller than the dense matrix and cheaper
to apply: ``x Mᵀ = (x rightᵀ) leftᵀ`` costs ``T·(in + out)`` per token instead of ``in·out``.

A patch holds each matrix either dense (a ``torch.Tensor``) or as a ``LowRank``; the helpers at
the bottom (``dense``, ``apply``, ``add``, ``compact``) take either, so callers need not ask.
"""

from __future__ import annotations

import torch


class LowRank:
    """``left [out, r] @ right [r, in]``; never materialised unless ``dense()`` is asked for."""

    __slots__ = ("left", "right")

    def __init__(self, left: torch.Tensor, right: torch.Tensor):
        if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
            raise ValueError(f"low-rank factors do not chain: {tuple(left.shape)} @ {tuple(right.shape)}")
        self.left, self.right = left, right

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.left.shape[0], self.right.shape[1]))

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.left.dtype

    @property
    def device(self) -> torch.device:
        return self.left.device

    def stored(self) -> int:
        """Numbers kept (against ``out·in`` dense)."""
        return self.left.numel() + self.right.numel()

    def dense(self) -> torch.Tensor:
        return self.left @ self.right

    def to(self, *args, **kwargs) -> "LowRank":
        return LowRank(self.left.to(*args, **kwargs), self.right.to(*args, **kwargs))

    def float(self) -> "LowRank":
        return self.to(torch.float32)

    def double(self) -> "LowRank":
        return self.to(torch.float64)

    def cpu(self) -> "LowRank":
        return self.to("cpu")

    def __mul__(self, s) -> "LowRank":
        return LowRank(s * self.left, self.right)

    __rmul__ = __mul__

    def premul(self, w: torch.Tensor) -> "LowRank":
        """``w @ M`` (``W A`` for an MLP input projection W), still factored."""
        return LowRank(w @ self.left.to(w.dtype), self.right.to(w.dtype))

    def norm(self) -> torch.Tensor:
        """Frobenius norm from the r×r Gram matrices: ``|LR|² = Σ (LᵀL) ⊙ (RRᵀ)``."""
        l, r = self.left.double(), self.right.double()
        return torch.sum((l.T @ l) * (r @ r.T)).clamp_min(0).sqrt().to(self.dtype)

    def isfinite(self) -> bool:
        return bool(torch.isfinite(self.left).all() and torch.isfinite(self.right).all())

    def __repr__(self) -> str:
        return f"LowRank(shape={tuple(self.shape)}, rank={self.rank}, dtype={self.dtype})"


def dense(m) -> torch.Tensor:
    return m.dense() if isinstance(m, LowRank) else m


def apply(m, x: torch.Tensor) -> torch.Tensor:
    """``x Mᵀ`` for rows x [..., in] (how a hook applies a thought matrix to activations)."""
    if isinstance(m, LowRank):
        return (x @ m.right.T) @ m.left.T
    return x @ m.T


def is_finite(m) -> bool:
    return m.isfinite() if isinstance(m, LowRank) else bool(torch.isfinite(m).all())


def add(a, b):
    """``a + b``: factors side by side (rank adds up) while both are factored, else dense;
    compacted to whichever form is smaller."""
    if isinstance(a, LowRank) and isinstance(b, LowRank):
        dt = torch.promote_types(a.dtype, b.dtype)
        return compact(LowRank(torch.cat([a.left.to(dt), b.left.to(dt)], 1),
                               torch.cat([a.right.to(dt), b.right.to(dt)], 0)))
    da, db = dense(a), dense(b)
    return da + db.to(da.dtype)


def compact(m):
    """Dense once the factors hold as many numbers as the matrix itself."""
    if isinstance(m, LowRank) and m.stored() >= m.shape[0] * m.shape[1]:
        return m.dense()
    return m


def orthonormal(m):
    """The same matrix with orthonormal ``right`` rows: ``right = R Q`` by a QR in float64 (of
    ``rightᵀ``), ``left·Rᵀ`` and ``Qᵀ`` returned in float64.  The factors a solve returns hold raw
    activations, whose outlier dimensions and near-repeated rows make ``left`` large with
    cancelling columns; applied in float32 that loses digits (relative error of ``A n`` up to
    ~1e-3 at ρ = 0.03, ~1 at ρ = 0).  With orthonormal rows on the right, ``left`` holds the
    matrix's own scale and float32 keeps it to its precision.  Dense matrices pass unchanged."""
    if not isinstance(m, LowRank):
        return m
    q, r = torch.linalg.qr(m.right.double().T)  # rightᵀ = Q R, reduced: Q [in, k], R [k, r]
    return LowRank(m.left.double() @ r.T, q.T.contiguous())


def stored(m):
    """A solve's result as a patch keeps it: orthonormal right factors (``orthonormal``), float32,
    dense once that is the smaller form (``compact``)."""
    return compact(orthonormal(m).float())


def truncated(m: LowRank, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` approximation of a factored matrix without forming it: QR of each
    factor, an SVD of the r×r core.  Returns (left vectors [out, k], singular values [k],
    right vectors [k, in], captured energy), float64, k = min(rank, r)."""
    l, r = m.left.double(), m.right.double()
    ql, rl = torch.linalg.qr(l)  # l = ql rl
    qr, rr = torch.linalg.qr(r.T)  # rᵀ = qr rr
    u, s, vh = torch.linalg.svd(rl @ rr.T)  # core = rl rrᵀ
    k = min(rank, s.numel())
    total = float((s * s).sum())
    energy = min(1.0, float((s[:k] ** 2).sum()) / total) if total > 0 else 1.0
    return ql @ u[:, :k], s[:k], (qr @ vh[:k].T).T, energy
