"""The product's operations — compute, apply, eval — over the engine, without any printing.

The CLI is a thin layer over these functions; they report progress through callbacks and
return plain dicts that become ``report.json`` and ``--json`` output.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__
from . import llamacpp
from .checkpoint import check_save_dtype, needs_fold, patched_eval_answers, token_batches, write_checkpoint, write_peft
from .gguf_export import check_qtype
from .datafiles import Pair, load_templates, render, rerender, shipped_path, shipped_texts
from .distributed import init_distributed, leave_distributed
from .engine import EngineConfig, PatchResult, ProgressFn, compute_patch
from .errors import InputError, PatchError, RecipeError
from .chat import ChatFormat, chat_format
from .evaluate import CHAT_TEMPLATE, HeldoutFidelity, Result, correct_answers, evaluate, heldout_fidelity
from .formats import describe_format, passes
from .families import model_device, text_config
from .fidelity import locality, text_logits
from .patch import ThoughtPatch
from .tokens import context_length, special_prefix, token_ids
from .models import Loaded, cache_dir, load_model
from .moments import Moments, load_or_compute
from .outputs import atomic_dir, atomic_file, check_file_target, check_target
from .patch import check_compatible, combine, load_patch, save_patch
from .recipe import MAX_NEW_TOKENS_LIMIT, Recipe, load_recipe, parse_recipe, with_labels
from .recipe_fields import turns
from .report import adapter_card, report_markdown

Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def patch_texts(recipe: Recipe, chat: ChatFormat | None = None) -> list[str]:
    """Example texts x: every pair under every patch template, ending with the newline that
    marks the end of an answer (the patched model must learn where to stop).  A chat recipe
    (``chat``, its format): each conversation's turns, the answer ending in the end-of-turn token."""
    if chat is not None:
        return chat.texts(recipe.examples, answer=True, where="examples")
    return [render(t, p.input, p.output) + ("" if p.open else "\n") for t in recipe.patch_formats()
            for p in recipe.examples]


def broad_texts(recipe: Recipe) -> list[str]:
    """The shipped broad texts (``transmute_cli/data/broad.txt``) the loop runs toward the
    prompted model (``broad: prompted``), else none."""
    return list(shipped_texts("broad.txt")) if recipe.broad == "prompted" and not recipe.chat else []


_LAST_MOMENTS: dict[str, Moments] = {}  # the last model's: a process fitting many recipes reads the file once


def broad_moments(recipe: Recipe, loaded: Loaded) -> Moments | None:
    """The shipped broad texts' per-layer second moments (``broad: original``, the default for
    text recipes), from the cache in ``$TRANSMUTE_CACHE/moments`` or computed once and cached;
    kept in memory for the last model asked for."""
    if recipe.broad != "original" or recipe.chat:
        return None
    key = f"{loaded.fingerprint}-{loaded.fam.name}"
    if key not in _LAST_MOMENTS:
        _LAST_MOMENTS.clear()
        _LAST_MOMENTS[key] = load_or_compute(loaded.model, loaded.fam, loaded.tokenizer,
                                             list(shipped_texts("broad.txt")), key, cache_dir() / "moments")[0]
    return _LAST_MOMENTS[key]


def chat_of(recipe: Recipe, loaded: Loaded) -> ChatFormat | None:
    """A chat recipe's format under the loaded model's chat template (``None``: a text recipe)."""
    if not recipe.chat:
        return None
    try:
        return chat_format(loaded.tokenizer, recipe.instruction, model=recipe.model)
    except InputError as e:
        raise _with_source(e, recipe) from None


# an answer cut at max_new_tokens is generated again once with this many times the cap (at most
# recipe.MAX_NEW_TOKENS_LIMIT) before it is left out
CONTINUE_FACTOR = 4


def whole_answers(recipe: Recipe, loaded: Loaded, pairs: Sequence[Pair], condition: str, *,
                  chat: ChatFormat | None = None, family: str | None = None) -> tuple[list[str], list[bool]]:
    """Greedy answers of the ``prompt`` or ``base`` model to ``pairs`` in the recipe's template
    (a chat recipe's: the chat template), and which are still cut: an answer that reaches
    ``max_new_tokens`` before its stop token is generated again with ``CONTINUE_FACTOR`` times
    the cap; one still cut there is flagged (the caller leaves it out)."""
    template = CHAT_TEMPLATE if chat else recipe.template

    def run(items: Sequence[Pair], cap: int) -> Result:
        return evaluate(loaded.model, loaded.tokenizer, recipe.instruction, items, [template], conditions=(condition,),
                        max_new_tokens=cap, family=family, chat=chat)[0]

    res = run(pairs, recipe.max_new_tokens)
    answers, cut = list(res.answers), list(res.cut)
    again = [i for i, c in enumerate(cut) if c]
    cap = min(CONTINUE_FACTOR * recipe.max_new_tokens, MAX_NEW_TOKENS_LIMIT)
    if again and cap > recipe.max_new_tokens:
        more = run([pairs[i] for i in again], cap)
        for i, a, c in zip(again, more.answers, more.cut):
            answers[i], cut[i] = a, c
    return answers, cut


def preserve_texts(recipe: Recipe, loaded: Loaded, chat: ChatFormat | None, *,
                   family: str | None = None) -> tuple[list[str], int]:
    """The preservation texts z, and how many were left out.  A chat recipe's are user messages:
    each becomes the conversation with the model's own answer *without* a system prompt — what
    the patch must leave alone; one whose answer is still cut at the larger cap
    (``whole_answers``) is left out (its end-of-turn would teach the patch to stop early)."""
    if chat is None or not recipe.preserve:
        return list(recipe.preserve), 0
    pairs = [Pair(z.strip(), "") for z in recipe.preserve]
    answers, cut = whole_answers(recipe, loaded, pairs, "base", chat=chat, family=family)
    return [chat.turns(Pair(p.input, a).messages(answer=bool(a)), generation_prompt=not a, where=f"preserve[{i}]")
            for i, (p, a, c) in enumerate(zip(pairs, answers, cut)) if not c], sum(cut)


def format_instruction(recipe: Recipe, template: str) -> str:
    """The instruction as a user prompting in ``template`` would write it: its demonstrations
    (lines in the recipe's template) rewritten in that template (``datafiles.rerender``); as
    written when it has none, or for the recipe's own template."""
    if template == recipe.template:
        return recipe.instruction
    return rerender(recipe.instruction, recipe.template, template) or recipe.instruction


def patch_contexts(recipe: Recipe) -> list[str] | None:
    """The instruction each patch text is patched under, one per text of ``patch_texts``.

    A text in another template than the recipe's sees the instruction rewritten in that template
    (``format_instruction``).  Many-shot (``demonstrations: N``): the recipe's instruction
    followed by N of the *other* examples, written in that text's template, one per line (one per
    paragraph when the instruction ends with a blank line, as Q/A prompts do).  The examples are
    shuffled with the recipe's seed and cut into folds of n − N; a fold's demonstrations are the
    first N examples outside it, so no example demonstrates itself and there are ⌈n / (n − N)⌉
    distinct prompts per template (each prefilled once by the engine).  ``None`` when every text
    sees the instruction as written."""
    k, n = recipe.demonstrations, len(recipe.examples)
    if recipe.chat:
        return None
    if not k:
        contexts = [format_instruction(recipe, t) for t in recipe.patch_formats() for _ in range(n)]
        return contexts if any(c != recipe.instruction for c in contexts) else None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed)).tolist()
    size = n - k
    demos: dict[int, list[int]] = {}
    for start in range(0, n, size):
        fold = order[start : start + size]
        outside = [i for i in order if i not in fold][:k]
        demos.update({i: outside for i in fold})
    contexts = []
    for t in recipe.patch_formats():
        # the instruction's own demonstrations in the text's template too (format_instruction)
        head = format_instruction(recipe, t)
        head = head if head.endswith("\n") else head + "\n"
        sep = "\n\n" if head.endswith("\n\n") else "\n"
        for i in range(n):
            shown = [recipe.examples[j] for j in demos[i]]
            contexts.append(head + "".join(render(t, p.input, p.output) + sep for p in shown))
    return contexts


def many_shot_prompt(recipe: Recipe) -> str | None:
    """The instruction and the N demonstrations the recipe's first example is patched under (in
    the recipe's template; those of the fold that holds it): the many-shot prompt a user could
    write instead, for comparison (``None`` without demonstrations)."""
    contexts = patch_contexts(recipe) if recipe.demonstrations else None
    return contexts[0] if contexts else None  # the main template comes first


def many_shot_result(recipe: Recipe, loaded: Loaded, queries: Sequence[Pair], *, family: str | None = None) -> Result:
    """The many-shot prompt's (``many_shot_prompt``) greedy answers to the held-out queries."""
    (shot,) = evaluate(loaded.model, loaded.tokenizer, many_shot_prompt(recipe), queries, [recipe.template],
                       conditions=("prompt",), max_new_tokens=recipe.max_new_tokens, family=family)
    return shot


def many_shot_json(recipe: Recipe, shot: Result) -> dict:
    """Its accuracy on the eval pairs (the queries with a reference answer)."""
    k = len(recipe.eval)
    correct = correct_answers(shot.answers[:k], recipe.eval)
    return {"demonstrations": recipe.demonstrations, "accuracy": correct / k if k else None, "correct": correct, "n": k}


def label_inputs(recipe: Recipe, loaded: Loaded, *, family: str | None = None,
                 chat: ChatFormat | None = None) -> tuple[Recipe, list[dict]]:
    """A recipe's ``inputs`` labelled with the prompted model's greedy answers (the prompt's
    behaviour, not a gold label): the recipe with them as examples, and the labels.  Inputs whose
    answer is empty (the model ends the line at once) are left out.  An answer still cut at the
    larger cap (``whole_answers``) is no whole label: a chat recipe keeps it as an *open* answer
    (fitted up to its last token, no end-of-turn after it: the prompt's behaviour on every token
    it has, and no false stop), a text recipe leaves it out.  The labels say which."""
    if not recipe.inputs:
        return recipe, []
    answered = answer_turns(recipe, loaded, chat=chat, family=family)
    labels = []
    for item, (history, a, c) in zip(recipe.inputs, answered):
        last = len(history) // 2 == len(turns(item)) - 1  # else an earlier turn's answer ended the conversation
        labels.append({"input": item if isinstance(item, str) else list(item), "output": a,
                       **({"history": list(history)} if history else {}),
                       "kept": last and bool(a) and (not c or chat is not None), "cut": c,
                       "open": last and bool(a) and c and chat is not None})
    kept = [(l, h) for l, (h, _, _) in zip(labels, answered) if l["kept"]]
    if not kept and not recipe.examples:
        raise InputError(f"the prompted model answered none of the {len(labels)} inputs with a whole answer (every "
                         f"answer is empty or cut at {CONTINUE_FACTOR} × max_new_tokens)", source=recipe.source,
                         field="inputs")
    n = len(recipe.examples) + len(kept)
    for key, value, most in (("batches", recipe.batches, n), ("demonstrations", recipe.demonstrations, n - 1)):
        if value > most:
            raise InputError(f"must be at most {most}: {len(labels) - len(kept)} of the inputs got an empty or cut "
                             f"answer from the prompted model and were left out, got {value}", source=recipe.source,
                             field=key)
    labelled = recipe.model_copy(update={"inputs": tuple(turns(l["input"])[-1] for l, _ in kept)})
    return with_labels(labelled, [l["output"] for l, _ in kept], [l["open"] for l, _ in kept],
                       [h for _, h in kept]), labels


def answer_turns(recipe: Recipe, loaded: Loaded, *, chat: ChatFormat | None = None,
                 family: str | None = None) -> list[tuple[tuple[str, ...], str, bool]]:
    """The prompted model's answers to a recipe's inputs, a conversation's turns one after the
    other (each turn asked after the earlier turns and the model's own answers to them): per
    input, the conversation before its last answer (user and assistant turns), that answer, and
    whether it is still cut (``whole_answers``).  A conversation whose earlier answer is empty or
    cut stops there: that answer is returned with the turns before it."""
    asked = [turns(i) for i in recipe.inputs]
    history: list[tuple[str, ...]] = [() for _ in asked]
    out: list = [None] * len(asked)
    for k in range(max(len(t) for t in asked)):
        now = [j for j, t in enumerate(asked) if len(t) > k and out[j] is None]
        if not now:
            break
        pairs = [Pair(asked[j][k], "", history=history[j]) for j in now]
        answers, cut = whole_answers(recipe, loaded, pairs, "prompt", chat=chat, family=family)
        for j, a, c in zip(now, answers, cut):
            if k == len(asked[j]) - 1 or not a or c:
                out[j] = (history[j], a, c)
            else:
                history[j] += (asked[j][k], a)
    return out


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


def engine_config(recipe: Recipe, **over) -> EngineConfig:
    cfg = dict(
        rho=recipe.rho, eta=recipe.eta, batches=recipe.batches, components=tuple(recipe.components),
        layers=recipe.layers, solver=recipe.solver, seed=recipe.seed, preserve_weight=recipe.preserve_weight,
        broad_weight=recipe.broad_weight,
        # in-sample fidelity on the examples in the recipe's own template (patch_texts' first n)
        fidelity_texts=None if recipe.chat else len(recipe.examples),
    )
    cfg.update(over)
    return EngineConfig(**cfg)


def fit(recipe: Recipe, loaded: Loaded, *, progress: ProgressFn | None = None, family: str | None = None,
        distributed: bool = False, diagnostics: bool | None = None, chat: ChatFormat | None = None,
        preserve: Sequence[str] | None = None, **over) -> PatchResult:
    """The patch of a (labelled) recipe: its patch texts under their instructions, its
    preservation texts and the broad texts, with the recipe's settings (``over`` replaces some:
    the experiments' variants).  ``preserve``: the texts as ``preserve_texts`` made them (a chat
    recipe's need the model's answers), else the recipe's own."""
    return compute_patch(loaded.model, loaded.tokenizer, chat.system if chat else recipe.instruction,
                         patch_texts(recipe, chat),
                         engine_config(recipe, distributed=distributed, diagnostics=diagnostics, **over),
                         progress=progress, family=family,
                         preserve=list(recipe.preserve) if preserve is None else preserve,
                         contexts=patch_contexts(recipe), plain=chat.plain if chat else None,
                         broad=broad_texts(recipe), moments=broad_moments(recipe, loaded))


def _with_source(err: InputError, recipe: Recipe, labels: Sequence[dict] = ()) -> InputError:
    """Engine input errors name a field of patch texts; the recipe file, the example and the
    template are named here (patch texts are every example under every patch template; the
    examples that ``labels`` added came from the recipe's ``inputs``)."""
    field, reason = err.field, err.reason
    if (field or "").startswith("broad["):  # a shipped broad text (broad: prompted), not the recipe's
        return type(err)(f"{reason} (a text of the shipped {shipped_path('broad.txt')})", source=recipe.source,
                         field="broad")
    m = re.fullmatch(r"examples\[(\d+)\]", field or "")
    if m:
        i, n = int(m.group(1)), len(recipe.examples)
        field = f"examples[{i % n}]"
        kept = [k for k, label in enumerate(labels) if label["kept"]]
        given = n - len(kept)
        if i % n >= given:
            field = f"inputs[{kept[i % n - given]}]"
        if i >= n:
            t = recipe.patch_formats()[i // n]
            reason += (f" (under patch_templates[{recipe.patch_templates.index(t)}])" if t in recipe.patch_templates
                       else f" (under the augmented query format {t!r})")
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
            "positions": h.positions, "base_answer_agreement": h.base_answer_agreement, "base_mean_kl": h.base_mean_kl,
            "first_tokens": h.first_tokens, "first_tokens_agreement": h.first_tokens_agreement,
            "base_first_tokens_agreement": h.base_first_tokens_agreement}


def eval_queries(recipe: Recipe) -> list[Pair]:
    """The held-out queries: the eval pairs, then the eval inputs (no reference answer)."""
    return list(recipe.eval) + [Pair(q, "") for q in recipe.eval_inputs]


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
        from .models import check_gguf_source, resolve

        check_gguf_source(resolve(recipe.model, log))
    rank, distributed, owned = init_distributed(device)
    if distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    t0 = time.perf_counter()
    if loaded is None:
        log(f"loading model {recipe.model}")
        loaded = load_model(recipe.model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, family=family,
                            device_map=device_map, log=log)
    t_load = time.perf_counter() - t0
    t_label = time.perf_counter()
    if recipe.pool:
        log(f"a system prompt alone: user messages from {recipe.pool}")
    if recipe.inputs:
        log(f"labelling {len(recipe.inputs)} inputs with the prompted model's greedy answers")
    chat = chat_of(recipe, loaded)
    recipe, labels = label_inputs(recipe, loaded, family=family, chat=chat)
    try:  # a conversation the chat template cannot align is named in the recipe's file
        preserve, preserve_cut = preserve_texts(recipe, loaded, chat, family=family)
        texts = patch_texts(recipe, chat)
    except InputError as e:
        raise _with_source(e, recipe, labels) from None
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
        res = fit(recipe, loaded, progress=progress, family=family, distributed=distributed,
                  diagnostics=diagnostics or None, chat=chat, preserve=preserve, fidelity=fidelity)
        done = True
    except InputError as e:
        raise _with_source(e, recipe, labels) from None
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
                           max_new_tokens=recipe.max_new_tokens, family=family, chat=chat)
        report["eval"] = eval_json(recipe, results)
        shot_answers = None
        by = {r.condition: r for r in results}
        held = heldout_fidelity(loaded.model, loaded.tokenizer, recipe.instruction, queries, template, patch,
                                by["prompt"], by["patched"], by["base"], family=family, chat=chat)
        report["fidelity"]["heldout"] = heldout_json(held)
        if recipe.demonstrations:  # the prompt the patch distils, as a user could write it instead
            shot = many_shot_result(recipe, loaded, queries, family=family)
            # the patch measured against the prompt it distils, beside the instruction as written
            held_shot = heldout_fidelity(loaded.model, loaded.tokenizer, many_shot_prompt(recipe), queries, template,
                                         patch, shot, by["patched"], by["base"], family=family)
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
        "broad": recipe.broad, "broad_weight": recipe.broad_weight,
        "demonstrations": recipe.demonstrations,
    }


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
        from .models import check_gguf_source, resolve

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
                overwrite: bool = False, log: Log = _quiet) -> dict:
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


# --------------------------------------------------------------------------- eval


def eval_gguf(target: str, path: Path, extra: Sequence[str], *, recipe_path: str | None = None, log: Log = _quiet,
              progress: Callable[[str, str], None] | None = None) -> dict:
    """``eval`` of a GGUF written by ``apply --format gguf|gguf-lora``: every condition in
    llama.cpp (``llamacpp.evaluate_gguf``); the recipe and base model from its ``transmute.*`` keys."""
    from transformers import AutoTokenizer

    from .models import gguf_of, resolve

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
    log: Log = _quiet,
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
    chat = chat_of(recipe, base)
    t0 = time.perf_counter()
    results: list[Result] = []
    loc_ref = locality_reference(recipe, base, chat) if "patched" in conditions else None
    # a many-shot patch distils the instruction + demonstrations: that prompt is measured too
    shot = many_shot_result(recipe, base, queries, family=family) if recipe.demonstrations else None
    loc = None
    if patch is not None:
        check_compatible(patch, base.model, base.fam, base.fingerprint, force=False, source=str(path))
        if loc_ref is not None:
            loc = locality_json(loc_ref, base.model, base.fam, patch.scaled(scale) if scale != 1.0 else patch)
        results = evaluate(base.model, base.tokenizer, recipe.instruction, queries, templates, patch,
                           conditions=conditions, max_new_tokens=recipe.max_new_tokens, scale=scale, family=family,
                           progress=progress, demonstrations=recipe.template, chat=chat)
    else:
        results = evaluate(base.model, base.tokenizer, recipe.instruction, queries, templates, None,
                           conditions=[c for c in conditions if c != "patched"], max_new_tokens=recipe.max_new_tokens,
                           family=family, progress=progress, demonstrations=recipe.template, chat=chat)
        if "patched" in conditions:
            del base
            ck = load_model(str(path), device=device, dtype=dtype, trust_remote_code=trust_remote_code, family=family)
            loc = locality_json(loc_ref, ck.model, ck.fam) if loc_ref is not None else None
            # the checkpoint is the patched model: run unprompted, reported (and shown) as patched
            results += evaluate(ck.model, ck.tokenizer, recipe.instruction, queries, templates, None,
                                conditions=("base",), max_new_tokens=recipe.max_new_tokens, family=family,
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


