"""One exception family for the whole tool.

The engine and loaders raise these; only the CLI turns them into a one-line
message and an exit code (2 for bad input, 1 for runtime failures).
"""

from __future__ import annotations


class TransmuteError(Exception):
    """Base class. ``str(err)`` is the one-line message shown to the user."""

    exit_code = 1


class InputError(TransmuteError):
    """Bad input from the user: a recipe, a file, a model path, a flag. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        self.reason = message
        parts = [p for p in (source, field) if p]
        super().__init__(": ".join(parts + [message]))


class RecipeError(InputError):
    """A recipe or templates file is invalid: names the file, the key path and the reason."""


class ModelError(InputError):
    """A model cannot be found, read or is not a supported architecture."""


class PatchError(InputError):
    """A patch file is corrupt, non-finite or made for another model."""


class EngineError(TransmuteError):
    """The computation itself failed (non-finite statistics, singular solve, ...)."""
