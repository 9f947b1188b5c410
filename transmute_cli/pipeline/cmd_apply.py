"""transmute apply: a patch (or a run) to a patched checkpoint, a PEFT adapter or a GGUF."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


from transmute_cli import __version__
from transmute_cli.artifacts import llamacpp
from transmute_cli.artifacts.checkpoint import (
    check_save_dtype, needs_fold, patched_eval_answers, token_batches, write_checkpoint, write_peft,
)
from transmute_cli.artifacts.gguf_export import check_qtype
from transmute_cli.errors import InputError, PatchError, RecipeError
from transmute_cli.recipe.chat import ChatFormat
from transmute_cli.artifacts.patch import ThoughtPatch
from transmute_cli.model.loading import Loaded, load_model
from transmute_cli.artifacts.outputs import atomic_dir, atomic_file, check_file_target, check_target
from transmute_cli.artifacts.patch import check_compatible, combine, load_patch
from transmute_cli.recipe.schema import Recipe, parse_recipe
from transmute_cli.report.markdown import adapter_card
from transmute_cli.messages import Log, quiet
from transmute_cli.pipeline.prepare import patch_texts, chat_of
from transmute_cli.pipeline.results import model_json


def apply(
    patch_specs: Sequence[tuple[str, float]],
    out: Path,
    *,
    model: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    dtype: str = "float32",
    log: Log = quiet,
    trust_remote_code: bool = False,
    family: str | None = None,
    fmt: str = "checkpoint",
    rank: int | None = None,
    save_dtype: str = "auto",
    stop_at_newline: bool = False,
    gguf_type: str = "q8_0",
) -> dict:
    """One or several patches (with scales) -> a patched standard checkpoint folder, a PEFT
    LoRA adapter (``fmt="peft"``: exact at each module's rank, or truncated to ``rank``), or a
    GGUF file for llama.cpp (``gguf``: the source GGUF patched, its tensors in ``gguf_type``;
    ``gguf-lora``: a llama.cpp adapter), verified in llama.cpp (``llamacpp``)."""
    if fmt not in ("checkpoint", "peft", *llamacpp.FORMATS):
        raise InputError(f"must be checkpoint, peft, gguf or gguf-lora, got {fmt!r}", field="--format")
    out = Path(out)
    if fmt in llamacpp.FORMATS:
        check_file_target(out, overwrite)
        check_qtype(gguf_type)
    else:
        check_target(out, overwrite)
    check_save_dtype(save_dtype)
    patches = [(load_patch(p), s) for p, s in patch_specs]
    first = patches[0][0]
    spec = model or first.metadata.get("base_model")
    if not spec:
        raise InputError("the patch does not record its base model; pass --model", source=patch_specs[0][0])
    if fmt in llamacpp.FORMATS:
        from transmute_cli.model.sources import check_gguf_source
        from transmute_cli.model.loading import resolve

        check_gguf_source(resolve(spec, log))
    log(f"loading base model {spec}")
    loaded = load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code, family=family, log=log)
    for (p, _s), (path, _) in zip(patches, patch_specs):
        check_compatible(p, loaded.model, loaded.fam, loaded.fingerprint, force=force, source=path)
    patch = combine(patches) if len(patches) > 1 or patches[0][1] != 1.0 else first
    fold = needs_fold(loaded, patch, fmt)
    texts: list[str] = []
    recipes = []
    chat: ChatFormat | None = None
    for (p, _), (path, _) in zip(patches, patch_specs):
        if not p.metadata.get("recipe"):
            continue
        try:
            r = parse_recipe(p.metadata["recipe"], source=f"{path} (recipe)")
        except RecipeError:
            # the recipe is needed only to fold thought vectors; a patch written before recipes
            # were stored self-contained may name files relative to a folder we do not know
            if fold:
                raise
            continue
        recipes.append(r)
        r_chat = chat_of(r, loaded)
        chat = chat or r_chat  # the text without a system message is the template's, whichever the system message
        texts += patch_texts(r, r_chat)
    if fold and not texts:
        raise PatchError("the patch carries no recipe to fold its thought vectors with", source=patch_specs[0][0])
    provenance = {"patches": [{"path": p, "scale": s} for p, s in patch_specs]}
    one_recipe = recipes[0] if len(recipes) == 1 else None
    if fmt in llamacpp.FORMATS:
        info = export_gguf(loaded, patch, out, fmt, texts, one_recipe, chat, provenance=provenance, qtype=gguf_type,
                           overwrite=overwrite, log=log)
        return {"gguf": info, "model": model_json(loaded), "patches": provenance["patches"]}
    with atomic_dir(out, overwrite) as tmp:
        if fmt == "peft":
            log("exporting a PEFT LoRA adapter " + (f"at rank {rank}" if rank else "at the patch's exact ranks"))
            info = write_peft(loaded, patch, tmp, texts, one_recipe, rank, peft_base(loaded), provenance=provenance,
                              chat=chat)
            (tmp / "README.md").write_text(adapter_card(
                info, base=spec, base_kind=loaded.source.kind, base_path=peft_base(loaded), fingerprint=loaded.fingerprint,
                instruction=one_recipe and one_recipe.instruction, template=one_recipe and one_recipe.template,
                version=__version__))
        else:
            info = write_checkpoint(loaded, patch, tmp, texts or [" "], one_recipe, None, provenance=provenance,
                                    save_dtype=save_dtype, chat=chat, stop_at_newline=stop_at_newline)
    info["path"] = str(out)
    return {"checkpoint" if fmt == "checkpoint" else "adapter": info, "model": model_json(loaded),
            "patches": provenance["patches"]}


def export_gguf(loaded: Loaded, patch: ThoughtPatch, out: Path, fmt: str, texts: Sequence[str], recipe: Recipe | None,
                chat: ChatFormat | None, *, provenance: dict | None = None, qtype: str = "q8_0",
                overwrite: bool = False, log: Log = quiet) -> dict:
    """``llamacpp.write_gguf`` into ``out`` (one file, renamed into place once whole), the
    vectors folded over ``texts``, checked in llama.cpp against the patch's answers here."""
    reference = patched_eval_answers(loaded, patch, recipe, chat) if recipe is not None and recipe.eval else None
    batches = token_batches(loaded, list(texts) or [" "], plain=chat.plain if chat else None)
    log(f"writing {'a patched GGUF' if fmt == 'gguf' else 'a llama.cpp LoRA adapter'} and checking it in llama.cpp")
    with atomic_file(out, overwrite) as tmp:
        info = llamacpp.write_gguf(loaded, patch, tmp, fmt, batches, recipe, qtype=qtype, provenance=provenance,
                                   chat=chat, patched_answers=reference, log=log)
    info["path"] = str(out)
    return info


def peft_base(loaded: Loaded) -> str:
    """The adapter's ``base_model_name_or_path``: what ``AutoPeftModelForCausalLM`` can load.  A
    transmute alias or a GGUF is no name transformers resolves, so its converted folder (in this
    machine's cache) goes there; the alias stays in ``transmute.json`` and the adapter card says
    how to load it on another machine.  A folder or hub id is written as given."""
    return loaded.source.path if loaded.source.kind in ("alias", "gguf") else loaded.source.spec
