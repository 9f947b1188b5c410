"""Measuring a patch against the prompted model.

- ``generate``: greedy answers per condition (no prompt, prompt in context, patched) and their scores
- ``heldout``: held-out fidelity (KL on the prompted answers, identical answers and first tokens)
"""

import importlib

# the names most callers use, loaded on first use (an eager import here would run the whole
# package whenever one of its modules is imported, and the layers below import single modules)
_NAMES = {'Result': 'generate', 'evaluate': 'generate'}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
