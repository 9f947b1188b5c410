"""How the chat recipes' defaults were chosen: held-out score on *tuning* questions, never the ones
docs/chat.md reports (those are the recipes' eval questions, examples/chat_suite.py).

    python examples/chat_sweep.py [--rho 0.01,0.03,0.1,0.3] [--recipes french pirate facts]
        -> results/chat_sweep.{json,md}
    python examples/chat_sweep.py --variants "base;lead=0;turns=0;first=4x16" --tune-pool --out results/chat-positions
        -> one patch per variant (settings separated by ';', a variant's own by ','), each against the
           chat defaults otherwise: rho=R, batches=B, eta=E (the engine's), and which positions of each
           example are fitted (``chat.Positions``): lead=W (the system turn's close and the user turn's
           header), turns=W (the user turns and the assistant header; the recipe's turns_weight),
           first=WxK (the answer's first K tokens, weight W); base: the defaults alone.  Beside the score, the patched answers' first 16
           tokens against the prompted model's, and KL to it on its own answers (less noisy than a
           checker on 40 answers).

- french, pirate: the recipe's 120 training questions, labelled by the prompted model as compute
  labels them; scored by the recipe's answer_format on recipes/chat/questions-tune.txt (40).
- facts: trained on the first two wordings of each fact in recipes/chat/acme-train.tsv (20),
  scored (the answer contains the fact) on the third (10).
- ``--tune-pool`` (french, pirate): also the shipped pool's messages that no recipe trains or is
  scored on (``transmute_cli/data/chat_pool.txt`` after the first CHAT_POOL_TRAIN, before the last
  CHAT_POOL_HELDOUT): 100 tuning questions instead of 40.

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

from transmute_cli import defaults  # noqa: E402
from transmute_cli.recipe import chat_pool  # noqa: E402
from transmute_cli.recipe.chat import Positions  # noqa: E402
from transmute_cli.recipe.datafiles import Pair, load_inputs, load_pairs_file  # noqa: E402
from transmute_cli.engine.loop import compute_patch  # noqa: E402
from transmute_cli.evaluation.generate import CHAT_TEMPLATE, correct_answers, evaluate  # noqa: E402
from transmute_cli.evaluation.heldout import answer_kl, first_tokens_agreement, prompted_reference  # noqa: E402
from transmute_cli.recipe.formats import passes  # noqa: E402
from transmute_cli.pipeline import chat_of, engine_config, label_inputs, patch_texts  # noqa: E402
from transmute_cli.model.loading import load_model  # noqa: E402
from transmute_cli.recipe.schema import load_recipe  # noqa: E402

CHAT = ROOT / "recipes" / "chat"
ENGINE = {"rho": float, "batches": int, "eta": float}


def split(name: str, recipe, tune_pool: bool = False):
    """(training inputs, tuning pairs) of one recipe."""
    if name == "facts":
        pairs = load_pairs_file(CHAT / "acme-train.tsv", source_field="--facts")
        return tuple(p.input for i, p in enumerate(pairs) if i % 3 != 2), [p for i, p in enumerate(pairs) if i % 3 == 2]
    tune = load_inputs(CHAT / "questions-tune.txt", source=None, field="--tune")
    if tune_pool:
        tune += list(chat_pool()[defaults.CHAT_POOL_TRAIN: len(chat_pool()) - defaults.CHAT_POOL_HELDOUT])
    return recipe.inputs, [Pair(q, "") for q in tune]


def parse_variant(text: str, turns: float) -> tuple[dict, Positions]:
    """``rho=0.1,lead=0,first=4x16`` -> (engine settings, positions); ``base``: none.  Positions
    start from the recipe's (``turns``: its turns_weight, the default unless it says)."""
    over, pos = {}, {"turns": turns}
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item == "base":
            continue
        key, _, value = item.partition("=")
        if key in ENGINE:
            over[key] = ENGINE[key](value)
        elif key in ("lead", "turns"):
            pos[key] = float(value)
        elif key == "first":
            w, _, k = value.partition("x")
            pos["first"], pos["first_tokens"] = float(w), int(k)
        else:
            raise SystemExit(f"error: --variants: unknown setting {key!r} (rho, batches, eta, lead, turns, first)")
    return over, Positions(**pos)


def score(recipe, answers: list[str], pairs: list[Pair]) -> float:
    if recipe.answer_format:
        return sum(passes(recipe.answer_format, a) for a in answers) / len(pairs)
    return correct_answers(answers, pairs, contains=True) / len(pairs)


def labels(recipe, loaded, chat, folder: str | None, name: str):
    """``label_inputs``' recipe, kept in ``folder`` (when given) as the examples it labelled: a rerun
    with other variants reuses them (they depend on the model, the prompt and the inputs only)."""
    path = Path(folder) / f"{name}-labels.json" if folder else None
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if saved["instruction"] == recipe.instruction and saved["inputs"] == list(recipe.inputs):
            return recipe.model_copy(update={"inputs": (), "examples": tuple(
                Pair(e["input"], e["output"], open=e["open"]) for e in saved["examples"])})
    labelled, _ = label_inputs(recipe, loaded, chat=chat)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"instruction": recipe.instruction, "inputs": list(recipe.inputs), "examples": [
            {"input": p.input, "output": p.output, "open": p.open} for p in labelled.examples]}, ensure_ascii=False))
    return labelled


def run(args) -> list[dict]:
    variants = args.variants.split(";") if args.variants else [f"rho={v}" for v in args.rho.split(",")]
    loaded, rows = None, []
    for name in args.recipes:
        recipe = load_recipe(ROOT / "recipes" / f"chat-{name}.yaml")
        loaded = loaded or load_model(recipe.model, device=args.device)
        chat = chat_of(recipe, loaded)
        train, tune = split(name, recipe, args.tune_pool)
        run_eval = lambda patch, cond: evaluate(loaded.model, loaded.tokenizer, recipe.instruction, tune,  # noqa: E731
                                                [CHAT_TEMPLATE], patch, conditions=(cond,),
                                                max_new_tokens=recipe.max_new_tokens, chat=chat)[0]
        prompted = run_eval(None, "prompt")
        ref = prompted_reference(loaded.model, loaded.tokenizer, recipe.instruction, tune, CHAT_TEMPLATE, prompted,
                                 family=loaded.fam, chat=chat)
        labelled = labels(recipe.model_copy(update={"inputs": train, "examples": ()}), loaded, chat, args.labels, name)
        texts = patch_texts(labelled, chat)
        for variant in variants:
            over, positions = parse_variant(variant, recipe.turns_weight)
            weights = None if positions.uniform else chat.token_weights(labelled.examples, texts, positions)
            t0 = time.perf_counter()
            res = compute_patch(loaded.model, loaded.tokenizer, chat.system, texts,
                                engine_config(labelled, fidelity=False, **over), plain=chat.plain, weights=weights)
            seconds = time.perf_counter() - t0
            patched = run_eval(res.patch, "patched")
            row = {"recipe": name, "train": len(texts), "tune": len(tune), "variant": variant.strip(),
                   "prompt": score(recipe, prompted.answers, tune), "patched": score(recipe, patched.answers, tune),
                   "first16": first_tokens_agreement(patched.answer_ids, prompted.answer_ids),
                   "kl": answer_kl(loaded.model, ref, res.patch, family=loaded.fam), "compute_s": seconds}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    for r in rows:  # a run from before --variants swept ρ alone
        r.setdefault("variant", f"rho={r.get('rho')}")
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["Held-out score on tuning questions (not reported elsewhere) by variant; chat recipes on "
             "SmolLM2-135M-Instruct. Each cell: score / same first 16 tokens as the prompted model / KL to it "
             "(nats per token of its answers).",
             "", "| recipe | train | tune | prompt | " + " | ".join(variants) + " |",
             "|---|---|---|---|" + "---|" * len(variants)]
    for name in dict.fromkeys(r["recipe"] for r in rows):
        mine = {r["variant"]: r for r in rows if r["recipe"] == name}
        first = next(iter(mine.values()))
        cell = lambda r: (f"{r['patched']:.3f}" + (f" / {r['first16']:.2f} / {r['kl']:.3f}" if "kl" in r else ""))  # noqa: E731
        lines.append(f"| {name} | {first['train']} | {first['tune']} | {first['prompt']:.3f} | "
                     + " | ".join(cell(mine[v]) if v in mine else "" for v in variants) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["french", "pirate", "facts"], choices=["french", "pirate", "facts"])
    ap.add_argument("--rho", default="0.01,0.03,0.1,0.3", help="the ρ sweep (without --variants)")
    ap.add_argument("--variants", default=None, help="settings per patch, ';'-separated (see the module doc)")
    ap.add_argument("--tune-pool", action="store_true", help="also tune on the pool's unused messages (french, pirate)")
    ap.add_argument("--labels", default=None, help="keep the prompted model's labels in this folder and reuse them")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "results" / "chat_sweep"))
    ap.add_argument("--markdown-from", nargs="+", default=None, metavar="JSON",
                    help="no run: the rows of these earlier runs' JSON files, together, written to --out")
    args = ap.parse_args()
    rows = [r for f in args.markdown_from for r in json.loads(Path(f).read_text())] if args.markdown_from else run(args)
    Path(args.out + ".json").write_text(json.dumps(rows, indent=2) + "\n")
    md = markdown(rows)
    Path(args.out + ".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
