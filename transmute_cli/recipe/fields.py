"""What each recipe key accepts: pydantic field types whose problems carry today's one-line reasons.

Every type here either validates with pydantic's own constraints (strict types, bounds, finite
floats, list items with their index in the key path) and turns pydantic's wording into ours, or
checks what pydantic cannot say (a template's fields, a pair's two forms, distinct layers) and
raises :func:`reject`.  ``recipe`` assembles them into the schema and turns the first problem
into the one ``RecipeError``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, NoReturn, Union

from pydantic import AfterValidator, BeforeValidator, Field, PlainValidator, Strict, ValidationError, ValidationInfo
from pydantic import WrapValidator
from pydantic_core import PydanticCustomError

from transmute_cli import defaults
from transmute_cli.recipe.datafiles import Pair, check_template, load_inputs, load_pairs_file, load_texts, pair_text
from transmute_cli.recipe.datafiles import parse_pair
from transmute_cli.errors import RecipeError
from transmute_cli.messages import Problem, describe, int_text, show

# The name becomes a folder (runs/<name>); keep it well under file-system limits.
MAX_NAME_LENGTH = 128

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SCI_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def reject(reason: str, at: str = "") -> NoReturn:
    """Report a problem with the value being validated; ``at`` extends its key path (``[2]``)."""
    raise PydanticCustomError("recipe", "{reason}", {"reason": reason, "at": at})


# --------------------------------------------------------------------------- field types


def _visible(value: str) -> str:
    if not value.strip():
        reject("must not be empty")
    return value


def _name(value: str) -> str:
    if not _NAME_RE.fullmatch(value) or ".." in value:
        reject("must start with a letter or digit and use only letters, digits, '.', '_', '-'"
               f" (no '..'), got {show(value)}")
    if len(value) > MAX_NAME_LENGTH:
        reject(f"must be at most {MAX_NAME_LENGTH} characters, got {len(value)}")
    return value


def _template(value: str) -> str:
    try:
        return check_template(value)
    except Problem as problem:
        reject(problem.reason)


def _pair(item: object) -> Pair:
    if isinstance(item, Pair):
        return item
    try:
        return parse_pair(item, "[input, output] or {input: ..., output: ...}")
    except Problem as problem:
        reject(problem.reason, f".{problem.key}" if problem.key else "")


def _input(item: object) -> str | tuple[str, ...]:
    """An example input without its output: text, or a number written without quotes; or (chat
    recipes) a conversation: a list of the user's turns, each answered in turn (a list of one
    turn is that turn)."""
    if isinstance(item, (list, tuple)) and not item:
        reject("a conversation (a list of the user's turns) needs at least one turn, got an empty list")
    try:
        if isinstance(item, (list, tuple)):
            said = tuple(pair_text(t, f"[{k}]") for k, t in enumerate(item))
            return said if len(said) > 1 else said[0]
        return pair_text(item, "")
    except Problem as problem:
        reject(problem.reason, problem.key)


def turns(item: str | tuple[str, ...]) -> tuple[str, ...]:
    """An input's user turns: one for a message, several for a conversation."""
    return (item,) if isinstance(item, str) else tuple(item)


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        reject(f"must be true or false, got {describe(value)}")
    return value


def input_items(items) -> list:
    """Inputs as YAML writes them: a message as text, a conversation as the list of its turns."""
    return [x if isinstance(x, str) else list(x) for x in items]


BROAD_CHOICES = ("original", "prompted", "off")


def _broad(value: object) -> str:
    """``original`` / ``prompted`` / ``off``; YAML 1.1 reads a bare ``off`` (and ``no``) as false."""
    if value is False:
        return "off"
    if not isinstance(value, str) or value not in BROAD_CHOICES:
        reject(f"must be one of {', '.join(BROAD_CHOICES)}, got {describe(value)}")
    return value


def _answer_format(value: object) -> tuple[str, ...]:
    from transmute_cli.recipe.formats import parse_format

    try:
        return parse_format(value)
    except ValueError as error:
        reason = str(error)
        at = reason[: reason.index("]") + 1] if reason.startswith("[") and "]" in reason else ""
        reject(reason[len(at):].lstrip(": ") if at else reason, at)


def _rules(value: object) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A mapping of rule names to answer formats, each scored on its own: ((name, specs), ...)."""
    if not isinstance(value, dict):
        reject(f"must be a mapping of rule names to answer formats, got {describe(value)}")
    if not value:
        reject("must name at least one rule")
    out = []
    for name, spec in value.items():
        if not isinstance(name, str) or not name.strip():
            reject(f"a rule's name must be a non-empty string, got {describe(name)}")
        try:
            out.append((name, _answer_format(spec)))
        except PydanticCustomError as error:
            reject(error.context["reason"], f".{name}{error.context.get('at', '')}")
    return tuple(out)


def list_of(what: str) -> BeforeValidator:
    """A list (YAML) or tuple (Python) only: a string or a mapping is not a list of anything."""

    def check(value: object) -> object:
        if not isinstance(value, (list, tuple)):
            reject(f"must be a list of {what}, got {describe(value)}")
        return value

    return BeforeValidator(check)


def number(kind: type, **bound: int) -> object:
    """A finite int or float within ``bound`` (ge/gt/le); booleans are not numbers (YAML ``yes``).

    PyYAML (YAML 1.1) reads ``1e-3`` — no dot — as a string; a user sweeping ρ writes exactly
    that, so scientific notation in a string is taken as the number it plainly is.
    """
    low = f">= {bound['ge']}" if "ge" in bound else f"> {bound['gt']}"
    rule = (f"an integer from {bound['ge']} to {bound['le']}" if "le" in bound else f"an integer {low}"
            ) if kind is int else f"a number {low}"

    def check(value: object, handler) -> object:
        if kind is float and isinstance(value, str) and _SCI_NUMBER.match(value.strip()):
            value = float(value)
        try:
            return handler(value)
        except ValidationError as exc:
            finite = exc.errors()[0]["type"] == "finite_number" or _too_big(value)
            reject(f"must be finite, got {describe(value)}" if finite else f"must be {rule}, got {describe(value)}")

    extra = {"allow_inf_nan": False} if kind is float else {}
    return Annotated[kind, Strict(), Field(**bound, **extra), WrapValidator(check)]


def _too_big(value: object) -> bool:
    """An int no float can hold (10**400): a number, but not a finite one."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    try:
        float(value)
    except OverflowError:
        return True
    return False


def _components(value: object) -> tuple[str, ...]:
    """One component name or a list of them; returned in canonical order."""
    single = isinstance(value, str)
    if not single and not isinstance(value, (list, tuple)):
        reject(f"must be 'vector', 'matrix' or a list of them, got {describe(value)}")
    items = [value] if single else value
    if not items:
        reject("must not be empty (choose from 'vector', 'matrix')")
    seen: set[str] = set()
    for index, item in enumerate(items):
        at = "" if single else f"[{index}]"
        if not isinstance(item, str) or item not in defaults.COMPONENTS:
            reject(f"must be 'vector' or 'matrix', got {describe(item)}", at)
        if item in seen:
            reject(f"duplicate {item!r}", at)
        seen.add(item)
    return tuple(c for c in defaults.COMPONENTS if c in seen)


def _layers(value: object) -> str | tuple[int, ...]:
    """``"all"`` or distinct layer indices, sorted (the engine checks the model's range)."""
    if isinstance(value, str) and value == "all":
        return "all"
    if not isinstance(value, (list, tuple)):
        reject(f"must be \"all\" or a list of layer indices, got {describe(value)}")
    if not value:
        reject('must not be empty (use "all" for every layer)')
    seen: set[int] = set()
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            reject(f"must be an integer >= 0, got {describe(item)}", f"[{index}]")
        if item in seen:
            reject(f"duplicate layer {int_text(item)}", f"[{index}]")
        seen.add(item)
    return tuple(sorted(seen))


# --------------------------------------------------------------------------- the *_file keys


def data_file(kind: str) -> PlainValidator:
    """A ``*_file`` key: read the file (relative paths from the recipe's folder) into pairs, texts
    or inputs (one per line)."""
    what = "a .tsv or .jsonl file" if kind == "pairs" else "a text file"
    loaders = {"texts": load_texts, "inputs": load_inputs}

    def load(value: object, info: ValidationInfo) -> tuple:
        field = info.field_name
        if not isinstance(value, str) or not value.strip():
            reject(f"must be a path to {what}, got {describe(value)}")
        path, base_dir = Path(value), (info.context or {}).get("base_dir")
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        source = (info.context or {}).get("source")
        try:
            found = (load_pairs_file(path, source_field=field, source=source) if kind == "pairs"
                     else loaders[kind](path, source=source, field=field))
        except RecipeError as error:  # located in the data file (or the recipe); kept as it is
            raise PydanticCustomError("located", "{error}", {"error": error}) from None
        if not found:
            reject(f"the file has no {kind} ({path})")
        return tuple(found)

    return PlainValidator(load)


# --------------------------------------------------------------------------- the types, by key

Text = Annotated[str, Strict(), AfterValidator(_visible)]
Name = Annotated[str, Strict(), AfterValidator(_name)]
Model = Annotated[Text, AfterValidator(str.strip)]
Template = Annotated[str, Strict(), AfterValidator(_template)]
Templates = Annotated[tuple[Template, ...], list_of("templates")]
Pairs = Annotated[tuple[Annotated[Pair, PlainValidator(_pair)], ...], list_of("[input, output] pairs")]
Texts = Annotated[tuple[Text, ...], list_of("texts")]
PairsFile = Annotated[tuple[Pair, ...], data_file("pairs")]
TextsFile = Annotated[tuple[str, ...], data_file("texts")]
Inputs = Annotated[tuple[Annotated[Union[str, tuple[str, ...]], PlainValidator(_input)], ...], list_of("inputs")]
InputsFile = Annotated[tuple[str, ...], data_file("inputs")]
NonNegative = number(float, ge=0)
Positive = number(float, gt=0)
Components = Annotated[tuple[str, ...], PlainValidator(_components)]
Flag = Annotated[bool, PlainValidator(_flag)]
Broad = Annotated[str, PlainValidator(_broad)]
AnswerFormat = Annotated[tuple[str, ...], PlainValidator(_answer_format)]
Rules = Annotated[tuple[tuple[str, tuple[str, ...]], ...], PlainValidator(_rules)]
Layers = Annotated[Union[str, tuple[int, ...]], PlainValidator(_layers)]
