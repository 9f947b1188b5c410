"""Measuring a patch against the prompted model.

- ``generate``: greedy answers per condition (no prompt, prompt in context, patched) and their scores
- ``heldout``: held-out fidelity (KL on the prompted answers, identical answers and first tokens)
"""

from transmute_cli.evaluation.generate import Result, evaluate

__all__ = ["Result", "evaluate"]
