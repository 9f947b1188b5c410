"""The product's operations — compute, apply, eval — over the engine, without any printing.

The CLI is a thin layer over these functions; they report progress through callbacks and
return plain dicts that become ``report.json`` and ``--json`` output.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__, models
from .distributed import leave_distributed
from .engine import EngineConfig, PatchResult, ProgressFn, compute_patch
from .errors import InputError, PatchError, RecipeError
from .evaluate import HeldoutFidelity, Result, evaluate, generate_answers, heldout_fidelity
from .families import Family, family_for, model_device
from .fidelity import compare_logits
from .hooks import ThoughtHooks
from .outputs import atomic_dir, check_target
from .patch import ThoughtPatch, check_compatible, combine, fold_statistics, load_patch, merge, save_patch, sidecar, vector_fold_kind
from .recipe import Recipe, load_recipe, load_templates, parse_recipe, render
from .tokens import encode, micro_batches, pad_id, special_prefix, token_ids

Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    fam: Family
    source: models.ModelSource
    fingerprint: str
    dtype: str


def load_model(spec: str, *, device: str = "auto", dtype: str = "float32", family: str | None = None,
               trust_remote_code: bool = False, device_map: str | None = None) -> Loaded:
    model, tok, src = models.load(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                  device_map=device_map)
    fam = family_for(model, family)
    return Loaded(model, tok, fam, src, models.fingerprint(model), dtype)


def patch_texts(recipe: Recipe) -> list[str]:
    """Example texts x: every pair under every patch template, ending with the newline that
    marks the end of an answer (the patched model must learn where to stop)."""
    return [render(t, p.input, p.output) + "\n" for t in recipe.all_templates() for p in recipe.examples]


def engine_config(recipe: Recipe, **over) -> EngineConfig:
    cfg = dict(
        rho=recipe.rho, eta=recipe.eta, batches=recipe.batches, components=tuple(recipe.components),
        layers=recipe.layers, solver=recipe.solver, seed=recipe.seed, preserve_weight=recipe.preserve_weight,
    )
    cfg.update(over)
    return EngineConfig(**cfg)


def _with_source(err: InputError, recipe: Recipe) -> InputError:
    """Engine input errors name a field of patch texts; the recipe file, the example and the
    template are named here (patch texts are every example under every patch template)."""
    field, reason = err.field, err.reason
    m = re.fullmatch(r"examples\[(\d+)\]", field or "")
    if m:
        i, n = int(m.group(1)), len(recipe.examples)
        field = f"examples[{i % n}]"
        if i >= n:
            reason += f" (under patch_templates[{i // n - 1}])"
    if err.source is None:
        return type(err)(reason, source=recipe.source, field=field)
    return err


def results_json(results: Sequence[Result]) -> list[dict]:
    return [
        {"template": r.template, "condition": r.condition, "accuracy": r.accuracy, "correct": r.correct, "n": r.n}
        for r in results
    ]


def heldout_json(h: HeldoutFidelity) -> dict:
    return {"queries": h.n, "template": h.template, "answer_agreement": h.answer_agreement, "mean_kl": h.mean_kl,
            "positions": h.positions, "base_answer_agreement": h.base_answer_agreement, "base_mean_kl": h.base_mean_kl}


def fidelity_json(res: PatchResult) -> dict:
    f = res.fidelity
    return {
        "tokens": f.tokens,
        "top1_agreement": f.top1_agreement,
        "mean_kl": f.mean_kl,
        "base_top1_agreement": f.base_top1_agreement,
        "base_mean_kl": f.base_mean_kl,
        "preserve_tokens": f.preserve_tokens,
        "preserve_top1_agreement": f.preserve_top1_agreement,
        "preserve_mean_kl": f.preserve_mean_kl,
        "layers": [asdict(l) for l in f.layers],
        "heldout": None,  # filled in when the recipe has eval pairs (see heldout_json)
    }


# --------------------------------------------------------------------------- compute


def compute(
    recipe: Recipe,
    out: Path | None = None,
    *,
    device: str = "auto",
    dtype: str = "float32",
    overwrite: bool = False,
    checkpoint: bool = True,
    evaluate_patch: bool = True,
    progress: ProgressFn | None = None,
    log: Log = _quiet,
    loaded: Loaded | None = None,
    trust_remote_code: bool = False,
    family: str | None = None,
    device_map: str | None = None,
) -> dict:
    """Recipe -> run folder with patch.safetensors, checkpoint/, report.json, report.md."""
    out = Path(out) if out is not None else Path("runs") / recipe.name
    check_target(out, overwrite)
    rank, distributed, owned = _init_distributed(device)
    if distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    t0 = time.perf_counter()
    if loaded is None:
        log(f"loading model {recipe.model}")
        loaded = load_model(recipe.model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, family=family,
                            device_map=device_map)
    t_load = time.perf_counter() - t0
    texts = patch_texts(recipe)
    log(f"computing the patch from {len(texts)} example texts on {model_device(loaded.model)}")
    t1 = time.perf_counter()
    done = False
    try:
        res = compute_patch(loaded.model, loaded.tokenizer, recipe.instruction, texts,
                            engine_config(recipe, distributed=distributed), progress=progress, family=family,
                            preserve=recipe.preserve)
        done = True
    except InputError as e:
        raise _with_source(e, recipe) from None
    finally:
        if owned:
            leave_distributed(barrier=done)
    t_compute = time.perf_counter() - t1
    if rank != 0:  # every rank holds the same patch; rank 0 evaluates and writes
        return {"rank": rank, "output": None}
    patch = res.patch
    meta = patch_metadata(recipe, loaded)
    report: dict = {
        "tool": {"name": "transmute", "version": __version__},
        "recipe": {"name": recipe.name, "path": recipe.source, "sha256": recipe.sha256},
        "model": model_json(loaded),
        "settings": settings_json(recipe),
        "examples": len(recipe.examples),
        "patch_texts": len(texts),
        "fidelity": fidelity_json(res),
        "timings": {"load_s": t_load, "compute_s": t_compute, **{f"engine_{k}_s": v for k, v in res.timings.items()}},
        "eval": None,
        "checkpoint": None,
    }
    results: list[Result] = []
    if recipe.eval and evaluate_patch:
        log(f"evaluating on {len(recipe.eval)} held-out pairs")
        t2 = time.perf_counter()
        results = evaluate(loaded.model, loaded.tokenizer, recipe.instruction, recipe.eval, [recipe.template], patch,
                           max_new_tokens=recipe.max_new_tokens, family=family)
        report["eval"] = {"results": results_json(results)}
        by = {r.condition: r for r in results}
        held = heldout_fidelity(loaded.model, loaded.tokenizer, recipe.instruction, recipe.eval, recipe.template, patch,
                                by["prompt"], by["patched"], by["base"], family=family)
        report["fidelity"]["heldout"] = heldout_json(held)
        report["timings"]["eval_s"] = time.perf_counter() - t2
    if checkpoint and any(p.device.type == "meta" for p in loaded.model.parameters()):
        # merging needs every weight in memory; the patch is complete without the checkpoint
        log("no checkpoint: the model has layers offloaded to disk (run `transmute apply` where it fits in memory)")
        report["checkpoint"] = {"skipped": "layers offloaded to disk by the device map"}
        checkpoint = False
    with atomic_dir(out, overwrite) as tmp:
        save_patch(patch, tmp / "patch.safetensors", meta)
        if checkpoint:
            log("writing the patched checkpoint")
            t3 = time.perf_counter()
            patched_answers = next((r.answers for r in results if r.condition == "patched"), None)
            report["checkpoint"] = write_checkpoint(
                loaded, patch, tmp / "checkpoint", texts, recipe, patched_answers,
                provenance={"patch_sha256_recipe": recipe.sha256, "scale": 1.0},
            )
            report["timings"]["checkpoint_s"] = time.perf_counter() - t3
        (tmp / "recipe.yaml").write_text(recipe.text)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(report_markdown(report))
    report["output"] = str(out)
    return report


def _init_distributed(device: str) -> tuple[int, bool, bool]:
    """Under torchrun (WORLD_SIZE > 1) join the process group: examples are sharded over ranks
    and the statistics all_reduce'd (gloo on CPU, nccl on CUDA). Returns (rank, distributed,
    owned): owned when this call created the group, so `compute` must also take it down."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, False, False
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), True, owned


def patch_metadata(recipe: Recipe, loaded: Loaded) -> dict[str, str]:
    cfg = loaded.model.config
    return {
        "base_model": recipe.model,
        "base_fingerprint": loaded.fingerprint,
        "model_type": str(getattr(cfg, "model_type", "")),
        "family": loaded.fam.name,
        "recipe": recipe.self_contained_text,  # re-parses without the recipe's folder
        "recipe_sha256": recipe.sha256,
        "recipe_name": recipe.name,
        "components": ",".join(recipe.components),
        "rho": repr(recipe.rho),
        "eta": repr(recipe.step),
        "batches": str(recipe.batches),
        "solver": recipe.solver,
        "layers": "all" if recipe.layers == "all" else ",".join(map(str, recipe.layers)),
        "seed": str(recipe.seed),
        "preserve_texts": str(len(recipe.preserve)),
        "preserve_weight": repr(recipe.preserve_weight),
    }


def model_json(loaded: Loaded) -> dict:
    cfg = loaded.model.config
    return {
        "spec": loaded.source.spec, "kind": loaded.source.kind, "fingerprint": loaded.fingerprint,
        "model_type": getattr(cfg, "model_type", None), "family": loaded.fam.name,
        "n_layers": getattr(cfg, "num_hidden_layers", None), "d_model": getattr(cfg, "hidden_size", None),
        "device": str(model_device(loaded.model)), "dtype": loaded.dtype,
    }


def settings_json(recipe: Recipe) -> dict:
    return {
        "rho": recipe.rho, "eta": recipe.step, "batches": recipe.batches, "components": list(recipe.components),
        "layers": recipe.layers if recipe.layers == "all" else list(recipe.layers), "solver": recipe.solver,
        "seed": recipe.seed, "templates": list(recipe.all_templates()),
        "preserve_texts": len(recipe.preserve), "preserve_weight": recipe.preserve_weight,
    }


# --------------------------------------------------------------------------- checkpoints


def _token_batches(loaded: Loaded, texts: Sequence[str], size: int = 16):
    enc = encode(loaded.tokenizer, "", texts)
    mbs = micro_batches(enc, list(range(len(texts))), size, pad_id(loaded.tokenizer), model_device(loaded.model))
    p = len(enc.pre)
    out = []
    for mb in mbs:
        mask = torch.zeros(mb.nctx_ids.shape, dtype=torch.bool, device=mb.nctx_ids.device)
        mask[:, :p] = True
        mask[:, p:] = mb.xmask
        out.append((mb.nctx_ids, mask))
    return out


def _logits(loaded: Loaded, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [loaded.model(input_ids=ids).logits[mask].float().cpu() for ids, mask in batches]


def write_checkpoint(loaded: Loaded, patch: ThoughtPatch, out: Path, texts: Sequence[str], recipe: Recipe | None,
                     patched_answers: list[str] | None, *, scale: float = 1.0, provenance: dict | None = None) -> dict:
    """Merge the patch into the loaded model's weights, save a standard HF folder, undo the merge, and measure how far the merged weights are from the in-process patch:
    mean KL and top-1 agreement over the patch texts, and greedy-answer agreement on the eval."""
    model, fam = loaded.model, loaded.fam
    batches = _token_batches(loaded, texts[:64])
    with ThoughtHooks(model, fam) as hooks:
        hooks.scale = scale
        hooks.set_patch(patch)
        ref = _logits(loaded, batches)
    fold = vector_fold_kind(model, fam)
    stats = fold_statistics(model, fam, patch.scaled(scale), _token_batches(loaded, texts)) if patch.vectors and fold != "bias" else None
    info = merge(model, fam, patch, scale, stats)
    try:
        got = _logits(loaded, batches)
        result = {
            "path": out.name,
            "vector_fold": info["vector_fold"],
            "exact": info["vector_fold"] in ("bias", "none"),
            **_compare_logits(ref, got, "in_process"),
        }
        if patched_answers is not None and recipe is not None and recipe.eval:
            answers = _eval_answers(loaded, recipe)
            result["answer_agreement_vs_in_process"] = sum(x == y for x, y in zip(answers, patched_answers)) / len(answers)
            result["accuracy"] = sum(x == p.output.strip() for x, p in zip(answers, recipe.eval)) / len(answers)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
    finally:
        info["undo"]()  # the loaded model is the base model again
    sidecar(out / "transmute.json", {
        "tool_version": __version__,
        "base_model": loaded.source.spec,
        "base_fingerprint": loaded.fingerprint,
        "patch_metadata": {k: v for k, v in patch.metadata.items() if k != "recipe"},
        "recipe": recipe.self_contained_text if recipe is not None else patch.metadata.get("recipe"),
        **(provenance or {}),
        "fidelity": {k: v for k, v in result.items() if k != "path"},
    })
    return result


def apply(
    patch_specs: Sequence[tuple[str, float]],
    out: Path,
    *,
    model: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    dtype: str = "float32",
    log: Log = _quiet,
    trust_remote_code: bool = False,
    family: str | None = None,
    fmt: str = "checkpoint",
    rank: int = 16,
) -> dict:
    """One or several patches (with scales) -> a patched standard checkpoint folder, or a PEFT
    LoRA adapter (``fmt="peft"``, truncated SVD at ``rank``)."""
    if fmt not in ("checkpoint", "peft"):
        raise InputError(f"must be checkpoint or peft, got {fmt!r}", field="--format")
    out = Path(out)
    check_target(out, overwrite)
    patches = [(load_patch(p), s) for p, s in patch_specs]
    first = patches[0][0]
    spec = model or first.metadata.get("base_model")
    if not spec:
        raise InputError("the patch does not record its base model; pass --model", source=patch_specs[0][0])
    log(f"loading base model {spec}")
    loaded = load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code, family=family)
    for (p, _s), (path, _) in zip(patches, patch_specs):
        check_compatible(p, loaded.model, loaded.fam, loaded.fingerprint, force=force, source=path)
    patch = combine(patches) if len(patches) > 1 or patches[0][1] != 1.0 else first
    needs_fold = bool(patch.vectors) and (fmt == "peft" or vector_fold_kind(loaded.model, loaded.fam) != "bias")
    texts: list[str] = []
    recipes = []
    for (p, _), (path, _) in zip(patches, patch_specs):
        if not p.metadata.get("recipe"):
            continue
        try:
            r = parse_recipe(p.metadata["recipe"], source=f"{path} (recipe)")
        except RecipeError:
            # the recipe is needed only to fold thought vectors; a patch written before recipes
            # were stored self-contained may name files relative to a folder we do not know
            if needs_fold:
                raise
            continue
        recipes.append(r)
        texts += patch_texts(r)
    if needs_fold and not texts:
        raise PatchError("the patch carries no recipe to fold its thought vectors with", source=patch_specs[0][0])
    provenance = {"patches": [{"path": p, "scale": s} for p, s in patch_specs]}
    one_recipe = recipes[0] if len(recipes) == 1 else None
    with atomic_dir(out, overwrite) as tmp:
        if fmt == "peft":
            log(f"exporting a PEFT LoRA adapter at rank {rank}")
            info = write_peft(loaded, patch, tmp, texts, one_recipe, rank, spec)
        else:
            info = write_checkpoint(loaded, patch, tmp, texts or [" "], one_recipe, None, provenance=provenance)
    info["path"] = str(out)
    return {"checkpoint" if fmt == "checkpoint" else "adapter": info, "model": model_json(loaded),
            "patches": provenance["patches"]}


def write_peft(loaded: Loaded, patch: ThoughtPatch, out: Path, texts: Sequence[str], recipe: Recipe | None,
               rank: int, base_spec: str) -> dict:
    """Export the adapter, reload it with ``PeftModel.from_pretrained`` and measure it against the
    in-process patch (KL/top-1 on the patch texts; eval accuracy of both when there is an eval)."""
    from peft import PeftModel

    from .export import export_peft

    model, fam = loaded.model, loaded.fam
    stats = fold_statistics(model, fam, patch, _token_batches(loaded, texts)) if patch.vectors else None
    info = export_peft(model, fam, patch, rank, out, base_spec, stats)
    batches = _token_batches(loaded, texts[:64])
    with ThoughtHooks(model, fam) as hooks:
        hooks.set_patch(patch)
        ref = _logits(loaded, batches)
        acc_in_process = _eval_accuracy(loaded, recipe) if recipe is not None and recipe.eval else None
    peft_model = PeftModel.from_pretrained(model, str(out))
    try:
        got = [peft_model(input_ids=ids).logits[mask].float().cpu() for ids, mask in batches]
        info.update(_compare_logits(ref, got, "in_process"))
        if acc_in_process is not None:
            info["accuracy_in_process"] = acc_in_process
            info["accuracy"] = _eval_accuracy(loaded, recipe, peft_model)
    finally:
        peft_model.unload()
    return info


def _eval_answers(loaded: Loaded, recipe: Recipe, model=None) -> list[str]:
    """Greedy answers to the recipe's eval queries, no prompt (``model`` defaults to the loaded one)."""
    pre = special_prefix(loaded.tokenizer)
    prompts = [pre + token_ids(loaded.tokenizer, render(recipe.template, p.input)) for p in recipe.eval]
    return generate_answers(model or loaded.model, loaded.tokenizer, prompts, recipe.max_new_tokens)


def _eval_accuracy(loaded: Loaded, recipe: Recipe, model=None) -> float:
    answers = _eval_answers(loaded, recipe, model)
    return sum(a == p.output.strip() for a, p in zip(answers, recipe.eval)) / len(recipe.eval)


def _compare_logits(ref: list[torch.Tensor], got: list[torch.Tensor], name: str) -> dict:
    kl = agree = n = 0.0
    for r, g in zip(ref, got):
        k, a = compare_logits(r, g)
        kl, agree, n = kl + k, agree + a, n + r.shape[0]
    return {f"mean_kl_vs_{name}": kl / max(n, 1), f"top1_agreement_vs_{name}": agree / max(n, 1), "positions": int(n)}


# --------------------------------------------------------------------------- eval


def resolve_target(target: str) -> tuple[str, Path]:
    """('run'|'patch'|'checkpoint', path) for a run folder, a patch file or a checkpoint folder."""
    p = Path(target)
    if not p.exists():
        raise InputError("not found", source=target)
    if p.is_file():
        return "patch", p
    if (p / "patch.safetensors").is_file():
        return "run", p / "patch.safetensors"
    if (p / "config.json").is_file():
        return "checkpoint", p
    raise InputError("not a run folder, a patch file or a checkpoint folder", source=target)


def eval_target(
    target: str,
    *,
    recipe_path: str | None = None,
    templates_path: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    scale: float = 1.0,
    conditions: Sequence[str] = ("base", "prompt", "patched"),
    log: Log = _quiet,
    progress: Callable[[str, str], None] | None = None,
    trust_remote_code: bool = False,
    family: str | None = None,
) -> dict:
    kind, path = resolve_target(target)
    extra = load_templates(templates_path) if templates_path else []
    if kind in ("run", "patch"):
        patch = load_patch(path)
        recipe_text, base_spec = patch.metadata.get("recipe"), patch.metadata.get("base_model")
    else:
        side = path / "transmute.json"
        if not side.is_file():
            raise InputError("a checkpoint without transmute.json: evaluate its run folder or patch instead", source=target)
        try:
            info = json.loads(side.read_text())
        except (OSError, ValueError):
            raise InputError("transmute.json is not valid JSON", source=str(side)) from None
        recipe_text, base_spec, patch = info.get("recipe"), info.get("base_model"), None
    recipe = load_recipe(recipe_path) if recipe_path else (
        parse_recipe(recipe_text, source=f"{target} (recipe)") if recipe_text else None)
    if recipe is None:
        raise InputError("no recipe recorded; pass --recipe", source=target)
    if not recipe.eval:
        raise InputError("has no eval pairs to evaluate on", source=recipe.source or f"{target} (recipe)", field="eval")
    templates = [recipe.template] + [t for t in extra if t != recipe.template]
    log(f"loading base model {base_spec}")
    base = load_model(base_spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code, family=family)
    t0 = time.perf_counter()
    results: list[Result] = []
    if patch is not None:
        check_compatible(patch, base.model, base.fam, base.fingerprint, force=False, source=str(path))
        results = evaluate(base.model, base.tokenizer, recipe.instruction, recipe.eval, templates, patch,
                           conditions=conditions, max_new_tokens=recipe.max_new_tokens, scale=scale, family=family,
                           progress=progress)
    else:
        results = evaluate(base.model, base.tokenizer, recipe.instruction, recipe.eval, templates, None,
                           conditions=[c for c in conditions if c != "patched"], max_new_tokens=recipe.max_new_tokens,
                           family=family, progress=progress)
        if "patched" in conditions:
            del base
            ck = load_model(str(path), device=device, dtype=dtype, trust_remote_code=trust_remote_code, family=family)
            results += evaluate(ck.model, ck.tokenizer, recipe.instruction, recipe.eval, templates, None,
                                conditions=("base",), max_new_tokens=recipe.max_new_tokens, family=family, progress=progress)
            for r in results[-len(templates):]:
                r.condition = "patched"
    order = {t: i for i, t in enumerate(templates)}
    results.sort(key=lambda r: (order[r.template], conditions.index(r.condition)))
    return {
        "target": target, "kind": kind, "recipe": recipe.name, "n": len(recipe.eval), "scale": scale,
        "results": results_json(results), "answers": {f"{r.template}|{r.condition}": r.answers for r in results},
        "eval_s": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- human-readable report


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else str(x)
    return str(x)


def report_markdown(r: dict) -> str:
    f = r["fidelity"]
    lines = [
        f"# transmute report: {r['recipe']['name']}",
        "",
        f"- model: `{r['model']['spec']}` ({r['model']['model_type']}, {r['model']['n_layers']} layers, "
        f"fingerprint {r['model']['fingerprint']}, {r['model']['device']}, {r['model']['dtype']})",
        f"- recipe sha256: `{r['recipe']['sha256']}`",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in r["settings"].items() if k != "templates"),
        f"- examples: {r['examples']} ({r['patch_texts']} patch texts, {f['tokens']} token positions)",
        f"- compute: {r['timings']['compute_s']:.1f} s",
        "",
        "## Fidelity on the patch examples (patched, no prompt  vs  original, with prompt)",
        "",
        "In-sample: the solve was fitted to these tokens; see the held-out section below for queries it never saw.",
        "",
        "| | top-1 agreement | mean KL (nats) |",
        "|---|---|---|",
        f"| unpatched, no prompt | {_fmt(f['base_top1_agreement'])} | {_fmt(f['base_mean_kl'])} |",
        f"| patched, no prompt | {_fmt(f['top1_agreement'])} | {_fmt(f['mean_kl'])} |",
        *([f"| preservation texts ({f['preserve_tokens']} tokens): patched vs original | "
           f"{_fmt(f['preserve_top1_agreement'])} | {_fmt(f['preserve_mean_kl'])} |"] if f.get("preserve_tokens") else []),
        "",
        "| layer | tokens | matrix fit residual | vector/joint residual | |δ| | |A| |",
        "|---|---|---|---|---|---|",
    ]
    for l in f["layers"]:
        lines.append(f"| {l['layer']} | {l['tokens']} | {_fmt(l['matrix_residual'])} | {_fmt(l['vector_residual'])} | "
                     f"{_fmt(l['vector_norm'], 2)} | {_fmt(l['matrix_norm'], 2)} |")
    h = f.get("heldout")
    if h:
        lines += ["", f"## Fidelity on the {h['queries']} held-out eval queries (against the prompted model)", "",
                  "| | greedy answers identical | mean KL on the prompted answer (nats/token) |", "|---|---|---|",
                  f"| unpatched, no prompt | {_fmt(h['base_answer_agreement'])} | {_fmt(h['base_mean_kl'])} |",
                  f"| patched, no prompt | {_fmt(h['answer_agreement'])} | {_fmt(h['mean_kl'])} |"]
    if r.get("eval"):
        lines += ["", "## Accuracy on held-out pairs (greedy, answer cut at the first newline, exact match)", "",
                  "| template | condition | accuracy | correct / n |", "|---|---|---|---|"]
        for e in r["eval"]["results"]:
            lines.append(f"| `{e['template']!r}` | {e['condition']} | {e['accuracy']:.3f} | {e['correct']}/{e['n']} |")
    if r.get("checkpoint") and "skipped" in r["checkpoint"]:
        lines += ["", f"Checkpoint not written: {r['checkpoint']['skipped']}."]
    elif r.get("checkpoint"):
        c = r["checkpoint"]
        lines += ["", "## Saved checkpoint vs in-process patch", "",
                  f"- thought vectors stored as: {c['vector_fold']} ({'exact' if c['exact'] else 'approximate'})",
                  f"- top-1 agreement {_fmt(c['top1_agreement_vs_in_process'])}, mean KL {_fmt(c['mean_kl_vs_in_process'], 5)} "
                  f"over {c['positions']} positions"]
        if "answer_agreement_vs_in_process" in c:
            lines.append(f"- greedy answers identical on {_fmt(c['answer_agreement_vs_in_process'])} of the eval queries; "
                         f"checkpoint accuracy {_fmt(c['accuracy'])}")
    return "\n".join(lines) + "\n"
