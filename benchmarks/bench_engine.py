"""Engine benchmark: ratios measured side by side, on one model, in one run.

    python benchmarks/bench_engine.py [--model gemma-3-270m] [--recipe recipes/translate-en-fr.yaml]
        [--device auto] [--json out.json] [--quick] [--tiny] [--repeats 3]

Measures compute_patch ÷ one plain forward (≤ 3), naive ÷ incremental loop (≥ 5), and peak
memory / time at 10, 100, 1,000 examples in fresh subprocesses (peak ratio ≤ 1.10).  Timings are
medians of R repeats (1 at 1,000); torch threads at default.  Table: stdout; progress: stderr.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from transmute_cli.engine.loop import EngineConfig, compute_patch
from transmute_cli.model.families import base_model, family_for
from transmute_cli.engine.lowrank import dense
from transmute_cli.recipe.datafiles import render
from transmute_cli.recipe.schema import load_recipe
from transmute_cli.model.tokens import encode, micro_batches, pad_id

ROOT = Path(__file__).resolve().parent.parent
MICRO_BATCH = 16  # the engine's default, used for the forward baseline too


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- setup


def load_model(args):
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import tiny_model, tiny_tokenizer
        from transmute_cli.model.loading import pick_device

        return tiny_model("gemma3").to(pick_device(args.device)), tiny_tokenizer()
    from transmute_cli.model import loading as models

    model, tok, _src = models.load(args.model, device=args.device)
    return model, tok


def texts_for(recipe, n: int | None = None) -> list[str]:
    """The recipe's examples (n=None) or n texts cycling through its examples and eval pairs."""
    pairs = list(recipe.examples) if n is None else list(itertools.islice(itertools.cycle(recipe.examples + recipe.eval), n))
    return [render(recipe.template, p.input, p.output) + "\n" for p in pairs]


def config(recipe, **over) -> EngineConfig:
    kw = dict(rho=recipe.rho, solver=recipe.solver, batches=recipe.batches, eta=recipe.eta,
              components=recipe.components, layers=recipe.layers, fidelity=False)
    kw.update(over)
    return EngineConfig(**kw)


def sync(model) -> None:
    torch.cuda.synchronize() if next(model.parameters()).is_cuda else None


def timed(fn, model, repeats: int):
    """(median seconds, last result) over ``repeats`` calls."""
    times, out = [], None
    for _ in range(repeats):
        sync(model)
        t0 = time.perf_counter()
        out = fn()
        sync(model)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def forward_fn(model, tok, instruction: str, texts: list[str], whole: bool = True):
    """One plain forward over ``pre + I + x`` for every example, batched like the engine."""
    enc = encode(tok, instruction, texts)
    device = next(model.parameters()).device
    mbs = micro_batches(enc, list(range(len(texts))), MICRO_BATCH, pad_id(tok), device)
    net = model if whole else base_model(model, family_for(model))

    def run():
        with torch.no_grad():
            for mb in mbs:
                net(input_ids=mb.ctx_ids, use_cache=False)

    return run


def patch_diff(a, b) -> tuple[float, float]:
    """(max |a − b|, max |a|) over every tensor of two ThoughtPatches."""
    diff = scale = 0.0
    for name in ("matrices", "vectors", "downs"):
        da, db = getattr(a, name), getattr(b, name)
        if set(da) != set(db):
            return float("inf"), 0.0
        for l in da:
            ta, tb = dense(da[l]), dense(db[l])  # factored matrices compared as what they are
            diff = max(diff, (ta - tb).abs().max().item())
            scale = max(scale, ta.abs().max().item())
    return diff, scale


# --------------------------------------------------------------------------- memory (child process)


def _status_kb(key: str) -> int | None:
    try:
        return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux), so the load's transient peak is not counted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(args) -> None:
    """One size in a fresh process: RSS before load, after load, peak during compute_patch."""
    n = args._child
    maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731  (KB on Linux)
    out = {"examples": n, "maxrss_before_load_mb": maxrss()}
    model, tok = load_model(args)
    recipe = load_recipe(args.recipe)
    texts, cfg = texts_for(recipe, n), config(recipe)
    cuda = next(model.parameters()).is_cuda
    out["maxrss_after_load_mb"] = maxrss()
    rss = _status_kb("VmRSS")
    out["rss_after_load_mb"] = rss / 1024 if rss is not None else out["maxrss_after_load_mb"]
    reset = _reset_peak()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out["cuda_after_load_mb"] = torch.cuda.memory_allocated() / 2**20
    t0 = time.perf_counter()
    compute_patch(model, tok, recipe.instruction, texts, cfg)
    sync(model)
    first = time.perf_counter() - t0
    hwm = _status_kb("VmHWM") if reset else None
    out["maxrss_after_compute_mb"] = maxrss()
    out["peak_rss_compute_mb"] = hwm / 1024 if hwm is not None else out["maxrss_after_compute_mb"]
    out["peak_increase_mb"] = out["peak_rss_compute_mb"] - out["rss_after_load_mb"]
    out["peak_reset"] = reset
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_peak_increase_mb"] = out["cuda_peak_mb"] - out["cuda_after_load_mb"]
    times = [first]
    for _ in range(args.repeats - 1 if n < 1000 else 0):
        times.append(timed(lambda: compute_patch(model, tok, recipe.instruction, texts, cfg), model, 1)[0])
    out["time_s"] = statistics.median(times)
    out["time_per_example_ms"] = 1000 * out["time_s"] / n
    print(json.dumps(out))


def run_child(args, n: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(n), "--model", args.model,
           "--recipe", str(args.recipe), "--device", args.device, "--repeats", str(args.repeats)]
    cmd += ["--tiny"] if args.tiny else []
    log(f"memory/scaling: {n} examples in a fresh process")
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def machine_info(model) -> dict:
    dev = next(model.parameters()).device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    if dev.type == "cpu":
        try:
            name = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1)
        except (OSError, AttributeError):
            pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(dev),
            "device_name": name, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "translate-en-fr.yaml"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (10 / 30 / 100 examples)")
    ap.add_argument("--tiny", action="store_true", help="tests/tiny.py's tiny gemma3 (smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--_child", type=int, help=argparse.SUPPRESS)  # one size, in a fresh process
    args = ap.parse_args(argv)
    if args._child:
        return child(args) or 0

    model, tok = load_model(args)
    recipe = load_recipe(args.recipe)
    info = machine_info(model)
    log(f"{'tiny gemma3' if args.tiny else args.model} on {info['device']} ({info['device_name']}), "
        f"{info['torch_threads']} threads")
    texts, R, res = texts_for(recipe), args.repeats, {}
    call = lambda cfg: lambda: compute_patch(model, tok, recipe.instruction, texts, cfg)  # noqa: E731

    # 1. compute vs one forward over the same contextual inputs
    log(f"forward baseline ({len(texts)} examples)")
    fwd, fwd_base = forward_fn(model, tok, recipe.instruction, texts), forward_fn(model, tok, recipe.instruction, texts, False)
    fwd(), fwd_base()  # warm-up
    res["forward_s"] = timed(fwd, model, R)[0]
    res["forward_no_lm_head_s"] = timed(fwd_base, model, R)[0]
    log("compute_patch (incremental, fidelity=False)")
    res["compute_s"], inc = timed(call(config(recipe)), model, R)
    res["compute_timings"] = inc.timings
    log("compute_patch (incremental, fidelity=True)")
    res["compute_fidelity_s"], fid = timed(call(config(recipe, fidelity=True)), model, R)
    res["compute_fidelity_timings"] = fid.timings
    res["ratio_compute_forward"] = res["compute_s"] / res["forward_s"]
    res["ratio_compute_fidelity_forward"] = res["compute_fidelity_s"] / res["forward_s"]
    res["ratio_compute_forward_no_lm_head"] = res["compute_s"] / res["forward_no_lm_head_s"]

    # 2. naive loop vs incremental
    log("compute_patch (naive propagation)")
    res["naive_s"], naive = timed(call(config(recipe, propagation="naive")), model, R)
    res["speedup_naive"] = res["naive_s"] / res["compute_s"]
    res["patch_max_abs_diff"], scale = patch_diff(inc.patch, naive.patch)
    res["patch_max_abs"] = scale
    res["patch_rel_diff"] = res["patch_max_abs_diff"] / scale if scale > 0 else float("inf")
    del inc, fid, naive, model

    # 3. memory and time against the number of examples, one fresh process per size
    sizes = (10, 30, 100) if args.quick else (10, 100, 1000)
    res["sizes"] = {n: run_child(args, n) for n in sizes}
    lo, hi = res["sizes"][sizes[0]], res["sizes"][sizes[-1]]
    res["mem_ratio_peak"] = hi["peak_rss_compute_mb"] / lo["peak_rss_compute_mb"]
    res["mem_ratio_increase"] = hi["peak_increase_mb"] / max(lo["peak_increase_mb"], 1e-9)
    if "cuda_peak_mb" in hi:
        res["cuda_mem_ratio_peak"] = hi["cuda_peak_mb"] / lo["cuda_peak_mb"]
    res["per_example_ratio"] = hi["time_per_example_ms"] / res["sizes"][sizes[1]]["time_per_example_ms"]

    # 4. the table
    ms = lambda s: f"{1000 * s:.1f} ms"  # noqa: E731
    yes = lambda ok: "yes" if ok else "NO"  # noqa: E731
    rows = [
        ("forward, model(), ctx inputs", ms(res["forward_s"]), "", ""),
        ("forward, no lm_head", ms(res["forward_no_lm_head_s"]), "", ""),
        ("compute_patch (fidelity=False)", ms(res["compute_s"]), "", ""),
        ("compute_patch (fidelity=True)", ms(res["compute_fidelity_s"]), "", ""),
        ("compute / forward", f"{res['ratio_compute_forward']:.2f}x", "<= 3", yes(res["ratio_compute_forward"] <= 3)),
        ("compute+fidelity / forward", f"{res['ratio_compute_fidelity_forward']:.2f}x", "<= 3",
         yes(res["ratio_compute_fidelity_forward"] <= 3)),
        ("compute / forward w/o lm_head", f"{res['ratio_compute_forward_no_lm_head']:.2f}x", "info", ""),
        ("naive loop", ms(res["naive_s"]), "", ""),
        ("naive / incremental", f"{res['speedup_naive']:.2f}x", ">= 5", yes(res["speedup_naive"] >= 5)),
        ("patch max |naive - incr|", f"{res['patch_max_abs_diff']:.2e} (rel {res['patch_rel_diff']:.1e})",
         "rel <= 1e-3", yes(res["patch_rel_diff"] <= 1e-3)),
    ]
    for n, s in res["sizes"].items():
        rows.append((f"{n} ex: peak RSS / +over model", f"{s['peak_rss_compute_mb']:.0f} / +{s['peak_increase_mb']:.0f} MB", "", ""))
        if "cuda_peak_mb" in s:
            rows.append((f"{n} ex: CUDA peak / +over model", f"{s['cuda_peak_mb']:.0f} / +{s['cuda_peak_increase_mb']:.0f} MB", "", ""))
        rows.append((f"{n} ex: time, per example", f"{s['time_s']:.2f} s, {s['time_per_example_ms']:.1f} ms", "", ""))
    rows += [
        (f"peak RSS {sizes[-1]} / {sizes[0]}", f"{res['mem_ratio_peak']:.3f}", "<= 1.10", yes(res["mem_ratio_peak"] <= 1.10)),
        (f"increase {sizes[-1]} / {sizes[0]}", f"{res['mem_ratio_increase']:.2f}", "info", ""),
    ]
    if "cuda_mem_ratio_peak" in res:
        rows.append((f"CUDA peak {sizes[-1]} / {sizes[0]}", f"{res['cuda_mem_ratio_peak']:.3f}", "<= 1.10",
                     yes(res["cuda_mem_ratio_peak"] <= 1.10)))
    rows.append((f"per-example time {sizes[-1]} / {sizes[1]}", f"{res['per_example_ratio']:.2f}", "<= 1.25 (linear)",
                 yes(res["per_example_ratio"] <= 1.25)))
    head = ("measure", "value", "target", "met")
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(4)]
    print(f"# {info['command']}\n# {info['device_name']} | {info['device']} | torch {info['torch']} | "
          f"{info['torch_threads']} threads | {len(texts)} examples | median of {R}")
    for r in [head, tuple("-" * x for x in w), *rows]:
        print("  ".join(str(c).ljust(x) for c, x in zip(r, w)).rstrip())
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "model": "tiny-gemma3" if args.tiny else args.model,
                                         "recipe": str(args.recipe), "repeats": R, "results": res}, indent=2))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
