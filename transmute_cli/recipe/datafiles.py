"""Templates and the data files a recipe names: fill a template (plain substitution of
``{input}`` and ``{output}``, never ``str.format``, so braces in user data are just text), read a
templates file, a texts file (preservation texts) and a pairs file (``.tsv`` / ``.jsonl``).
Every problem is one ``RecipeError`` naming the file, the line or key, and the reason."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from transmute_cli.messages import SHOW_LIMIT, Problem, describe, fail, key_label, not_text, shorten

INPUT_FIELD = "{input}"
OUTPUT_FIELD = "{output}"
PAIRS_SUFFIXES = (".tsv", ".jsonl")
# Anything that looks like a format field, to catch typos such as {inptu}.
_FIELD_LIKE_RE = re.compile(r"\{\w+\}")
_MARKERS_RE = re.compile(r"\{input\}|\{output\}")
_ESCAPE_RE = re.compile(r"\\(n|\\)")


@dataclass(frozen=True)
class Pair:
    """One (input, output) example; both are non-empty text.  ``history`` (chat recipes only):
    the earlier turns of the conversation, user and assistant alternating, before ``input``.
    ``open``: the output is the start of a longer answer (a label cut at the cap): it is fitted
    up to its last token, with no end of answer after it (no newline, no end-of-turn)."""

    input: str
    output: str
    history: tuple[str, ...] = ()
    open: bool = False

    def messages(self, answer: bool = True) -> list[dict[str, str]]:
        """The conversation as chat messages (``answer=False``: up to the last user turn)."""
        roles = ("user", "assistant")
        turns = [*self.history, self.input] + ([self.output] if answer else [])
        return [{"role": roles[k % 2], "content": t} for k, t in enumerate(turns)]


def shipped_path(name: str) -> str:
    """How a file shipped in ``transmute_cli/data`` is named in reports."""
    return f"transmute_cli/data/{name}"


@lru_cache(maxsize=None)
def shipped_texts(name: str) -> tuple[str, ...]:
    """A texts file shipped in ``transmute_cli/data`` (``load_texts`` format), read once."""
    return tuple(load_texts(Path(__file__).parent.parent / "data" / name))


# --------------------------------------------------------------------------- templates


def validate_template(template: object, *, source: str | None, field: str) -> str:
    """Check a template and return it; a problem is a RecipeError at ``source``/``field``."""
    if not isinstance(template, str):
        fail(source, field, not_text(template))
    try:
        return check_template(template)
    except Problem as problem:
        fail(source, field, problem.reason)


def check_template(template: str) -> str:
    """Return the template, or raise :class:`Problem` saying what is wrong with it.

    A template needs exactly one ``{input}`` followed later by exactly one
    ``{output}`` (so a query prefix exists).  Any other ``{word}`` is refused
    because it is almost always a typo that would silently stay in the text.
    """
    for match in _FIELD_LIKE_RE.finditer(template):
        if match.group() not in (INPUT_FIELD, OUTPUT_FIELD):
            name = shorten(match.group(), SHOW_LIMIT)
            raise Problem(f"unknown field {name} (only {{input}} and {{output}} are allowed)")
    if INPUT_FIELD not in template or OUTPUT_FIELD not in template:
        raise Problem("must contain {input} and {output}")
    for marker in (INPUT_FIELD, OUTPUT_FIELD):
        count = template.count(marker)
        if count > 1:
            raise Problem(f"must contain {marker} exactly once, found {count}")
    if template.index(INPUT_FIELD) > template.index(OUTPUT_FIELD):
        raise Problem("{input} must come before {output}")
    return template


def query_prefix(template: str) -> str:
    """The template text before ``{output}``, trailing spaces/tabs removed.

    The space before the answer belongs to the answer's first token in most
    tokenizers, so the query ends at the last visible character (newlines are
    kept: they are structure, not padding).
    """
    head, found, _ = template.partition(OUTPUT_FIELD)
    if not found:
        raise ValueError("template has no {output} field")
    return head.rstrip(" \t")


def _substitute(text: str, input: str, output: str) -> str:
    """Fill both markers in one pass, so markers inside user data stay untouched."""
    return _MARKERS_RE.sub(lambda m: input if m.group() == INPUT_FIELD else output, text)


def render(template: str, input: str, output: str | None = None) -> str:
    """Fill a template; with ``output=None`` return the query (text up to the answer)."""
    if output is None:
        return _substitute(query_prefix(template), input, "")
    return _substitute(template, input, output)


def rerender(text: str, source: str, target: str) -> str | None:
    """``text`` (an instruction) with each demonstration written in template ``source`` (one
    filled template, each field on one line) written in ``target`` instead; other lines kept.
    ``None`` when no demonstration is found: there is nothing to rewrite."""
    head, _, rest = source.partition(INPUT_FIELD)
    middle, _, end = rest.partition(OUTPUT_FIELD)
    pattern = re.compile(f"^{re.escape(head)}(?P<input>[^\n]+?){re.escape(middle)}(?P<output>[^\n]+?)"
                         f"{re.escape(end)}$", re.M)
    found = 0

    def fill(match: re.Match) -> str:
        nonlocal found
        found += 1
        return render(target, match["input"], match["output"])

    rewritten = pattern.sub(fill, text)
    return rewritten if found else None


def _unescape(text: str) -> str:
    r"""Turn ``\n`` into a newline and ``\\`` into a backslash, left to right."""
    return _ESCAPE_RE.sub(lambda m: "\n" if m.group(1) == "n" else "\\", text)


# --------------------------------------------------------------------------- reading files


def read_bytes(path: Path, *, source: str | None, field: str | None, where: str = "") -> bytes:
    """Read a whole file, turning every OS-level failure into a RecipeError."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        fail(source, field, f"file not found{where}")
    except IsADirectoryError:
        fail(source, field, f"is a directory, not a file{where}")
    except PermissionError:
        fail(source, field, f"permission denied{where}")
    except (OSError, ValueError) as exc:  # ValueError: embedded NUL in the path
        reason = getattr(exc, "strerror", None) or str(exc)
        fail(source, field, f"cannot read the file ({shorten(reason, 60)}){where}")


def bad_byte_line(data: bytes, exc: UnicodeDecodeError) -> int:
    return data.count(b"\n", 0, exc.start) + 1


def decode_lines(data: bytes, *, source: str) -> list[str]:
    """Decode a line-oriented file; a bad byte is reported as ``line N``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        fail(source, f"line {bad_byte_line(data, exc)}", "not valid UTF-8 text")
    return text.removeprefix("\ufeff").split("\n")


def load_templates(path: str | os.PathLike) -> list[str]:
    r"""Read a templates file: one template per line.

    Blank lines and lines starting with ``#`` are skipped; ``\n`` in a line is
    a newline and ``\\`` a backslash, so multi-line templates fit on one line.
    """
    source = os.fsdecode(path)
    data = read_bytes(Path(source), source=source, field=None)
    templates = []
    for number, line in enumerate(decode_lines(data, source=source), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        templates.append(validate_template(_unescape(text), source=source, field=f"line {number}"))
    if not templates:
        fail(source, None, "no templates found")
    return templates


def load_texts(path: str | os.PathLike, *, source: str | None = None, field: str | None = None) -> list[str]:
    """Read a texts file (``preserve_file``): texts separated by blank lines, so a text may span
    several lines (a prompt with its demonstrations); lines starting with ``#`` are comments.
    Each text keeps its line breaks and ends with a newline."""
    name = os.fsdecode(path)
    where = f" ({name})" if source is not None else ""
    data = read_bytes(Path(name), source=source if source is not None else name, field=field, where=where)
    texts, block = [], []
    for line in decode_lines(data, source=name) + [""]:
        if line.strip().startswith("#"):
            continue
        if line.strip():
            block.append(line.rstrip())
        elif block:
            texts.append("\n".join(block) + "\n")
            block = []
    return texts


def load_inputs(path: str | os.PathLike, *, source: str | None = None, field: str | None = None) -> list[str]:
    """Read an inputs file (``inputs_file``): one example input per line; blank lines and lines
    starting with ``#`` are skipped.  An input keeps its inner spaces, not the line break."""
    name = os.fsdecode(path)
    where = f" ({name})" if source is not None else ""
    data = read_bytes(Path(name), source=source if source is not None else name, field=field, where=where)
    return [line.removesuffix("\r") for line in decode_lines(data, source=name)
            if line.strip() and not line.lstrip().startswith("#")]


# --------------------------------------------------------------------------- pairs


def pair_text(value: object, key: str) -> str:
    """One side of a pair: text, or a number written without quotes (``7``)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise Problem(not_text(value), key)
    if isinstance(value, str):
        text = value
    else:
        try:
            text = str(value)
        except ValueError:  # int too large to print
            raise Problem(not_text(value), key) from None
    if not text.strip():
        raise Problem("must not be empty", key)
    return text


def parse_pair(item: object, form: str) -> Pair:
    """A pair from ``[input, output]`` or ``{input: ..., output: ...}``; ``form`` is for messages."""
    if isinstance(item, (list, tuple)):
        if len(item) != 2:
            items = "item" if len(item) == 1 else "items"
            raise Problem(f"must be {form}, got a list of {len(item)} {items}")
        return Pair(pair_text(item[0], "input"), pair_text(item[1], "output"))
    if isinstance(item, dict):
        for key in item:
            if key not in ("input", "output", "history", "open"):
                raise Problem("unknown key (allowed: input, output, history, open)", key_label(key))
        for key in ("input", "output"):
            if key not in item:
                raise Problem("is required", key)
        if not isinstance(item.get("open", False), bool):
            raise Problem(f"must be true or false, got {describe(item['open'])}", "open")
        return Pair(pair_text(item["input"], "input"), pair_text(item["output"], "output"),
                    _history(item.get("history", [])), item.get("open", False))
    raise Problem(f"must be {form}, got {describe(item)}")


def _history(value: object) -> tuple[str, ...]:
    """Earlier turns of a chat example: a list of texts, user and assistant alternating."""
    if not isinstance(value, (list, tuple)):
        raise Problem(f"must be a list of earlier turns (user, assistant, ...), got {describe(value)}", "history")
    if len(value) % 2:
        raise Problem(f"must hold user and assistant turns in pairs, got {len(value)} turns", "history")
    return tuple(pair_text(t, f"history[{k}]") for k, t in enumerate(value))


def _tsv_pair(line: str) -> Pair:
    fields = line.split("\t")
    if len(fields) != 2:
        got = "no tab" if len(fields) == 1 else f"{len(fields)} fields"
        raise Problem(f"must be input<TAB>output (exactly 2 tab-separated fields), got {got}")
    return Pair(pair_text(fields[0], "input"), pair_text(fields[1], "output"))


def _jsonl_pair(line: str) -> Pair:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise Problem(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise Problem("not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer too long to convert
        raise Problem(f"not valid JSON ({shorten(str(exc), 60)})") from None
    return parse_pair(item, '{"input": ..., "output": ...} or [input, output]')


def load_pairs_file(
    path: Path, *, source_field: str, source: str | None = None
) -> list[Pair]:
    """Read pairs from a ``.tsv`` or ``.jsonl`` file.

    File-level problems (extension, missing, unreadable) are reported against
    the recipe (``source``) at ``source_field``; problems inside the file are
    reported against the data file itself at ``line N``, where the user must
    look to fix them.
    """
    path = Path(path)
    where = f" ({path})"
    suffix = path.suffix.lower()
    if suffix not in PAIRS_SUFFIXES:
        fail(source, source_field, f"must be a .tsv or .jsonl file{where}")
    data = read_bytes(path, source=source, field=source_field, where=where)
    data_source = str(path)
    pairs = []
    for number, raw in enumerate(decode_lines(data, source=data_source), start=1):
        line = raw.removesuffix("\r")
        if not line.strip() or (suffix == ".tsv" and line.lstrip().startswith("#")):
            continue
        try:
            pairs.append(_tsv_pair(line) if suffix == ".tsv" else _jsonl_pair(line))
        except Problem as problem:
            reason = f"{problem.key}: {problem.reason}" if problem.key else problem.reason
            fail(data_source, f"line {number}", reason)
    return pairs
