"""What a run reports, as plain dicts (report.json): the held-out results, formats and rules,
samples, fidelity, the locality figures, the many-shot prompt beside the patch, the model and the
settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from transmute_cli.recipe.datafiles import Pair, shipped_path, shipped_texts
from transmute_cli.engine.loop import PatchResult
from transmute_cli.recipe.chat import ChatFormat
from transmute_cli.evaluation.generate import CHAT_TEMPLATE, Result, correct_answers, evaluate
from transmute_cli.evaluation.heldout import HeldoutFidelity
from transmute_cli.recipe.formats import describe_format, passes
from transmute_cli.model.families import Family, model_device, text_config
from transmute_cli.engine.fidelity import locality, text_logits
from transmute_cli.artifacts.patch import ThoughtPatch
from transmute_cli.model.tokens import context_length, special_prefix, token_ids
from transmute_cli.model.loading import Loaded
from transmute_cli.recipe.schema import Recipe
from transmute_cli.pipeline.prepare import many_shot_prompt


def many_shot_result(recipe: Recipe, loaded: Loaded, queries: Sequence[Pair], *, family: str | Family | None = None) -> Result:
    """The many-shot prompt's (``many_shot_prompt``) greedy answers to the held-out queries."""
    (shot,) = evaluate(loaded.model, loaded.tokenizer, many_shot_prompt(recipe), queries, [recipe.template],
                       conditions=("prompt",), max_new_tokens=recipe.max_new_tokens, family=family)
    return shot


def many_shot_json(recipe: Recipe, shot: Result) -> dict:
    """Its accuracy on the eval pairs (the queries with a reference answer)."""
    k = len(recipe.eval)
    correct = correct_answers(shot.answers[:k], recipe.eval)
    return {"demonstrations": recipe.demonstrations, "accuracy": correct / k if k else None, "correct": correct, "n": k}


LOCALITY_TEXT = shipped_path("locality.txt")
# tokens of it scored: each costs three full-vocabulary heads (262k rows on Gemma 3); 128 keep the
# report to a few seconds on a CPU and take in its prose and the start of its list
LOCALITY_TOKENS = 128


@dataclass
class LocalityReference:
    """The shipped locality text's tokens and the original model's logits on it with the prompt
    in front and without it (``fidelity.text_logits``): all a patched model is compared with."""

    name: str  # the text's file, for the report
    prefix: list[int]  # what the model without the prompt sees before the text
    text: list[int]
    prompted: torch.Tensor
    base: torch.Tensor


def locality_reference(recipe: Recipe, loaded: Loaded, chat: ChatFormat | None = None, *,
                       text: tuple[str, str] | None = None,
                       max_tokens: int | None = LOCALITY_TOKENS) -> LocalityReference | None:
    """Text recipes: the text after ``pre + I`` and after ``pre``; chat recipes: the text as a
    user turn after the chat template's text with and without the system message.  The text's
    first ``max_tokens`` tokens (None: all), cut to what fits in the model's context after the
    prompt; ``None`` when fewer than 16 would (an instruction that fills the context: no figure).
    ``text``: (name, text) in place of the shipped locality text (examples/locality.py)."""
    tok = loaded.tokenizer
    name, text = text or (LOCALITY_TEXT, shipped_texts("locality.txt")[0])
    if chat is not None:
        text = chat.turns([{"role": "user", "content": text.strip()}], where="locality")
        prompted, plain = token_ids(tok, chat.system), token_ids(tok, chat.plain)
    else:
        plain = special_prefix(tok)
        prompted = plain + token_ids(tok, recipe.instruction)
    ids = token_ids(tok, text)[:max_tokens]
    limit = context_length(loaded.model)
    if limit is not None:
        ids = ids[: max(0, limit - len(prompted))]
    if len(ids) < 16:
        return None
    return LocalityReference(name, plain, ids, text_logits(loaded.model, loaded.fam, prompted, ids),
                             text_logits(loaded.model, loaded.fam, plain, ids))


def locality_json(ref: LocalityReference | None, model, fam, patch: ThoughtPatch | None = None) -> dict | None:
    """``fidelity.locality`` of ``model`` without the prompt (``patch`` in hooks, or a patched
    checkpoint) against the reference, as report.json's ``locality`` (``None`` without one)."""
    if ref is None:
        return None
    loc = locality(ref.prompted, text_logits(model, fam, ref.prefix, ref.text, patch), ref.base, ref.text)
    return {"text": ref.name, **asdict(loc)}


def results_json(results: Sequence[Result]) -> list[dict]:
    return [
        {"template": r.template, "condition": r.condition, "accuracy": r.accuracy, "correct": r.correct, "n": r.n}
        for r in results
    ]


def heldout_json(h: HeldoutFidelity) -> dict:
    return {"queries": h.n, "template": h.template, "answer_agreement": h.answer_agreement, "mean_kl": h.mean_kl,
            "positions": h.positions, "base_answer_agreement": h.base_answer_agreement, "base_mean_kl": h.base_mean_kl,
            "first_tokens": h.first_tokens, "first_tokens_agreement": h.first_tokens_agreement,
            "base_first_tokens_agreement": h.base_first_tokens_agreement}


def labelled_results(recipe: Recipe, results: Sequence[Result]) -> list[Result]:
    """The results scored on the eval pairs alone (the queries with a reference answer)."""
    k = len(recipe.eval)
    return [Result(r.template, r.condition, correct_answers(r.answers[:k], recipe.eval, contains=recipe.chat), k)
            for r in results] if k else []


def eval_json(recipe: Recipe, results: Sequence[Result]) -> dict:
    """Per template and condition: accuracy on the eval pairs (the queries with a reference
    answer) and, when the recipe names an ``answer_format``, the share of all held-out answers
    that pass it."""
    out: dict = {"results": results_json(labelled_results(recipe, results))}
    if recipe.answer_format:
        out["format"] = format_json(recipe.answer_format, results)
    if recipe.rules:
        out["rules"] = [{"name": name, **format_json(spec, results)} for name, spec in recipe.rules]
    return out


def format_json(spec: Sequence[str], results: Sequence[Result]) -> dict:
    """Per template and condition, the share of held-out answers that pass ``spec``."""
    return {"spec": describe_format(spec),
            "results": [{"template": r.template, "condition": r.condition, "n": len(r.answers),
                         "passed": (ok := sum(passes(spec, a) for a in r.answers)),
                         "rate": ok / len(r.answers) if r.answers else 0.0} for r in results]}


def prompt_warnings(results: Sequence[dict]) -> list[str]:
    """What a user must know before trusting a patch, from the accuracy on the recipe's own
    template (``results_json`` rows, the first template the recipe's): a prompt that gets nothing
    right leaves the patch nothing to imitate; one that does no better than no prompt, little."""
    if not results:
        return []
    own = results[0]["template"]
    acc = {r["condition"]: r for r in results if r["template"] == own}
    prompt, base = acc.get("prompt"), acc.get("base")
    if prompt is None or not prompt["n"]:
        return []
    if prompt["correct"] == 0:
        return [f"the prompt itself scores 0.00 (0/{prompt['n']}) on the eval: the patch imitates the prompt, so there "
                "is nothing to transmute; its answers are in report.json (samples) -- fix the instruction first"]
    if base is not None and prompt["accuracy"] <= base["accuracy"]:
        return [f"the prompt scores {prompt['accuracy']:.2f} on the eval, no better than no prompt "
                f"({base['accuracy']:.2f}): the patch imitates the prompt, so expect no gain from it"]
    return []


def samples_json(recipe: Recipe, queries: Sequence[Pair], results: Sequence[Result],
                 extra: dict[str, list[str]] | None = None) -> list[dict]:
    """Every held-out query's answers per condition, one entry per (template, query), as
    lm-evaluation-harness's ``--log_samples``: the input, the reference (``None`` for an eval
    input), each condition's greedy answer and whether it is right (exact match; a chat recipe's:
    the answer contains the reference).  ``extra``: more answers per condition name (the
    many-shot prompt's), on the recipe's own template."""
    k = len(recipe.eval)
    out = []
    for template in dict.fromkeys(r.template for r in results):
        by = {r.condition: r.answers for r in results if r.template == template}
        if template == results[0].template:
            by.update(extra or {})
        for i, q in enumerate(queries):
            ref = q.output if i < k else None
            entry = {"template": template, "input": q.input, "reference": ref}
            entry.update({c: a[i] for c, a in by.items()})
            if ref is not None:
                entry["correct"] = {c: bool(correct_answers([a[i]], [q], contains=recipe.chat)) for c, a in by.items()}
            out.append(entry)
    return out


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
        "augment": str(recipe.augment).lower(),
        "broad": recipe.broad,
        "broad_weight": repr(recipe.broad_weight),
        "demonstrations": str(recipe.demonstrations),
        "chat": str(recipe.chat).lower(),
        **({"turns_weight": repr(recipe.turns_weight)} if recipe.chat else {}),
    }


def model_json(loaded: Loaded) -> dict:
    cfg = text_config(loaded.model)
    return {
        "spec": loaded.source.spec, "kind": loaded.source.kind, "fingerprint": loaded.fingerprint,
        "model_type": getattr(loaded.model.config, "model_type", None), "family": loaded.fam.name,
        "n_layers": getattr(cfg, "num_hidden_layers", None), "d_model": getattr(cfg, "hidden_size", None),
        "device": str(model_device(loaded.model)), "dtype": loaded.dtype,
    }


def settings_json(recipe: Recipe) -> dict:
    return {
        "rho": recipe.rho, "eta": recipe.step, "batches": recipe.batches, "components": list(recipe.components),
        "layers": recipe.layers if recipe.layers == "all" else list(recipe.layers), "solver": recipe.solver,
        "seed": recipe.seed, "templates": [CHAT_TEMPLATE] if recipe.chat else list(recipe.patch_formats()),
        "chat": recipe.chat, "augment": recipe.augment,
        "preserve_texts": len(recipe.preserve), "preserve_weight": recipe.preserve_weight,
        **({"turns_weight": recipe.turns_weight} if recipe.chat else {}),
        "broad": recipe.broad, "broad_weight": recipe.broad_weight,
        "demonstrations": recipe.demonstrations,
    }
