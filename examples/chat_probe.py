"""Does the chat model follow a system prompt at all?  Before a system prompt is worth transmuting,
the prompted model must show the behaviour: this scores candidate system prompts, with the prompt
in context and without it, on the held-out questions (no patch is computed).

    python examples/chat_probe.py -> results/chat_probe.{json,md}

The candidates are the phrasings tried for the shipped chat recipes: "answer in one word, in
capitals" (not shipped: the model does not follow it), the one-short-sentence format that
recipes/chat-short.yaml ships instead, and the English and French wordings of "answer in French"
(recipes/chat-french.yaml ships the French one).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transmute_cli.chat import chat_format  # noqa: E402
from transmute_cli.datafiles import Pair, load_inputs  # noqa: E402
from transmute_cli.evaluate import CHAT_TEMPLATE, evaluate  # noqa: E402
from transmute_cli.formats import describe_format, parse_format, passes  # noqa: E402
from transmute_cli.models import CHAT_ALIAS, load_model  # noqa: E402

CAPS_WORD = ["uppercase", "one_word"]
CANDIDATES = [
    ("Answer with one word only, in capital letters.", CAPS_WORD),
    ("Reply with a single word written in UPPERCASE letters. No sentences.", CAPS_WORD),
    ("Answer in one word, in capital letters.\nExamples:\nQ: What color is grass?\nA: GREEN\n"
     "Q: What is the capital of Italy?\nA: ROME\nQ: Which animal says meow?\nA: CAT", CAPS_WORD),
    ("You answer every question with ONE WORD IN CAPITAL LETTERS, like: GREEN, ROME, CAT. Never write a "
     "sentence.", CAPS_WORD),
    ("YOU ONLY SPEAK IN CAPITAL LETTERS. ANSWER WITH ONE WORD.", CAPS_WORD),
    ("WRITE YOUR WHOLE ANSWER IN CAPITAL LETTERS.", ["uppercase"]),
    ("Answer with a single word.", ["one_word"]),
    ("Answer in one short sentence, no more than ten words.", ["regex:^[^.!?\n]{1,80}[.!?]?$"]),
    ("Always answer in French.", ["language_fr"]),
    ("Tu es un assistant qui répond toujours en français.", ["language_fr"]),
]


def main() -> None:
    questions = load_inputs(ROOT / "recipes" / "chat" / "questions-heldout.txt", source=None, field="questions")
    pairs = [Pair(q, "") for q in questions]
    loaded = load_model(CHAT_ALIAS, device="auto")
    rows = []
    for system, spec in CANDIDATES:
        spec = parse_format(spec)
        chat = chat_format(loaded.tokenizer, system)
        res = {r.condition: r for r in evaluate(loaded.model, loaded.tokenizer, system, pairs, [CHAT_TEMPLATE],
                                                conditions=("base", "prompt"), max_new_tokens=48, chat=chat)}
        row = {"system": system, "format": describe_format(spec), "n": len(pairs),
               **{c: sum(passes(spec, a) for a in r.answers) for c, r in res.items()}}
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False), file=sys.stderr, flush=True)
    (ROOT / "results" / "chat_probe.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    lines = [f"System prompts on `{CHAT_ALIAS}`: answers passing the check, of {len(pairs)} held-out questions.", "",
             "| system prompt | check | no prompt | prompt in context |", "|---|---|---|---|"]
    for r in rows:
        system, check = (text.replace("\n", " / ") for text in (r["system"], r["format"].replace("\n", "\\n")))
        lines.append(f"| {system} | `{check}` | {r['base']} | {r['prompt']} |")
    md = "\n".join(lines) + "\n"
    (ROOT / "results" / "chat_probe.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
