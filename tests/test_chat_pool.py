"""The shipped chat pool (transmute_cli/data/chat_pool.txt): the default user messages a chat
recipe with only a system prompt is fitted on.  It must load as a texts file, hold at least 300
distinct, non-empty, short messages, ship with the package, and share no message with the user
questions of the shipped chat recipes (their training, held-out and preservation texts), so a
held-out score never measures a message the patch was fitted on."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from collections import Counter
from pathlib import Path

from transmute_cli.recipe.datafiles import load_texts
from transmute_cli.recipe.schema import load_recipe

ROOT = Path(__file__).resolve().parent.parent
POOL = ROOT / "transmute_cli" / "data" / "chat_pool.txt"
MAX_CHARS = 600


def spaced(text: str) -> str:
    """Case-insensitive, whitespace-normalised."""
    return " ".join(text.lower().split())


def bare(text: str) -> str:
    """Case-insensitive, whitespace- and punctuation-normalised."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def pool() -> list[str]:
    return load_texts(POOL)


def recipe_questions() -> dict[str, str]:
    """Every user text of the shipped chat recipes (normalised -> where it comes from)."""
    found: dict[str, str] = {}
    recipes = sorted((ROOT / "recipes").glob("chat-*.yaml"))
    assert recipes, "no recipes/chat-*.yaml found"
    for path in recipes:
        r = load_recipe(path)
        texts = [p.input for p in (*r.examples, *r.eval)]
        texts += [t for p in (*r.examples, *r.eval) for t in p.history[::2]]  # earlier user turns
        # a recipe that states no inputs takes the pool's (recipe.pool): those are not its own questions
        texts += [*(() if r.pool else r.inputs), *r.eval_inputs, *r.preserve]
        for text in texts:
            found.setdefault(bare(text), f"{path.name}: {text.strip()!r}")
    return found


def test_the_pool_loads_into_at_least_300_distinct_short_messages():
    texts = pool()
    assert len(texts) >= 300
    assert all(t.strip() for t in texts)
    too_long = [t[:60] for t in texts if len(t.strip()) > MAX_CHARS]
    assert not too_long
    counts = Counter(spaced(t) for t in texts)
    assert not [t for t, n in counts.items() if n > 1]


def test_no_message_is_a_question_of_a_shipped_chat_recipe():
    questions = recipe_questions()
    assert len(questions) > 100  # the recipes' files were read
    shared = [f"{t.strip()!r} is {questions[bare(t)]}" for t in pool() if bare(t) in questions]
    assert not shared


def test_the_pool_ships_with_the_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["transmute_cli"]
    name = POOL.relative_to(ROOT / "transmute_cli").as_posix()
    assert any(fnmatch.fnmatch(name, p) for p in patterns), patterns


# --------------------------------------------------------------------------- a system prompt alone

def test_a_system_prompt_alone_is_a_recipe_fitted_on_the_pool_and_scored_on_its_held_out_end():
    from transmute_cli import defaults
    from transmute_cli.recipe import chat_pool, parse_recipe, with_labels

    msgs = chat_pool()
    r = parse_recipe("model: smollm2-135m-instruct\nchat: true\ninstruction: Speak like a pirate.\n", source="p.yaml")
    assert r.inputs == msgs[: defaults.CHAT_POOL_TRAIN]
    assert r.eval_inputs == msgs[-defaults.CHAT_POOL_HELDOUT:]
    assert set(r.inputs).isdisjoint(r.eval_inputs) and all(m == m.strip() for m in r.inputs)
    assert "chat_pool.txt" in r.pool and f"eval_inputs: its last {defaults.CHAT_POOL_HELDOUT}" in r.pool
    # the self-contained text (what a patch and a checkpoint record) re-parses to the same messages,
    # before and after labelling
    again = parse_recipe(r.self_contained_text, source="again")
    assert again.inputs == r.inputs and again.eval_inputs == r.eval_inputs and again.pool == ""
    labelled = with_labels(r, [f"answer {i}" for i in range(len(r.inputs))])
    back = parse_recipe(labelled.self_contained_text, source="back")
    assert [p.input for p in back.examples] == list(r.inputs) and back.eval_inputs == r.eval_inputs
    assert labelled.pool == r.pool


def test_the_pool_keeps_the_users_own_held_out_queries_out_of_training():
    from transmute_cli import defaults
    from transmute_cli.recipe import chat_pool, parse_recipe

    msgs = chat_pool()
    mine = [msgs[0], "What is my own question?"]
    text = f"chat: true\ninstruction: Be brief.\neval_inputs: {json.dumps(mine)}\n"
    r = parse_recipe(text, source="mine.yaml")
    assert r.eval_inputs == tuple(mine)  # the user's held-out queries, not the pool's
    assert msgs[0] not in r.inputs and r.inputs == msgs[1: defaults.CHAT_POOL_TRAIN]
    assert "eval_inputs" not in r.pool


def test_the_pool_is_for_chat_recipes_without_examples_only():
    import pytest

    from transmute_cli.errors import RecipeError
    from transmute_cli.recipe.schema import parse_recipe

    with pytest.raises(RecipeError, match="examples: at least one example is required"):
        parse_recipe("instruction: Translate.\n", source="t.yaml")  # a text recipe needs examples
    r = parse_recipe("chat: true\ninstruction: Be brief.\ninputs: [\"Hello?\"]\n", source="c.yaml")
    assert r.inputs == ("Hello?",) and not r.pool and not r.eval_inputs


def test_compute_system_is_the_one_line_form_and_refuses_what_it_cannot_mean(tmp_path):
    from typer.testing import CliRunner

    from transmute_cli.cli import _compute_recipe, app

    r = _compute_recipe(None, 'You are Captain Flint, a pirate. Say "Ahoy!"', None)
    assert r.chat and r.instruction.startswith("You are Captain Flint") and r.model == "smollm2-135m-instruct"
    assert r.name == "you-are-captain-flint-a" and r.source == "--system" and r.pool
    assert _compute_recipe(None, "Be brief.", "my/model").model == "my/model"
    runner = CliRunner()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("chat: true\ninstruction: Be brief.\n")
    for args, message in ((["compute"], "RECIPE: missing: a recipe file, or --system"),
                          (["compute", str(recipe), "--system", "x"], "--system: give a recipe file or --system"),
                          (["compute", str(recipe), "--model", "m"], "--model: only with --system")):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and res.stderr.startswith(f"error: {message}"), res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- multi-turn conversations

def test_the_pool_conversations_load_as_user_turns_and_share_nothing_with_the_pool_or_the_recipes():
    """transmute_cli/data/chat_pool_turns.txt: conversations of two or more user turns (the
    prompted model answers each in turn); none of their turns is a pool message, a question of a
    shipped chat recipe or of the held-out conversations (recipes/chat/conversations-heldout.txt)."""
    from transmute_cli.recipe import TURN_MARK, chat_pool_conversations, conversations

    talks = chat_pool_conversations()
    assert len(talks) >= 80 and all(len(c) >= 2 and all(t and TURN_MARK not in t for t in c) for c in talks)
    turns = [t for c in talks for t in c]
    held = [t for c in conversations(load_texts(ROOT / "recipes" / "chat" / "conversations-heldout.txt")) for t in c]
    assert len(held) == 48
    others = {bare(t) for t in pool()} | set(recipe_questions()) | {bare(t) for t in held}
    assert not [t for t in turns if bare(t) in others]
    assert not [t for t in held if bare(t) in {bare(x) for x in pool()} | set(recipe_questions())]
    name = "data/chat_pool_turns.txt"
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert any(fnmatch.fnmatch(name, p) for p in config["tool"]["setuptools"]["package-data"]["transmute_cli"])


def test_a_system_prompt_alone_takes_the_pool_conversations_the_default_names(monkeypatch):
    from transmute_cli import defaults
    from transmute_cli.recipe import chat_pool, chat_pool_conversations, parse_recipe

    monkeypatch.setattr(defaults, "CHAT_POOL_CONVERSATIONS", 3)
    r = parse_recipe("chat: true\ninstruction: Speak like a pirate.\n", source="p.yaml")
    assert r.inputs == chat_pool()[: defaults.CHAT_POOL_TRAIN] + chat_pool_conversations()[:3]
    assert "3 multi-turn conversations" in r.pool
    assert parse_recipe(r.self_contained_text, source="again").inputs == r.inputs  # written as lists of turns
