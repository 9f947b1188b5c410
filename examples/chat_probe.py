"""Does the chat model follow a system prompt at all?  Before a system prompt is worth transmuting,
the prompted model must show the behaviour: this scores candidate system prompts, with the prompt
in context and without it, on the held-out questions (no patch is computed).

    python examples/chat_probe.py -> results/chat_probe.{json,md}
    python examples/chat_probe.py --long -> results/chat_probe_long.{json,md}

The candidates are the phrasings tried for the shipped chat recipes: "answer in one word, in
capitals" (not shipped: the model does not follow it), the one-short-sentence format that
recipes/chat-short.yaml ships instead, and the English and French wordings of "answer in French"
(recipes/chat-french.yaml ships the French one).

``--long``: the long system prompt of recipes/chat-concierge.yaml as shipped and in the
arrangements of examples/concierge-variants.yaml, each scored on the recipe's rules (each on its
own) and its facts, on the recipe's held-out queries.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transmute_cli.recipe.chat import chat_format  # noqa: E402
from transmute_cli.recipe.datafiles import Pair, load_inputs  # noqa: E402
from transmute_cli.evaluation.generate import CHAT_TEMPLATE, evaluate  # noqa: E402
from transmute_cli.recipe.formats import describe_format, parse_format, passes  # noqa: E402
from transmute_cli.model.sources import CHAT_ALIAS  # noqa: E402
from transmute_cli.model.loading import load_model  # noqa: E402

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


def long_prompts() -> None:
    import yaml

    from transmute_cli.evaluation.generate import correct_answers
    from transmute_cli.pipeline import eval_queries
    from transmute_cli.recipe.schema import load_recipe
    from transmute_cli.model.tokens import token_ids

    recipe = load_recipe(ROOT / "recipes" / "chat-concierge.yaml")
    variants = {"shipped (recipes/chat-concierge.yaml)": recipe.instruction,
                **yaml.safe_load((ROOT / "examples" / "concierge-variants.yaml").read_text())}
    queries = eval_queries(recipe)
    loaded = load_model(recipe.model, device="auto")
    rows = []
    for name, system in variants.items():
        chat = chat_format(loaded.tokenizer, system, model=recipe.model)
        res = {r.condition: r for r in evaluate(loaded.model, loaded.tokenizer, system, queries, [CHAT_TEMPLATE],
                                                conditions=("base", "prompt"), max_new_tokens=recipe.max_new_tokens,
                                                chat=chat)}
        row = {"variant": name, "system_tokens": len(token_ids(loaded.tokenizer, chat.system)),
               "n": len(queries), "facts_n": len(recipe.eval),
               **{c: {"facts": correct_answers(r.answers[:len(recipe.eval)], recipe.eval, contains=True),
                      **{rule: sum(passes(spec, a) for a in r.answers) for rule, spec in recipe.rules}}
                  for c, r in res.items()}}
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False), file=sys.stderr, flush=True)
    (ROOT / "results" / "chat_probe_long.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    rules = [r for r, _ in recipe.rules]
    lines = [f"The long system prompt on `{recipe.model}`, arranged three ways: held-out answers passing each rule "
             f"(of {len(queries)}) and facts found (of {len(recipe.eval)}), with the prompt in context (without it).", "",
             "| arrangement | tokens | " + " | ".join(rules) + " | facts |", "|---|---|" + "---|" * (len(rules) + 1)]
    for r in rows:
        cells = [f"{r['prompt'][k]} ({r['base'][k]})" for k in rules + ["facts"]]
        lines.append(f"| {r['variant']} | {r['system_tokens']} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (ROOT / "results" / "chat_probe_long.md").write_text(md)
    print(md)


def main() -> None:
    if "--long" in sys.argv[1:]:
        return long_prompts()
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
