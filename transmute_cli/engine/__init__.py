"""The engine: the layer-wise patching loop and its maths, free of any CLI or printing.

- ``loop``: ``compute_patch``, the loop itself (contextual and non-contextual passes, per-layer solve)
- ``thought``: ``ThoughtPatch``, what it computes
- ``fidelity``: in-sample fidelity of a patch on its examples, and the locality figures on a text
- ``config``: ``EngineConfig`` (every knob), ``PatchResult``, progress events
- ``stats``: the streaming sums a layer's solve reads (token rows, then d×d sums)
- ``solve``: the ridge solves, fit residuals, the null-space projector
- ``lowrank``: exact low-rank matrices (two thin factors) and the algebra on either form
- ``hooks``: capturing activations, applying a patch in process, the instruction's cached keys and values
- ``moments``: the broad texts' per-layer second moments, computed once per model and cached
- ``exact``: the exact token patch (ground truth for the tests)
- ``distributed``: sharding over a torchrun process group
"""

from transmute_cli.engine.config import EngineConfig, PatchResult
from transmute_cli.engine.loop import compute_patch

__all__ = ["EngineConfig", "PatchResult", "compute_patch"]
