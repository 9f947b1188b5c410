"""The payoff, measured side by side in one process: the patched model queried without the prompt
against the base model with the prompt in context, in llama.cpp (default) or in transformers.

    python benchmarks/bench_llamacpp.py RUN [RUN ...] [--rounds 3] [--tokens 32] [--json out.json]
        [--backend llama.cpp|transformers]

RUN is a run folder written by ``transmute compute RECIPE --gguf`` (its ``model.gguf``, its
recipe and base model); with ``--backend transformers``, by ``transmute compute RECIPE`` (its
``checkpoint/`` against the base model, both float32, batch 1, the KV cache of the prompt built
per query).  For each of the recipe's eval queries (the first 20), each model is
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


def _time_hf(model, ids: list[int], tokens: int) -> tuple[float, float]:
    """``_time`` for a transformers model: prefill, then greedy steps on its KV cache."""
    import torch
    from transformers import DynamicCache

    from transmute_cli.engine.hooks import cache_kwargs

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)  # filled in place, passed under the name this transformers takes
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), **cache_kwargs(model, cache))
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        first = time.perf_counter()
        for _ in range(tokens - 1):
            out = model(nxt, **cache_kwargs(model, cache))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        end = time.perf_counter()
    return first - t0, (tokens - 1) / (end - first) if tokens > 1 else float("nan")


def _queries(tok, recipe):
    """(ids before a query with the prompt, without it, the first 20 eval queries' ids)."""
    from transmute_cli.recipe.chat import chat_format
    from transmute_cli.evaluation.generate import query_ids
    from transmute_cli.pipeline import eval_queries

    chat = chat_format(tok, recipe.instruction, model=recipe.model) if recipe.chat else None
    return query_ids(tok, recipe.instruction, eval_queries(recipe)[:20], recipe.template, chat)


def _alternate(timer, base, patch, instr, pre, queries, rounds: int, tokens: int) -> dict:
    """Every query through the base model with the prompt and the patched one without it,
    alternating, ``rounds`` times: {"prompted": [...], "patched": [...]} of ``timer``'s pairs."""
    rows = {"prompted": [], "patched": []}
    for _ in range(rounds):
        for q in queries:
            rows["prompted"].append(timer(base, instr + q, tokens))
            rows["patched"].append(timer(patch, pre + q, tokens))
    return rows


def kv_bytes(config, tokens: int, bytes_per_value: int = 4) -> int:
    """Bytes of KV cache ``tokens`` positions take in every layer (keys and values)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * tokens * bytes_per_value


def bench_run_hf(run: Path, rounds: int, tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transmute_cli.model.loading import resolve
    from transmute_cli.recipe.schema import parse_recipe

    ck = run / "checkpoint"
    if not (ck / "config.json").is_file():
        raise SystemExit(f"{run}: no checkpoint/ (run `transmute compute RECIPE`)")
    info = json.loads((ck / "transmute.json").read_text())  # the recipe and base model the checkpoint records
    recipe = parse_recipe(info["recipe"], default_name=info.get("recipe_name") or run.name)
    src = resolve(info["base_model"])
    instr, pre, queries = _queries(AutoTokenizer.from_pretrained(ck), recipe)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32).eval()
    patch = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    _time_hf(base, instr + queries[0], 2), _time_hf(patch, pre + queries[0], 2)  # warm-up
    rows = _alternate(_time_hf, base, patch, instr, pre, queries, rounds, tokens)
    return _summary(run, recipe, queries, rounds, tokens, instr, pre, rows, backend="transformers",
                    kv_bytes_saved_per_request=kv_bytes(base.config, len(instr) - len(pre)),
                    threads=torch.get_num_threads())


def _summary(run, recipe, queries, rounds, tokens, instr, pre, rows, **extra) -> dict:
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in rows.items()}
    # a whole answer of `tokens` tokens: time to first token, then tokens - 1 decoding steps
    whole = {k: tokens / (m[0] + (tokens - 1) / m[1]) for k, m in med.items()}
    return {
        "run": str(run), "recipe": recipe.name, "chat": recipe.chat, "queries": len(queries), "rounds": rounds,
        "tokens": tokens, "prompt_tokens": len(instr) - len(pre),
        "query_tokens_median": statistics.median(len(q) for q in queries),
        "ttft_s": {"prompted": med["prompted"][0], "patched": med["patched"][0]},
        "decode_tokens_per_s": {"prompted": med["prompted"][1], "patched": med["patched"][1]},
        "answer_tokens_per_s": whole,
        "ttft_ratio_prompted_over_patched": med["prompted"][0] / med["patched"][0],
        "decode_ratio_patched_over_prompted": med["patched"][1] / med["prompted"][1],
        "answer_ratio_patched_over_prompted": whole["patched"] / whole["prompted"],
        **extra,
    }


def bench_run(run: Path, rounds: int, tokens: int) -> dict:
    from transformers import AutoTokenizer

    from transmute_cli.artifacts import llamacpp
    from transmute_cli.model.sources import gguf_of
    from transmute_cli.model.loading import resolve
    from transmute_cli.recipe.schema import parse_recipe

    patched = run / "model.gguf"
    if not patched.is_file():
        raise SystemExit(f"{run}: no model.gguf (run `transmute compute RECIPE --gguf`)")
    info = llamacpp.gguf_info(patched)
    recipe = parse_recipe(info["recipe"], default_name=info["recipe_name"] or run.name)
    src = resolve(info["base_model"])
    instr, pre, queries = _queries(AutoTokenizer.from_pretrained(src.path), recipe)
    with gguf_of(src) as base_path:
        base, patch = llamacpp.load(base_path), llamacpp.load(patched)
        rows = _alternate(_time, base, patch, instr, pre, queries, rounds, tokens)
        sizes = {"base_bytes": base_path.stat().st_size, "patched_bytes": patched.stat().st_size}
    return _summary(run, recipe, queries, rounds, tokens, instr, pre, rows, backend="llama.cpp", **sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--backend", choices=("llama.cpp", "transformers"), default="llama.cpp")
    args = ap.parse_args()
    hf = args.backend == "transformers"
    docs = [(bench_run_hf if hf else bench_run)(r, args.rounds, args.tokens) for r in args.runs]
    print(f"{'transformers, float32, batch 1' if hf else 'llama.cpp (llama-cpp-python)'}, {os.cpu_count()} cores; "
          f"medians over queries × {args.rounds} rounds; answers of {args.tokens} tokens")
    print("| recipe | prompt tokens | TTFT prompted | TTFT patched | prompted ÷ patched | decode tok/s prompted |"
          " decode tok/s patched | patched ÷ prompted | answer tok/s prompted | answer tok/s patched |"
          " patched ÷ prompted |" + (" KV cache saved per request |" if hf else " base GGUF | patched GGUF |"))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if hf else "---|---|"))
    for d in docs:
        tail = (f" {d['kv_bytes_saved_per_request'] / 1e6:.1f} MB |" if hf else
                f" {d['base_bytes'] / 1e6:.0f} MB | {d['patched_bytes'] / 1e6:.0f} MB |")
        print(f"| {d['recipe']} | {d['prompt_tokens']} | {d['ttft_s']['prompted'] * 1000:.1f} ms | "
              f"{d['ttft_s']['patched'] * 1000:.1f} ms | {d['ttft_ratio_prompted_over_patched']:.2f}× | "
              f"{d['decode_tokens_per_s']['prompted']:.1f} | {d['decode_tokens_per_s']['patched']:.1f} | "
              f"{d['decode_ratio_patched_over_prompted']:.2f}× | {d['answer_tokens_per_s']['prompted']:.1f} | "
              f"{d['answer_tokens_per_s']['patched']:.1f} | {d['answer_ratio_patched_over_prompted']:.2f}× |" + tail)
    if args.json:
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "runs": docs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
