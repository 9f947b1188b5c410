"""How the chat recipes' default ρ was chosen: held-out score on *tuning* questions, never the ones
docs/chat.md reports (those are the recipes' eval questions, examples/chat_suite.py).

    python examples/chat_sweep.py [--rho 0.01,0.03,0.1,0.3] [--recipes french pirate facts]
        -> results/chat_sweep.{json,md}

- french, pirate: the recipe's 120 training questions, labelled by the prompted model as compute
  labels them; scored by the recipe's answer_format on recipes/chat/questions-tune.txt (40).
- facts: trained on the first two wordings of each fact in recipes/chat/acme-train.tsv (20),
  scored (the answer contains the fact) on the third (10).

Per recipe the labels and the prompted model's score are computed once; per ρ one patch
(engine defaults otherwise, no end-to-end fidelity pass) and the patched model's answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transmute_cli.recipe.datafiles import Pair, load_inputs, load_pairs_file  # noqa: E402
from transmute_cli.engine.loop import compute_patch  # noqa: E402
from transmute_cli.evaluation.generate import CHAT_TEMPLATE, correct_answers, evaluate  # noqa: E402
from transmute_cli.recipe.formats import passes  # noqa: E402
from transmute_cli.pipeline import chat_of, engine_config, label_inputs, patch_texts  # noqa: E402
from transmute_cli.model.loading import load_model  # noqa: E402
from transmute_cli.recipe.schema import load_recipe  # noqa: E402

CHAT = ROOT / "recipes" / "chat"


def split(name: str, recipe):
    """(training inputs, tuning pairs) of one recipe."""
    if name == "facts":
        pairs = load_pairs_file(CHAT / "acme-train.tsv", source_field="--facts")
        return tuple(p.input for i, p in enumerate(pairs) if i % 3 != 2), [p for i, p in enumerate(pairs) if i % 3 == 2]
    tune = load_inputs(CHAT / "questions-tune.txt", source=None, field="--tune")
    return recipe.inputs, [Pair(q, "") for q in tune]


def score(recipe, answers: list[str], pairs: list[Pair]) -> float:
    if recipe.answer_format:
        return sum(passes(recipe.answer_format, a) for a in answers) / len(pairs)
    return correct_answers(answers, pairs, contains=True) / len(pairs)


def run(args) -> list[dict]:
    rhos = [float(v) for v in args.rho.split(",")]
    loaded, rows = None, []
    for name in args.recipes:
        recipe = load_recipe(ROOT / "recipes" / f"chat-{name}.yaml")
        loaded = loaded or load_model(recipe.model, device=args.device)
        chat = chat_of(recipe, loaded)
        train, tune = split(name, recipe)
        (prompted,) = evaluate(loaded.model, loaded.tokenizer, recipe.instruction, tune, [CHAT_TEMPLATE],
                               conditions=("prompt",), max_new_tokens=recipe.max_new_tokens, chat=chat)
        labelled, _ = label_inputs(recipe.model_copy(update={"inputs": train, "examples": ()}), loaded, chat=chat)
        texts = patch_texts(labelled, chat)
        for rho in rhos:
            t0 = time.perf_counter()
            res = compute_patch(loaded.model, loaded.tokenizer, chat.system, texts,
                                engine_config(labelled, rho=rho, fidelity=False), plain=chat.plain)
            seconds = time.perf_counter() - t0
            (patched,) = evaluate(loaded.model, loaded.tokenizer, recipe.instruction, tune, [CHAT_TEMPLATE], res.patch,
                                  conditions=("patched",), max_new_tokens=recipe.max_new_tokens, chat=chat)
            row = {"recipe": name, "train": len(train), "tune": len(tune), "rho": rho,
                   "prompt": score(recipe, prompted.answers, tune), "patched": score(recipe, patched.answers, tune),
                   "compute_s": seconds}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    rhos = sorted({r["rho"] for r in rows})
    lines = ["Held-out score on tuning questions (not reported elsewhere) by ρ; chat recipes on SmolLM2-135M-Instruct.",
             "", "| recipe | train | tune | prompt | " + " | ".join(f"ρ {r:g}" for r in rhos) + " |",
             "|---|---|---|---|" + "---|" * len(rhos)]
    for name in dict.fromkeys(r["recipe"] for r in rows):
        mine = {r["rho"]: r for r in rows if r["recipe"] == name}
        first = next(iter(mine.values()))
        lines.append(f"| {name} | {first['train']} | {first['tune']} | {first['prompt']:.3f} | "
                     + " | ".join(f"{mine[r]['patched']:.3f}" if r in mine else "" for r in rhos) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["french", "pirate", "facts"], choices=["french", "pirate", "facts"])
    ap.add_argument("--rho", default="0.01,0.03,0.1,0.3")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "results" / "chat_sweep"))
    args = ap.parse_args()
    rows = run(args)
    Path(args.out + ".json").write_text(json.dumps(rows, indent=2) + "\n")
    md = markdown(rows)
    Path(args.out + ".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
