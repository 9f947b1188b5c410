"""The whole benchmark suite in one command: one table on stdout, every number in --json.

    python benchmarks/bench_suite.py [--model gemma-3-270m] [--recipe recipes/translate-en-fr.yaml]
        [--device auto] [--json results/bench.json] [--quick] [--tiny] [--skip-engine]

1+4. cost of compute and scaling in examples: bench_engine.py in a subprocess (same flags), merged.
2.   the patch: one cold compute_patch and its held-out accuracy (patched / prompt / base).  The
     comparison with a tuned LoRA and a steering vector is benchmarks/bench_baselines.py.
3.   inference throughput: greedy generation of exactly GEN_TOKENS new tokens for every eval query
     in one batch: merged patch without prompt (a), base with prompt (b), base without (c); median
     of 3 interleaved repeats.
5.   model loading: first GGUF conversion vs cached load, in a fresh TRANSMUTE_CACHE (not --tiny).
--tiny: tests/tiny.py's random gemma3 and a built-in tiny recipe (a smoke run, numbers meaningless).
Transmute's compute is one cold call, as a user runs it.  Table: stdout; progress: stderr.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine as be
from bench_engine import ROOT, log, sync

from transmute_cli.artifacts import checkpoint

from transmute_cli.model import loading as models
from transmute_cli.model.sources import ALIASES

from transmute_cli import pipeline
from transmute_cli.evaluation.generate import correct_answers, evaluate, generate_answers
from transmute_cli.model.families import family_for
from transmute_cli.artifacts.merge import merge, vector_fold_kind
from transmute_cli.recipe.datafiles import render
from transmute_cli.recipe.schema import load_recipe, parse_recipe
from transmute_cli.model.tokens import left_pad, pad_id, special_prefix, token_ids

GEN_TOKENS, REPEATS = 8, 3
_TINY = [("dog", "god"), ("cat", "tac"), ("sun", "nus"), ("map", "pam"), ("red", "der"), ("box", "xob"),
         ("fig", "gif"), ("jam", "maj")], [("pen", "nep"), ("cup", "puc"), ("hat", "tah"), ("log", "gol"),
                                           ("net", "ten"), ("owl", "lwo")]
TINY_RECIPE = "\n".join([
    "name: tiny-reverse", "instruction: " + json.dumps("Reverse the word:\nabc -> cba\n"),
    'template: "{input} -> {output}"', "examples: " + json.dumps([list(p) for p in _TINY[0]]),
    "eval: " + json.dumps([list(p) for p in _TINY[1]]), "rho: 1.0", "solver: joint",
    "components: [vector, matrix]", "max_new_tokens: 8", ""])


def timed_once(fn, model):
    sync(model)
    t0 = time.perf_counter()
    out = fn()
    sync(model)
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------- 1+4. engine


def run_engine(args, recipe_path: str, tmp: Path) -> tuple[dict, list[tuple]]:
    out = tmp / "engine.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_engine.py"), "--json", str(out), "--model", args.model,
           "--recipe", recipe_path, "--device", args.device] + ["--quick"] * args.quick + ["--tiny"] * args.tiny
    log("engine benchmark (subprocess): " + " ".join(cmd[1:]))
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    lines = [l for l in res.stdout.splitlines() if l.strip() and not l.startswith("#")][2:]  # header, dashes
    rows = []
    for line in lines:  # the engine's own table: columns are separated by two spaces or more
        name, value, target, met = (re.split(r"\s{2,}", line.strip()) + ["", "", ""])[:4]
        rows.append((f"engine: {name}", value, target, met.lower() or "info"))
    return json.loads(out.read_text()), rows


# --------------------------------------------------------------------------- 2. the patch


def patch_section(model, tok, recipe) -> tuple[dict, object]:
    """The patch the throughput section merges: one cold compute_patch, and its held-out accuracy.
    (The comparison with fine-tuning and steering is benchmarks/bench_baselines.py: a LoRA tuned
    over learning rates on a validation split, on several tasks.)"""
    out = {}
    from transmute_cli.model.loading import fingerprint

    loaded = pipeline.Loaded(model, tok, family_for(model), None, fingerprint(model), "float32")
    log(f"compute_patch on {len(pipeline.patch_texts(recipe))} texts")
    out["transmute_s"], res = timed_once(lambda: pipeline.fit(recipe, loaded), model)
    out["transmute_engine_timings"] = res.timings
    log("evaluating patched / prompted / base accuracy")
    accs = {r.condition: r.accuracy for r in evaluate(
        model, tok, recipe.instruction, recipe.eval, [recipe.template], res.patch,
        conditions=("patched", "prompt", "base"), max_new_tokens=recipe.max_new_tokens)}
    out.update(patched_accuracy=accs["patched"], prompt_accuracy=accs["prompt"], base_accuracy=accs["base"])
    return out, res.patch


# --------------------------------------------------------------------------- 3. throughput


def generate_fixed(model, tok, prompts, n: int) -> int:
    """Greedy, exactly n new tokens per row (no newline/EOS stop), one left-padded batch; returns tokens made."""
    ids, mask = left_pad(tok, prompts)
    width, dev = ids.shape[1], next(model.parameters()).device
    with torch.no_grad():
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, top_p=None, top_k=None, temperature=None, pad_token_id=pad_id(tok))
    return (gen.shape[1] - width) * len(prompts)


def throughput_section(model, tok, recipe, patch) -> dict:
    ids, pre, fam = functools.partial(token_ids, tok), special_prefix(tok), family_for(model)
    queries = [pre + ids(render(recipe.template, p.input)) for p in recipe.eval]
    prompted = [pre + ids(recipe.instruction) + q[len(pre):] for q in queries]
    loaded = pipeline.Loaded(model, tok, fam, None, "", "float32")
    texts = pipeline.patch_texts(recipe)
    log("fold statistics for the merged patch")
    stats = checkpoint.vector_fold_stats(loaded, patch, texts)
    out: dict = {"gen_tokens": GEN_TOKENS, "batch": len(queries), "repeats": REPEATS,
                 "vector_fold": vector_fold_kind(model, fam) if patch.vectors else "none"}
    times: dict[str, list[float]] = {"merged": [], "prompt": [], "base": []}
    for r in range(REPEATS + 1):  # round 0 is a warm-up
        for cond, got_s in times.items():
            info = merge(model, fam, patch, 1.0, stats) if cond == "merged" else None
            try:
                if cond == "merged" and r == 0:
                    got = generate_answers(model, tok, queries, recipe.max_new_tokens)
                    out["merged_accuracy"] = correct_answers(got, recipe.eval) / len(got)
                ps = prompted if cond == "prompt" else queries
                dt, n = timed_once(lambda ps=ps: generate_fixed(model, tok, ps, GEN_TOKENS), model)
            finally:
                if info is not None:
                    info["undo"]()
            if r:
                got_s.append(n / dt)
        log(f"throughput round {r}{' (warm-up)' if r == 0 else ''}")
    for cond, v in times.items():
        out[f"{cond}_tok_s"], out[f"{cond}_tok_s_all"] = statistics.median(v), v
    out["ratio_merged_prompt"] = out["merged_tok_s"] / out["prompt_tok_s"]
    out["ratio_merged_base"] = out["merged_tok_s"] / out["base_tok_s"]
    out["prompt_tokens"] = len(prompted[0]) - len(queries[0])
    return out


# --------------------------------------------------------------------------- 5. loading


def loading_section(args) -> dict:
    if args.tiny:
        return {"skipped": "no GGUF for the tiny model"}
    if args.model not in ALIASES and not args.model.lower().endswith(".gguf"):
        return {"skipped": f"{args.model} is not a GGUF model"}
    old = os.environ.get("TRANSMUTE_CACHE")
    out = {}
    try:
        with tempfile.TemporaryDirectory(prefix="transmute-cache-") as d:
            os.environ["TRANSMUTE_CACHE"] = d
            for key in ("first_load_s", "cached_load_s"):
                log(f"model loading: {key} (cache {d})")
                t0 = time.perf_counter()
                m = models.load(args.model, device=args.device)[0]
                sync(m)
                out[key] = time.perf_counter() - t0
                del m
                gc.collect()
    finally:
        os.environ.pop("TRANSMUTE_CACHE") if old is None else os.environ.__setitem__("TRANSMUTE_CACHE", old)
    out["ratio_first_cached"] = out["first_load_s"] / out["cached_load_s"]
    return out


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "translate-en-fr.yaml"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="engine sizes 10/30/100")
    ap.add_argument("--tiny", action="store_true", help="tiny random gemma3 and a built-in tiny recipe (smoke run)")
    ap.add_argument("--skip-engine", action="store_true", help="leave out bench_engine.py (sections 1 and 4)")
    args = ap.parse_args(argv)
    res: dict = {}
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmpd:
        tmp = Path(tmpd)
        recipe_path = args.recipe
        if args.tiny:
            recipe_path = str(tmp / "tiny-reverse.yaml")
            Path(recipe_path).write_text(TINY_RECIPE)
        recipe = parse_recipe(TINY_RECIPE, source="<tiny recipe>") if args.tiny else load_recipe(recipe_path)
        if not recipe.eval:
            raise SystemExit(f"{recipe_path}: the suite needs eval pairs")
        if not args.skip_engine:  # first, while this process holds no model
            res["engine"], engine_rows = run_engine(args, recipe_path, tmp)
            rows += engine_rows

    model, tok = be.load_model(args)
    info = be.machine_info(model)
    log(f"{'tiny gemma3' if args.tiny else args.model} on {info['device']} ({info['device_name']}), "
        f"{info['torch_threads']} threads; recipe {recipe.name}: {len(recipe.examples)} examples, {len(recipe.eval)} eval")
    res["patch"], patch = patch_section(model, tok, recipe)
    res["throughput"] = throughput_section(model, tok, recipe, patch)
    del model, patch
    gc.collect()
    res["loading"] = loading_section(args)

    L, T, ld = res["patch"], res["throughput"], res["loading"]
    yes = lambda ok: "yes" if ok else "no"
    rows += [
        ("patch: compute_patch (cold)", f"{L['transmute_s']:.2f} s", "", "info"),
        ("patch: accuracy patched / prompt / base",
         f"{L['patched_accuracy']:.3f} / {L['prompt_accuracy']:.3f} / {L['base_accuracy']:.3f}", "", "info"),
        ("infer: merged patch, no prompt (a)", f"{T['merged_tok_s']:.1f} tok/s", "", "info"),
        ("infer: base + prompt (b)", f"{T['prompt_tok_s']:.1f} tok/s", "", "info"),
        ("infer: base, no prompt (c)", f"{T['base_tok_s']:.1f} tok/s", "", "info"),
        ("infer: merged accuracy", f"{T['merged_accuracy']:.3f} ({T['vector_fold']})", "", "info"),
        ("infer: (a) / (b)", f"{T['ratio_merged_prompt']:.2f}x", ">= 1.5", yes(T["ratio_merged_prompt"] >= 1.5)),
        ("infer: (a) / (c)", f"{T['ratio_merged_base']:.2f}x", ">= 0.95", yes(T["ratio_merged_base"] >= 0.95)),
    ]
    if "skipped" in ld:
        rows.append(("load: GGUF first / cached", f"skipped: {ld['skipped']}", "", "info"))
    else:
        rows += [("load: first (GGUF conversion)", f"{ld['first_load_s']:.1f} s", "", "info"),
                 ("load: cached", f"{ld['cached_load_s']:.1f} s", "", "info"),
                 ("load: first / cached", f"{ld['ratio_first_cached']:.1f}x", "", "info")]
    head = ("name", "value", "target", "met")
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(4)]
    print(f"# {info['command']}\n# {info['device_name']} | {info['device']} | torch {info['torch']} | "
          f"{info['torch_threads']} threads | {info['date']}\n# model {'tiny-gemma3' if args.tiny else args.model} | "
          f"recipe {recipe.name}: {len(recipe.examples)} examples, {len(recipe.eval)} eval")
    for r in [head, tuple("-" * x for x in w), *rows]:
        print("  ".join(str(c).ljust(x) for c, x in zip(r, w)).rstrip())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": info, "model": "tiny-gemma3" if args.tiny else args.model,
            "recipe": "<tiny recipe>" if args.tiny else str(args.recipe), "quick": args.quick, "results": res,
            "table": [dict(zip(head, r)) for r in rows]}, indent=2, default=str))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
