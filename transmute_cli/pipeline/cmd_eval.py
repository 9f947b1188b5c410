"""transmute eval: a run, a checkpoint or a GGUF scored on a recipe's held-out queries (per
template)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path


from transmute_cli.artifacts import llamacpp
from transmute_cli.recipe.datafiles import load_templates
from transmute_cli.errors import InputError
from transmute_cli.recipe.chat import chat_format
from transmute_cli.evaluation.generate import CHAT_TEMPLATE, Result, evaluate
from transmute_cli.model.loading import load_model
from transmute_cli.artifacts.patch import check_compatible, load_patch
from transmute_cli.recipe.schema import eval_queries, load_recipe, parse_recipe
from transmute_cli.messages import Log, quiet
from transmute_cli.pipeline.prepare import chat_of
from transmute_cli.pipeline.results import (
    many_shot_result, many_shot_json, locality_reference, locality_json, eval_json, prompt_warnings, samples_json,
)


# --------------------------------------------------------------------------- eval


def eval_gguf(target: str, path: Path, extra: Sequence[str], *, recipe_path: str | None = None, log: Log = quiet,
              progress: Callable[[str, str], None] | None = None) -> dict:
    """``eval`` of a GGUF written by ``apply --format gguf|gguf-lora``: every condition in
    llama.cpp (``llamacpp.evaluate_gguf``); the recipe and base model from its ``transmute.*`` keys."""
    from transformers import AutoTokenizer

    from transmute_cli.model.sources import gguf_of

    from transmute_cli.model.loading import resolve

    info = llamacpp.gguf_info(path)
    if not info["base_model"]:
        raise InputError("a GGUF without transmute.base_model: not one transmute wrote", source=target)
    recipe = load_recipe(recipe_path) if recipe_path else (
        parse_recipe(info["recipe"], source=f"{target} (recipe)", default_name=info["recipe_name"] or path.stem)
        if info["recipe"] else None)
    if recipe is None:
        raise InputError("no recipe recorded; pass --recipe", source=target)
    if not recipe.eval and not recipe.eval_inputs:
        raise InputError("has no eval pairs to evaluate on", source=recipe.source or f"{target} (recipe)", field="eval")
    src = resolve(info["base_model"], log)
    tokenizer = AutoTokenizer.from_pretrained(src.path)
    chat = chat_format(tokenizer, recipe.instruction, model=recipe.model) if recipe.chat else None
    own = CHAT_TEMPLATE if recipe.chat else recipe.template
    templates = [own] + [t for t in extra if t != own]
    t0 = time.perf_counter()
    with gguf_of(src, log) as source:
        results = llamacpp.evaluate_gguf(path, info["adapter"], source, tokenizer, recipe, templates, chat, progress)
    scored = eval_json(recipe, results)
    queries = eval_queries(recipe)
    return {
        "target": target, "kind": "gguf-lora" if info["adapter"] else "gguf", "engine": "llama.cpp",
        "recipe": recipe.name, "n": len(recipe.eval), "queries": len(queries), "scale": 1.0, "chat": recipe.chat,
        **scored, "answers": {f"{r.template}|{r.condition}": r.answers for r in results},
        "samples": samples_json(recipe, queries, results), "many_shot_prompt": None,
        "warnings": prompt_warnings(scored["results"]),
        "prompt_rerendered": [r.template for r in results if r.rerendered], "locality": None,
        "eval_s": time.perf_counter() - t0,
    }


def resolve_target(target: str) -> tuple[str, Path]:
    """('run'|'patch'|'checkpoint', path) for a run folder, a patch file or a checkpoint folder."""
    p = Path(target)
    if not p.exists():
        raise InputError("not found", source=target)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return "gguf", p
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
    log: Log = quiet,
    progress: Callable[[str, str], None] | None = None,
    trust_remote_code: bool = False,
    family: str | None = None,
) -> dict:
    kind, path = resolve_target(target)
    extra = load_templates(templates_path) if templates_path else []
    if kind == "gguf":
        return eval_gguf(target, path, extra, recipe_path=recipe_path, log=log, progress=progress)
    if kind in ("run", "patch"):
        patch = load_patch(path)
        recipe_text, base_spec = patch.metadata.get("recipe"), patch.metadata.get("base_model")
        name = patch.metadata.get("recipe_name")
    else:
        side = path / "transmute.json"
        if not side.is_file():
            raise InputError("a checkpoint without transmute.json: evaluate its run folder or patch instead", source=target)
        try:
            info = json.loads(side.read_text())
        except (OSError, ValueError):
            raise InputError("transmute.json is not valid JSON", source=str(side)) from None
        recipe_text, base_spec, patch = info.get("recipe"), info.get("base_model"), None
        name = info.get("recipe_name")
    # a recorded recipe without a name key is called what compute called it: its file's stem
    name = name or Path(target.rstrip("/")).stem
    recipe = load_recipe(recipe_path) if recipe_path else (
        parse_recipe(recipe_text, source=f"{target} (recipe)", default_name=name) if recipe_text else None)
    if recipe is None:
        raise InputError("no recipe recorded; pass --recipe", source=target)
    queries = eval_queries(recipe)
    if not queries:
        raise InputError("has no eval pairs to evaluate on", source=recipe.source or f"{target} (recipe)", field="eval")
    if recipe.chat and extra:
        raise InputError("a chat recipe has no templates to vary (the model's chat template writes its queries)",
                         field="--templates")
    own = CHAT_TEMPLATE if recipe.chat else recipe.template
    templates = [own] + [t for t in extra if t != own]
    log(f"loading base model {base_spec}")
    base = load_model(base_spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code, family=family,
                      log=log)
    fam = base.fam  # resolved once, with the model: every step below is handed it
    chat = chat_of(recipe, base)
    t0 = time.perf_counter()
    results: list[Result] = []
    loc_ref = locality_reference(recipe, base, chat) if "patched" in conditions else None
    # a many-shot patch distils the instruction + demonstrations: that prompt is measured too
    shot = many_shot_result(recipe, base, queries, family=fam) if recipe.demonstrations else None
    loc = None
    if patch is not None:
        check_compatible(patch, base.model, base.fam, base.fingerprint, force=False, source=str(path))
        if loc_ref is not None:
            loc = locality_json(loc_ref, base.model, base.fam, patch.scaled(scale) if scale != 1.0 else patch)
        results = evaluate(base.model, base.tokenizer, recipe.instruction, queries, templates, patch,
                           conditions=conditions, max_new_tokens=recipe.max_new_tokens, scale=scale, family=fam,
                           progress=progress, demonstrations=recipe.template, chat=chat)
    else:
        results = evaluate(base.model, base.tokenizer, recipe.instruction, queries, templates, None,
                           conditions=[c for c in conditions if c != "patched"], max_new_tokens=recipe.max_new_tokens,
                           family=fam, progress=progress, demonstrations=recipe.template, chat=chat)
        if "patched" in conditions:
            del base
            ck = load_model(str(path), device=device, dtype=dtype, trust_remote_code=trust_remote_code, family=family)
            loc = locality_json(loc_ref, ck.model, ck.fam) if loc_ref is not None else None
            # the checkpoint is the patched model: run unprompted, reported (and shown) as patched
            results += evaluate(ck.model, ck.tokenizer, recipe.instruction, queries, templates, None,
                                conditions=("base",), max_new_tokens=recipe.max_new_tokens, family=ck.fam,
                                progress=progress and (lambda template, _: progress(template, "patched")),
                                chat=chat_of(recipe, ck))
            for r in results[-len(templates):]:
                r.condition = "patched"
    order = {t: i for i, t in enumerate(templates)}
    results.sort(key=lambda r: (order[r.template], conditions.index(r.condition)))
    scored = eval_json(recipe, results)
    return {
        "target": target, "kind": kind, "recipe": recipe.name, "n": len(recipe.eval), "queries": len(queries),
        "scale": scale, "chat": recipe.chat, **scored,
        "answers": {f"{r.template}|{r.condition}": r.answers for r in results},
        "samples": samples_json(recipe, queries, results, shot and {"many_shot_prompt": shot.answers}),
        "many_shot_prompt": many_shot_json(recipe, shot) if shot is not None else None,
        "warnings": prompt_warnings(scored["results"]),
        # templates whose prompt condition had the instruction's demonstrations rewritten in them
        "prompt_rerendered": [r.template for r in results if r.rerendered],
        "locality": loc,
        "eval_s": time.perf_counter() - t0,
    }
