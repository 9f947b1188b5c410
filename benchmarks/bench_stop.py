"""Stopping at the newline: transmute's own criterion (decode each row's continuation at every
step) against transformers' ``stop_strings=["\\n"]``, on the real model, side by side in one run.

    python benchmarks/bench_stop.py [--model gemma-3-270m] [--recipe recipes/translate-en-fr.yaml] [--repeats 5]

Prints whether both give the same generated ids (after the cut at the first newline) for the
prompted and the unprompted eval queries, and the median wall time of each (alternating runs).
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

from transmute_cli.recipe.datafiles import render  # noqa: E402
from transmute_cli.evaluation.generate import NewlineStop, stop_cut  # noqa: E402
from transmute_cli.model.loading import load_model  # noqa: E402
from transmute_cli.recipe.schema import load_recipe  # noqa: E402
from transmute_cli.model.tokens import left_pad, special_prefix, token_ids  # noqa: E402


def batch(tok, prompts):
    ids, mask = left_pad(tok, prompts)
    return ids, mask, ids.shape[1]


_BUILT: dict = {}


def generate(model, tok, prompts, how: str, max_new_tokens: int):
    from transformers import StopStringCriteria, StoppingCriteriaList

    ids, mask, width = batch(tok, prompts)
    if how == "criterion":
        extra = {"stopping_criteria": StoppingCriteriaList([NewlineStop(tok, width)])}
    elif how == "strings":
        extra = {"stop_strings": ["\n"], "tokenizer": tok}
    else:  # transformers' StopStringCriteria, its token tables built once and reused
        if "c" not in _BUILT:
            _BUILT["c"] = StopStringCriteria(tok, ["\n"])
        extra = {"stopping_criteria": StoppingCriteriaList([_BUILT["c"]])}
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             top_p=None, top_k=None, temperature=None, pad_token_id=tok.pad_token_id, **extra)
    return [stop_cut(tok, row.tolist()) for row in gen[:, width:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "translate-en-fr.yaml"))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    loaded = load_model(args.model, device="cpu")
    model, tok, r = loaded.model, loaded.tokenizer, load_recipe(args.recipe)
    pre = special_prefix(tok)
    query = [token_ids(tok, render(r.template, p.input)) for p in r.eval]
    sets = {"prompt": [pre + token_ids(tok, r.instruction) + q for q in query], "no prompt": [pre + q for q in query]}
    for name, prompts in sets.items():
        ref = generate(model, tok, prompts, "criterion", r.max_new_tokens)
        same = all(generate(model, tok, prompts, how, r.max_new_tokens) == ref for how in ("strings", "built"))
        times = {"criterion": [], "strings": [], "built": []}
        for _ in range(args.repeats):
            for how in times:
                t0 = time.perf_counter()
                generate(model, tok, prompts, how, r.max_new_tokens)
                times[how].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name}: {len(prompts)} queries, same ids: {same}; median s: criterion {med['criterion']:.2f}, "
              f"stop_strings {med['strings']:.2f} ({med['strings'] / med['criterion']:.2f}x), "
              f"StopStringCriteria built once {med['built']:.2f} ({med['built'] / med['criterion']:.2f}x)")


if __name__ == "__main__":
    main()
