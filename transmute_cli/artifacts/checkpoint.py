"""A patched checkpoint or PEFT adapter, written and verified: merge the patch into the weights,
save a standard folder that loads with plain ``transformers`` (or ``PeftModel``), undo the merge,
and measure how far the saved weights are from the in-process patch."""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from transmute_cli import __version__
from transmute_cli.recipe.chat import ChatFormat
from transmute_cli.errors import InputError
from transmute_cli.evaluation.generate import (
    correct_answers, end_token_ids, generate_answers, newline_token_ids, query_ids, same_answers,
)
from transmute_cli.artifacts.lora import vector_as_bias
from transmute_cli.model.families import model_device
from transmute_cli.engine.fidelity import compare_logits
from transmute_cli.engine.hooks import ThoughtHooks
from transmute_cli.model.loading import DTYPES, Loaded, cache_dir
from transmute_cli.artifacts.patch import ThoughtPatch
from transmute_cli.artifacts.merge import fold_statistics, merge, vector_fold_kind
from transmute_cli.recipe.schema import Recipe
from transmute_cli.model.tokens import encode, micro_batches, pad_id


def token_batches(loaded: Loaded, texts: Sequence[str], size: int = 16, plain: str | None = None):
    """The texts as the model without the prompt reads them (``plain``: a chat recipe's prefix)."""
    enc = encode(loaded.tokenizer, "", texts, plain=plain)
    mbs = micro_batches(enc, list(range(len(texts))), size, pad_id(loaded.tokenizer), model_device(loaded.model))
    p = len(enc.npre)
    out = []
    for mb in mbs:
        mask = torch.zeros(mb.nctx_ids.shape, dtype=torch.bool, device=mb.nctx_ids.device)
        mask[:, :p] = True
        mask[:, p:] = mb.xmask
        out.append((mb.nctx_ids, mask))
    return out


def masked_logits(model, batches) -> list[torch.Tensor]:
    """Float32 logits at the real (unpadded) positions of ``token_batches``, on the CPU."""
    with torch.no_grad():
        return [model(input_ids=ids).logits[mask].float().cpu() for ids, mask in batches]


def write_checkpoint(loaded: Loaded, patch: ThoughtPatch, out: Path, texts: Sequence[str], recipe: Recipe | None,
                     patched_answers: list[str] | None, *, scale: float = 1.0, provenance: dict | None = None,
                     save_dtype: str = "auto", chat: ChatFormat | None = None,
                     stop_at_newline: bool = False) -> dict:
    """Merge the patch into the loaded model's weights, save a standard HF folder in ``save_dtype``
    (``auto``: the model's own, ``models.native_dtype``), undo the merge, and measure how far the
    checkpoint is from the in-process patch: mean KL and top-1 agreement over the patch texts,
    and greedy-answer agreement on the eval.  Saved in another dtype than the one in memory, the
    checkpoint is measured as a user gets it: reloaded from the folder with plain transformers.
    Its ``generation_config`` is the base model's; ``stop_at_newline`` (a text recipe's task
    stop rule, opt-in) lists every newline token as an end token too."""
    model, fam = loaded.model, loaded.fam
    check_save_dtype(save_dtype)
    dtype = loaded.native_dtype if save_dtype == "auto" else save_dtype
    in_memory = next(model.parameters()).dtype == DTYPES[dtype]
    plain = chat.plain if chat else None  # a chat recipe's texts follow the template's own prefix
    batches = token_batches(loaded, texts[:64], plain=plain)
    with ThoughtHooks(model, fam) as hooks:
        hooks.scale = scale
        hooks.set_patch(patch)
        ref = masked_logits(model, batches)
    stats = vector_fold_stats(loaded, patch.scaled(scale), texts, plain=plain)
    cache_dir().mkdir(parents=True, exist_ok=True)
    spill = tempfile.TemporaryDirectory(prefix="undo-", dir=cache_dir())
    info = merge(model, fam, patch, scale, stats, spill=Path(spill.name))  # originals on disk: one layer in memory
    result = {"path": out.name, "dtype": dtype, "vector_fold": info["vector_fold"],
              "exact": info["vector_fold"] in ("bias", "none")}
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_in(model, out, DTYPES[dtype])
        loaded.tokenizer.save_pretrained(out)
        # the stop rule is the task's, not the model's: plain generate continues a list or a
        # paragraph past a line unless asked (a chat model's answers end at its end-of-turn token)
        result["generation_stops_at_newline"] = (stop_at_newline and plain is None
                                                 and _stop_at_newline(model, loaded.tokenizer, out))
        if in_memory:  # the merged weights are the saved ones
            result.update(_measure(loaded, model, batches, ref, recipe, patched_answers, chat))
    finally:
        info["undo"]()  # the loaded model is the base model again
        spill.cleanup()
    if not in_memory:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(out, dtype=DTYPES[dtype]).to(model_device(model)).eval()
        try:
            result.update(_measure(loaded, saved, batches, ref, recipe, patched_answers, chat))
        finally:
            del saved
    _write_sidecar(out, loaded, patch, recipe, provenance, {"fidelity": {k: v for k, v in result.items() if k != "path"}})
    return result


def needs_fold(loaded: Loaded, patch: ThoughtPatch, fmt: str = "checkpoint") -> bool:
    """Whether the patch's thought vectors must be folded into the down projection by least
    squares: a checkpoint carries them exactly only as a config-switched MLP bias (Llama), a
    PEFT adapter as ``lora_bias`` where they join the residual at down_proj itself; a GGUF output
    never (``llamacpp``)."""
    if not patch.vectors:
        return False
    if fmt in ("gguf", "gguf-lora"):
        return True
    if fmt == "peft":
        return not vector_as_bias(loaded.fam)
    return vector_fold_kind(loaded.model, loaded.fam) != "bias"


def vector_fold_stats(loaded: Loaded, patch: ThoughtPatch, texts: Sequence[str], fmt: str = "checkpoint",
                      plain: str | None = None) -> dict | None:
    """The activation statistics over ``texts`` that fold the vectors (``merge.fold_statistics``),
    or None where ``fmt`` carries them exactly."""
    if not needs_fold(loaded, patch, fmt):
        return None
    return fold_statistics(loaded.model, loaded.fam, patch, token_batches(loaded, texts, plain=plain))


def check_save_dtype(value: str) -> None:
    """Checked before any work, so a typo does not cost a compute."""
    if value != "auto" and value not in DTYPES:
        raise InputError(f"must be auto or one of {', '.join(DTYPES)}, got {value!r}", field="--save-dtype")


def _measure(loaded: Loaded, model, batches, ref, recipe: Recipe | None, patched_answers: list[str] | None,
             chat: ChatFormat | None) -> dict:
    got = masked_logits(model, batches)
    result = compare_runs(ref, got, "in_process")
    if patched_answers is not None and recipe is not None and recipe.eval:
        answers = _eval_answers(loaded, recipe, model, chat)
        result["answer_agreement_vs_in_process"] = same_answers(answers, patched_answers)
        result["accuracy"] = correct_answers(answers, recipe.eval, contains=recipe.chat) / len(answers)
        result["answers"] = answers  # the saved checkpoint's greedy answers on the eval queries
    return result


def save_in(model, out: Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` with every floating-point weight in ``dtype`` and the config saying so;
    the model is left as it was.  The converted copies (a tied weight converted once) are held
    until saved: half the model's size from float32 to bf16, nothing when the dtypes match."""
    current = next(model.parameters()).dtype
    if current == dtype:
        model.save_pretrained(out)
        return
    cast: dict[int, torch.Tensor] = {}  # by storage: a tied embedding is converted (and saved) once
    state = {}
    for name, t in model.state_dict().items():
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key not in cast:
            cast[key] = t.to(dtype) if t.is_floating_point() else t
        state[name] = cast[key]
    model.save_pretrained(out, state_dict=state)
    # save_pretrained writes the dtype of the parameters in memory into config.json
    cfg = json.loads((out / "config.json").read_text())
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _stop_at_newline(model, tokenizer, out: Path) -> bool:
    """Save a ``generation_config`` whose end tokens are EOS and every token holding a newline, so
    plain ``generate`` on the checkpoint stops where the patch's answers end (one line) instead of
    running on into the next example -- and stops every other use at its first line too, hence
    opt-in (``--stop-at-newline``).  Returns whether one was written (a model may have none)."""
    if getattr(model, "generation_config", None) is None:
        return False
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = list(dict.fromkeys(end_token_ids(model, tokenizer) + newline_token_ids(tokenizer)))
    config.save_pretrained(out)
    return True


def write_peft(loaded: Loaded, patch: ThoughtPatch, out: Path, texts: Sequence[str], recipe: Recipe | None,
               rank: int | None, base_spec: str, *, provenance: dict | None = None,
               chat: ChatFormat | None = None) -> dict:
    """Export the adapter, reload it with ``PeftModel.from_pretrained`` and measure it against the
    in-process patch (KL/top-1 on the patch texts; eval accuracy of both when there is an eval)."""
    from peft import PeftModel

    from transmute_cli.artifacts.lora import export_peft

    model, fam = loaded.model, loaded.fam
    plain = chat.plain if chat else None
    stats = vector_fold_stats(loaded, patch, texts, "peft", plain=plain)
    info = export_peft(model, fam, patch, rank, out, base_spec, stats)
    batches = token_batches(loaded, texts[:64], plain=plain)
    with ThoughtHooks(model, fam) as hooks:
        hooks.set_patch(patch)
        ref = masked_logits(model, batches)
        acc_in_process = _eval_accuracy(loaded, recipe, chat=chat) if recipe is not None and recipe.eval else None
    peft_model = PeftModel.from_pretrained(model, str(out))
    try:
        got = masked_logits(peft_model, batches)
        info.update(compare_runs(ref, got, "in_process"))
        if acc_in_process is not None:
            info["accuracy_in_process"] = acc_in_process
            info["accuracy"] = _eval_accuracy(loaded, recipe, peft_model, chat)
    finally:
        peft_model.unload()
    _write_sidecar(out, loaded, patch, recipe, provenance, {"adapter": info})
    return info


def _write_sidecar(out: Path, loaded: Loaded, patch: ThoughtPatch, recipe: Recipe | None, provenance: dict | None,
                   figures: dict) -> None:
    """``transmute.json``: the base a user resolves (alias, hub id or path, with its fingerprint),
    the recipe, where the patch came from, and what was measured."""
    (out / "transmute.json").write_text(json.dumps({
        "tool_version": __version__,
        "base_model": loaded.source.spec,
        "base_fingerprint": loaded.fingerprint,
        "patch_metadata": {k: v for k, v in patch.metadata.items() if k != "recipe"},
        "recipe": recipe.self_contained_text if recipe is not None else patch.metadata.get("recipe"),
        "recipe_name": recipe.name if recipe is not None else patch.metadata.get("recipe_name"),
        **(provenance or {}),
        **figures,
    }, indent=2, sort_keys=True) + "\n")


def patched_eval_answers(loaded: Loaded, patch: ThoughtPatch, recipe: Recipe, chat: ChatFormat | None = None) -> list[str]:
    """The in-process patch's greedy answers to the recipe's eval queries (the reference an
    exported form is compared with)."""
    with ThoughtHooks(loaded.model, loaded.fam) as hooks:
        hooks.set_patch(patch)
        return _eval_answers(loaded, recipe, chat=chat)


def _eval_answers(loaded: Loaded, recipe: Recipe, model=None, chat: ChatFormat | None = None) -> list[str]:
    """Greedy answers to the recipe's eval queries, no prompt (``model`` defaults to the loaded one;
    ``chat``: a chat recipe's format)."""
    _, pre, queries = query_ids(loaded.tokenizer, recipe.instruction, recipe.eval, recipe.template, chat)
    return generate_answers(model or loaded.model, loaded.tokenizer, [pre + q for q in queries], recipe.max_new_tokens,
                            newline=chat is None)


def _eval_accuracy(loaded: Loaded, recipe: Recipe, model=None, chat: ChatFormat | None = None) -> float:
    return correct_answers(_eval_answers(loaded, recipe, model, chat), recipe.eval, contains=recipe.chat) / len(recipe.eval)


def compare_runs(ref: list[torch.Tensor], got: list[torch.Tensor], name: str) -> dict:
    kl = agree = n = 0.0
    for r, g in zip(ref, got):
        k, a = compare_logits(r, g)
        kl, agree, n = kl + k, agree + a, n + r.shape[0]
    return {f"mean_kl_vs_{name}": kl / max(n, 1), f"top1_agreement_vs_{name}": agree / max(n, 1), "positions": int(n)}
