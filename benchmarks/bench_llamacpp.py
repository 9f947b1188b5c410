"""The payoff in llama.cpp, measured side by side in one process: the patched GGUF queried without
the prompt against the base GGUF with the prompt in context.

    python benchmarks/bench_llamacpp.py RUN [RUN ...] [--rounds 3] [--tokens 32] [--json out.json]

RUN is a run folder written by ``transmute compute RECIPE --gguf`` (its ``model.gguf``, its
recipe and base model).  For each of the recipe's eval queries (the first 20), each model is
reset (no KV cache kept between queries, as a server without prompt caching) and asked for
``--tokens`` greedy tokens; rounds alternate the two models.  Printed per run: time to first
token (the prompt's prefill and one step) and decoding tokens/s, medians over every query and
round, their ratios, the prompt lengths in tokens, and the file sizes.  llama.cpp threads: all
cores.  Absolute times are this machine's; the ratios are what the patch buys.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _time(llm, ids: list[int], tokens: int) -> tuple[float, float]:
    """(time to first token, decoding tokens/s after it) for a greedy continuation of ``ids``."""
    llm.reset()
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        n += 1
        if first is None:
            first = time.perf_counter()
        if n >= tokens:
            break
    end = time.perf_counter()
    return first - t0, (n - 1) / (end - first) if n > 1 and end > first else float("nan")


def bench_run(run: Path, rounds: int, tokens: int) -> dict:
    from transformers import AutoTokenizer

    from transmute_cli import llamacpp
    from transmute_cli.chat import chat_format
    from transmute_cli.evaluate import query_ids
    from transmute_cli.models import gguf_of, resolve
    from transmute_cli.pipeline import eval_queries
    from transmute_cli.recipe import parse_recipe

    patched = run / "model.gguf"
    if not patched.is_file():
        raise SystemExit(f"{run}: no model.gguf (run `transmute compute RECIPE --gguf`)")
    info = llamacpp.gguf_info(patched)
    recipe = parse_recipe(info["recipe"], default_name=info["recipe_name"] or run.name)
    src = resolve(info["base_model"])
    tok = AutoTokenizer.from_pretrained(src.path)
    chat = chat_format(tok, recipe.instruction, model=recipe.model) if recipe.chat else None
    instr, pre, queries = query_ids(tok, recipe.instruction, eval_queries(recipe)[:20], recipe.template, chat)
    with gguf_of(src) as base_path:
        base, patch = llamacpp.load(base_path), llamacpp.load(patched)
        rows = {"prompted": [], "patched": []}
        for _ in range(rounds):
            for q in queries:
                rows["prompted"].append(_time(base, instr + q, tokens))
                rows["patched"].append(_time(patch, pre + q, tokens))
        sizes = {"base_bytes": base_path.stat().st_size, "patched_bytes": patched.stat().st_size}
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in rows.items()}
    return {
        "run": str(run), "recipe": recipe.name, "chat": recipe.chat, "queries": len(queries), "rounds": rounds,
        "tokens": tokens, "prompt_tokens": len(instr) - len(pre),
        "query_tokens_median": statistics.median(len(q) for q in queries),
        "ttft_s": {"prompted": med["prompted"][0], "patched": med["patched"][0]},
        "decode_tokens_per_s": {"prompted": med["prompted"][1], "patched": med["patched"][1]},
        "ttft_ratio_prompted_over_patched": med["prompted"][0] / med["patched"][0],
        "decode_ratio_patched_over_prompted": med["patched"][1] / med["prompted"][1],
        **sizes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    docs = [bench_run(r, args.rounds, args.tokens) for r in args.runs]
    print(f"llama.cpp (llama-cpp-python), {os.cpu_count()} threads; medians over queries × {args.rounds} rounds")
    print("| recipe | prompt tokens | TTFT prompted | TTFT patched | prompted ÷ patched | decode tok/s prompted |"
          " decode tok/s patched | patched ÷ prompted | base GGUF | patched GGUF |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in docs:
        print(f"| {d['recipe']} | {d['prompt_tokens']} | {d['ttft_s']['prompted'] * 1000:.1f} ms | "
              f"{d['ttft_s']['patched'] * 1000:.1f} ms | {d['ttft_ratio_prompted_over_patched']:.2f}× | "
              f"{d['decode_tokens_per_s']['prompted']:.1f} | {d['decode_tokens_per_s']['patched']:.1f} | "
              f"{d['decode_ratio_patched_over_prompted']:.2f}× | {d['base_bytes'] / 1e6:.0f} MB | "
              f"{d['patched_bytes'] / 1e6:.0f} MB |")
    if args.json:
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "runs": docs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
