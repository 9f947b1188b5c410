"""How far a saved checkpoint (plain transformers, no custom code) is from the in-process patch,
per supported family.  Matrices fold exactly; the thought vector is exact where the family has
an MLP bias switch (Llama: `mlp_bias`), otherwise folded into W_down by least squares.

    python examples/checkpoint_fidelity.py            # tiny random models of every family
    python examples/checkpoint_fidelity.py --real     # plus the real Gemma 3 270M, en->fr recipe

Each checkpoint is saved, reloaded with AutoModelForCausalLM.from_pretrained, and compared with
the in-process patch on the patch texts: mean KL (nats/position) and top-1 agreement.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from transmute_cli.artifacts import checkpoint

from transmute_cli.model import loading as models

from transmute_cli import pipeline  # noqa: E402
from transmute_cli.engine.loop import EngineConfig, compute_patch  # noqa: E402
from transmute_cli.model.families import family_for  # noqa: E402
from transmute_cli.engine.hooks import ThoughtHooks  # noqa: E402
from transmute_cli.recipe.schema import load_recipe  # noqa: E402

INSTRUCTION = "Reverse the word:\nabc -> cba\nhat -> tah\n"
TEXTS = [f"{w} -> {w[::-1]}\n" for w in ("dog", "cat", "sun", "moon", "tree", "lamp", "fish", "bird", "road", "milk")]


def measure(model, tok, instruction, texts, cfg) -> dict:
    loaded = pipeline.Loaded(model, tok, family_for(model), models.ModelSource("x", "folder", "x"),
                             models.fingerprint(model), "float32")
    patch = compute_patch(model, tok, instruction, texts, cfg).patch
    with tempfile.TemporaryDirectory() as d:
        info = checkpoint.write_checkpoint(loaded, patch, Path(d) / "ck", texts, None, None)
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(Path(d) / "ck", dtype=torch.float32).eval()
        batches = checkpoint.token_batches(loaded, texts)
        with ThoughtHooks(model, loaded.fam) as hooks:
            hooks.set_patch(patch)
            ref = checkpoint.masked_logits(model, batches)
        got = checkpoint.masked_logits(reloaded, batches)
    reload = checkpoint.compare_runs(ref, got, "in_process")
    return {"vector_fold": info["vector_fold"], "kl": reload["mean_kl_vs_in_process"],
            "top1": reload["top1_agreement_vs_in_process"], "max_abs_logit_diff": max((r - g).abs().max().item()
                                                                                     for r, g in zip(ref, got))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true")
    args = ap.parse_args()
    from tiny import tiny_model, tiny_tokenizer

    rows = []
    for fam in ("gemma3", "llama", "qwen2", "qwen3", "mistral"):
        m = tiny_model(fam)
        rows.append((f"tiny {fam}", measure(m, tiny_tokenizer(), INSTRUCTION, TEXTS, EngineConfig())))
    if args.real:
        r = load_recipe(ROOT / "recipes" / "translate-en-fr.yaml")
        g = pipeline.load_model("gemma-3-270m", device="cpu")
        rows.append(("Gemma 3 270M, en->fr", measure(g.model, g.tokenizer, r.instruction, pipeline.patch_texts(r),
                                                       pipeline.engine_config(r))))
    print("| model | vector stored as | mean KL vs in-process | top-1 agreement | max |Δlogit| |")
    print("|---|---|---|---|---|")
    for name, x in rows:
        print(f"| {name} | {x['vector_fold']} | {x['kl']:.2e} | {x['top1']:.3f} | {x['max_abs_logit_diff']:.2e} |")


if __name__ == "__main__":
    main()
