"""The shipped chat recipes (recipes/chat-*.yaml): what the patch keeps of the system prompt on
held-out questions, and what it does to other chats.

    python examples/chat_suite.py [--recipes french pirate ...] [--neutral recipes/chat/neutral-chats.txt]
        [--turns-weight W] -> results/chat.{json,md}

Per recipe, one ``transmute compute`` (the product's own path, no checkpoint) on
SmolLM2-135M-Instruct, then:

- **held-out score** (the recipe's questions it was not fitted to): the recipe's
  ``answer_format`` pass rate, or its accuracy (the answer contains the reference) — with no
  system prompt, with it, and patched without it; the target is patched >= 0.9 x prompted;
- **held-out fidelity**: the patched model's first 16 answer tokens identical to the prompted
  model's, and KL(prompted || patched) on the prompted answers;
- **other chats** (``--neutral``: open-ended requests unlike the recipe's questions, no system
  prompt): how far the patched model moves from the original — first 16 answer tokens identical
  and KL(original || patched) on the original's answers — beside how far the system prompt itself
  moves it (the same two figures for the prompted model), and the format pass rate of each.

One model load; progress on stderr; the table on stdout and in the .md, every number in the .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transmute_cli.recipe.datafiles import Pair, load_inputs  # noqa: E402
import torch  # noqa: E402

from transmute_cli.evaluation.generate import CHAT_TEMPLATE, evaluate, query_ids  # noqa: E402

from transmute_cli.evaluation.heldout import answer_logits, first_tokens_agreement  # noqa: E402
from transmute_cli.engine.fidelity import compare_logits  # noqa: E402
from transmute_cli.recipe.formats import passes  # noqa: E402
from transmute_cli.engine.hooks import ThoughtHooks  # noqa: E402
from transmute_cli.artifacts.patch import load_patch  # noqa: E402
from transmute_cli.pipeline import chat_of, compute  # noqa: E402
from transmute_cli.model.loading import load_model  # noqa: E402
from transmute_cli.recipe.schema import load_recipe  # noqa: E402

RECIPES = ("short", "french", "pirate", "facts")
TARGET = 0.9
# served as users serve a model: their own system prompt in front of the baked one
OTHER_SYSTEM = "You are a helpful assistant. Answer the user's questions."


def served_with_another_system_prompt(loaded, recipe, patch) -> dict:
    """The held-out queries under OTHER_SYSTEM (the user's own system prompt), on the original
    model and on the patched one: does the baked behaviour hold beside another system prompt?
    The held-out score as the report gives it (answer_format pass rate, else accuracy)."""
    from transmute_cli.recipe.chat import chat_format
    from transmute_cli.pipeline import eval_json, eval_queries

    model, tok = loaded.model, loaded.tokenizer
    chat = chat_format(tok, OTHER_SYSTEM, model=recipe.model)
    pairs = eval_queries(recipe)
    out, results = {"system": OTHER_SYSTEM}, []
    for cond in ("base", "patched"):
        with ThoughtHooks(model, loaded.fam) as hooks:
            if cond == "patched":
                hooks.set_patch(patch)
            else:
                hooks.enabled = False
            (res,) = evaluate(model, tok, OTHER_SYSTEM, pairs, [CHAT_TEMPLATE], conditions=("prompt",),
                              max_new_tokens=recipe.max_new_tokens, chat=chat)
        res.condition = cond
        results.append(res)
        out[f"{cond}_answers"] = res.answers
    out.update(held_score(eval_json(recipe, results))[1])
    return out


def held_score(ev: dict) -> tuple[str, dict[str, float]]:
    """What a chat recipe is scored by (report.json's ``eval``): the answer_format pass rate, else
    the accuracy on the eval pairs; (its name, {condition: score})."""
    if ev.get("format"):
        return "format: " + ev["format"]["spec"], {r["condition"]: r["rate"] for r in ev["format"]["results"]}
    return "accuracy (answer contains the fact)", {r["condition"]: r["accuracy"] for r in ev["results"]}


def other_chats(loaded, recipe, patch, questions: list[str]) -> dict:
    """The neutral chats without a system prompt: the patched and the prompted model against the
    original (first tokens identical, KL on the original's answers), and format pass rates."""
    chat = chat_of(recipe, loaded)
    model, tok = loaded.model, loaded.tokenizer
    pairs = [Pair(q, "") for q in questions]
    res = {r.condition: r for r in evaluate(model, tok, recipe.instruction, pairs, [CHAT_TEMPLATE], patch,
                                            max_new_tokens=recipe.max_new_tokens, chat=chat)}
    base = res["base"]
    system, plain, queries = query_ids(tok, recipe.instruction, pairs, CHAT_TEMPLATE, chat)
    keep = [i for i, a in enumerate(base.answer_ids) if a]
    lengths = [len(base.answer_ids[i]) for i in keep]

    def logits(prefix: list[int]) -> list[torch.Tensor]:  # on the original model's answers
        seqs = [prefix + queries[i] + base.answer_ids[i] for i in keep]
        return answer_logits(model, loaded.fam, seqs, [len(prefix + queries[i]) for i in keep], lengths)

    ref, prompted = logits(plain), logits(system)
    with ThoughtHooks(model, loaded.fam) as hooks:
        hooks.set_patch(patch)
        patched = logits(plain)
    tokens = max(sum(lengths), 1)
    out = {
        "n": len(pairs),
        "patched_same_first_tokens": first_tokens_agreement(res["patched"].answer_ids, base.answer_ids),
        "prompt_same_first_tokens": first_tokens_agreement(res["prompt"].answer_ids, base.answer_ids),
        "patched_kl": sum(compare_logits(r, p)[0] for r, p in zip(ref, patched)) / tokens,
        "prompt_kl": sum(compare_logits(r, p)[0] for r, p in zip(ref, prompted)) / tokens,
        "answers": {c: r.answers for c, r in res.items()},
    }
    if recipe.answer_format:
        out["format"] = {c: sum(passes(recipe.answer_format, a) for a in r.answers) / len(pairs) for c, r in res.items()}
    return out


def one(loaded, label: str, recipe, neutral: list[str], out: Path) -> dict:
    rep = compute(recipe, out, loaded=loaded, checkpoint=False)
    held = rep["fidelity"]["heldout"]
    score, by = held_score(rep["eval"])
    patch = load_patch(out / "patch.safetensors")
    side = other_chats(loaded, recipe, patch, neutral)
    served = served_with_another_system_prompt(loaded, recipe, patch)
    row = {
        "recipe": label, "score": score, "heldout": held["queries"], "rho": recipe.rho,
        "turns_weight": recipe.turns_weight,
        "no_prompt": by["base"], "prompt": by["prompt"], "patched": by["patched"],
        "ratio": by["patched"] / by["prompt"] if by["prompt"] else None,
        "same_first_tokens": held["first_tokens_agreement"], "base_same_first_tokens": held["base_first_tokens_agreement"],
        "kl": held["mean_kl"], "base_kl": held["base_mean_kl"], "in_sample_top1": rep["fidelity"]["top1_agreement"],
        "compute_s": rep["timings"]["compute_s"], "label_s": rep["timings"].get("label_s"), "examples": rep["examples"],
        "preserve_texts": len(recipe.preserve), "other_chats": side, "served": served,
        "labels_open": rep.get("labels_open"), "labels_left_out": rep.get("labels_left_out"),
    }
    print(f"{label:8s} {score}: no prompt {row['no_prompt']:.2f} prompt {row['prompt']:.2f} patched "
          f"{row['patched']:.2f}; other chats: patched KL {side['patched_kl']:.3f} vs prompt KL "
          f"{side['prompt_kl']:.3f} ({row['compute_s']:.1f} s)", file=sys.stderr, flush=True)
    return row


def run(args) -> dict:
    neutral = load_inputs(Path(args.neutral), source=None, field="--neutral")
    loaded = None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            recipe = load_recipe(ROOT / "recipes" / f"chat-{name}.yaml")
            if args.turns_weight is not None:  # as if the recipe said turns_weight: W
                recipe = recipe.model_copy(update={"turns_weight": args.turns_weight})
            loaded = loaded or load_model(recipe.model, device=args.device)
            # a recipe with preservation texts is measured without them too: what they buy
            variants = [(name, recipe)] + ([(f"{name} without preserve", recipe.model_copy(update={"preserve": ()}))]
                                           if recipe.preserve else [])
            for label, variant in variants:
                rows.append(one(loaded, label, variant, neutral, Path(tmp) / label.replace(" ", "-")))
    return {"model": rows and loaded.source.spec, "neutral": args.neutral, "target": TARGET, "rows": rows}


def markdown(doc: dict) -> str:
    lines = [
        f"Chat recipes on `{doc['model']}`: held-out questions (no system prompt / with it / patched without it), "
        f"held-out fidelity against the prompted model, and {doc['rows'][0]['other_chats']['n']} other chats "
        f"(`{doc['neutral']}`, no system prompt) against the original model.", "",
        "| recipe | held-out score | n | no prompt | prompt | patched | patched ÷ prompt | same first 16 tokens "
        "(unpatched) | KL nats/token (unpatched) | other chats: same first 16 tokens, patched / prompt | other chats: "
        "KL vs original, patched / prompt | compute s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        o = r["other_chats"]
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(
            f"| {r['recipe']} | {r['score']} | {r['heldout']} | {r['no_prompt']:.3f} | {r['prompt']:.3f} | "
            f"{r['patched']:.3f} | {ratio} | {r['same_first_tokens']:.3f} ({r['base_same_first_tokens']:.3f}) | "
            f"{r['kl']:.3f} ({r['base_kl']:.3f}) | {o['patched_same_first_tokens']:.3f} / "
            f"{o['prompt_same_first_tokens']:.3f} | {o['patched_kl']:.3f} / {o['prompt_kl']:.3f} | {r['compute_s']:.1f} |")
    fmt = [r for r in doc["rows"] if "format" in r["other_chats"]]
    if fmt:
        lines += ["", "Format pass rate on the other chats (the behaviour carried to requests unlike the training "
                  "questions):", "", "| recipe | no prompt | prompt | patched |", "|---|---|---|---|"]
        for r in fmt:
            f = r["other_chats"]["format"]
            lines.append(f"| {r['recipe']} | {f['base']:.3f} | {f['prompt']:.3f} | {f['patched']:.3f} |")
    served = [r for r in doc["rows"] if r.get("served")]
    if served:
        lines += ["", f"Served with the user's own system prompt (\"{OTHER_SYSTEM}\") in front, on the held-out "
                  "questions: the original model / the patched one, beside the baked prompt's own score:", "",
                  "| recipe | original + user's prompt | patched + user's prompt | patched, no system prompt | "
                  "baked prompt in context |", "|---|---|---|---|---|"]
        for r in served:
            s = r["served"]
            lines.append(f"| {r['recipe']} | {s['base']:.3f} | {s['patched']:.3f} | {r['patched']:.3f} | "
                         f"{r['prompt']:.3f} |")
    shipped = [r for r in doc["rows"] if " without " not in r["recipe"]]  # the recipes as shipped
    met = [r["recipe"] for r in shipped if r["ratio"] is not None and r["ratio"] >= doc["target"]]
    lines += ["", f"Target patched >= {doc['target']} x prompted on the held-out score, recipes as shipped: met on "
              f"{len(met)} of {len(shipped)} ({', '.join(met) or 'none'})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    ap.add_argument("--neutral", default=str(ROOT / "recipes" / "chat" / "neutral-chats.txt"))
    ap.add_argument("--turns-weight", type=float, default=None,
                    help="every recipe as if it said turns_weight: W (default: the recipes' own)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "results" / "chat"))
    args = ap.parse_args()
    doc = run(args)
    doc["neutral"] = str(Path(args.neutral).resolve().relative_to(ROOT)) if Path(args.neutral).resolve().is_relative_to(
        ROOT) else args.neutral
    Path(args.out + ".json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    md = markdown(doc)
    Path(args.out + ".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
