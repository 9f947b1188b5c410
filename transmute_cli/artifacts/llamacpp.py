"""GGUF outputs for llama.cpp, written and verified *in llama.cpp*: ``--format gguf`` (the source
GGUF with the patched tensors replaced) and ``--format gguf-lora`` (a llama.cpp LoRA adapter on
the unchanged source), each loaded back with llama-cpp-python (which is llama.cpp, built from
source) and measured against the patch in transformers: the same greedy answers on the recipe's
eval queries, and their accuracy.  Without llama-cpp-python the files are written and the check
says it did not run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

from transmute_cli import __version__
from transmute_cli.recipe.chat import ChatFormat
from transmute_cli.errors import InputError
from transmute_cli.evaluation.generate import correct_answers, query_ids, same_answers
from transmute_cli.artifacts.lora import deltas, lora_pair
from transmute_cli.artifacts.gguf_export import write_lora_gguf, write_patched_gguf
from transmute_cli.model.loading import Loaded
from transmute_cli.model.sources import gguf_of
from transmute_cli.artifacts.patch import ThoughtPatch
from transmute_cli.artifacts.merge import fold_statistics
from transmute_cli.recipe.schema import Recipe

FORMATS = ("gguf", "gguf-lora")


def available() -> bool:
    """Whether llama-cpp-python is installed (found without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _updates(loaded: Loaded, patch: ThoughtPatch, batches):
    """``export.deltas`` with every thought vector folded into the down projection (llama.cpp's
    LoRA has no bias; a patched GGUF keeps the source's tensors, which have none)."""
    stats = fold_statistics(loaded.model, loaded.fam, patch, batches) if patch.vectors else None
    return deltas(loaded.model, loaded.fam, patch, stats, bias=False)


def metadata(loaded: Loaded, patch: ThoughtPatch, recipe: Recipe | None, provenance: dict | None) -> dict[str, str]:
    """``transmute.*`` keys: what was baked into the file (llama.cpp ignores keys it does not know)."""
    meta = {"transmute.version": __version__, "transmute.base_model": loaded.source.spec,
            "transmute.base_fingerprint": loaded.fingerprint}
    if recipe is not None:
        meta.update({"transmute.recipe_name": recipe.name, "transmute.recipe": recipe.self_contained_text,
                     "transmute.recipe_sha256": recipe.sha256})
    elif patch.metadata.get("recipe"):
        meta["transmute.recipe"] = patch.metadata["recipe"]
    if provenance and provenance.get("patches"):
        meta["transmute.patches"] = ", ".join(f"{p['path']}:{p['scale']}" for p in provenance["patches"])
    return meta


def write_gguf(loaded: Loaded, patch: ThoughtPatch, out: Path, fmt: str, batches, recipe: Recipe | None, *,
               qtype: str = "q8_0", provenance: dict | None = None, chat: ChatFormat | None = None,
               patched_answers: list[str] | None = None, checkpoint_answers: list[str] | None = None,
               log=lambda _m: None) -> dict:
    """Write ``out`` (``fmt`` gguf or gguf-lora) from the GGUF the loaded model came from, then
    run the recipe's eval queries through llama.cpp and compare with ``patched_answers`` (the
    patch's greedy answers in transformers) and ``checkpoint_answers`` (a saved checkpoint's),
    each beside its accuracy."""
    meta = metadata(loaded, patch, recipe, provenance)
    with gguf_of(loaded.source, log) as src:
        if fmt == "gguf":
            info = write_patched_gguf(src, out, _updates(loaded, patch, batches), qtype=qtype, metadata=meta)
        else:
            pairs = ((name, *lora_pair(delta)[:2]) for name, delta in _updates(loaded, patch, batches))
            info = write_lora_gguf(src, out, pairs, metadata=meta)
        info["format"] = fmt
        if recipe is not None and recipe.eval and patched_answers is not None:
            info["llama_cpp"] = verify(loaded, recipe, out if fmt == "gguf" else src,
                                       lora=out if fmt == "gguf-lora" else None, chat=chat,
                                       patched_answers=patched_answers, checkpoint_answers=checkpoint_answers)
            for key, ref in (("accuracy_in_process", patched_answers), ("accuracy_checkpoint", checkpoint_answers)):
                if ref is not None:
                    info[key] = correct_answers(ref, recipe.eval, contains=recipe.chat) / len(ref)
    return info


def verify(loaded: Loaded, recipe: Recipe, model_path: Path, *, lora: Path | None, chat: ChatFormat | None,
           patched_answers: list[str], checkpoint_answers: list[str] | None = None) -> dict:
    """The eval queries through llama.cpp: agreement with the patch's answers in transformers and
    accuracy (``None`` figures and the reason when llama-cpp-python is not installed)."""
    if not available():
        return {"ran": False, "why": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    _, pre, queries = query_ids(loaded.tokenizer, recipe.instruction, recipe.eval, recipe.template, chat)
    got = answers(model_path, [pre + q for q in queries], recipe.max_new_tokens, lora=lora, newline=chat is None)
    out = {"ran": True, "answer_agreement_vs_transformers": same_answers(got, patched_answers),
           "accuracy": correct_answers(got, recipe.eval, contains=recipe.chat) / len(got), "answers": got}
    if checkpoint_answers is not None:  # the GGUF against what the checkpoint writes in transformers
        out["answer_agreement_vs_checkpoint"] = same_answers(got, checkpoint_answers)
    return out


def answers(model_path: Path, prompts: Sequence[list[int]], max_new_tokens: int, *, lora: Path | None = None,
            newline: bool = True, n_ctx: int = 2048) -> list[str]:
    """Greedy answers of llama.cpp to token-id prompts (the ids transformers' tokenizer gave, so
    both read the same tokens), cut at the first newline (``newline``) or run to an end token."""
    llm = load(model_path, lora=lora, n_ctx=n_ctx)
    out = []
    for ids in prompts:
        llm.reset()
        res = llm.create_completion(list(ids), max_tokens=max_new_tokens, temperature=0.0, top_k=1, top_p=1.0,
                                    repeat_penalty=1.0, stop=["\n"] if newline else None)
        text = res["choices"][0]["text"]
        out.append(text.split("\n", 1)[0].strip() if newline else text.strip())
    return out


def load(model_path: Path, *, lora: Path | None = None, n_ctx: int = 2048):
    """A llama-cpp-python ``Llama`` on the file (and adapter), its own logging silenced."""
    if not available():
        raise InputError("reading a GGUF through llama.cpp needs llama-cpp-python (pip install llama-cpp-python)",
                         source=str(model_path))
    from llama_cpp import Llama

    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        return Llama(model_path=str(model_path), lora_path=str(lora) if lora else None, n_ctx=n_ctx,
                     n_threads=max(1, os.cpu_count() or 1), verbose=False, seed=0)


def gguf_info(path: Path) -> dict:
    """What a GGUF file says about itself: ``transmute.*`` keys (recipe, base model, ...) and
    whether it is a LoRA adapter (``general.type = adapter``)."""
    from transmute_cli.artifacts.gguf_export import _reader

    fields = _reader(path).fields
    read = lambda key: fields[key].contents() if key in fields else None  # noqa: E731
    return {"recipe": read("transmute.recipe"), "recipe_name": read("transmute.recipe_name"),
            "base_model": read("transmute.base_model"), "adapter": read("general.type") == "adapter"}


def evaluate_gguf(path: Path, adapter: bool, source: Path, tokenizer, recipe: Recipe, templates: Sequence[str],
                  chat: ChatFormat | None = None, progress=None) -> list:
    """``evaluate``'s three conditions, all in llama.cpp: the source GGUF without and with the
    prompt, and the patched GGUF (or the source with the adapter ``path``) without it; the token
    ids are transformers' tokenizer's, as in every other eval."""
    from transmute_cli.recipe.datafiles import Pair, rerender
    from transmute_cli.evaluation.generate import Result
    from transmute_cli.recipe.schema import eval_queries
    from transmute_cli.model.tokens import special_prefix, token_ids

    pairs: list[Pair] = eval_queries(recipe)
    patched = dict(model_path=source, lora=path) if adapter else dict(model_path=path, lora=None)
    results = []
    for template in templates:
        instr, pre, queries = query_ids(tokenizer, recipe.instruction, pairs, template, chat)
        rewritten = rerender(recipe.instruction, recipe.template, template) if chat is None and \
            template != recipe.template else None
        if rewritten:
            instr = special_prefix(tokenizer) + token_ids(tokenizer, rewritten)
        for cond, prefix, where in (("base", pre, dict(model_path=source, lora=None)), ("prompt", instr, None),
                                    ("patched", pre, patched)):
            if progress:
                progress(template, cond)
            where = where or dict(model_path=source, lora=None)
            got = answers(where["model_path"], [prefix + q for q in queries], recipe.max_new_tokens, lora=where["lora"],
                          newline=chat is None)
            results.append(Result(template, cond, correct_answers(got[:len(recipe.eval)], recipe.eval,
                                                                   contains=recipe.chat), len(recipe.eval), got,
                                  rerendered=cond == "prompt" and rewritten is not None))
    return results
