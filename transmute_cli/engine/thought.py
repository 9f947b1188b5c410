"""The thought patch the engine computes: per layer, the thought matrix A (input space), the
thought vector δ and, with the joint solver, the down-projection matrix D.  Its file format, the
compatibility check and patch arithmetic: ``artifacts/patch.py``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from transmute_cli.engine.lowrank import is_finite
from transmute_cli.errors import EngineError


@dataclass
class ThoughtPatch:
    """Per-layer thought matrices and vectors.

    ``matrices[l]`` is the *input-space* form ``A`` [d, d]: the thought matrix of every MLP input
    projection W of layer l is ``Δ(W) = W A`` (gate and up share it; it is how the ridge solution
    factorises).  ``vectors[l]`` [d] is added where the MLP output joins the residual stream.
    Matrices are dense tensors or exact ``LowRank`` factors (``lowrank.dense`` gives either dense).
    """

    n_layers: int
    d_model: int
    matrices: dict[int, torch.Tensor] = field(default_factory=dict)
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    # joint solver only: down-projection thought matrix D [d, f], W_down -> W_down + D
    downs: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.matrices) | set(self.vectors) | set(self.downs))

    def scaled(self, s: float) -> "ThoughtPatch":
        return ThoughtPatch(
            self.n_layers,
            self.d_model,
            {l: s * a for l, a in self.matrices.items()},
            {l: s * v for l, v in self.vectors.items()},
            dict(self.metadata),
            {l: s * d for l, d in self.downs.items()},
        )

    def check_finite(self) -> None:
        for kind, tensors in (("matrix", self.matrices), ("vector", self.vectors), ("down matrix", self.downs)):
            for l, t in tensors.items():
                if not is_finite(t):
                    raise EngineError(f"the thought {kind} of layer {l} has NaN or Inf values")
