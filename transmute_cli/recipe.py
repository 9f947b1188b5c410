"""Recipes (YAML): load and validate.

A recipe is the user's whole input to one transmutation: the instruction I,
the example pairs the patch is computed from, the templates that turn a pair
into text, and the numeric knobs.  Everything is checked here, up front, so
the engine never starts a long computation on a typo, and every problem comes
back as one :class:`RecipeError` whose one-line message names the file, the
key path and the reason (``recipes/x.yaml: examples[3].output: must not be
empty``).  No other exception type leaves :func:`load_recipe` or
:func:`parse_recipe`.  Templates and the files a recipe names are read by
``datafiles``; the message shapes live in ``messages``.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from transmute_cli import defaults
from transmute_cli.datafiles import Pair, bad_byte_line, load_pairs_file, load_texts, parse_pair, read_bytes, validate_template
from transmute_cli.messages import Problem, describe, fail, int_text, key_label, one_line, show, shorten

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
_MISSING = object()


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
        fail(source, "name", f"must be a string, got {describe(value)}")
    if not _NAME_RE.fullmatch(value) or ".." in value:
        fail(
            source,
            "name",
            "must start with a letter or digit and use only letters, digits, '.', '_', '-'"
            f" (no '..'), got {show(value)}",
        )
    if len(value) > MAX_NAME_LENGTH:
        fail(source, "name", f"must be at most {MAX_NAME_LENGTH} characters, got {len(value)}")
    return value


def _text(value: object, field: str, source: str | None) -> str:
    """A required-when-present string field that must have visible text."""
    if not isinstance(value, str):
        fail(source, field, f"must be a string, got {describe(value)}")
    if not value.strip():
        fail(source, field, "must not be empty")
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
        fail(source, field, f"must be a number {rule}, got {describe(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        fail(source, field, f"must be finite, got {describe(value)}")
    return number


def _rho(value: object, source: str | None) -> float:
    if value is _MISSING:
        return DEFAULT_RHO
    rho = _number(value, "rho", ">= 0", source)
    if rho < 0:
        fail(source, "rho", f"must be a number >= 0, got {describe(value if not isinstance(value, str) else rho)}")
    return rho


def _eta(value: object, source: str | None) -> float | None:
    """``None`` (absent or null) means the default step 1/batches."""
    if value is _MISSING or value is None:
        return None
    eta = _number(value, "eta", "> 0", source)
    if eta <= 0:
        fail(source, "eta", f"must be a number > 0, got {describe(value if not isinstance(value, str) else eta)}")
    return eta


def _integer(value: object, field: str, low: int, high: int | None, source: str | None) -> int:
    rule = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    if isinstance(value, bool) or not isinstance(value, int):
        fail(source, field, f"must be {rule}, got {describe(value)}")
    if value < low or (high is not None and value > high):
        fail(source, field, f"must be {rule}, got {describe(value)}")
    return value


def _templates_list(value: object, source: str | None) -> tuple[str, ...]:
    if value is _MISSING:
        return ()
    if not isinstance(value, list):
        fail(source, "patch_templates", f"must be a list of templates, got {describe(value)}")
    return tuple(
        validate_template(item, source=source, field=f"patch_templates[{index}]")
        for index, item in enumerate(value)
    )


def _pairs(value: object, field: str, source: str | None) -> list[Pair]:
    """Inline pairs (``examples`` or ``eval``)."""
    if value is _MISSING:
        return []
    if not isinstance(value, list):
        fail(source, field, f"must be a list of [input, output] pairs, got {describe(value)}")
    pairs = []
    for index, item in enumerate(value):
        try:
            pairs.append(parse_pair(item, "[input, output] or {input: ..., output: ...}"))
        except Problem as problem:
            where = f"{field}[{index}]" + (f".{problem.key}" if problem.key else "")
            fail(source, where, problem.reason)
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
        fail(source, field, f"must be a path to a .tsv or .jsonl file, got {describe(value)}")
    path = _relative_to_recipe(value, base_dir)
    pairs = load_pairs_file(path, source_field=field, source=source)
    if not pairs:
        fail(source, field, f"the file has no pairs ({path})")
    return pairs


def _preserve(value: object, file_value: object, source: str | None, base_dir: Path | None) -> tuple[str, ...]:
    """``preserve`` (a list of texts) plus the texts of ``preserve_file``."""
    texts: list[str] = []
    if value is not _MISSING:
        if not isinstance(value, list):
            fail(source, "preserve", f"must be a list of texts, got {describe(value)}")
        texts += [_text(item, f"preserve[{i}]", source) for i, item in enumerate(value)]
    if file_value is not _MISSING:
        if not isinstance(file_value, str) or not file_value.strip():
            fail(source, "preserve_file", f"must be a path to a text file, got {describe(file_value)}")
        path = _relative_to_recipe(file_value, base_dir)
        found = load_texts(path, source=source, field="preserve_file")
        if not found:
            fail(source, "preserve_file", f"the file has no texts ({path})")
        texts += found
    return tuple(texts)


def _components(value: object, source: str | None) -> tuple[str, ...]:
    """One component name or a list of them; returned in canonical order."""
    if value is _MISSING:
        return defaults.COMPONENTS
    single = isinstance(value, str)
    if not single and not isinstance(value, list):
        fail(
            source,
            "components",
            f"must be 'vector', 'matrix' or a list of them, got {describe(value)}",
        )
    items = [value] if single else value
    if not items:
        fail(source, "components", "must not be empty (choose from 'vector', 'matrix')")
    seen: set[str] = set()
    for index, item in enumerate(items):
        field = "components" if single else f"components[{index}]"
        if not isinstance(item, str) or item not in defaults.COMPONENTS:
            fail(source, field, f"must be 'vector' or 'matrix', got {describe(item)}")
        if item in seen:
            fail(source, field, f"duplicate {item!r}")
        seen.add(item)
    return tuple(c for c in defaults.COMPONENTS if c in seen)


def _layers(value: object, source: str | None) -> str | tuple[int, ...]:
    """``"all"`` or distinct layer indices, sorted (the engine checks the model's range)."""
    if value is _MISSING or value == "all":
        return "all"
    if not isinstance(value, list):
        fail(source, "layers", f"must be \"all\" or a list of layer indices, got {describe(value)}")
    if not value:
        fail(source, "layers", 'must not be empty (use "all" for every layer)')
    seen: set[int] = set()
    for index, item in enumerate(value):
        field = f"layers[{index}]"
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            fail(source, field, f"must be an integer >= 0, got {describe(item)}")
        if item in seen:
            fail(source, field, f"duplicate layer {int_text(item)}")
        seen.add(item)
    return tuple(sorted(seen))


def _solver(value: object, source: str | None) -> str:
    if value is _MISSING:
        return defaults.SOLVER
    if not isinstance(value, str) or value not in defaults.SOLVERS:
        fail(source, "solver", f"must be 'independent' or 'joint', got {describe(value)}")
    return value


# --------------------------------------------------------------------------- recipe


def _yaml_reason(exc: BaseException, text: str) -> str:
    """A short one-line reason from whatever the YAML parser raised."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        parts = [part for part in (exc.context, exc.problem) if part]
        problem = shorten(one_line(", ".join(parts) or "syntax error"))
        if mark is None:
            return problem
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    first = shorten(one_line(str(exc).split("\n", 1)[0]))
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
        fail(source, None, f"not valid YAML ({_yaml_reason(exc, text)})")


def _mapping(text: str, source: str | None) -> dict:
    data = _load_yaml(text, source)
    if data is None:
        fail(source, None, "the recipe is empty")
    if not isinstance(data, dict):
        fail(source, None, f"the top level must be a mapping of keys, got {describe(data)}")
    for key in data:
        if not isinstance(key, str) or key not in ALLOWED_KEYS:
            fail(source, key_label(key), f"unknown key (allowed: {', '.join(ALLOWED_KEYS)})")
    return data


def _text_sha256(text: str, source: str | None) -> str:
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        fail(source, None, "not valid Unicode text (unpaired surrogate characters)")
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
        fail(source, "instruction", "is required")
    instruction = _text(get("instruction"), "instruction", source)
    template = DEFAULT_TEMPLATE if get("template") is _MISSING else validate_template(
        get("template"), source=source, field="template"
    )
    patch_templates = _templates_list(get("patch_templates"), source)
    examples = _pairs(get("examples"), "examples", source)
    examples += _pairs_from_file(get("examples_file"), "examples_file", source, base_dir)
    if not examples:
        fail(source, "examples", "at least one example is required (examples or examples_file)")
    eval_pairs = _pairs(get("eval"), "eval", source)
    eval_pairs += _pairs_from_file(get("eval_file"), "eval_file", source, base_dir)
    rho = _rho(get("rho"), source)
    eta = _eta(get("eta"), source)
    batches = DEFAULT_BATCHES if get("batches") is _MISSING else _integer(
        get("batches"), "batches", 1, None, source
    )
    if batches > len(examples):
        fail(source, "batches", f"must be <= the number of examples ({len(examples)}), got {batches}")
    seed = DEFAULT_SEED if get("seed") is _MISSING else _integer(get("seed"), "seed", 0, MAX_SEED, source)
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS if get("max_new_tokens") is _MISSING else _integer(
        get("max_new_tokens"), "max_new_tokens", 1, MAX_NEW_TOKENS_LIMIT, source
    )
    preserve = _preserve(get("preserve"), get("preserve_file"), source, base_dir)
    preserve_weight = 1.0
    if get("preserve_weight") is not _MISSING:
        preserve_weight = _number(get("preserve_weight"), "preserve_weight", "> 0", source)
        if preserve_weight <= 0:
            fail(source, "preserve_weight", f"must be a number > 0, got {describe(get('preserve_weight'))}")
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
    data = read_bytes(file, source=source, field=None)
    try:
        # Decode the bytes ourselves (no newline translation) so sha256 is the file's.
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        fail(source, None, f"not valid UTF-8 text (bad byte on line {bad_byte_line(data, exc)})")
    return parse_recipe(text, source=source, base_dir=file.parent, default_name=file.stem)
