"""The engine's settings (EngineConfig), what it returns (PatchResult) and its progress events."""

from __future__ import annotations


import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from transmute_cli import defaults
from transmute_cli.errors import InputError
from transmute_cli.engine.fidelity import Fidelity
from transmute_cli.engine.thought import ThoughtPatch


@dataclass(frozen=True)
class EngineConfig:
    rho: float = defaults.RHO
    eta: float | None = None  # None: 1/batches (the paper's choice)
    batches: int = defaults.BATCHES
    components: tuple[str, ...] = defaults.COMPONENTS
    layers: str | Sequence[int] = "all"
    solver: str = defaults.SOLVER
    seed: int = defaults.SEED  # order in which examples are dealt into batches
    micro_batch: int = 16  # examples run through a layer at once (memory, not maths)
    stats_dtype: torch.dtype = torch.float64
    # "naive": rerun the whole model (lm_head included) for every layer — the benchmark baseline
    # and a test oracle for the incremental propagation
    propagation: str = "incremental"
    fidelity: bool = True  # end-to-end KL / top-1 on the patch examples
    # ... on the first this many texts only (None: all): the recipe's own template, not every
    # augmented copy of it (each costs three forwards with the full-vocabulary head)
    fidelity_texts: int | None = None
    # per-layer fit residual of the thought matrix: None = only where it is cheap (token rows
    # kept, T·d·f per layer); True = also from the d×d sums (a d²·f + d³ product per layer and
    # batch, more than the solve itself); False = never
    diagnostics: bool | None = None
    # shard examples over an initialised torch.distributed group: each rank accumulates its
    # share and the sums are all_reduce'd before every solve (they are sums, so this is exact)
    distributed: bool = False
    # weight of each token of the preservation texts relative to a token of an example
    preserve_weight: float = 1.0
    # weight of each token of the broad texts: patched under the instruction like the examples
    # (``broad``), or given by their cached second moments with the original model as the target
    # (``moments``)
    broad_weight: float = defaults.BROAD_WEIGHT
    # the contextual pass attends to the instruction's keys and values, computed once (False:
    # rerun the instruction's tokens with every micro-batch at every layer — same maths, the
    # benchmark's baseline)
    prefix_cache: bool = True
    # AlphaEdit's constraint (0: off): the thought and down matrices act only outside the
    # leading directions of the broad texts' inputs that hold this share of their energy
    # (``solve.null_projector`` on the cached moments); the moments still regularise the rest
    null_space: float = 0.0

    @property
    def step(self) -> float:
        return defaults.step(self.eta, self.batches)

    def validate(self) -> None:
        if not (self.rho >= 0 and math.isfinite(self.rho)):
            raise InputError(f"must be a number >= 0, got {self.rho}", field="rho")
        if not (self.step > 0 and math.isfinite(self.step)):
            raise InputError(f"must be a number > 0, got {self.eta}", field="eta")
        if self.batches < 1:
            raise InputError(f"must be >= 1, got {self.batches}", field="batches")
        if not self.components or any(c not in defaults.COMPONENTS for c in self.components):
            raise InputError(f"must be a non-empty subset of {list(defaults.COMPONENTS)}", field="components")
        if self.solver not in defaults.SOLVERS:
            raise InputError(f"must be one of {list(defaults.SOLVERS)}, got {self.solver!r}", field="solver")
        if not (self.preserve_weight > 0 and math.isfinite(self.preserve_weight)):
            raise InputError(f"must be a number > 0, got {self.preserve_weight}", field="preserve_weight")
        if not (self.broad_weight > 0 and math.isfinite(self.broad_weight)):
            raise InputError(f"must be a number > 0, got {self.broad_weight}", field="broad_weight")
        if not 0 <= self.null_space < 1:
            raise InputError(f"must be in [0, 1), got {self.null_space}", field="null_space")
        if self.propagation not in ("incremental", "naive"):
            raise InputError(f"unknown propagation {self.propagation!r}", field="propagation")


@dataclass
class PatchResult:
    patch: ThoughtPatch
    fidelity: Fidelity
    timings: dict[str, float]


@dataclass(frozen=True)
class Progress:
    """What the callback receives: ``stage`` is 'prepare', 'layer' or 'fidelity'."""

    stage: str
    batch: int
    batches: int
    layer: int
    layers: int


ProgressFn = Callable[[Progress], None]
