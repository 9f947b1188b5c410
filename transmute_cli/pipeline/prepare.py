"""From a recipe to a fit: the texts the engine patches (the examples under their instructions, chat
turns), the prompted model's labels for a recipe's inputs, preservation and broad texts, the
engine's settings, and the fit itself."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from transmute_cli.model.families import Family
from transmute_cli.recipe.datafiles import Pair, render, rerender, shipped_path, shipped_texts
from transmute_cli.engine.loop import EngineConfig, PatchResult, ProgressFn, compute_patch
from transmute_cli.errors import InputError
from transmute_cli.recipe.chat import ChatFormat, Positions, chat_format
from transmute_cli.evaluation.generate import CHAT_TEMPLATE, Result, evaluate
from transmute_cli.model.loading import Loaded, cache_dir
from transmute_cli.engine.moments import Moments, load_or_compute
from transmute_cli.recipe.schema import MAX_NEW_TOKENS_LIMIT, Recipe, with_labels
from transmute_cli.recipe.fields import turns



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
        raise with_source(e, recipe) from None


# an answer cut at max_new_tokens is generated again once with this many times the cap (at most
# recipe.MAX_NEW_TOKENS_LIMIT) before it is left out
CONTINUE_FACTOR = 4


def whole_answers(recipe: Recipe, loaded: Loaded, pairs: Sequence[Pair], condition: str, *,
                  chat: ChatFormat | None = None, family: str | Family | None = None) -> tuple[list[str], list[bool]]:
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
                   family: str | Family | None = None) -> tuple[list[str], int]:
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


def label_inputs(recipe: Recipe, loaded: Loaded, *, family: str | Family | None = None,
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
                 family: str | Family | None = None) -> list[tuple[tuple[str, ...], str, bool]]:
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


def fit(recipe: Recipe, loaded: Loaded, *, progress: ProgressFn | None = None, family: str | Family | None = None,
        distributed: bool = False, diagnostics: bool | None = None, chat: ChatFormat | None = None,
        preserve: Sequence[str] | None = None, **over) -> PatchResult:
    """The patch of a (labelled) recipe: its patch texts under their instructions, its
    preservation texts and the broad texts, with the recipe's settings (``over`` replaces some:
    the experiments' variants).  ``preserve``: the texts as ``preserve_texts`` made them (a chat
    recipe's need the model's answers), else the recipe's own."""
    texts = patch_texts(recipe, chat)
    return compute_patch(loaded.model, loaded.tokenizer, chat.system if chat else recipe.instruction, texts,
                         engine_config(recipe, distributed=distributed, diagnostics=diagnostics, **over),
                         progress=progress, family=family,
                         preserve=list(recipe.preserve) if preserve is None else preserve,
                         contexts=patch_contexts(recipe), plain=chat.plain if chat else None,
                         broad=broad_texts(recipe), moments=broad_moments(recipe, loaded),
                         weights=token_weights(recipe, chat, texts))


def token_weights(recipe: Recipe, chat: ChatFormat | None, texts: Sequence[str]) -> list[list[float]] | None:
    """A chat recipe's weight per token of each patch text (``turns_weight``); None: all 1."""
    positions = Positions(turns=recipe.turns_weight)
    return None if chat is None or positions.uniform else chat.token_weights(recipe.examples, texts, positions)


def with_source(err: InputError, recipe: Recipe, labels: Sequence[dict] = ()) -> InputError:
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
