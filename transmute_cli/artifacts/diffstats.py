"""What ``transmute diff`` reports and the maths behind it: per tensor the norms, ``|A − B|``,
cosine, relative change and the entropy effective rank (Roy & Vetterli 2007); per layer the
combined change."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from transmute_cli.engine.solve import spectrum

MAX_SVD_ELEMENTS = 20_000_000  # bigger matrices (embeddings, huge MLPs) get no effective rank
TOP_LAYERS = 5


@dataclass
class TensorDiff:
    layer: int
    tensor: str  # patches: "matrix" | "vector" | "down"; checkpoints: name relative to the layer
    norm_a: float
    norm_b: float
    diff_norm: float  # |A − B|_F
    cosine: float | None  # <A,B>/(|A||B|); None if either is zero
    relative_change: float | None  # |A − B|/|A|; None if |A| == 0
    effective_rank: float | None  # of B − A (2-D only; None if B == A or too big)
    effective_rank_a: float | None = None  # patches only: of A's tensor
    effective_rank_b: float | None = None  # patches only: of B's tensor


@dataclass
class DiffReport:
    kind: str  # "patch" | "checkpoint"
    a: str
    b: str
    tensors: list[TensorDiff]
    layer_change: list[dict]  # {"layer", "diff_norm", "norm_a", "relative_change", "tensors"}
    top_layers: list[int]  # changed layers by diff_norm, largest first (at most 5)
    notes: list[str] = field(default_factory=list)
    overlap: dict | None = None  # patches only, see diff_patches

    def to_json(self) -> dict:
        return clean(
            {
                "kind": self.kind,
                "a": self.a,
                "b": self.b,
                "tensors": [asdict(t) for t in self.tensors],
                "layer_change": self.layer_change,
                "top_layers": self.top_layers,
                "notes": self.notes,
                "overlap": self.overlap,
            }
        )


def clean(x):
    """Plain JSON: Python floats/ints/strings, NaN/Inf as None."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, (float, torch.Tensor)):
        v = float(x)
        return v if math.isfinite(v) else None
    return str(x)


# --------------------------------------------------------------------------- the maths


def _kept(s: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Singular values above the usual numerical-rank cutoff (s_max · max(shape) · eps of float32)."""
    if s.numel() == 0 or s[0] <= 0:
        return s[:0]
    return s[s > s[0] * max(shape) * torch.finfo(torch.float32).eps]


def effective_rank(m: torch.Tensor, s: torch.Tensor | None = None) -> float | None:
    """exp of the entropy of the normalised singular values (Roy & Vetterli 2007); None for
    1-D, zero or too large matrices.  Singular values below the numerical-rank cutoff are float
    rounding noise and are dropped.  ``s``: the singular values, when already known."""
    if m.dim() != 2 or m.numel() == 0 or m.numel() > MAX_SVD_ELEMENTS:
        return None
    if not torch.isfinite(m).all():
        return None
    s = _kept(spectrum(m)[0] if s is None else s, m.shape)
    if s.numel() == 0:
        return None
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(m: torch.Tensor, s: torch.Tensor) -> int:
    return int(_kept(s, m.shape).numel())


def cosine(dot: float, na: float, nb: float) -> float | None:
    """``dot / (na nb)`` clipped to [-1, 1] against rounding; None when either norm is 0."""
    return max(-1.0, min(1.0, dot / (na * nb))) if na > 0 and nb > 0 else None


def tensor_stats(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor
                 ) -> tuple[float, float, float, float | None, float | None, float]:
    """norm_a, norm_b, |d|, cosine, relative change, <a, b> (accumulated in float64)."""
    na = float(torch.linalg.vector_norm(a, dtype=torch.float64))
    nb = float(torch.linalg.vector_norm(b, dtype=torch.float64))
    nd = float(torch.linalg.vector_norm(d, dtype=torch.float64))
    dot = float((a * b).sum(dtype=torch.float64)) if na > 0 and nb > 0 else 0.0
    rel = nd / na if na > 0 else None
    return na, nb, nd, cosine(dot, na, nb), rel, dot


def layer_summary(per_layer: dict[int, dict]) -> tuple[list[dict], list[int]]:
    rows = []
    for l in sorted(per_layer):
        acc = per_layer[l]
        dn, an = math.sqrt(acc["d2"]), math.sqrt(acc["a2"])
        rows.append(
            {"layer": l, "diff_norm": dn, "norm_a": an, "relative_change": dn / an if an > 0 else None, "tensors": acc["n"]}
        )
    changed = [r for r in rows if r["diff_norm"] > 0]
    top = [r["layer"] for r in sorted(changed, key=lambda r: (-r["diff_norm"], r["layer"]))[:TOP_LAYERS]]
    return rows, top


def only_note(names: list[str], side: str, what: str = "tensors") -> str:
    n = len(names)
    word = what if n != 1 else what.rstrip("s")
    return f"{n} {word} only in {side}, e.g. {sorted(names)[0]}"
