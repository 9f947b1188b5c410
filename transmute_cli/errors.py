"""One exception family for the whole tool.

The engine and loaders raise these; only the CLI turns them into a one-line
message and an exit code: 2 for bad input, 3 for runtime failures (``RUNTIME_EXIT``); 1 is
kept for a gate that failed (``eval --min-accuracy``, ``GATE_EXIT``), so a CI script can tell a
regression from a crash.
"""

from __future__ import annotations


GATE_EXIT = 1  # the command ran and a check it was asked for failed
INPUT_EXIT = 2  # bad usage or bad input: nothing ran
RUNTIME_EXIT = 3  # the computation failed (or an internal error)
INTERRUPT_EXIT = 130


class TransmuteError(Exception):
    """Base class. ``str(err)`` is the one-line message shown to the user."""

    exit_code = RUNTIME_EXIT


class InputError(TransmuteError):
    """Bad input from the user: a recipe, a file, a model path, a flag. Exit code 2."""

    exit_code = INPUT_EXIT

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
