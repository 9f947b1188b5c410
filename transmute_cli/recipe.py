"""Recipes (YAML) and templates files: load, validate, render.

A recipe is the user's whole input to one transmutation: the instruction I,
the example pairs the patch is computed from, the templates that turn a pair
into text, and the numeric knobs.  Everything is checked here, up front, so
the engine never starts a long computation on a typo, and every problem comes
back as one :class:`RecipeError` whose one-line message names the file, the
key path and the reason (``recipes/x.yaml: examples[3].output: must not be
empty``).  No other exception type leaves :func:`load_recipe`,
:func:`parse_recipe` or :func:`load_templates`.

Templates are filled with plain substitution of ``{input}`` and ``{output}``
(never ``str.format``), so braces in user data or elsewhere in a template are
just text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import yaml

from transmute_cli import defaults
from transmute_cli.errors import RecipeError

DEFAULT_TEMPLATE = "{input} -> {output}"
DEFAULT_MODEL = "gemma-3-270m"
DEFAULT_RHO = defaults.RHO
DEFAULT_BATCHES = defaults.BATCHES
DEFAULT_SEED = defaults.SEED
DEFAULT_MAX_NEW_TOKENS = 16
MAX_NEW_TOKENS_LIMIT = 512
# numpy's generators only take 32-bit seeds; refusing bigger ones here beats a crash later.
MAX_SEED = 2**32 - 1
# The name becomes a folder (runs/<name>); keep it well under file-system limits.
MAX_NAME_LENGTH = 128

INPUT_FIELD = "{input}"
OUTPUT_FIELD = "{output}"
COMPONENTS = defaults.COMPONENTS
SOLVERS = defaults.SOLVERS
PAIRS_SUFFIXES = (".tsv", ".jsonl")
FILE_KEYS = ("examples_file", "eval_file", "preserve_file")

ALLOWED_KEYS = (
    "batches",
    "components",
    "eta",
    "eval",
    "eval_file",
    "examples",
    "examples_file",
    "instruction",
    "layers",
    "max_new_tokens",
    "model",
    "name",
    "patch_templates",
    "preserve",
    "preserve_file",
    "preserve_weight",
    "rho",
    "seed",
    "solver",
    "template",
)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Anything that looks like a format field, to catch typos such as {inptu}.
_FIELD_LIKE_RE = re.compile(r"\{\w+\}")
_MARKERS_RE = re.compile(r"\{input\}|\{output\}")
_ESCAPE_RE = re.compile(r"\\(n|\\)")
# Every character str.splitlines() breaks on: none may reach a one-line message.
_LINE_BREAKS_RE = re.compile("[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_MISSING = object()
_SHOW_LIMIT = 40
_REASON_LIMIT = 120


@dataclass(frozen=True)
class Pair:
    """One (input, output) example; both are non-empty text."""

    input: str
    output: str


@dataclass(frozen=True)
class Recipe:
    """A validated recipe; ``text`` and ``sha256`` record exactly what was read."""

    name: str
    model: str
    instruction: str
    template: str
    patch_templates: tuple[str, ...]
    examples: tuple[Pair, ...]
    eval: tuple[Pair, ...]
    rho: float
    eta: float | None
    batches: int
    components: tuple[str, ...]
    layers: str | tuple[int, ...]
    solver: str
    seed: int
    max_new_tokens: int
    source: str | None
    text: str
    sha256: str
    # texts on which the patched model should act like the original one (see engine.compute_patch)
    preserve: tuple[str, ...] = ()
    preserve_weight: float = 1.0
    # the recipe with the contents of its *_file keys written in (empty when it has none):
    # what a patch and a checkpoint record, so they re-parse anywhere, without the recipe's folder
    inlined: str = ""

    @property
    def self_contained_text(self) -> str:
        """Recipe text that parses without the files it names (see ``inlined``)."""
        return self.inlined or self.text

    @property
    def step(self) -> float:
        return defaults.step(self.eta, self.batches)

    def all_templates(self) -> tuple[str, ...]:
        """The main template then the patch templates, without repeats, order kept."""
        return tuple(dict.fromkeys((self.template, *self.patch_templates)))


class _Problem(Exception):
    """A reason without a location; the caller knows where it happened.

    ``key`` names the part of a pair at fault (``input``/``output``) so YAML
    items can report ``examples[3].output`` while JSONL lines report
    ``line 7: output: ...``.
    """

    def __init__(self, reason: str, key: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.key = key


# --------------------------------------------------------------------------- messages


def _one_line(text: str) -> str:
    """Replace line breaks by spaces: the CLI prints every error on one line."""
    return _LINE_BREAKS_RE.sub(" ", text)


def _error(reason: str, *, source: str | None, field: str | None = None) -> RecipeError:
    """Build the one RecipeError shape used everywhere (all parts made one-line)."""
    return RecipeError(
        _one_line(reason),
        source=None if source is None else _one_line(source),
        field=None if field is None else _one_line(field),
    )


def _fail(source: str | None, field: str | None, reason: str) -> NoReturn:
    raise _error(reason, source=source, field=field)


def _shorten(text: str, limit: int = _REASON_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(text: str) -> str:
    """Quote user text for a message: repr escapes newlines; long text is cut."""
    if len(text) <= _SHOW_LIMIT:
        return repr(text)
    return repr(text[:_SHOW_LIMIT]) + "..."


def _int_text(value: int) -> str:
    """An int as text, without tripping Python's limit on huge int-to-str conversions."""
    try:
        text = str(value)
    except ValueError:
        return "a very large integer"
    if len(text) > 24:
        return f"an integer with {len(text.lstrip('-'))} digits"
    return text


def _describe(value: object) -> str:
    """What the user wrote, in words, for the 'got ...' part of a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return _int_text(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return f"a string ({_show(value)})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, bytes):
        return "binary data"
    return f"a {type(value).__name__}"


def _key_label(key: object) -> str:
    """A mapping key as a field name; odd keys are quoted so the message stays readable."""
    if isinstance(key, str):
        if key and key.isprintable() and len(key) <= _SHOW_LIMIT:
            return key
        return _show(key)
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        return _int_text(key)
    return _shorten(str(key), _SHOW_LIMIT)


# --------------------------------------------------------------------------- templates


def validate_template(template: object, *, source: str | None, field: str) -> str:
    """Check a template and return it.

    A template needs exactly one ``{input}`` followed later by exactly one
    ``{output}`` (so a query prefix exists).  Any other ``{word}`` is refused
    because it is almost always a typo that would silently stay in the text.
    """
    if not isinstance(template, str):
        _fail(source, field, f"must be a string, got {_describe(template)}")
    for match in _FIELD_LIKE_RE.finditer(template):
        if match.group() not in (INPUT_FIELD, OUTPUT_FIELD):
            name = _shorten(match.group(), _SHOW_LIMIT)
            _fail(source, field, f"unknown field {name} (only {{input}} and {{output}} are allowed)")
    if INPUT_FIELD not in template or OUTPUT_FIELD not in template:
        _fail(source, field, "must contain {input} and {output}")
    for marker in (INPUT_FIELD, OUTPUT_FIELD):
        count = template.count(marker)
        if count > 1:
            _fail(source, field, f"must contain {marker} exactly once, found {count}")
    if template.index(INPUT_FIELD) > template.index(OUTPUT_FIELD):
        _fail(source, field, "{input} must come before {output}")
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


def _unescape(text: str) -> str:
    r"""Turn ``\n`` into a newline and ``\\`` into a backslash, left to right."""
    return _ESCAPE_RE.sub(lambda m: "\n" if m.group(1) == "n" else "\\", text)


# --------------------------------------------------------------------------- reading files


def _read_bytes(path: Path, *, source: str | None, field: str | None, where: str = "") -> bytes:
    """Read a whole file, turning every OS-level failure into a RecipeError."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        _fail(source, field, f"file not found{where}")
    except IsADirectoryError:
        _fail(source, field, f"is a directory, not a file{where}")
    except PermissionError:
        _fail(source, field, f"permission denied{where}")
    except (OSError, ValueError) as exc:  # ValueError: embedded NUL in the path
        reason = getattr(exc, "strerror", None) or str(exc)
        _fail(source, field, f"cannot read the file ({_shorten(reason, 60)}){where}")


def _bad_byte_line(data: bytes, exc: UnicodeDecodeError) -> int:
    return data.count(b"\n", 0, exc.start) + 1


def _decode_lines(data: bytes, *, source: str) -> list[str]:
    """Decode a line-oriented file; a bad byte is reported as ``line N``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(source, f"line {_bad_byte_line(data, exc)}", "not valid UTF-8 text")
    return text.removeprefix("\ufeff").split("\n")


def load_templates(path: str | os.PathLike) -> list[str]:
    r"""Read a templates file: one template per line.

    Blank lines and lines starting with ``#`` are skipped; ``\n`` in a line is
    a newline and ``\\`` a backslash, so multi-line templates fit on one line.
    """
    source = os.fsdecode(path)
    data = _read_bytes(Path(source), source=source, field=None)
    templates = []
    for number, line in enumerate(_decode_lines(data, source=source), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        templates.append(validate_template(_unescape(text), source=source, field=f"line {number}"))
    if not templates:
        _fail(source, None, "no templates found")
    return templates


def load_texts(path: str | os.PathLike, *, source: str | None = None, field: str | None = None) -> list[str]:
    """Read a texts file (``preserve_file``): texts separated by blank lines, so a text may span
    several lines (a prompt with its demonstrations); lines starting with ``#`` are comments.
    Each text keeps its line breaks and ends with a newline."""
    name = os.fsdecode(path)
    where = f" ({name})" if source is not None else ""
    data = _read_bytes(Path(name), source=source if source is not None else name, field=field, where=where)
    texts, block = [], []
    for line in _decode_lines(data, source=name) + [""]:
        if line.strip().startswith("#"):
            continue
        if line.strip():
            block.append(line.rstrip())
        elif block:
            texts.append("\n".join(block) + "\n")
            block = []
    return texts


# --------------------------------------------------------------------------- pairs


def _pair_text(value: object, key: str) -> str:
    """One side of a pair: text, or a number written without quotes (``7``)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Problem(f"must be a string, got {_describe(value)}", key)
    if isinstance(value, str):
        text = value
    else:
        try:
            text = str(value)
        except ValueError:  # int too large to print
            raise _Problem(f"must be a string, got {_describe(value)}", key) from None
    if not text.strip():
        raise _Problem("must not be empty", key)
    return text


def _parse_pair(item: object, form: str) -> Pair:
    """A pair from ``[input, output]`` or ``{input: ..., output: ...}``; ``form`` is for messages."""
    if isinstance(item, (list, tuple)):
        if len(item) != 2:
            items = "item" if len(item) == 1 else "items"
            raise _Problem(f"must be {form}, got a list of {len(item)} {items}")
        return Pair(_pair_text(item[0], "input"), _pair_text(item[1], "output"))
    if isinstance(item, dict):
        for key in item:
            if key not in ("input", "output"):
                raise _Problem("unknown key (allowed: input, output)", _key_label(key))
        for key in ("input", "output"):
            if key not in item:
                raise _Problem("is required", key)
        return Pair(_pair_text(item["input"], "input"), _pair_text(item["output"], "output"))
    raise _Problem(f"must be {form}, got {_describe(item)}")


def _tsv_pair(line: str) -> Pair:
    fields = line.split("\t")
    if len(fields) != 2:
        got = "no tab" if len(fields) == 1 else f"{len(fields)} fields"
        raise _Problem(f"must be input<TAB>output (exactly 2 tab-separated fields), got {got}")
    return Pair(_pair_text(fields[0], "input"), _pair_text(fields[1], "output"))


def _jsonl_pair(line: str) -> Pair:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _Problem(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise _Problem("not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer too long to convert
        raise _Problem(f"not valid JSON ({_shorten(str(exc), 60)})") from None
    return _parse_pair(item, '{"input": ..., "output": ...} or [input, output]')


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
        _fail(source, source_field, f"must be a .tsv or .jsonl file{where}")
    data = _read_bytes(path, source=source, field=source_field, where=where)
    data_source = str(path)
    pairs = []
    for number, raw in enumerate(_decode_lines(data, source=data_source), start=1):
        line = raw.removesuffix("\r")
        if not line.strip() or (suffix == ".tsv" and line.lstrip().startswith("#")):
            continue
        try:
            pairs.append(_tsv_pair(line) if suffix == ".tsv" else _jsonl_pair(line))
        except _Problem as problem:
            reason = f"{problem.key}: {problem.reason}" if problem.key else problem.reason
            _fail(data_source, f"line {number}", reason)
    return pairs


# --------------------------------------------------------------------------- recipe fields


def sanitize_name(stem: str) -> str:
    """Turn a file stem into a safe run name (unsafe characters become ``-``)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", stem)
    while ".." in name:
        name = name.replace("..", ".")
    name = name.lstrip("._-")[:MAX_NAME_LENGTH]
    return name or "recipe"


def _name(value: object, default: str, source: str | None) -> str:
    if value is _MISSING:
        return sanitize_name(default)
    if not isinstance(value, str):
        _fail(source, "name", f"must be a string, got {_describe(value)}")
    if not _NAME_RE.fullmatch(value) or ".." in value:
        _fail(
            source,
            "name",
            "must start with a letter or digit and use only letters, digits, '.', '_', '-'"
            f" (no '..'), got {_show(value)}",
        )
    if len(value) > MAX_NAME_LENGTH:
        _fail(source, "name", f"must be at most {MAX_NAME_LENGTH} characters, got {len(value)}")
    return value


def _text(value: object, field: str, source: str | None) -> str:
    """A required-when-present string field that must have visible text."""
    if not isinstance(value, str):
        _fail(source, field, f"must be a string, got {_describe(value)}")
    if not value.strip():
        _fail(source, field, "must not be empty")
    return value


_SCI_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _number(value: object, field: str, rule: str, source: str | None) -> float:
    """A finite float; ints are fine, booleans are not (YAML ``yes`` is a boolean).

    PyYAML (YAML 1.1) reads ``1e-3`` — no dot — as a string; a user sweeping ρ writes exactly
    that, so scientific notation in a string is accepted as the number it plainly is.
    """
    if isinstance(value, str) and _SCI_NUMBER.match(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(source, field, f"must be a number {rule}, got {_describe(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        _fail(source, field, f"must be finite, got {_describe(value)}")
    return number


def _rho(value: object, source: str | None) -> float:
    if value is _MISSING:
        return DEFAULT_RHO
    rho = _number(value, "rho", ">= 0", source)
    if rho < 0:
        _fail(source, "rho", f"must be a number >= 0, got {_describe(value if not isinstance(value, str) else rho)}")
    return rho


def _eta(value: object, source: str | None) -> float | None:
    """``None`` (absent or null) means the default step 1/batches."""
    if value is _MISSING or value is None:
        return None
    eta = _number(value, "eta", "> 0", source)
    if eta <= 0:
        _fail(source, "eta", f"must be a number > 0, got {_describe(value if not isinstance(value, str) else eta)}")
    return eta


def _integer(value: object, field: str, low: int, high: int | None, source: str | None) -> int:
    rule = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(source, field, f"must be {rule}, got {_describe(value)}")
    if value < low or (high is not None and value > high):
        _fail(source, field, f"must be {rule}, got {_describe(value)}")
    return value


def _templates_list(value: object, source: str | None) -> tuple[str, ...]:
    if value is _MISSING:
        return ()
    if not isinstance(value, list):
        _fail(source, "patch_templates", f"must be a list of templates, got {_describe(value)}")
    return tuple(
        validate_template(item, source=source, field=f"patch_templates[{index}]")
        for index, item in enumerate(value)
    )


def _pairs(value: object, field: str, source: str | None) -> list[Pair]:
    """Inline pairs (``examples`` or ``eval``)."""
    if value is _MISSING:
        return []
    if not isinstance(value, list):
        _fail(source, field, f"must be a list of [input, output] pairs, got {_describe(value)}")
    pairs = []
    for index, item in enumerate(value):
        try:
            pairs.append(_parse_pair(item, "[input, output] or {input: ..., output: ...}"))
        except _Problem as problem:
            where = f"{field}[{index}]" + (f".{problem.key}" if problem.key else "")
            _fail(source, where, problem.reason)
    return pairs


def _relative_to_recipe(value: str, base_dir: Path | None) -> Path:
    """A ``*_file`` path: relative ones are anchored at the recipe's folder (else the cwd)."""
    path = Path(value)
    return base_dir / path if base_dir is not None and not path.is_absolute() else path


def _pairs_from_file(
    value: object, field: str, source: str | None, base_dir: Path | None
) -> list[Pair]:
    """Pairs from ``examples_file``/``eval_file``, a path relative to the recipe's folder."""
    if value is _MISSING:
        return []
    if not isinstance(value, str) or not value.strip():
        _fail(source, field, f"must be a path to a .tsv or .jsonl file, got {_describe(value)}")
    path = _relative_to_recipe(value, base_dir)
    pairs = load_pairs_file(path, source_field=field, source=source)
    if not pairs:
        _fail(source, field, f"the file has no pairs ({path})")
    return pairs


def _preserve(value: object, file_value: object, source: str | None, base_dir: Path | None) -> tuple[str, ...]:
    """``preserve`` (a list of texts) plus the texts of ``preserve_file``."""
    texts: list[str] = []
    if value is not _MISSING:
        if not isinstance(value, list):
            _fail(source, "preserve", f"must be a list of texts, got {_describe(value)}")
        texts += [_text(item, f"preserve[{i}]", source) for i, item in enumerate(value)]
    if file_value is not _MISSING:
        if not isinstance(file_value, str) or not file_value.strip():
            _fail(source, "preserve_file", f"must be a path to a text file, got {_describe(file_value)}")
        path = _relative_to_recipe(file_value, base_dir)
        found = load_texts(path, source=source, field="preserve_file")
        if not found:
            _fail(source, "preserve_file", f"the file has no texts ({path})")
        texts += found
    return tuple(texts)


def _components(value: object, source: str | None) -> tuple[str, ...]:
    """One component name or a list of them; returned in canonical order."""
    if value is _MISSING:
        return COMPONENTS
    single = isinstance(value, str)
    if not single and not isinstance(value, list):
        _fail(
            source,
            "components",
            f"must be 'vector', 'matrix' or a list of them, got {_describe(value)}",
        )
    items = [value] if single else value
    if not items:
        _fail(source, "components", "must not be empty (choose from 'vector', 'matrix')")
    seen: set[str] = set()
    for index, item in enumerate(items):
        field = "components" if single else f"components[{index}]"
        if not isinstance(item, str) or item not in COMPONENTS:
            _fail(source, field, f"must be 'vector' or 'matrix', got {_describe(item)}")
        if item in seen:
            _fail(source, field, f"duplicate {item!r}")
        seen.add(item)
    return tuple(c for c in COMPONENTS if c in seen)


def _layers(value: object, source: str | None) -> str | tuple[int, ...]:
    """``"all"`` or distinct layer indices, sorted (the engine checks the model's range)."""
    if value is _MISSING or value == "all":
        return "all"
    if not isinstance(value, list):
        _fail(source, "layers", f"must be \"all\" or a list of layer indices, got {_describe(value)}")
    if not value:
        _fail(source, "layers", 'must not be empty (use "all" for every layer)')
    seen: set[int] = set()
    for index, item in enumerate(value):
        field = f"layers[{index}]"
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            _fail(source, field, f"must be an integer >= 0, got {_describe(item)}")
        if item in seen:
            _fail(source, field, f"duplicate layer {_int_text(item)}")
        seen.add(item)
    return tuple(sorted(seen))


def _solver(value: object, source: str | None) -> str:
    if value is _MISSING:
        return defaults.SOLVER
    if not isinstance(value, str) or value not in SOLVERS:
        _fail(source, "solver", f"must be 'independent' or 'joint', got {_describe(value)}")
    return value


# --------------------------------------------------------------------------- recipe


def _yaml_reason(exc: BaseException, text: str) -> str:
    """A short one-line reason from whatever the YAML parser raised."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        parts = [part for part in (exc.context, exc.problem) if part]
        problem = _shorten(_one_line(", ".join(parts) or "syntax error"))
        if mark is None:
            return problem
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    first = _shorten(_one_line(str(exc).split("\n", 1)[0]))
    if isinstance(exc, yaml.reader.ReaderError):
        return f"line {text.count(chr(10), 0, exc.position) + 1}: {first}"
    return first or type(exc).__name__


def _load_yaml(text: str, source: str | None) -> object:
    try:
        return yaml.safe_load(text)
    # The parser can raise more than YAMLError on hostile input (ValueError for an
    # impossible date or a huge int, RecursionError for deep nesting): all mean
    # "this is not a recipe we can read".
    except Exception as exc:  # noqa: BLE001
        _fail(source, None, f"not valid YAML ({_yaml_reason(exc, text)})")


def _mapping(text: str, source: str | None) -> dict:
    data = _load_yaml(text, source)
    if data is None:
        _fail(source, None, "the recipe is empty")
    if not isinstance(data, dict):
        _fail(source, None, f"the top level must be a mapping of keys, got {_describe(data)}")
    for key in data:
        if not isinstance(key, str) or key not in ALLOWED_KEYS:
            _fail(source, _key_label(key), f"unknown key (allowed: {', '.join(ALLOWED_KEYS)})")
    return data


def _text_sha256(text: str, source: str | None) -> str:
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        _fail(source, None, "not valid Unicode text (unpaired surrogate characters)")
    return hashlib.sha256(raw).hexdigest()


def parse_recipe(
    text: str,
    *,
    source: str | None = None,
    base_dir: Path | None = None,
    default_name: str = "recipe",
) -> Recipe:
    """Validate recipe text; ``base_dir`` anchors relative ``*_file`` paths (else the cwd)."""
    sha256 = _text_sha256(text, source)
    data = _mapping(text, source)

    def get(key: str) -> object:
        return data.get(key, _MISSING)

    name = _name(get("name"), default_name, source)
    model = DEFAULT_MODEL if get("model") is _MISSING else _text(get("model"), "model", source).strip()
    if get("instruction") is _MISSING:
        _fail(source, "instruction", "is required")
    instruction = _text(get("instruction"), "instruction", source)
    template = DEFAULT_TEMPLATE if get("template") is _MISSING else validate_template(
        get("template"), source=source, field="template"
    )
    patch_templates = _templates_list(get("patch_templates"), source)
    examples = _pairs(get("examples"), "examples", source)
    examples += _pairs_from_file(get("examples_file"), "examples_file", source, base_dir)
    if not examples:
        _fail(source, "examples", "at least one example is required (examples or examples_file)")
    eval_pairs = _pairs(get("eval"), "eval", source)
    eval_pairs += _pairs_from_file(get("eval_file"), "eval_file", source, base_dir)
    rho = _rho(get("rho"), source)
    eta = _eta(get("eta"), source)
    batches = DEFAULT_BATCHES if get("batches") is _MISSING else _integer(
        get("batches"), "batches", 1, None, source
    )
    if batches > len(examples):
        _fail(source, "batches", f"must be <= the number of examples ({len(examples)}), got {batches}")
    seed = DEFAULT_SEED if get("seed") is _MISSING else _integer(get("seed"), "seed", 0, MAX_SEED, source)
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS if get("max_new_tokens") is _MISSING else _integer(
        get("max_new_tokens"), "max_new_tokens", 1, MAX_NEW_TOKENS_LIMIT, source
    )
    preserve = _preserve(get("preserve"), get("preserve_file"), source, base_dir)
    preserve_weight = 1.0
    if get("preserve_weight") is not _MISSING:
        preserve_weight = _number(get("preserve_weight"), "preserve_weight", "> 0", source)
        if preserve_weight <= 0:
            _fail(source, "preserve_weight", f"must be a number > 0, got {_describe(get('preserve_weight'))}")
    inlined = ""
    if any(get(k) is not _MISSING for k in FILE_KEYS):
        inlined = _inline_files(data, examples, eval_pairs, preserve, source)
    return Recipe(
        name=name,
        model=model,
        instruction=instruction,
        template=template,
        patch_templates=patch_templates,
        examples=tuple(examples),
        eval=tuple(eval_pairs),
        rho=rho,
        eta=eta,
        batches=batches,
        components=_components(get("components"), source),
        layers=_layers(get("layers"), source),
        solver=_solver(get("solver"), source),
        seed=seed,
        max_new_tokens=max_new_tokens,
        source=source,
        text=text,
        sha256=sha256,
        preserve=preserve,
        preserve_weight=preserve_weight,
        inlined=inlined,
    )


def _inline_files(data: dict, examples: list[Pair], eval_pairs: list[Pair], preserve: tuple[str, ...],
                  source: str | None) -> str:
    """The recipe's keys with every ``*_file`` replaced by what it held (order of keys kept)."""
    out: dict = {}
    lists = {"examples": [[p.input, p.output] for p in examples], "eval": [[p.input, p.output] for p in eval_pairs],
             "preserve": list(preserve)}
    for key, value in data.items():
        target = key.removesuffix("_file")
        if target in lists:
            if target not in out and lists[target]:
                out[target] = lists[target]
        else:
            out[key] = value
    head = f"# {source or 'recipe'} with the contents of its *_file keys written in\n"
    return head + yaml.safe_dump(out, allow_unicode=True, sort_keys=False, width=1000)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe file; the run name defaults to the file stem."""
    source = os.fsdecode(path)
    file = Path(source)
    data = _read_bytes(file, source=source, field=None)
    try:
        # Decode the bytes ourselves (no newline translation) so sha256 is the file's.
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(source, None, f"not valid UTF-8 text (bad byte on line {_bad_byte_line(data, exc)})")
    return parse_recipe(text, source=source, base_dir=file.parent, default_name=file.stem)
