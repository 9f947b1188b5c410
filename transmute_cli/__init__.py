"""transmute: turn a prompt into weights (thought vectors and thought matrices)."""

__version__ = "0.1.0"
