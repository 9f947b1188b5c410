"""Greedy answers on the real model: ``transformers.generate`` (finished rows stay in the batch,
stopped at the newline by ``NewlineStop``) against transmute's decoder ``greedy_rows`` (a row
leaves the batch and the KV cache at its stop token; the prompt condition's instruction runs once,
its cache shared by the rows), side by side in one run.

    python benchmarks/bench_generate.py [--model gemma-3-270m] [--recipe recipes/translate-en-fr.yaml]
        [--patch RUN/patch.safetensors] [--templates examples/templates-words.txt] [--repeats 3]

For every template and condition (no prompt, prompt, patched when --patch is given) of the
recipe's eval queries: whether both give the same token ids, and the total wall time of each
(runs alternate; the median over repeats is printed), with the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transmute_cli.recipe.datafiles import load_templates, render  # noqa: E402
from transmute_cli.evaluation.generate import greedy_rows, reference_rows  # noqa: E402
from transmute_cli.engine.hooks import ThoughtHooks  # noqa: E402
from transmute_cli.model.loading import load_model  # noqa: E402
from transmute_cli.artifacts.patch import load_patch  # noqa: E402
from transmute_cli.recipe.schema import load_recipe  # noqa: E402
from transmute_cli.model.tokens import special_prefix, token_ids  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "translate-en-fr.yaml"))
    ap.add_argument("--patch", default=None)
    ap.add_argument("--templates", default=str(ROOT / "examples" / "templates-words.txt"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    recipe = load_recipe(args.recipe)
    loaded = load_model(args.model, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    patch = load_patch(args.patch) if args.patch else None
    pre, instr = special_prefix(tok), token_ids(tok, recipe.instruction)
    jobs = []
    for template in [recipe.template] + [t for t in load_templates(args.templates) if t != recipe.template]:
        queries = [token_ids(tok, render(template, p.input)) for p in recipe.eval]
        # (template, condition, shared prefix, rows): the prompt condition shares pre + instruction
        jobs += [(template, "base", [], [pre + q for q in queries]), (template, "prompt", pre + instr, queries)]
        if patch is not None:
            jobs.append((template, "patched", [], [pre + q for q in queries]))
    times = {"generate": [], "greedy_rows": []}
    same = rows = 0
    for repeat in range(args.repeats):
        total = {"generate": 0.0, "greedy_rows": 0.0}
        for template, cond, prefix, prompts in jobs:
            with ThoughtHooks(model, loaded.fam) as hooks:
                if cond == "patched":
                    hooks.set_patch(patch)
                order = ("generate", "greedy_rows") if repeat % 2 == 0 else ("greedy_rows", "generate")
                got = {}
                for name in order:
                    start = time.perf_counter()
                    if name == "generate":
                        got[name] = reference_rows(model, tok, [prefix + p for p in prompts], recipe.max_new_tokens)
                    else:
                        got[name] = greedy_rows(model, tok, prompts, recipe.max_new_tokens, prefix=prefix)
                    total[name] += time.perf_counter() - start
            if repeat == 0:
                same += sum(a == b for a, b in zip(got["generate"], got["greedy_rows"]))
                rows += len(prompts)
        for name in times:
            times[name].append(total[name])
    g, d = statistics.median(times["generate"]), statistics.median(times["greedy_rows"])
    print(f"{len(jobs)} generations of {len(recipe.eval)} rows ({args.model}, torch threads {torch.get_num_threads()})")
    print(f"same token ids: {same}/{rows} rows")
    print(f"generate: median {g:.1f} s (runs {', '.join(f'{t:.1f}' for t in times['generate'])})")
    print(f"greedy_rows: median {d:.1f} s (runs {', '.join(f'{t:.1f}' for t in times['greedy_rows'])})")
    print(f"generate / greedy_rows: {g / d:.2f}x")


if __name__ == "__main__":
    main()
