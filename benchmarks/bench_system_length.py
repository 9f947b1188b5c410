"""A system prompt's cost in `transmute compute`, against its length.

    python benchmarks/bench_system_length.py [--recipe recipes/chat-concierge.yaml] [--inputs 40]
        [--json results/system-length.json]

The recipe's system prompt is cut after its 1st, 2nd, ... paragraph (blank-line separated;
the last cut is the whole prompt) and each cut is baked from the same ``--inputs`` user messages
(the recipe's own, else the shipped pool's first ones): labelled by the prompted model, then the
patching loop; no eval, no checkpoint, no in-sample fidelity (they do not depend on the prompt's
length, or are measured elsewhere).  Printed per cut: the system prompt's tokens, labelling
seconds, loop seconds, total.  Runs one after another in one process (the model loaded once);
CPU timings are this machine's, the growth with length is what to read.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transmute_cli import pipeline  # noqa: E402
from transmute_cli.recipe.chat import chat_format  # noqa: E402
from transmute_cli.recipe import chat_pool, load_recipe, parse_recipe, recipe_yaml  # noqa: E402
from transmute_cli.model.tokens import token_ids  # noqa: E402


def cuts(instruction: str) -> list[str]:
    """The instruction cut after each of its paragraphs (the last cut: all of it)."""
    paras = instruction.split("\n\n")
    return ["\n\n".join(paras[: i + 1]) for i in range(len(paras))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "chat-concierge.yaml")
    ap.add_argument("--inputs", type=int, default=40)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    base = load_recipe(args.recipe)
    if not base.chat:
        raise SystemExit(f"{args.recipe}: not a chat recipe")
    inputs = list(base.inputs or chat_pool())[: args.inputs]
    loaded = pipeline.load_model(base.model, device="cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, system in enumerate(cuts(base.instruction)):
            recipe = parse_recipe(recipe_yaml({"model": base.model, "chat": True, "instruction": system,
                                               "inputs": inputs}), source=f"cut {i + 1}")
            tokens = len(token_ids(loaded.tokenizer, chat_format(loaded.tokenizer, system, model=base.model).system))
            t0 = time.perf_counter()
            rep = pipeline.compute(recipe, Path(tmp) / str(i), loaded=loaded, checkpoint=False, evaluate_patch=False,
                                   fidelity=False)
            total = time.perf_counter() - t0
            t = rep["timings"]
            rows.append({"paragraphs": i + 1, "system_tokens": tokens, "label_s": t.get("label_s", 0.0),
                         "loop_s": t["compute_s"], "total_s": total, "inputs": len(inputs)})
            print(f"cut {i + 1}: {tokens} tokens, label {rows[-1]['label_s']:.1f} s, loop {t['compute_s']:.1f} s, "
                  f"total {total:.1f} s", file=sys.stderr, flush=True)
    print(f"| system prompt tokens | labelling s | patching loop s | total s ({len(inputs)} user messages) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['system_tokens']} | {r['label_s']:.1f} | {r['loop_s']:.1f} | {r['total_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"recipe": str(args.recipe), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
