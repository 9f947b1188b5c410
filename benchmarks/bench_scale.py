"""Scale benchmark: a random-weight model of a real shape, every figure a ratio measured in one run.

    python benchmarks/bench_scale.py [--shape 1b|8b|tiny] [--device cpu|cuda] [--dtype float32|bfloat16]
        [--examples 20] [--json out.json]

Builds a random Llama of the shape of Llama-3.2-1B (d 2048, ffn 8192, 16 layers, vocab 128256,
tied embeddings) or Llama-3-8B (d 4096, ffn 14336, 32 layers), and runs, each in a fresh
process so that its peak memory is its own:

* ``forward``: one plain forward over the examples with the instruction (the baseline);
* ``compute``: ``compute_patch`` with the default settings, then the patch saved;
* ``apply``: the patch folded into a checkpoint saved in bf16 (fold statistics, merge, save,
  undo, the saved folder reloaded and measured) and exported as an exact PEFT adapter.

Printed: compute ÷ forward time, tokens/s of compute, peak memory ÷ model size (RSS on CPU,
``max_memory_allocated`` on CUDA) for each step, patch file ÷ model size, and patched ÷ base
decoding speed (tokens/s of a greedy continuation with the patch's hooks vs without).  The
tokenizer is the tests' character-level one (ids < 100): the figures are of cost, not accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
}
INSTRUCTION = "Translate English to French.\ncat -> chat\nwater -> eau\nbook -> livre\nred -> rouge\nbread -> pain\n"
PAIRS = [("dog", "chien"), ("house", "maison"), ("sun", "soleil"), ("moon", "lune"), ("tree", "arbre"),
         ("car", "voiture"), ("apple", "pomme"), ("milk", "lait"), ("green", "vert"), ("door", "porte"),
         ("window", "fenêtre"), ("chair", "chaise"), ("table", "table"), ("sea", "mer"), ("night", "nuit"),
         ("day", "jour"), ("friend", "ami"), ("city", "ville"), ("bird", "oiseau"), ("fish", "poisson")]


def log(msg: str) -> None:
    print(f"[bench-scale] {msg}", file=sys.stderr, flush=True)


def texts(n: int) -> list[str]:
    return [f"{a} -> {b}\n" for a, b in (PAIRS * (n // len(PAIRS) + 1))[:n]]


@torch.no_grad()
def random_llama(shape: str, dtype: torch.dtype, device: str):
    """Random weights (normal, std 0.02; norms 1) without transformers' slow initialisation:
    built on the meta device, materialised in place."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=g)
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg).to(device)  # its buffers were left empty
    model.tie_weights()
    return model.eval()


def model_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KB on Linux


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child(args) -> dict:
    from tiny import tiny_tokenizer

    from transmute_cli.engine.loop import EngineConfig, compute_patch
    from transmute_cli.model.tokens import encode, micro_batches, pad_id

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = random_llama(args.shape, dtype, args.device)
    tok = tiny_tokenizer()
    out = {"step": args.child, "build_s": time.perf_counter() - t0, "model_bytes": model_bytes(model)}
    xs = texts(args.examples)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base_peak = peak_bytes(args.device)
    if args.child == "forward":
        enc = encode(tok, INSTRUCTION, xs)
        mbs = micro_batches(enc, list(range(len(xs))), 16, pad_id(tok), model.device)
        times = []
        for _ in range(2):  # the first call warms up allocators and kernels
            sync(args.device)
            t1 = time.perf_counter()
            with torch.no_grad():
                for mb in mbs:
                    model(input_ids=mb.ctx_ids, use_cache=False)
            sync(args.device)
            times.append(time.perf_counter() - t1)
        out.update(forward_s=min(times), tokens=int(sum(mb.ctx_ids.numel() for mb in mbs)))
    elif args.child == "compute":
        sync(args.device)
        t1 = time.perf_counter()
        res = compute_patch(model, tok, INSTRUCTION, xs, EngineConfig(fidelity=False))
        sync(args.device)
        out["compute_s"] = time.perf_counter() - t1
        out["patch_tokens"] = res.fidelity.layers[0].tokens
        with tempfile.TemporaryDirectory() as d:
            from transmute_cli.artifacts.patch import save_patch

            save_patch(res.patch, Path(d) / "p.safetensors", {})
            out["patch_bytes"] = (Path(d) / "p.safetensors").stat().st_size
        out["factored"] = sorted({type(m).__name__ for m in (*res.patch.matrices.values(), *res.patch.downs.values())})
        out.update(decode_speeds(model, tok, res.patch, args.device))
    elif args.child in ("checkpoint", "peft"):
        from transmute_cli.artifacts.checkpoint import write_checkpoint, write_peft
        from transmute_cli.model.families import family_for
        from transmute_cli.model.loading import Loaded, ModelSource

        res = compute_patch(model, tok, INSTRUCTION, xs, EngineConfig(fidelity=False))
        src = ModelSource(f"random-llama-{args.shape}", "folder", "")
        loaded = Loaded(model, tok, family_for(model), src, "random", args.dtype, "bfloat16")
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory(dir=args.tmp) as d:
            sync(args.device)
            t1 = time.perf_counter()
            if args.child == "checkpoint":
                info = write_checkpoint(loaded, res.patch, Path(d) / "ck", xs, None, None)
                out["checkpoint"] = {k: info[k] for k in ("dtype", "vector_fold", "mean_kl_vs_in_process",
                                                          "top1_agreement_vs_in_process")}
                out["checkpoint_bytes"] = sum(p.stat().st_size for p in (Path(d) / "ck").glob("*.safetensors"))
            else:
                info = write_peft(loaded, res.patch, Path(d) / "ad", xs, None, None, "random")
                out["peft"] = {k: info[k] for k in ("max_rank", "exact", "vector", "mean_kl_vs_in_process",
                                                    "top1_agreement_vs_in_process")}
            sync(args.device)
            out[f"{args.child}_s"] = time.perf_counter() - t1
    out["peak_bytes"] = peak_bytes(args.device)
    out["peak_before_step_bytes"] = base_peak
    return out


@torch.no_grad()
def decode_speeds(model, tok, patch, device: str, steps: int = 32) -> dict:
    """Greedy continuation tokens/s of 8 prompts, base vs with the patch's hooks (in process),
    medians of 3 alternated runs."""
    from transmute_cli.model.families import family_for
    from transmute_cli.engine.hooks import ThoughtHooks

    ids = torch.tensor([tok(t.split(" -> ")[0] + " -> ")["input_ids"][:4] for t in texts(8)], device=model.device)

    def run() -> float:
        sync(device)
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                       min_new_tokens=steps, do_sample=False, pad_token_id=0)
        sync(device)
        return ids.shape[0] * steps / (time.perf_counter() - t0)

    run()  # warm-up
    base, patched = [], []
    with ThoughtHooks(model, family_for(model)) as hooks:
        for _ in range(3):  # alternated, so a drift of the machine's speed hits both alike
            hooks.enabled = False
            base.append(run())
            hooks.set_patch(patch)
            hooks.enabled = True
            patched.append(run())
    return {"decode_tokens_per_s_base": statistics.median(base), "decode_tokens_per_s_patched": statistics.median(patched)}


def spawn(args, step: str) -> dict:
    cmd = [sys.executable, __file__, "--child", step, "--shape", args.shape, "--device", args.device,
           "--dtype", args.dtype, "--examples", str(args.examples), "--tmp", args.tmp]
    log(f"{step}: {' '.join(cmd[2:])}")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit(f"child {step} failed ({res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--examples", type=int, default=20)
    ap.add_argument("--steps", default="forward,compute,checkpoint,peft")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where checkpoints are written (and removed)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    runs = {step: spawn(args, step) for step in args.steps.split(",")}
    size = next(iter(runs.values()))["model_bytes"]
    rows = []
    f, c = runs.get("forward"), runs.get("compute")
    if f and c:
        rows.append(("compute ÷ one forward (time)", c["compute_s"] / f["forward_s"]))
        rows.append(("compute tokens/s (patch tokens)", c["patch_tokens"] / c["compute_s"]))
    for step, r in runs.items():
        rows.append((f"{step}: peak memory ÷ model size", r["peak_bytes"] / size))
    if c:
        rows.append(("patch file ÷ model size", c["patch_bytes"] / size))
        rows.append(("patched ÷ base decoding tokens/s", c["decode_tokens_per_s_patched"] / c["decode_tokens_per_s_base"]))
    if "checkpoint" in runs:
        rows.append(("patch file ÷ bf16 checkpoint", c["patch_bytes"] / runs["checkpoint"]["checkpoint_bytes"] if c else float("nan")))
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    print(f"random Llama, shape {args.shape} ({size / 2**30:.2f} GiB in {args.dtype}), {args.examples} examples, "
          f"on {device} ({datetime.date.today()})")
    for name, v in rows:
        print(f"  {name:40s} {v:8.3f}")
    for step, r in runs.items():
        extra = {k: v for k, v in r.items() if k.endswith("_s") or k in ("checkpoint", "peft", "factored", "patch_tokens")}
        print(f"  {step}: {json.dumps(extra, default=str)}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "device": device, "runs": runs,
                                         "ratios": dict(rows)}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
