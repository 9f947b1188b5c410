"""Multi-turn conversations in the shipped chat pool: do they help a system prompt alone hold on
the first turn and on a later turn of a conversation?

    python examples/chat_turns.py [--recipes pirate french] [--conversations 80] [--out chat-turns]
        -> results/chat-turns.{json,md}

Per recipe (recipes/chat-NAME.yaml: its system prompt and answer_format; its own 40 held-out
questions), on SmolLM2-135M-Instruct, in one run:

- the patch fitted on the pool as a system prompt alone gets it (the first CHAT_POOL_TRAIN
  messages of transmute_cli/data/chat_pool.txt), and on the same messages plus the first
  ``--conversations`` conversations of transmute_cli/data/chat_pool_turns.txt, each answered turn
  by turn by the prompted model (``pipeline.label_inputs``: one labelling serves both fits; the
  single messages' labels are the same in both);
- scored on the recipe's held-out questions as a first turn, and as the **second turn** of the 24
  held-out conversations of recipes/chat/conversations-heldout.txt: the first turn answered by
  the prompted model (the same history for every condition: what a chat with the baked model
  looks like when it kept the behaviour on turn one), then the conversation's second question.
  The "no prompt" row there sees that history too: what the history alone carries.

Scores are answer_format pass rates (no prompt / prompt / patched). Progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transmute_cli import defaults  # noqa: E402
from transmute_cli.recipe.datafiles import Pair, load_texts  # noqa: E402
from transmute_cli.evaluation.generate import CHAT_TEMPLATE, evaluate  # noqa: E402
from transmute_cli.pipeline import chat_of, fit, format_json, label_inputs, whole_answers  # noqa: E402
from transmute_cli.model.loading import load_model  # noqa: E402
from transmute_cli.recipe import chat_pool, chat_pool_conversations, conversations, load_recipe, parse_recipe  # noqa: E402
from transmute_cli.recipe.schema import recipe_yaml  # noqa: E402

HELD_CONVERSATIONS = ROOT / "recipes" / "chat" / "conversations-heldout.txt"


def rates(recipe, results) -> dict[str, float]:
    """The answer_format pass rate per condition, as the report scores it (``format_json``)."""
    return {r["condition"]: r["rate"] for r in format_json(recipe.answer_format, results)["results"]}


def run(args) -> dict:
    rows, loaded = [], None
    pool, talks = chat_pool()[: defaults.CHAT_POOL_TRAIN], chat_pool_conversations()[: args.conversations]
    convs = conversations(load_texts(HELD_CONVERSATIONS))  # two user turns each
    for name in args.recipes:
        shipped = load_recipe(ROOT / "recipes" / f"chat-{name}.yaml")
        loaded = loaded or load_model(shipped.model, device=args.device)
        keys = {"model": shipped.model, "chat": True, "instruction": shipped.instruction,
                "inputs": list(pool) + [list(c) for c in talks], "answer_format": list(shipped.answer_format)}
        recipe = parse_recipe(recipe_yaml(keys), source=f"{name}-turns")
        chat = chat_of(recipe, loaded)
        t = time.perf_counter()
        labelled, labels = label_inputs(recipe, loaded, chat=chat)
        label_s = time.perf_counter() - t
        single = labelled.model_copy(update={"examples": tuple(p for p in labelled.examples if not p.history)})
        # held out: the recipe's own questions (turn one), and the conversations' second turns after
        # the prompted model's answer to their first
        own = [Pair(q, "") for q in shipped.eval_inputs]
        firsts, _ = whole_answers(recipe, loaded, [Pair(a, "") for a, _ in convs], "prompt", chat=chat)
        second = [Pair(b, "", history=(a, f)) for (a, b), f in zip(convs, firsts)]
        row = {"recipe": name, "label_s": label_s, "labels": len(labels),
               "conversations_kept": sum(1 for p in labelled.examples if p.history),
               "open": sum(l["open"] for l in labels), "variants": {}}
        for variant, fitted in (("pool", single), (f"pool + {len(talks)} conversations", labelled)):
            t = time.perf_counter()
            patch = fit(fitted, loaded, chat=chat, fidelity=False).patch
            fit_s = time.perf_counter() - t
            out = {"examples": len(fitted.examples), "fit_s": fit_s}
            for key, queries in (("first_turn", own), ("second_turn", second)):
                res = evaluate(loaded.model, loaded.tokenizer, recipe.instruction, queries, [CHAT_TEMPLATE], patch,
                               max_new_tokens=recipe.max_new_tokens, chat=chat)
                out[key] = {"n": len(queries), **rates(recipe, res), "answers": {r.condition: r.answers for r in res}}
            row["variants"][variant] = out
            f, s = out["first_turn"], out["second_turn"]
            print(f"{name} / {variant}: first turn {f['base']:.2f} / {f['prompt']:.2f} / {f['patched']:.2f}; second "
                  f"turn {s['base']:.2f} / {s['prompt']:.2f} / {s['patched']:.2f} (fit {fit_s:.0f} s)",
                  file=sys.stderr, flush=True)
        rows.append(row)
    return {"model": loaded.source.spec, "pool": defaults.CHAT_POOL_TRAIN, "conversations": len(talks),
            "held_conversations": len(convs), "rows": rows}


def markdown(doc: dict) -> str:
    lines = [f"Multi-turn conversations in the chat pool, `{doc['model']}`: a system prompt alone fitted on the "
             f"pool's first {doc['pool']} messages, and on them plus {doc['conversations']} multi-turn conversations "
             f"(`transmute_cli/data/chat_pool_turns.txt`), each answered turn by turn by the prompted model. Scored "
             "(answer_format pass rate, no prompt / prompt / patched) on the recipe's 40 held-out questions as a "
             f"first turn, and as the second turn of {doc['held_conversations']} held-out conversations "
             "(`recipes/chat/conversations-heldout.txt`; the first answer is the prompted model's, for every "
             "condition).", "",
             "| recipe | fitted on | examples | first turn: no prompt / prompt / patched | ÷ prompt | second turn: "
             "no prompt / prompt / patched | ÷ prompt |", "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        for variant, v in r["variants"].items():
            cells = []
            for key in ("first_turn", "second_turn"):
                x = v[key]
                ratio = f"{x['patched'] / x['prompt']:.2f}" if x["prompt"] else "–"
                cells += [f"{x['base']:.2f} / {x['prompt']:.2f} / **{x['patched']:.2f}**", ratio]
            lines.append(f"| {r['recipe']} | {variant} | {v['examples']} | {' | '.join(cells)} |")
    lines += ["", "Labels: " + "; ".join(f"{r['recipe']} {r['labels']} inputs, {r['conversations_kept']} of "
                                         f"{doc['conversations']} conversations kept (the others stopped at an "
                                         f"earlier answer still cut at 4 × max_new_tokens), {r['open']} open answers"
                                         for r in doc["rows"]),
              "", "(Times are in the .json; they were taken beside other jobs on the machine and are not timings.)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="+", default=["pirate", "french"])
    ap.add_argument("--conversations", type=int, default=80)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="chat-turns")
    ap.add_argument("--markdown-from", help="rewrite results/OUT.md from an earlier run's JSON (no model run)")
    args = ap.parse_args()
    if args.markdown_from:
        print(markdown(json.loads(Path(args.markdown_from).read_text())), end="")
        return
    doc = run(args)
    (ROOT / "results" / f"{args.out}.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    (ROOT / "results" / f"{args.out}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
