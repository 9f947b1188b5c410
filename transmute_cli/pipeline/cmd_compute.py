"""transmute compute: a recipe to a run folder (patch, checkpoint, report.json, report.md)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from transmute_cli import __version__
from transmute_cli.artifacts import llamacpp
from transmute_cli.artifacts.checkpoint import check_save_dtype, token_batches, write_checkpoint
from transmute_cli.engine.distributed import init_distributed, leave_distributed
from transmute_cli.engine.loop import ProgressFn
from transmute_cli.errors import InputError
from transmute_cli.evaluation.generate import CHAT_TEMPLATE, Result, evaluate
from transmute_cli.evaluation.heldout import heldout_fidelity
from transmute_cli.model.families import model_device
from transmute_cli.model.loading import Loaded, load_model
from transmute_cli.artifacts.outputs import atomic_dir, check_target
from transmute_cli.artifacts.patch import save_patch
from transmute_cli.recipe.schema import Recipe, eval_queries
from transmute_cli.report.markdown import report_markdown
from transmute_cli.messages import Log, quiet
from transmute_cli.pipeline.prepare import (
    patch_texts, chat_of, preserve_texts, many_shot_prompt, label_inputs, fit, with_source,
)
from transmute_cli.pipeline.results import (
    many_shot_result, many_shot_json, locality_reference, locality_json, heldout_json, eval_json, prompt_warnings,
    samples_json, fidelity_json, patch_metadata, model_json, settings_json,
)


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
    log: Log = quiet,
    loaded: Loaded | None = None,
    trust_remote_code: bool = False,
    family: str | None = None,
    device_map: str | None = None,
    save_dtype: str = "auto",
    diagnostics: bool = False,
    stop_at_newline: bool = False,
    fidelity: bool = True,
    gguf: bool = False,
) -> dict:
    """Recipe -> run folder with patch.safetensors, checkpoint/, report.json, report.md.
    ``diagnostics``: the per-layer matrix fit residual also where it costs more than the solve
    (d×d sums, past d/2 tokens); where the token rows are kept it is always there.
    ``fidelity=False`` skips the in-sample fidelity pass (end-to-end KL on the patch examples;
    on a chat recipe with long answers the largest part of compute); the held-out figures stay."""
    out = Path(out) if out is not None else Path("runs") / recipe.name
    check_target(out, overwrite)
    check_save_dtype(save_dtype)
    if gguf:  # written from the GGUF the model came from: known before any work
        from transmute_cli.model.sources import check_gguf_source
        from transmute_cli.model.loading import resolve

        check_gguf_source(resolve(recipe.model, log))
    rank, distributed, owned = init_distributed(device)
    if distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    t0 = time.perf_counter()
    if loaded is None:
        log(f"loading model {recipe.model}")
        loaded = load_model(recipe.model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, family=family,
                            device_map=device_map, log=log)
    fam = loaded.fam  # resolved once, with the model: every step below is handed it
    t_load = time.perf_counter() - t0
    t_label = time.perf_counter()
    if recipe.pool:
        log(f"a system prompt alone: user messages from {recipe.pool}")
    if recipe.inputs:
        log(f"labelling {len(recipe.inputs)} inputs with the prompted model's greedy answers")
    chat = chat_of(recipe, loaded)
    recipe, labels = label_inputs(recipe, loaded, family=fam, chat=chat)
    try:  # a conversation the chat template cannot align is named in the recipe's file
        preserve, preserve_cut = preserve_texts(recipe, loaded, chat, family=fam)
        texts = patch_texts(recipe, chat)
    except InputError as e:
        raise with_source(e, recipe, labels) from None
    t_label = time.perf_counter() - t_label
    shots = f", each under the instruction + {recipe.demonstrations} other examples" if recipe.demonstrations else ""
    formats = len(recipe.patch_formats()) if not chat else 1
    broad = {"original": " and the broad texts' cached statistics", "prompted": " and the broad texts",
             "off": ""}[recipe.broad]
    log(f"computing the patch from {len(texts)} example texts ({formats} query format{'s' * (formats > 1)})"
        f"{shots}{broad} on {model_device(loaded.model)}")
    t1 = time.perf_counter()
    done = False
    try:
        res = fit(recipe, loaded, progress=progress, family=fam, distributed=distributed,
                  diagnostics=diagnostics or None, chat=chat, preserve=preserve, fidelity=fidelity)
        done = True
    except InputError as e:
        raise with_source(e, recipe, labels) from None
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
        "recipe": {"name": recipe.name, "path": recipe.source, "sha256": recipe.sha256,
                   # a system prompt alone: which user messages came from the shipped pool
                   "pool": recipe.pool or None},
        "model": model_json(loaded),
        "settings": settings_json(recipe),
        "examples": len(recipe.examples),
        "patch_texts": len(texts),
        "labels": labels or None,  # inputs labelled by the prompted model (label_inputs)
        # inputs left out: the prompted model's answer was empty / still cut at the larger cap
        "labels_left_out": {"empty": sum(not l["output"] for l in labels),
                            "cut": sum(l["cut"] and not l["kept"] for l in labels)} if labels else None,
        # chat inputs whose answer was still cut at the larger cap: fitted as open answers
        "labels_open": sum(l["open"] for l in labels) if labels else None,
        # chat preservation messages left out: the model's own answer still cut at the larger cap
        "preserve_left_out": preserve_cut,
        "fidelity": fidelity_json(res),
        "timings": {"load_s": t_load, "compute_s": t_compute, **({"label_s": t_label} if labels else {}),
                    **{f"engine_{k}_s": v for k, v in res.timings.items()}},
        "eval": None,
        "samples": None,  # every held-out query's answers per condition (samples_json)
        "warnings": [],  # prompt_warnings: the exit code stays 0, the user is told
        "locality": None,
        "checkpoint": None,
        "gguf": None,  # --gguf: the patched GGUF (llamacpp.write_gguf), checked in llama.cpp
    }
    results: list[Result] = []
    queries = eval_queries(recipe)
    if queries and evaluate_patch:
        log(f"evaluating on {len(queries)} held-out queries")
        t2 = time.perf_counter()
        template = CHAT_TEMPLATE if chat else recipe.template
        results = evaluate(loaded.model, loaded.tokenizer, recipe.instruction, queries, [template], patch,
                           max_new_tokens=recipe.max_new_tokens, family=fam, chat=chat)
        report["eval"] = eval_json(recipe, results)
        shot_answers = None
        by = {r.condition: r for r in results}
        held = heldout_fidelity(loaded.model, loaded.tokenizer, recipe.instruction, queries, template, patch,
                                by["prompt"], by["patched"], by["base"], family=fam, chat=chat)
        report["fidelity"]["heldout"] = heldout_json(held)
        if recipe.demonstrations:  # the prompt the patch distils, as a user could write it instead
            shot = many_shot_result(recipe, loaded, queries, family=fam)
            # the patch measured against the prompt it distils, beside the instruction as written
            held_shot = heldout_fidelity(loaded.model, loaded.tokenizer, many_shot_prompt(recipe), queries, template,
                                         patch, shot, by["patched"], by["base"], family=fam)
            report["eval"]["many_shot_prompt"] = {**many_shot_json(recipe, shot), "heldout": heldout_json(held_shot)}
            shot_answers = {"many_shot_prompt": shot.answers}
        report["samples"] = samples_json(recipe, queries, results, shot_answers)
        report["warnings"] = prompt_warnings(report["eval"]["results"])
        report["timings"]["eval_s"] = time.perf_counter() - t2
    t2 = time.perf_counter()  # cheap: three forward passes over one text, no generation
    report["locality"] = locality_json(locality_reference(recipe, loaded, chat), loaded.model, loaded.fam, patch)
    report["timings"]["locality_s"] = time.perf_counter() - t2
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
                provenance={"patch_sha256_recipe": recipe.sha256, "scale": 1.0}, save_dtype=save_dtype, chat=chat,
                stop_at_newline=stop_at_newline,
            )
            report["timings"]["checkpoint_s"] = time.perf_counter() - t3
        if gguf:
            log("writing the patched GGUF and checking it in llama.cpp")
            t3 = time.perf_counter()
            reference = next((r.answers for r in results if r.condition == "patched"), None)
            report["gguf"] = llamacpp.write_gguf(
                loaded, patch, tmp / "model.gguf", "gguf", token_batches(loaded, texts, plain=chat.plain if chat else None),
                recipe, chat=chat, patched_answers=reference[: len(recipe.eval)] if reference else None,
                checkpoint_answers=(report.get("checkpoint") or {}).get("answers"), log=log)
            report["gguf"]["path"] = "model.gguf"
            report["timings"]["gguf_s"] = time.perf_counter() - t3
        (tmp / "recipe.yaml").write_text(recipe.text)
        report["timings"]["total_s"] = time.perf_counter() - t0  # from the model load to the files written
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(report_markdown(report))
    report["output"] = str(out)
    return report
