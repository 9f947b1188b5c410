"""Recipes (YAML): load and validate.

A recipe is the user's whole input to one transmutation: the instruction I,
the example pairs the patch is computed from, the templates that turn a pair
into text, and the numeric knobs.  Everything is checked here, up front, so
the engine never starts a long computation on a typo.

The schema is :class:`Recipe` itself, a pydantic model: its fields are the
recipe keys (with types, bounds and defaults), and the ``*_file`` keys are
added beside the key they extend (``examples_file`` after ``examples``) in a
model with ``extra="forbid"``.  Pydantic collects every problem; the first
(an unknown key before anything else, then in key order) becomes the one
:class:`RecipeError` whose one-line message names the file, the key path and
the reason (``recipes/x.yaml: examples[3].output: must not be empty``).  No
other exception type leaves :func:`load_recipe` or :func:`parse_recipe`.
Templates and the files a recipe names are read by ``datafiles``; the message
shapes live in ``messages``.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Literal, NoReturn, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from transmute_cli import defaults
from transmute_cli.recipe.datafiles import Pair, bad_byte_line, read_bytes
from transmute_cli.messages import describe, fail, key_label, not_text, one_line, shorten
from transmute_cli.recipe.fields import MAX_NAME_LENGTH, Components, Layers, Model, Name, NonNegative, Pairs
from transmute_cli.recipe.fields import (
    Inputs, InputsFile, input_items, turns, PairsFile, Positive, Template, Templates, Text, Texts,
)
from transmute_cli.recipe.pool import from_pool
from transmute_cli.recipe.fields import AnswerFormat, Broad, Flag, Rules, TextsFile, number

DEFAULT_TEMPLATE = "{input} -> {output}"
DEFAULT_MODEL = "gemma-3-270m"
DEFAULT_MAX_NEW_TOKENS = 16
# a chat answer is a sentence or more, ended by the model's end-of-turn token, not a newline
CHAT_MAX_NEW_TOKENS = 48
MAX_NEW_TOKENS_LIMIT = 512
# numpy's generators only take 32-bit seeds; refusing bigger ones here beats a crash later.
MAX_SEED = 2**32 - 1


class Recipe(BaseModel):
    """A validated recipe; ``text`` and ``sha256`` record exactly what was read.

    The fields are the recipe keys in the order their problems are reported."""

    model_config = ConfigDict(frozen=True)

    name: Name = "recipe"
    model: Model = DEFAULT_MODEL
    # a chat model: the instruction is the system message, each example a user turn and the
    # assistant's answer (earlier turns in ``history``), all rendered by the model's chat template
    chat: Flag = False
    instruction: Text
    template: Template = DEFAULT_TEMPLATE
    patch_templates: Templates = ()
    examples: Pairs = ()
    # example inputs without outputs: compute labels them with the prompted model's greedy answers
    # (the prompt's own behaviour) before patching; see label_inputs
    inputs: Inputs = ()
    eval: Pairs = ()
    # held-out queries without a reference answer: scored against the prompted model's answers
    # (agreement, KL) and by answer_format
    eval_inputs: Inputs = ()
    # checks every answer must pass (formats.parse_format): uppercase, one_word, language_fr, ...
    answer_format: AnswerFormat = ()
    # named checks scored each on its own on every held-out answer (a system prompt's rules):
    # {name: an answer_format spec}; reported per rule beside the prompted model's rate
    rules: Rules = ()
    # many-shot: each example is patched under the instruction followed by this many of the
    # *other* examples as demonstrations (pipeline.patch_contexts); 0 = the instruction alone
    demonstrations: number(int, ge=0) = 0
    rho: NonNegative = defaults.RHO
    eta: Optional[Positive] = None  # None: the default step 1/batches
    batches: number(int, ge=1) = defaults.BATCHES
    seed: number(int, ge=0, le=MAX_SEED) = defaults.SEED
    max_new_tokens: number(int, ge=1, le=MAX_NEW_TOKENS_LIMIT) = DEFAULT_MAX_NEW_TOKENS
    # texts on which the patched model should act like the original one (see engine.compute_patch)
    preserve: Texts = ()
    preserve_weight: Positive = 1.0
    # chat recipes: the weight of each token of the conversation before the fitted answer (the
    # user's messages, earlier answers) against an answer token's (chat.Positions.turns)
    turns_weight: NonNegative = defaults.TURNS_WEIGHT
    # text recipes: also patch the examples in the shipped query formats (defaults.AUGMENT_TEMPLATES)
    augment: Flag = defaults.AUGMENT
    # text recipes: the shipped broad texts in the fit — "original": the original model as their
    # target, by their cached second moments (moments.py); "prompted": run through the loop
    # toward what the prompted model does on them (exact, several times the cost); "off"
    broad: Broad = defaults.BROAD
    broad_weight: Positive = defaults.BROAD_WEIGHT
    components: Components = defaults.COMPONENTS
    layers: Layers = "all"
    solver: Literal[defaults.SOLVERS] = defaults.SOLVER
    # not recipe keys: what was read, set by parse_recipe
    source: Optional[str] = None
    text: str = ""
    sha256: str = ""
    # the recipe with the contents of its *_file keys written in (empty when it has none):
    # what a patch and a checkpoint record, so they re-parse anywhere, without the recipe's folder
    inlined: str = ""
    # what came from the shipped chat pool (a system prompt alone), for the report; "" when nothing
    pool: str = ""

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

    def patch_formats(self) -> tuple[str, ...]:
        """Every template the examples are patched in: ``all_templates`` then, with ``augment``,
        the shipped query formats (``defaults.AUGMENT_TEMPLATES``), without repeats."""
        extra = defaults.AUGMENT_TEMPLATES if self.augment and not self.chat else ()
        return tuple(dict.fromkeys((*self.all_templates(), *extra)))


_META = ("source", "text", "sha256", "inlined", "pool")
_FILES = {"examples": PairsFile, "inputs": InputsFile, "eval": PairsFile, "eval_inputs": InputsFile,
          "preserve": TextsFile}
FILE_KEYS = tuple(f"{key}_file" for key in _FILES)


def _key_fields() -> dict:
    fields: dict = {}
    for key, info in Recipe.model_fields.items():
        if key not in _META:
            fields[key] = (info.annotation, info)
        if key in _FILES:
            fields[f"{key}_file"] = (_FILES[key], ())
    return fields


# What a recipe file may say: Recipe's fields without the record of what was read, plus the files.
_Keys = create_model("RecipeKeys", __config__=ConfigDict(extra="forbid"), **_key_fields())
ALLOWED_KEYS = tuple(sorted(_Keys.model_fields))


def _first_problem(exc: ValidationError, source: str | None) -> NoReturn:
    """The one RecipeError for the first problem: an unknown key first, then in key order."""
    errors = exc.errors(include_url=False)
    unknown = [e for e in errors if e["type"] in ("extra_forbidden", "invalid_key")]
    error = (unknown or errors)[0]
    kind, ctx, value = error["type"], error.get("ctx") or {}, error["input"]
    if kind == "located":
        raise ctx["error"]
    if unknown:
        key = value if kind == "invalid_key" else error["loc"][-1]
        fail(source, key_label(key), f"unknown key (allowed: {', '.join(ALLOWED_KEYS)})")
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"])
    reasons = {
        "recipe": ctx.get("reason"),
        "missing": "is required",
        "string_type": not_text(value),
        "literal_error": f"must be {ctx.get('expected')}, got {describe(value)}",
    }
    fail(source, path.lstrip(".") + ctx.get("at", ""), reasons.get(kind) or error["msg"])


# --------------------------------------------------------------------------- recipe


def sanitize_name(stem: str) -> str:
    """Turn a file stem into a safe run name (unsafe characters become ``-``)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", stem)
    while ".." in name:
        name = name.replace("..", ".")
    name = name.lstrip("._-")[:MAX_NAME_LENGTH]
    return name or "recipe"


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


def _mapping(text: str, source: str | None) -> dict:
    try:
        data = yaml.safe_load(text)
    # The parser can raise more than YAMLError on hostile input (ValueError for an
    # impossible date or a huge int, RecursionError for deep nesting): all mean
    # "this is not a recipe we can read".
    except Exception as exc:  # noqa: BLE001
        fail(source, None, f"not valid YAML ({_yaml_reason(exc, text)})")
    if data is None:
        fail(source, None, "the recipe is empty")
    if not isinstance(data, dict):
        fail(source, None, f"the top level must be a mapping of keys, got {describe(data)}")
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
    try:
        keys = _Keys.model_validate(data, context={"base_dir": base_dir, "source": source})
    except ValidationError as exc:
        _first_problem(exc, source)
    values = dict(keys)
    for key in _FILES:
        values[key] = values[key] + values.pop(f"{key}_file")
    pooled = from_pool(data, values) if values["chat"] else ""
    n = len(values["examples"]) + len(values["inputs"])
    if not n:
        fail(source, "examples", "at least one example is required (examples, examples_file, inputs or inputs_file)")
    if values["batches"] > n:
        fail(source, "batches", f"must be <= the number of examples ({n}), got {values['batches']}")
    if values["demonstrations"] > n - 1:
        fail(source, "demonstrations", f"must be at most the number of examples - 1 ({n - 1}: an example is"
                                       f" never its own demonstration), got {values['demonstrations']}")
    _check_style(data, values, source)
    _check_repeats(data, values, source)
    if values["chat"] and "max_new_tokens" not in data:
        values["max_new_tokens"] = CHAT_MAX_NEW_TOKENS
    if values["chat"] and "rho" not in data:
        values["rho"] = defaults.RHO_CHAT
    if "name" not in data:
        values["name"] = sanitize_name(default_name)
    inlined = _inline_files(data, values, source) if pooled or any(k in data for k in FILE_KEYS) else ""
    return Recipe.model_construct(**values, source=source, text=text, sha256=sha256, inlined=inlined, pool=pooled)


def recipe_yaml(keys: dict) -> str:
    """Recipe text for ``keys`` (what ``compute --system`` parses and records)."""
    return yaml.safe_dump(keys, allow_unicode=True, sort_keys=False, width=1000)


def _check_style(data: dict, values: dict, source: str | None) -> None:
    """A recipe is a text recipe or a chat recipe, not both."""
    for i, item in enumerate(values["eval_inputs"]):
        if not isinstance(item, str):
            fail(source, f"eval_inputs[{i}]", "a conversation is not supported here yet (its earlier answers would "
                                              "differ per model); score a later turn with an eval pair that has a "
                                              "history: {history: [user, assistant], input: ..., output: ...}")
    if values["chat"]:
        for key in ("template", "patch_templates"):
            if key in data:
                fail(source, key, "a chat recipe is written by the model's chat template (instruction = system "
                                  "message, examples = user and assistant turns): remove it, or chat: true")
        if values["demonstrations"]:
            fail(source, "demonstrations", "not supported with chat: true (the system message is the instruction)")
        for key, off in (("augment", False), ("broad", "off")):  # text formats and texts: not a chat's turns
            if key in data and values[key] != off:
                fail(source, key, "not supported with chat: true yet (the shipped formats and broad texts are plain "
                                  "text, not chat turns)")
            values[key] = off
        return
    if "turns_weight" in data:
        fail(source, "turns_weight", "weighs the turns of a conversation: it needs chat: true")
    for key in ("examples", "eval"):
        for i, pair in enumerate(values[key]):
            if pair.history:
                fail(source, f"{key}[{i}].history", "earlier turns of a conversation need chat: true")
    for i, item in enumerate(values["inputs"]):
        if not isinstance(item, str):
            fail(source, f"inputs[{i}]", "a conversation (a list of user turns) needs chat: true")


def _check_repeats(data: dict, values: dict, source: str | None) -> None:
    """An input (with its earlier turns) is an example once: repeated, it is fitted twice and a
    many-shot context could show it its own answer.  The first repeat is named with the entry it
    repeats.  (An eval query may be an example: the new-knowledge protocol queries the facts.)"""
    def where(key: str, i: int) -> str:
        # entries of a *_file come after the ones written in the recipe
        inline = len(data.get(key) or []) if isinstance(data.get(key), list) else 0
        return f"{key}[{i}]" if i < inline or f"{key}_file" not in data else f"{key}_file (entry {i - inline + 1})"

    seen: dict[tuple, str] = {}
    asked = [Pair(turns(x)[-1], "", history=turns(x)[:-1]) for x in values["inputs"]]  # user turns only
    for key, items in (("examples", values["examples"]), ("inputs", asked)):
        for i, p in enumerate(items):
            k = (p.history, p.input.strip())
            if k in seen:
                fail(source, where(key, i), f"the same input as {seen[k]} ({shorten(p.input.strip())!r}): an input is an "
                                            "example once (repeated, it is fitted twice, and a many-shot context would "
                                            "show it its own answer); remove one")
            seen[k] = where(key, i)


def _pair_item(p: Pair) -> list | dict:
    if p.history or p.open:
        return {**({"history": list(p.history)} if p.history else {}), "input": p.input, "output": p.output,
                **({"open": True} if p.open else {})}
    return [p.input, p.output]


def _inline_files(data: dict, values: dict, source: str | None, labelled: bool = False) -> str:
    """The recipe's keys with every ``*_file`` replaced by what it held (order of keys kept);
    ``labelled``: its inputs are in ``values["examples"]`` already, and the keys go."""
    lists = {"examples": [_pair_item(p) for p in values["examples"]], "inputs": input_items(values["inputs"]),
             "eval": [_pair_item(p) for p in values["eval"]], "eval_inputs": input_items(values["eval_inputs"]),
             "preserve": list(values["preserve"])}
    if labelled:
        lists["inputs"] = []
    out: dict = {}
    for key, value in data.items():
        target = key.removesuffix("_file")
        if target in lists:
            if target not in out and lists[target]:
                out[target] = lists[target]
        else:
            out[key] = value
    if labelled and "examples" not in out:
        out["examples"] = lists["examples"]
    what = "its inputs labelled by the prompted model" if labelled else "the contents of its *_file keys written in"
    head = f"# {source or 'recipe'} with {what}\n"
    return head + yaml.safe_dump(out, allow_unicode=True, sort_keys=False, width=1000)


def with_labels(recipe: Recipe, labels: list[str], open_answers: list[bool] | None = None,
                histories: list[tuple[str, ...]] | None = None) -> Recipe:
    """The recipe with its ``inputs`` turned into examples whose outputs are ``labels`` (one per
    input, in order; ``open_answers``: which are the start of a longer answer, Pair.open).  Its
    self-contained text holds them as examples, so a patch or checkpoint that records it
    re-parses to the very pairs the patch was computed from."""
    if len(labels) != len(recipe.inputs):
        raise ValueError(f"{len(labels)} labels for {len(recipe.inputs)} inputs")
    opens = open_answers or [False] * len(labels)
    before = histories or [()] * len(labels)
    values = {k: getattr(recipe, k) for k in Recipe.model_fields if k not in _META}
    values["examples"] = tuple(recipe.examples) + tuple(Pair(i, o, history=tuple(h), open=c)
                                                        for i, o, c, h in zip(recipe.inputs, labels, opens, before))
    # the self-contained text: *_file contents and what the shipped pool gave are keys there
    data = yaml.safe_load(recipe.self_contained_text)
    inlined = _inline_files(data, values, recipe.source, labelled=True)
    values["inputs"] = ()
    return Recipe.model_construct(**values, source=recipe.source, text=recipe.text, sha256=recipe.sha256,
                                  inlined=inlined, pool=recipe.pool)


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


def eval_queries(recipe: Recipe) -> list[Pair]:
    """The held-out queries: the eval pairs, then the eval inputs (no reference answer)."""
    return list(recipe.eval) + [Pair(q, "") for q in recipe.eval_inputs]
