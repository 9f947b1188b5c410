"""The shipped chat pool: the user messages and multi-turn conversations a chat recipe that
states only a system prompt is fitted on (transmute_cli/data/chat_pool.txt, chat_pool_turns.txt)
and scored on (the pool's last messages)."""

from __future__ import annotations

from collections.abc import Iterable

from transmute_cli import defaults
from transmute_cli.recipe.datafiles import shipped_path, shipped_texts
from transmute_cli.recipe.fields import input_items

POOL_NAME = "chat_pool.txt"
POOL_TURNS_NAME = "chat_pool_turns.txt"
TURN_MARK = "<next turn>"  # between a conversation's user turns in POOL_TURNS_NAME


def chat_pool() -> tuple[str, ...]:
    """The shipped user messages (transmute_cli/data/chat_pool.txt) a system prompt alone is fitted on."""
    return tuple(t.strip() for t in shipped_texts(POOL_NAME))


def conversations(blocks: Iterable[str]) -> tuple[tuple[str, ...], ...]:
    """Conversations from the blocks of a texts file (``load_texts``): each block the user's turns,
    separated by a ``<next turn>`` line."""
    return tuple(tuple(t.strip() for t in block.split(f"\n{TURN_MARK}\n")) for block in blocks)


def chat_pool_conversations() -> tuple[tuple[str, ...], ...]:
    """The shipped multi-turn conversations (transmute_cli/data/chat_pool_turns.txt)."""
    return conversations(shipped_texts(POOL_TURNS_NAME))


def from_pool(data: dict, values: dict) -> str:
    """A chat recipe without examples or inputs: the pool's first messages as its inputs (less any
    of its own held-out queries) and, without eval or eval_inputs, the pool's last ones as its
    held-out queries; written into ``data`` so the self-contained text holds them.  Says what was
    taken ("" when nothing)."""
    if values["examples"] or values["inputs"]:
        return ""
    pool = chat_pool()
    held = pool[len(pool) - defaults.CHAT_POOL_HELDOUT:]
    said = []
    if not values["eval"] and not values["eval_inputs"]:
        values["eval_inputs"] = held
        data["eval_inputs"] = list(held)
        said.append(f"eval_inputs: its last {len(held)}")
    own = {p.input.strip() for p in values["eval"]} | {x.strip() for x in values["eval_inputs"]}
    train = tuple(x for x in pool[: defaults.CHAT_POOL_TRAIN] if x not in own)
    talks = tuple(c for c in chat_pool_conversations()[: defaults.CHAT_POOL_CONVERSATIONS] if not own & set(c))
    values["inputs"] = train + talks
    data["inputs"] = input_items(train + talks)
    said.insert(0, f"inputs: {len(train)} of its first {defaults.CHAT_POOL_TRAIN}")
    if defaults.CHAT_POOL_CONVERSATIONS:
        said.insert(1, f"{len(talks)} multi-turn conversations of {shipped_path(POOL_TURNS_NAME)}")
    return f"{shipped_path(POOL_NAME)} ({len(pool)} user messages): " + "; ".join(said)
