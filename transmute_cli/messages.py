"""One-line problem messages shared by every input loader: the one ``RecipeError`` shape
(file, key path, reason), and how user values are quoted in a reason."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NoReturn

from transmute_cli.errors import RecipeError

# Every character str.splitlines() breaks on: none may reach a one-line message.
_LINE_BREAKS_RE = re.compile("[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
SHOW_LIMIT = 40
REASON_LIMIT = 120


class Problem(Exception):
    """A reason without a location; the caller knows where it happened.

    ``key`` names the part of a pair at fault (``input``/``output``) so YAML
    items can report ``examples[3].output`` while JSONL lines report
    ``line 7: output: ...``.
    """

    def __init__(self, reason: str, key: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.key = key


def one_line(text: str) -> str:
    """Replace line breaks by spaces: the CLI prints every error on one line."""
    return _LINE_BREAKS_RE.sub(" ", text)


def fail(source: str | None, field: str | None, reason: str) -> NoReturn:
    """Raise the one RecipeError shape used everywhere (all parts made one-line)."""
    raise RecipeError(
        one_line(reason),
        source=None if source is None else one_line(source),
        field=None if field is None else one_line(field),
    )


def shorten(text: str, limit: int = REASON_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show(text: str) -> str:
    """Quote user text for a message: repr escapes newlines; long text is cut."""
    if len(text) <= SHOW_LIMIT:
        return repr(text)
    return repr(text[:SHOW_LIMIT]) + "..."


def int_text(value: int) -> str:
    """An int as text, without tripping Python's limit on huge int-to-str conversions."""
    try:
        text = str(value)
    except ValueError:
        return "a very large integer"
    if len(text) > 24:
        return f"an integer with {len(text.lstrip('-'))} digits"
    return text


def describe(value: object) -> str:
    """What the user wrote, in words, for the 'got ...' part of a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return int_text(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return f"a string ({show(value)})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, bytes):
        return "binary data"
    return f"a {type(value).__name__}"


def not_text(value: object) -> str:
    """The reason for a value that must be a string; YAML's booleans get the way out (``NO`` in a
    country-code task, ``yes`` as an answer)."""
    reason = f"must be a string, got {describe(value)}"
    if isinstance(value, bool):
        reason += ": YAML reads unquoted yes, no, on, off, true and false as booleans; put the text in quotes"
    return reason


def key_label(key: object) -> str:
    """A mapping key as a field name; odd keys are quoted so the message stays readable."""
    if isinstance(key, str):
        if key and key.isprintable() and len(key) <= SHOW_LIMIT:
            return key
        return show(key)
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        return int_text(key)
    return shorten(str(key), SHOW_LIMIT)


# progress lines for people: the pipeline and the model loader report through one of these
Log = Callable[[str], None]


def quiet(_msg: str) -> None:
    """A Log that says nothing (the default when no one listens)."""
