"""Tests for the recipe and templates loaders (transmute_cli/recipe/schema.py).

Error messages are asserted in full: they are the user interface of a
failed run, so a change in wording should be a deliberate test change.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# The package is not installed in every environment; make the checkout importable.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from transmute_cli.errors import InputError, RecipeError  # noqa: E402
from transmute_cli.recipe.datafiles import (  # noqa: E402
    Pair,
    load_pairs_file,
    load_templates,
    load_texts,
    query_prefix,
    render,
    validate_template,
)
from transmute_cli.recipe.schema import (  # noqa: E402
    ALLOWED_KEYS,
    DEFAULT_MODEL,
    DEFAULT_TEMPLATE,
    Recipe,
    load_recipe,
    parse_recipe,
    sanitize_name,
)

BASE = "instruction: Translate.\nexamples:\n  - [dog, chien]\n"
ALLOWED = ", ".join(ALLOWED_KEYS)
ITEM_FORM = "[input, output] or {input: ..., output: ...}"

FULL = """\
name: translate-en-fr
model: gemma-3-270m
instruction: |
  Translate English to French.
  cat -> chat
template: "{input} -> {output}"
patch_templates:
  - "{input} = {output}"
  - "English: {input}\\nFrench: {output}"
examples:
  - [dog, chien]
  - {input: house, output: maison}
  - [3+4, 7]
  - [1.5, 2]
eval:
  - [sun, soleil]
rho: 0.02
eta: 0.5
batches: 2
components: [matrix, vector]
layers: [5, 0, 3]
solver: joint
seed: 7
max_new_tokens: 32
"""


def _message(exc: RecipeError) -> str:
    """The one-line message, checked to really be one line."""
    message = str(exc)
    assert "\n" not in message
    assert len(message.splitlines()) == 1
    return message


def recipe_error(text: str, **kwargs) -> str:
    kwargs.setdefault("source", "r.yaml")
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, **kwargs)
    return _message(info.value)


def load_error(path) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return _message(info.value)


def templates_error(path) -> str:
    with pytest.raises(RecipeError) as info:
        load_templates(path)
    return _message(info.value)


# --------------------------------------------------------------------------- good recipes


def test_full_example_parses_with_all_values():
    recipe = parse_recipe(FULL, source="recipes/x.yaml")
    assert recipe.name == "translate-en-fr"
    assert recipe.model == "gemma-3-270m"
    assert recipe.instruction == "Translate English to French.\ncat -> chat\n"
    assert recipe.template == "{input} -> {output}"
    assert recipe.patch_templates == ("{input} = {output}", "English: {input}\nFrench: {output}")
    assert recipe.examples == (
        Pair("dog", "chien"),
        Pair("house", "maison"),
        Pair("3+4", "7"),
        Pair("1.5", "2"),
    )
    assert recipe.eval == (Pair("sun", "soleil"),)
    assert recipe.rho == 0.02
    assert recipe.eta == 0.5
    assert recipe.step == 0.5
    assert recipe.batches == 2
    assert recipe.components == ("vector", "matrix")
    assert recipe.layers == (0, 3, 5)
    assert recipe.solver == "joint"
    assert recipe.seed == 7
    assert recipe.max_new_tokens == 32
    assert recipe.source == "recipes/x.yaml"
    assert recipe.text == FULL
    assert recipe.sha256 == hashlib.sha256(FULL.encode()).hexdigest()


def test_defaults():
    recipe = parse_recipe(BASE)
    assert recipe == Recipe(
        name="recipe",
        model=DEFAULT_MODEL,
        instruction="Translate.",
        template=DEFAULT_TEMPLATE,
        patch_templates=(),
        examples=(Pair("dog", "chien"),),
        eval=(),
        rho=0.03,
        eta=None,
        batches=1,
        components=("vector", "matrix"),
        layers="all",
        solver="joint",
        seed=0,
        max_new_tokens=16,
        source=None,
        text=BASE,
        sha256=hashlib.sha256(BASE.encode()).hexdigest(),
    )
    assert recipe.step == 1.0
    assert DEFAULT_MODEL == "gemma-3-270m"
    # the engine's own defaults are the recipe's (one place: transmute_cli/defaults.py)
    from transmute_cli.engine.loop import EngineConfig
    from transmute_cli.pipeline import engine_config

    # (in-sample fidelity on the examples in the recipe's own template: the first n patch texts)
    assert engine_config(recipe) == EngineConfig(fidelity_texts=len(recipe.examples))
    # locality by default: the broad texts' moments at weight 3, no format augmentation
    assert (recipe.broad, recipe.broad_weight, recipe.augment) == ("original", 3.0, False)
    assert DEFAULT_TEMPLATE == "{input} -> {output}"


# keys every recipe states for itself (its content), not settings with a default
_CONTENT_KEYS = {"name", "model", "instruction", "template", "examples", "examples_file", "eval", "eval_file",
                 "preserve", "preserve_file", "chat", "inputs", "inputs_file", "eval_inputs", "eval_inputs_file",
                 "answer_format", "rules"}


@pytest.mark.parametrize("path", sorted((_ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_state_only_what_differs_from_the_defaults_and_say_why(path):
    """A shipped recipe that sets a knob sets it to something else than the default, and a comment
    line right above it says why (the defaults are product decisions: transmute_cli/defaults.py)."""
    from transmute_cli.recipe.schema import load_recipe

    data = yaml.safe_load(path.read_text())
    recipe, default = load_recipe(path), parse_recipe(BASE)
    lines = path.read_text().splitlines()
    for key in set(data) - _CONTENT_KEYS:
        assert getattr(recipe, key) != getattr(default, key), f"{path.name}: {key} restates the default"
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{key}:"))
        assert at > 0 and lines[at - 1].lstrip().startswith("#"), f"{path.name}: {key} has no comment saying why"


def test_default_name_argument_is_sanitized():
    assert parse_recipe(BASE, default_name="my run").name == "my-run"


def test_step_defaults_to_one_over_batches():
    text = "instruction: x\nexamples: [[a, b], [c, d], [e, f], [g, h]]\nbatches: 4\n"
    recipe = parse_recipe(text)
    assert recipe.eta is None
    assert recipe.step == 0.25
    assert parse_recipe(text + "eta: null\n").eta is None


def test_ints_accepted_where_floats_expected():
    recipe = parse_recipe(BASE + "rho: 0\neta: 2\n")
    assert recipe.rho == 0.0 and isinstance(recipe.rho, float)
    assert recipe.eta == 2.0 and isinstance(recipe.eta, float)


def test_list_and_mapping_example_forms_and_numbers():
    text = (
        "instruction: x\n"
        "examples:\n"
        "  - [dog, chien]\n"
        "  - {input: house, output: maison}\n"
        "  - {output: 12, input: 3+9}\n"
        "  - [0.25, -4]\n"
    )
    assert parse_recipe(text).examples == (
        Pair("dog", "chien"),
        Pair("house", "maison"),
        Pair("3+9", "12"),
        Pair("0.25", "-4"),
    )


def test_example_text_is_kept_verbatim():
    recipe = parse_recipe('instruction: x\nexamples: [[" a b", "c  "]]\n')
    assert recipe.examples == (Pair(" a b", "c  "),)


def test_components_single_string_and_canonical_order():
    assert parse_recipe(BASE + "components: matrix\n").components == ("matrix",)
    assert parse_recipe(BASE + "components: [vector]\n").components == ("vector",)
    assert parse_recipe(BASE + "components: [matrix, vector]\n").components == (
        "vector",
        "matrix",
    )


def test_layers_all_and_sorted():
    assert parse_recipe(BASE + "layers: all\n").layers == "all"
    assert parse_recipe(BASE + "layers: [9, 2]\n").layers == (2, 9)


def test_all_templates_deduplicated_in_order():
    text = BASE + 'patch_templates: ["{input} = {output}", "{input} -> {output}", "{input} = {output}"]\n'
    assert parse_recipe(text).all_templates() == ("{input} -> {output}", "{input} = {output}")


def test_template_braces_elsewhere_are_literal():
    text = BASE + 'template: "{ {input} } => {{output}} {}"\n'
    assert parse_recipe(text).template == "{ {input} } => {{output}} {}"


def test_load_recipe_name_from_stem_and_provenance(tmp_path):
    raw = BASE.replace("\n", "\r\n").encode()
    path = tmp_path / "my recipe.yaml"
    path.write_bytes(raw)
    recipe = load_recipe(path)
    assert recipe.name == "my-recipe"
    assert recipe.source == str(path)
    assert recipe.text == raw.decode()
    assert recipe.sha256 == hashlib.sha256(raw).hexdigest()
    assert recipe.examples == (Pair("dog", "chien"),)


def test_load_recipe_explicit_name_wins(tmp_path):
    path = tmp_path / "file.yaml"
    path.write_text("name: other.v2\n" + BASE, encoding="utf-8")
    assert load_recipe(str(path)).name == "other.v2"


@pytest.mark.parametrize(
    ("stem", "name"),
    [
        ("translate", "translate"),
        ("my recipe", "my-recipe"),
        ("..hidden", "hidden"),
        ("a..b", "a.b"),
        ("café", "caf-"),
        ("___", "recipe"),
        ("", "recipe"),
    ],
)
def test_sanitize_name(stem, name):
    assert sanitize_name(stem) == name


# --------------------------------------------------------------------------- examples files


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_examples_file_tsv_relative_to_recipe_folder(tmp_path, monkeypatch):
    _write(tmp_path / "recipes" / "data" / "x.tsv", "# pairs\n\ndog\tchien\r\nhouse\tmaison\n  # more\n")
    recipe_path = _write(
        tmp_path / "recipes" / "r.yaml",
        "instruction: x\nexamples: [[sun, soleil]]\nexamples_file: data/x.tsv\n",
    )
    monkeypatch.chdir(tmp_path / "recipes" / "data")  # the cwd must not matter
    assert load_recipe(recipe_path).examples == (
        Pair("sun", "soleil"),
        Pair("dog", "chien"),
        Pair("house", "maison"),
    )


def test_examples_and_eval_jsonl(tmp_path):
    _write(
        tmp_path / "data" / "x.jsonl",
        '{"input": "dog", "output": "chien"}\n\n["house", "maison"]\n{"output": 7, "input": "3+4"}\n',
    )
    _write(tmp_path / "data" / "eval.tsv", "sun\tsoleil\n")
    recipe_path = _write(
        tmp_path / "r.yaml",
        "instruction: x\nexamples_file: data/x.jsonl\neval_file: data/eval.tsv\nbatches: 3\n",
    )
    recipe = load_recipe(recipe_path)
    assert recipe.examples == (Pair("dog", "chien"), Pair("house", "maison"), Pair("3+4", "7"))
    assert recipe.eval == (Pair("sun", "soleil"),)
    assert recipe.batches == 3


def test_preserve_texts_and_file_relative_to_recipe_folder(tmp_path, monkeypatch):
    _write(tmp_path / "recipes" / "keep.txt",
           "# comments and blank lines separate texts\n\nSynonyms:\nbig -> large  \n\n\n# x\nPlain prose.\n")
    recipe_path = _write(tmp_path / "recipes" / "r.yaml",
                         BASE + "preserve: ['Inline text.']\npreserve_file: keep.txt\npreserve_weight: 1e-1\n")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(recipe_path)
    assert recipe.preserve == ("Inline text.", "Synonyms:\nbig -> large\n", "Plain prose.\n")
    assert recipe.preserve_weight == 0.1
    assert parse_recipe(BASE).preserve == () and parse_recipe(BASE).preserve_weight == 1.0
    assert load_texts(tmp_path / "recipes" / "keep.txt") == list(recipe.preserve[1:])


def test_preserve_file_problems_name_the_field(tmp_path):
    recipe_path = _write(tmp_path / "r.yaml", BASE + "preserve_file: missing.txt\n")
    assert load_error(recipe_path) == f"{recipe_path}: preserve_file: file not found ({tmp_path / 'missing.txt'})"
    _write(tmp_path / "empty.txt", "# only a comment\n\n")
    recipe_path = _write(tmp_path / "r.yaml", BASE + "preserve_file: empty.txt\n")
    assert load_error(recipe_path) == f"{recipe_path}: preserve_file: the file has no texts ({tmp_path / 'empty.txt'})"


def test_examples_file_absolute_path(tmp_path):
    data = _write(tmp_path / "elsewhere" / "x.TSV", "a\tb\n")
    recipe_path = _write(tmp_path / "r.yaml", f"instruction: x\nexamples_file: '{data}'\n")
    assert load_recipe(recipe_path).examples == (Pair("a", "b"),)


def test_parse_recipe_base_dir(tmp_path):
    _write(tmp_path / "x.tsv", "a\tb\n")
    recipe = parse_recipe("instruction: x\nexamples_file: x.tsv\n", base_dir=tmp_path)
    assert recipe.examples == (Pair("a", "b"),)


def test_load_pairs_file_directly(tmp_path):
    path = _write(tmp_path / "p.jsonl", '["a", "b"]\n')
    assert load_pairs_file(path, source_field="examples_file") == [Pair("a", "b")]


# --------------------------------------------------------------------------- bad recipe files


def test_missing_file(tmp_path):
    path = tmp_path / "x.yaml"
    assert load_error(path) == f"{path}: file not found"


def test_directory_given(tmp_path):
    assert load_error(tmp_path) == f"{tmp_path}: is a directory, not a file"


def test_not_utf8(tmp_path):
    path = _write(tmp_path / "x.yaml", b"instruction: x\nexamples: [[caf\xe9, b]]\n")
    assert load_error(path) == f"{path}: not valid UTF-8 text (bad byte on line 2)"


def test_error_is_an_input_error_with_parts(tmp_path):
    with pytest.raises(RecipeError) as info:
        parse_recipe(BASE + "rho: -1\n", source="r.yaml")
    err = info.value
    assert isinstance(err, InputError) and err.exit_code == 2
    assert (err.source, err.field, err.reason) == ("r.yaml", "rho", "must be a number >= 0, got -1")


def test_first_problem_is_reported_unknown_keys_first_then_in_key_order(tmp_path):
    """pydantic collects every problem; the one reported is the first a reader would fix."""
    bad = "rho: -1\nname: 'a b'\n"
    assert recipe_error(BASE + bad) == "r.yaml: name: must start with a letter or digit and use only letters," \
        " digits, '.', '_', '-' (no '..'), got 'a b'"
    assert recipe_error(BASE + bad + "bogus: 1\n").startswith("r.yaml: bogus: unknown key (allowed: ")
    # a problem inside a data file does not hide an earlier key's problem, and is itself kept whole
    (tmp_path / "ex.tsv").write_text("dog\tchien\nno tab here\n")
    file = "examples_file: ex.tsv\n"
    assert recipe_error(BASE + file + "seed: -1\n", base_dir=tmp_path) == \
        f"{tmp_path / 'ex.tsv'}: line 2: must be input<TAB>output (exactly 2 tab-separated fields), got no tab"
    assert recipe_error(BASE + file + "name: 'a b'\n", base_dir=tmp_path).startswith("r.yaml: name: ")


def test_recipe_built_in_python_is_validated_by_the_same_schema():
    from pydantic import ValidationError

    assert Recipe(instruction="T.", examples=[["a", "b"]]).examples == (Pair("a", "b"),)
    with pytest.raises(ValidationError, match="must be a number >= 0, got -1"):
        Recipe(instruction="T.", rho=-1)
    with pytest.raises(ValidationError, match="'independent' or 'joint'"):
        Recipe(instruction="T.", solver="ridge")


def test_allowed_keys_are_the_fields_a_user_writes():
    """Recipe's fields minus the record of what was read, plus the *_file keys (none listed twice)."""
    written = set(Recipe.model_fields) - {"source", "text", "sha256", "inlined", "pool"}
    assert set(ALLOWED_KEYS) == written | {"examples_file", "inputs_file", "eval_file", "eval_inputs_file", "preserve_file"}
    assert list(ALLOWED_KEYS) == sorted(ALLOWED_KEYS)


def test_message_without_source():
    assert recipe_error(BASE + "rho: -1\n", source=None) == "rho: must be a number >= 0, got -1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # whole-file problems
        ("a: b: c\n", "r.yaml: not valid YAML (line 1, column 5: mapping values are not allowed here)"),
        (
            "a: 1\n---\nb: 2\n",
            "r.yaml: not valid YAML (line 2, column 1: expected a single document in the stream,"
            " but found another document)",
        ),
        ("x: 2024-13-45\n", "r.yaml: not valid YAML (month must be in 1..12)"),
        ("[" * 1000, "r.yaml: not valid YAML (nested too deeply)"),
        ("- a\n- b\n", "r.yaml: the top level must be a mapping of keys, got a list"),
        ("hello\n", "r.yaml: the top level must be a mapping of keys, got a string ('hello')"),
        ("5\n", "r.yaml: the top level must be a mapping of keys, got 5"),
        ("", "r.yaml: the recipe is empty"),
        ("# only a comment\n\n", "r.yaml: the recipe is empty"),
        ("~\n", "r.yaml: the recipe is empty"),
        # keys
        (BASE + "rhoo: 1\n", f"r.yaml: rhoo: unknown key (allowed: {ALLOWED})"),
        (BASE + "1: x\n", f"r.yaml: 1: unknown key (allowed: {ALLOWED})"),
        (BASE + '"a\\nb": x\n', f"r.yaml: 'a\\nb': unknown key (allowed: {ALLOWED})"),
        ("examples: [[a, b]]\n", "r.yaml: instruction: is required"),
        # name / model / instruction
        (BASE + "name: a/b\n", "r.yaml: name: must start with a letter or digit and use only letters,"
         " digits, '.', '_', '-' (no '..'), got 'a/b'"),
        (BASE + "name: ..\n", "r.yaml: name: must start with a letter or digit and use only letters,"
         " digits, '.', '_', '-' (no '..'), got '..'"),
        (BASE + "name: a..b\n", "r.yaml: name: must start with a letter or digit and use only letters,"
         " digits, '.', '_', '-' (no '..'), got 'a..b'"),
        (BASE + "name: " + "a" * 129 + "\n", "r.yaml: name: must be at most 128 characters, got 129"),
        (BASE + "name: 12\n", "r.yaml: name: must be a string, got 12"),
        (BASE + "model: ''\n", "r.yaml: model: must not be empty"),
        (BASE + "model: [a]\n", "r.yaml: model: must be a string, got a list"),
        ('instruction: "   "\nexamples: [[a, b]]\n', "r.yaml: instruction: must not be empty"),
        ("instruction:\nexamples: [[a, b]]\n", "r.yaml: instruction: must be a string, got null"),
        # numbers
        (BASE + "rho: a\n", "r.yaml: rho: must be a number >= 0, got a string ('a')"),
        (BASE + "rho: true\n", "r.yaml: rho: must be a number >= 0, got a boolean (true)"),
        (BASE + "rho: yes\n", "r.yaml: rho: must be a number >= 0, got a boolean (true)"),
        (BASE + "rho: -1\n", "r.yaml: rho: must be a number >= 0, got -1"),
        (BASE + "rho: -0.5\n", "r.yaml: rho: must be a number >= 0, got -0.5"),
        (BASE + "rho: .inf\n", "r.yaml: rho: must be finite, got inf"),
        (BASE + "rho: 1" + "0" * 400 + "\n", "r.yaml: rho: must be finite, got an integer with 401 digits"),
        (BASE + "rho: -1e-2\n", "r.yaml: rho: must be a number >= 0, got -0.01"),
        (BASE + "eta: 0\n", "r.yaml: eta: must be a number > 0, got 0"),
        (BASE + "eta: -2.5\n", "r.yaml: eta: must be a number > 0, got -2.5"),
        (BASE + "eta: .nan\n", "r.yaml: eta: must be finite, got nan"),
        (BASE + "eta: false\n", "r.yaml: eta: must be a number > 0, got a boolean (false)"),
        (BASE + "batches: 1.5\n", "r.yaml: batches: must be an integer >= 1, got 1.5"),
        (BASE + "batches: 0\n", "r.yaml: batches: must be an integer >= 1, got 0"),
        (BASE + "batches: true\n", "r.yaml: batches: must be an integer >= 1, got a boolean (true)"),
        (BASE + "batches: 2\n", "r.yaml: batches: must be <= the number of examples (1), got 2"),
        (BASE + "seed: -1\n", "r.yaml: seed: must be an integer from 0 to 4294967295, got -1"),
        (BASE + "seed: 4294967296\n", "r.yaml: seed: must be an integer from 0 to 4294967295, got 4294967296"),
        (BASE + "max_new_tokens: 0\n", "r.yaml: max_new_tokens: must be an integer from 1 to 512, got 0"),
        (BASE + "max_new_tokens: 513\n", "r.yaml: max_new_tokens: must be an integer from 1 to 512, got 513"),
        # components / layers / solver
        (BASE + "components: 5\n", "r.yaml: components: must be 'vector', 'matrix' or a list of them, got 5"),
        (BASE + "components: []\n", "r.yaml: components: must not be empty (choose from 'vector', 'matrix')"),
        (BASE + "components: vectors\n", "r.yaml: components: must be 'vector' or 'matrix', got a string ('vectors')"),
        (BASE + "components: [vector, 1]\n", "r.yaml: components[1]: must be 'vector' or 'matrix', got 1"),
        (BASE + "components: [matrix, matrix]\n", "r.yaml: components[1]: duplicate 'matrix'"),
        (BASE + "layers: some\n", "r.yaml: layers: must be \"all\" or a list of layer indices, got a string ('some')"),
        (BASE + "layers: 3\n", "r.yaml: layers: must be \"all\" or a list of layer indices, got 3"),
        (BASE + "layers: []\n", "r.yaml: layers: must not be empty (use \"all\" for every layer)"),
        (BASE + "layers: [-1]\n", "r.yaml: layers[0]: must be an integer >= 0, got -1"),
        (BASE + "layers: [0, 1.0]\n", "r.yaml: layers[1]: must be an integer >= 0, got 1.0"),
        (BASE + "layers: [true]\n", "r.yaml: layers[0]: must be an integer >= 0, got a boolean (true)"),
        (BASE + "layers: [1, 1]\n", "r.yaml: layers[1]: duplicate layer 1"),
        (BASE + "solver: fast\n", "r.yaml: solver: must be 'independent' or 'joint', got a string ('fast')"),
        # examples
        ("instruction: x\n", "r.yaml: examples: at least one example is required (examples, examples_file, inputs or inputs_file)"),
        (
            "instruction: x\nexamples: []\n",
            "r.yaml: examples: at least one example is required (examples, examples_file, inputs or inputs_file)",
        ),
        ("instruction: x\nexamples: dog\n", "r.yaml: examples: must be a list of [input, output] pairs, got a string ('dog')"),
        (
            "instruction: x\nexamples: [[a, b, c]]\n",
            f"r.yaml: examples[0]: must be {ITEM_FORM}, got a list of 3 items",
        ),
        ("instruction: x\nexamples: [[a]]\n", f"r.yaml: examples[0]: must be {ITEM_FORM}, got a list of 1 item"),
        (
            "instruction: x\nexamples: [[a, b], {input: a, output: b, note: c}]\n",
            "r.yaml: examples[1].note: unknown key (allowed: input, output, history, open)",
        ),
        ("instruction: x\nexamples: [{input: a}]\n", "r.yaml: examples[0].output: is required"),
        ("instruction: x\nexamples: [[a, b], dog]\n", f"r.yaml: examples[1]: must be {ITEM_FORM}, got a string ('dog')"),
        ("instruction: x\nexamples: [[a, b], [c, d], 7]\n", f"r.yaml: examples[2]: must be {ITEM_FORM}, got 7"),
        ("instruction: x\nexamples: [[dog, '  ']]\n", "r.yaml: examples[0].output: must not be empty"),
        ("instruction: x\nexamples: [['', b]]\n", "r.yaml: examples[0].input: must not be empty"),
        ("instruction: x\nexamples: [[yes, b]]\n", "r.yaml: examples[0].input: must be a string, got a boolean (true): YAML reads unquoted yes, no, on, off, true and false as booleans; put the text in quotes"),
        ("instruction: x\nexamples: [[a, null]]\n", "r.yaml: examples[0].output: must be a string, got null"),
        ("instruction: x\nexamples: [[a, [b]]]\n", "r.yaml: examples[0].output: must be a string, got a list"),
        # inputs (labelled by the prompted model) and many-shot demonstrations
        ("instruction: x\ninputs: dog\n", "r.yaml: inputs: must be a list of inputs, got a string ('dog')"),
        ("instruction: x\ninputs: [dog, '  ']\n", "r.yaml: inputs[1]: must not be empty"),
        ("instruction: x\ninputs: [dog, [a, b]]\n", "r.yaml: inputs[1]: a conversation (a list of user turns) needs chat: true"),
        ("instruction: x\ninputs: [dog, [a, [b]]]\n", "r.yaml: inputs[1][1]: must be a string, got a list"),
        ("instruction: x\ninputs: [yes]\n", "r.yaml: inputs[0]: must be a string, got a boolean (true): YAML reads unquoted yes, no, on, off, true and false as booleans; put the text in quotes"),
        ("instruction: x\ninputs: []\n",
         "r.yaml: examples: at least one example is required (examples, examples_file, inputs or inputs_file)"),
        (BASE + "demonstrations: -1\n", "r.yaml: demonstrations: must be an integer >= 0, got -1"),
        (BASE + "demonstrations: 2.5\n", "r.yaml: demonstrations: must be an integer >= 0, got 2.5"),
        (BASE + "demonstrations: 1\n", "r.yaml: demonstrations: must be at most the number of examples - 1 (0: an"
         " example is never its own demonstration), got 1"),
        ("instruction: x\nexamples: [[a, b]]\ninputs: [c, d]\ndemonstrations: 3\n",
         "r.yaml: demonstrations: must be at most the number of examples - 1 (2: an example is never its own"
         " demonstration), got 3"),
        ("instruction: x\nexamples: [[a, b]]\ninputs: [c]\nbatches: 3\n",
         "r.yaml: batches: must be <= the number of examples (2), got 3"),
        ("instruction: x\nexamples: [[a, {b: c}]]\n", "r.yaml: examples[0].output: must be a string, got a mapping"),
        (BASE + "eval: [[sun, soleil], [moon]]\n", f"r.yaml: eval[1]: must be {ITEM_FORM}, got a list of 1 item"),
        (BASE + "eval: {sun: soleil}\n", "r.yaml: eval: must be a list of [input, output] pairs, got a mapping"),
        # templates
        (BASE + "template: '{input} ->'\n", "r.yaml: template: must contain {input} and {output}"),
        (BASE + "template: 'Answer: {output}'\n", "r.yaml: template: must contain {input} and {output}"),
        (
            BASE + "template: '{inptu} -> {output}'\n",
            "r.yaml: template: unknown field {inptu} (only {input} and {output} are allowed)",
        ),
        (BASE + "template: '{output} <- {input}'\n", "r.yaml: template: {input} must come before {output}"),
        (BASE + "template: '{input} {input} {output}'\n", "r.yaml: template: must contain {input} exactly once, found 2"),
        (BASE + "template: '{input} {output} {output}'\n", "r.yaml: template: must contain {output} exactly once, found 2"),
        (BASE + "template: 5\n", "r.yaml: template: must be a string, got 5"),
        (BASE + "patch_templates: ['{input} {output}', '{input}']\n", "r.yaml: patch_templates[1]: must contain {input} and {output}"),
        (BASE + "patch_templates: '{input} {output}'\n", "r.yaml: patch_templates: must be a list of templates, got a string ('{input} {output}')"),
        # data files given in text
        (BASE + "examples_file: 3\n", "r.yaml: examples_file: must be a path to a .tsv or .jsonl file, got 3"),
        (BASE + "eval_file: ''\n", "r.yaml: eval_file: must be a path to a .tsv or .jsonl file, got a string ('')"),
        # preservation texts
        (BASE + "preserve: hello\n", "r.yaml: preserve: must be a list of texts, got a string ('hello')"),
        (BASE + "preserve: [ok, '  ']\n", "r.yaml: preserve[1]: must not be empty"),
        (BASE + "preserve: [ok, 3]\n", "r.yaml: preserve[1]: must be a string, got 3"),
        (BASE + "preserve_file: 3\n", "r.yaml: preserve_file: must be a path to a text file, got 3"),
        (BASE + "preserve_weight: 0\n", "r.yaml: preserve_weight: must be a number > 0, got 0"),
        (BASE + "preserve_weight: -2\n", "r.yaml: preserve_weight: must be a number > 0, got -2"),
        (BASE + "preserve_weight: lots\n", "r.yaml: preserve_weight: must be a number > 0, got a string ('lots')"),
    ],
)
def test_bad_recipe_messages(text, message):
    assert recipe_error(text) == message


@pytest.mark.parametrize("text, message", [
    ("instruction: x\nexamples: [[a, b], [c, d], [' a', e]]\n",
     "r.yaml: examples[2]: the same input as examples[0] ('a'): an input is an example once (repeated, it is fitted "
     "twice, and a many-shot context would show it its own answer); remove one"),
    ("instruction: x\nexamples: [[a, b]]\ninputs: [c, a]\n", "r.yaml: inputs[1]: the same input as examples[0] ('a')"),
    ("instruction: x\ninputs: [c, c]\n", "r.yaml: inputs[1]: the same input as inputs[0] ('c')"),
])
def test_an_input_is_an_example_once(text, message):
    assert recipe_error(text).startswith(message)


def test_repeats_in_an_examples_file_are_named_by_entry(in_tmp):
    _write(Path("d.tsv"), "# header\na\tb\n\nc\td\na\te\n")
    assert load_error(_recipe_with_file("examples_file", "d.tsv")).startswith(
        "r.yaml: examples_file (entry 3): the same input as examples_file (entry 1) ('a')")


def test_an_eval_query_may_be_an_example():
    """The new-knowledge protocol (dictionary recipes, staff-city) queries the facts themselves."""
    assert parse_recipe("instruction: x\nexamples: [[a, b]]\neval: [[a, b]]\n").eval[0].input == "a"


def test_long_strings_are_cut_in_messages():
    message = recipe_error(BASE + "solver: " + "x" * 100 + "\n")
    assert message == "r.yaml: solver: must be 'independent' or 'joint', got a string ('" + "x" * 40 + "'...)"


def test_newlines_in_user_text_never_break_the_message():
    message = recipe_error(BASE + 'solver: "a\\nb\\rc\\u2028d"\n')
    assert message == "r.yaml: solver: must be 'independent' or 'joint', got a string ('a\\nb\\rc\\u2028d')"


# --------------------------------------------------------------------------- bad examples files


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Work in tmp_path so paths in messages are short and exact."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _recipe_with_file(key: str, value: str) -> Path:
    return _write(Path("r.yaml"), f"{BASE}{key}: {value}\n")


@pytest.mark.parametrize(
    ("files", "key", "value", "message"),
    [
        ({}, "examples_file", "data/x.csv", "r.yaml: examples_file: must be a .tsv or .jsonl file (data/x.csv)"),
        ({}, "examples_file", "data/x", "r.yaml: examples_file: must be a .tsv or .jsonl file (data/x)"),
        ({}, "examples_file", "data/x.tsv", "r.yaml: examples_file: file not found (data/x.tsv)"),
        ({}, "eval_file", "data/e.jsonl", "r.yaml: eval_file: file not found (data/e.jsonl)"),
        ({"data/x.tsv/a": "a\tb\n"}, "examples_file", "data/x.tsv",
         "r.yaml: examples_file: is a directory, not a file (data/x.tsv)"),
        ({"data/x.tsv": "# nothing\n\n"}, "examples_file", "data/x.tsv",
         "r.yaml: examples_file: the file has no pairs (data/x.tsv)"),
        ({"data/x.tsv": "a\tb\n# c\n\nno tab here\n"}, "examples_file", "data/x.tsv",
         "data/x.tsv: line 4: must be input<TAB>output (exactly 2 tab-separated fields), got no tab"),
        ({"data/x.tsv": "a\tb\tc\n"}, "examples_file", "data/x.tsv",
         "data/x.tsv: line 1: must be input<TAB>output (exactly 2 tab-separated fields), got 3 fields"),
        ({"data/x.tsv": "a\tb\nc\t \n"}, "examples_file", "data/x.tsv", "data/x.tsv: line 2: output: must not be empty"),
        ({"data/x.tsv": "a\tb\n\tc\n"}, "eval_file", "data/x.tsv", "data/x.tsv: line 2: input: must not be empty"),
        ({"data/x.tsv": b"a\tb\nc\t\xff\n"}, "examples_file", "data/x.tsv", "data/x.tsv: line 2: not valid UTF-8 text"),
        ({"d.jsonl": '["a", "b"]\n\n{"input": "a"\n'}, "examples_file", "d.jsonl",
         "d.jsonl: line 3: not valid JSON (Expecting ',' delimiter at column 14)"),
        ({"d.jsonl": "nope\n"}, "examples_file", "d.jsonl", "d.jsonl: line 1: not valid JSON (Expecting value at column 1)"),
        ({"d.jsonl": '{"input": "a", "output": "b", "x": 1}\n'}, "examples_file", "d.jsonl",
         "d.jsonl: line 1: x: unknown key (allowed: input, output, history, open)"),
        ({"d.jsonl": '{"input": "a"}\n'}, "examples_file", "d.jsonl", "d.jsonl: line 1: output: is required"),
        ({"d.jsonl": '["a", "b", "c"]\n'}, "examples_file", "d.jsonl",
         'd.jsonl: line 1: must be {"input": ..., "output": ...} or [input, output], got a list of 3 items'),
        ({"d.jsonl": '"a\\tb"\n'}, "examples_file", "d.jsonl",
         "d.jsonl: line 1: must be {\"input\": ..., \"output\": ...} or [input, output], got a string ('a\\tb')"),
        ({"d.jsonl": '["a", true]\n'}, "examples_file", "d.jsonl",
         "d.jsonl: line 1: output: must be a string, got a boolean (true): YAML reads unquoted yes, no, on, off, true and false as booleans; put the text in quotes"),
        ({"d.jsonl": "[" * 100000 + "\n"}, "examples_file", "d.jsonl", "d.jsonl: line 1: not valid JSON (nested too deeply)"),
        ({}, "inputs_file", "in.txt", "r.yaml: inputs_file: file not found (in.txt)"),
        ({"in.txt": "# only a comment\n\n"}, "inputs_file", "in.txt", "r.yaml: inputs_file: the file has no inputs (in.txt)"),
        ({"in.txt": b"walk\n\xff\n"}, "inputs_file", "in.txt", "in.txt: line 2: not valid UTF-8 text"),
    ],
)
def test_bad_examples_files(in_tmp, files, key, value, message):
    for name, content in files.items():
        _write(Path(name), content)
    assert load_error(_recipe_with_file(key, value)) == message


def test_load_pairs_file_errors_without_recipe_source(in_tmp):
    with pytest.raises(RecipeError) as info:
        load_pairs_file(Path("missing.tsv"), source_field="examples_file")
    assert _message(info.value) == "examples_file: file not found (missing.tsv)"


# --------------------------------------------------------------------------- templates files


def test_load_templates_good_file(tmp_path):
    content = (
        "# templates, one per line\n"
        "\n"
        "   \n"
        "{input} -> {output}\n"
        "   # an indented comment\n"
        "  Q: {input}\\nA: {output}  \n"
        "C:\\\\dir\\\\{input} = {output}\n"
        "keep \\t and \\x: {input} {output}\n"
        "not a newline \\\\n: {input} {output}\r\n"
        "{ {input} } {output}"
    )
    path = _write(tmp_path / "templates.txt", content)
    assert load_templates(path) == [
        "{input} -> {output}",
        "Q: {input}\nA: {output}",
        "C:\\dir\\{input} = {output}",
        "keep \\t and \\x: {input} {output}",
        "not a newline \\n: {input} {output}",
        "{ {input} } {output}",
    ]
    assert load_templates(str(path))[0] == "{input} -> {output}"


def test_load_templates_with_bom(tmp_path):
    path = _write(tmp_path / "t.txt", "\ufeff{input} -> {output}\n".encode())
    assert load_templates(path) == ["{input} -> {output}"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("# header\n{input} -> {output}\n{input} ->\n", "line 3: must contain {input} and {output}"),
        ("\n\n{inptu} {output}\n", "line 3: unknown field {inptu} (only {input} and {output} are allowed)"),
        ("{output}\\n{input}\n", "line 1: {input} must come before {output}"),
        ("", "no templates found"),
        ("# only\n\n   \n# comments\n", "no templates found"),
        (b"{input} {output}\n\xff\n", "line 2: not valid UTF-8 text"),
    ],
)
def test_load_templates_errors(tmp_path, content, message):
    path = _write(tmp_path / "t.txt", content)
    assert templates_error(path) == f"{path}: {message}"


def test_load_templates_missing_and_directory(tmp_path):
    assert templates_error(tmp_path / "nope.txt") == f"{tmp_path / 'nope.txt'}: file not found"
    assert templates_error(tmp_path) == f"{tmp_path}: is a directory, not a file"


# --------------------------------------------------------------------------- render


def test_render_and_query():
    assert render(DEFAULT_TEMPLATE, "dog", "chien") == "dog -> chien"
    assert render(DEFAULT_TEMPLATE, "dog") == "dog ->"
    assert render("Q: {input}\nA: {output}", "x") == "Q: x\nA:"
    assert render("Q: {input}\n{output}", "x") == "Q: x\n"
    assert render("{input} =\t {output}!", "x", "y") == "x =\t y!"
    assert render("{input} =\t {output}!", "x") == "x ="
    assert query_prefix("In: {input} \t{output}") == "In: {input}"


def test_render_leaves_braces_in_user_data_alone():
    assert render(DEFAULT_TEMPLATE, "{output}", "{input}") == "{output} -> {input}"
    assert render(DEFAULT_TEMPLATE, "{0} {x!r}") == "{0} {x!r} ->"
    assert render("{ {input} }: {output}", "a", "b") == "{ a }: b"


def test_query_prefix_requires_output():
    with pytest.raises(ValueError):
        query_prefix("{input} only")


def test_validate_template_returns_template_and_names_field():
    assert validate_template("{input}{output}", source=None, field="template") == "{input}{output}"
    with pytest.raises(RecipeError) as info:
        validate_template("{input}", source="t.txt", field="line 2")
    assert str(info.value) == "t.txt: line 2: must contain {input} and {output}"


# --------------------------------------------------------------------------- properties

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["vector", "matrix", "all", "joint", "{input} -> {output}", "x.tsv", "y.jsonl", ""]),
)
_keys = st.one_of(st.sampled_from(ALLOWED_KEYS + ("input", "output")), st.text(max_size=6), st.integers())
_values = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(("input", "output", "x")), st.text(max_size=4)), children, max_size=3),
    ),
    max_leaves=12,
)
_VALID = {"instruction": "Translate.", "examples": [["dog", "chien"], {"input": "a", "output": "b"}]}
# Per key, some good and some borderline values, so random recipes often parse.
_PLAUSIBLE = {
    "name": ["ok-1", "a/b", "..", "x" * 200],
    "model": ["some/model", ""],
    "instruction": ["Do it.\n", "  "],
    "template": ["{input}: {output}", "{output}{input}", "Q: {input}\nA: {output}"],
    "patch_templates": [[], ["{input} = {output}"], ["{input}"]],
    "examples": [[["a", "b"]], [], [[1, 2.5]], [["a", "b"], ["c", "d"], ["e", "f"]]],
    "examples_file": ["x.tsv", "y.jsonl", "z.csv", "missing.tsv"],
    "inputs": [[], ["a"], ["a", 3, ""], "a"],
    "inputs_file": ["in.txt", "missing.txt"],
    "eval": [[], [["a", "b"]]],
    "eval_file": ["x.tsv", "missing.jsonl"],
    "eval_inputs": [[], ["a"], "a"],
    "eval_inputs_file": ["in.txt", "missing.txt"],
    "chat": [True, False, "yes", 1],
    "answer_format": ["uppercase", ["one_word", "regex:^[A-Z]"], "upper", "regex:[", []],
    "rules": [{"greeting": "regex:^Hi"}, {"a": ["one_word", "uppercase"], "b": "language_fr"}, {}, {"a": "upper"},
              ["uppercase"], {"": "uppercase"}],
    "demonstrations": [0, 1, 2, 5, -1],
    "rho": [0, 0.5, -1, float("inf"), float("nan")],
    "eta": [None, 1, 0, 0.5],
    "batches": [1, 2, 3, 0],
    "components": ["vector", ["matrix"], ["matrix", "vector"], ["vector", "vector"]],
    "layers": ["all", [0], [3, 1], [1, 1]],
    "solver": ["joint", "independent"],
    "seed": [0, 5, 2**40],
    "max_new_tokens": [1, 512, 513],
    "preserve": [[], ["Some text.\n"], [""], "x"],
    "preserve_file": ["keep.txt", "missing.txt", "x.tsv"],
    "preserve_weight": [1, 0.1, 0, -1, float("nan")],
    "augment": [True, False, "yes", 1],
    "broad": ["original", "prompted", "off", False, True, "on", 3],
    "broad_weight": [3, 0.3, 0, -1, float("nan")],
    "turns_weight": [1, 3, 0, -1, float("nan")],
}
_overrides = st.fixed_dictionaries(
    {},
    optional={key: st.one_of(st.sampled_from(values), _values) for key, values in _PLAUSIBLE.items()},
)


def _check_parse(text: str, base_dir: Path) -> None:
    try:
        recipe = parse_recipe(text, source="p.yaml", base_dir=base_dir)
    except RecipeError as exc:
        message = _message(exc)
        # Problems inside a data file are reported against that file.
        assert message.startswith(("p.yaml: ", f"{base_dir}{os.sep}"))
    else:
        assert isinstance(recipe, Recipe)
        # inputs count as examples once labelled (a chat recipe without either takes the shipped pool's)
        n = len(recipe.examples) + len(recipe.inputs)
        assert n and all(isinstance(p.input, str) and p.input.strip() for p in recipe.examples)
        assert all(isinstance(x, str) and x.strip() for x in recipe.inputs)
        assert 1 <= recipe.batches <= n
        assert math.isfinite(recipe.rho) and recipe.step > 0
        assert recipe.preserve_weight > 0 and all(t.strip() for t in recipe.preserve)
        assert recipe.turns_weight >= 0 and math.isfinite(recipe.turns_weight) and (recipe.chat or recipe.turns_weight == 1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A folder with a few data files that random recipes may point at."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "x.tsv").write_text("a\tb\n", encoding="utf-8")
    (folder / "y.jsonl").write_text('["a", "b"]\nbroken\n', encoding="utf-8")
    (folder / "keep.txt").write_text("one text\n\nanother\n", encoding="utf-8")
    (folder / "in.txt").write_text("walk\ngo\n", encoding="utf-8")
    return folder


@PROPERTY
@given(text=st.text())
def test_property_parse_arbitrary_text(data_dir, text):
    _check_parse(text, data_dir)


@PROPERTY
@given(data=st.dictionaries(_keys, _values, max_size=6))
def test_property_parse_arbitrary_structures(data_dir, data):
    _check_parse(yaml.safe_dump(data, allow_unicode=True), data_dir)


@PROPERTY
@given(overrides=_overrides)
def test_property_parse_nearly_valid_recipes(data_dir, overrides):
    _check_parse(yaml.safe_dump({**_VALID, **overrides}, allow_unicode=True), data_dir)


@PROPERTY
@given(content=st.one_of(st.text(), st.binary(), st.lists(st.sampled_from(
    ["{input} -> {output}", "# c", "", "\\n", "\\\\", "{output}", "{x}", "\r", "\xff"]
)).map("\n".join)))
def test_property_load_templates_arbitrary_content(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.txt"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        try:
            templates = load_templates(path)
        except RecipeError as exc:
            assert _message(exc).startswith(f"{path}: ")
        else:
            assert templates
            for template in templates:
                assert validate_template(template, source=None, field="t") == template


_safe_text = st.text().filter(lambda s: "{input}" not in s and "{output}" not in s)


@PROPERTY
@given(x=_safe_text, y=_safe_text)
def test_property_query_is_prefix_of_full_text(x, y):
    full = render(DEFAULT_TEMPLATE, x, y)
    assert full == f"{x} -> {y}"
    assert full.startswith(render(DEFAULT_TEMPLATE, x))


@PROPERTY
@given(
    x=st.text(),
    y=st.text(),
    template=st.sampled_from(["{input} -> {output}", "Q: {input}\nA: {output}", "{input}\t{output} .", "{input}{output}"]),
)
def test_property_render_any_data_with_markers(x, y, template):
    full = render(template, x, y)
    assert full.startswith(render(template, x))
    before, rest = template.split("{input}")
    middle, after = rest.split("{output}")
    assert full == before + x + middle + y + after


def test_plausible_values_cover_every_key():
    assert set(_PLAUSIBLE) == set(ALLOWED_KEYS)


def test_scientific_notation_without_dot_is_a_number(tmp_path):
    # PyYAML reads 1e-3 as a string; a user sweeping rho writes exactly that
    p = tmp_path / "r.yaml"
    p.write_text(BASE + "rho: 1e-3\n")
    assert load_recipe(p).rho == 1e-3


def test_inputs_and_inputs_file_are_example_inputs_without_outputs(tmp_path):
    _write(tmp_path / "in.txt", "# verbs\nwalk\n\n  go far \r\n7\n")
    r = load_recipe(_write(tmp_path / "r.yaml", "instruction: x\ninputs: [run, 12]\ninputs_file: in.txt\n"))
    assert r.inputs == ("run", "12", "walk", "  go far ", "7")  # inner spaces kept, line breaks not
    assert r.examples == ()
    assert r.demonstrations == 0  # default: the instruction alone


def test_with_labels_makes_inputs_examples_that_reparse_anywhere(tmp_path):
    from transmute_cli.recipe.schema import with_labels

    _write(tmp_path / "in.txt", "walk\ngo\n")
    r = load_recipe(_write(tmp_path / "r.yaml", "instruction: x\nexamples: [[see, saw]]\ninputs_file: in.txt\n"
                                                "demonstrations: 1\n"))
    labelled = with_labels(r, ["walked", "went"])
    assert labelled.examples == (Pair("see", "saw"), Pair("walk", "walked"), Pair("go", "went"))
    assert labelled.inputs == ()
    assert labelled.sha256 == r.sha256 and labelled.text == r.text  # what was read is still recorded
    again = parse_recipe(labelled.self_contained_text)  # no folder, no model: the pairs themselves
    assert again.examples == labelled.examples and again.inputs == () and again.demonstrations == 1
    with pytest.raises(ValueError):
        with_labels(r, ["walked"])
