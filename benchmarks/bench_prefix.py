"""The instruction's cost paid once: compute time against instruction length, side by side.

    python benchmarks/bench_prefix.py [--model gemma-3-270m] [--recipe examples/tasks/past-tense.yaml]
        [--lengths 10,100,300,1000] [--repeats 3] [--device auto] [--json results/prefix.json] [--tiny]

For each instruction length (tokens, the recipe's instruction first, then its own demonstrations
and further lines of filler text repeated up to the length), the patching loop runs on the
recipe's examples two ways, alternating, ``repeats`` times each (median reported):

* **cached**: the default — the instruction's keys and values are computed once per layer
  (one prefill) and every example's tokens attend to them (``EngineConfig.prefix_cache``);
* **rerun**: the instruction is run again beside every example at every layer (the loop before).

End-to-end fidelity is off in both (it runs full prompted sequences once and is the same in both;
it is not the loop).  The JSON also holds the largest relative difference between the two
patches at each length (the same maths: float32 rounding only).  Table: stdout; progress: stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import ROOT, config, load_model, log, sync, texts_for  # noqa: E402

from transmute_cli.engine.loop import compute_patch  # noqa: E402
from transmute_cli.engine.lowrank import dense  # noqa: E402
from transmute_cli.recipe.schema import load_recipe  # noqa: E402
from transmute_cli.model.tokens import token_ids  # noqa: E402

FILLER = ("The following lines show the task. Read them carefully, then answer in the same way, with one word "
          "and nothing else on the line.\n")


def instruction_of_length(tok, recipe, n: int) -> str:
    """The recipe's instruction, cut or extended with filler lines, to exactly ``n`` tokens when
    the tokenizer allows (the text is cut at a token boundary)."""
    text = recipe.instruction
    while len(token_ids(tok, text)) < n:
        text += FILLER
    ids = token_ids(tok, text)[:n]
    return tok.decode(ids)


def max_rel(a, b) -> float:
    worst = 0.0
    for store in ("matrices", "vectors", "downs"):
        x, y = getattr(a, store), getattr(b, store)
        for l in x:
            dx, dy = dense(x[l]).double(), dense(y[l]).double()
            worst = max(worst, float((dx - dy).abs().max() / dy.abs().max().clamp_min(1e-30)))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--recipe", default=str(ROOT / "examples" / "tasks" / "past-tense.yaml"))
    ap.add_argument("--lengths", default="10,100,300,1000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true", help="tests/tiny.py's random gemma3 (a smoke run)")
    args = ap.parse_args(argv)
    model, tok = load_model(args)
    recipe = load_recipe(args.recipe)
    texts = texts_for(recipe)
    x_tokens = sum(len(token_ids(tok, t)) for t in texts)
    rows = []
    for n in [int(v) for v in args.lengths.split(",")]:
        instr = instruction_of_length(tok, recipe, n)
        got = len(token_ids(tok, instr))
        times: dict[str, list[float]] = {"cached": [], "rerun": []}
        patches = {}
        for r in range(args.repeats):
            for mode in ("cached", "rerun") if r % 2 == 0 else ("rerun", "cached"):
                cfg = config(recipe, prefix_cache=mode == "cached")
                sync(model)
                t0 = time.perf_counter()
                patches[mode] = compute_patch(model, tok, instr, texts, cfg).patch
                sync(model)
                times[mode].append(time.perf_counter() - t0)
                log(f"instruction {got} tokens, {mode}: {times[mode][-1]:.2f} s")
        med = {m: statistics.median(v) for m, v in times.items()}
        rows.append({"instruction_tokens": got, "cached_s": med["cached"], "rerun_s": med["rerun"],
                     "cached_runs_s": times["cached"], "rerun_runs_s": times["rerun"],
                     "rerun_over_cached": med["rerun"] / med["cached"],
                     "patch_max_rel_diff": max_rel(patches["cached"], patches["rerun"])})
    base = rows[0]
    print(f"# {len(texts)} examples, {x_tokens} example tokens; medians of {args.repeats} alternating runs; "
          f"{'tiny random gemma3' if args.tiny else args.model}, torch {torch.__version__}, "
          f"{next(model.parameters()).device}")
    print(f"{'instruction tokens':>18}  {'cached s':>9}  {'rerun s':>9}  {'rerun / cached':>14}  "
          f"{'cached / cached@' + str(base['instruction_tokens']):>18}  {'patch max rel diff':>18}")
    for r in rows:
        print(f"{r['instruction_tokens']:>18}  {r['cached_s']:>9.2f}  {r['rerun_s']:>9.2f}  {r['rerun_over_cached']:>14.2f}"
              f"  {r['cached_s'] / base['cached_s']:>18.2f}  {r['patch_max_rel_diff']:>18.1e}")
    if args.json:
        doc = {"command": "python benchmarks/bench_prefix.py " + " ".join(argv or sys.argv[1:]),
               "model": "tiny" if args.tiny else args.model, "recipe": args.recipe, "examples": len(texts),
               "example_tokens": x_tokens, "repeats": args.repeats, "torch": torch.__version__,
               "device": str(next(model.parameters()).device), "rows": rows}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
