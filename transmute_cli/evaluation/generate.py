"""Greedy evaluation: exact-match accuracy of answers cut at the first newline.

Three conditions per template: ``base`` (no prompt), ``prompt`` (the instruction in context),
``patched`` (the thought patch, no prompt).  Token ids are built exactly as in the engine —
``[pre] + ids(I) + ids(query)`` — so the prompt condition is the context the patch imitates.

Chat recipes (``chat``, a ``recipe.chat.ChatFormat``): the query is the conversation up to where the
assistant answers, after the chat template's text with the system message (prompt) or without
it (base, patched); an answer runs to the model's end-of-turn token, newlines included, and a
label is found in it when the answer contains it (``correct_answers``).
"""

from __future__ import annotations


import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from transmute_cli.recipe.chat import ChatFormat
from transmute_cli.recipe.datafiles import Pair, render, rerender
from transmute_cli.model.families import Family, family_for, model_device, text_config
from transmute_cli.engine.hooks import ThoughtHooks, cache_kwargs, forward_parameters
from transmute_cli.engine.thought import ThoughtPatch
from transmute_cli.model.tokens import left_pad, pad_id, special_prefix, token_ids

CONDITIONS = ("base", "prompt", "patched")
CHAT_TEMPLATE = "(chat template)"  # what a chat recipe's results name as their template
FIRST_TOKENS = 16  # held-out fidelity: agreement of the first this many greedy answer tokens


@dataclass
class Result:
    template: str
    condition: str
    correct: int
    n: int
    answers: list[str] = field(default_factory=list)
    # the generated token ids of each answer, up to and including the token that ended it
    answer_ids: list[list[int]] = field(default_factory=list)
    # prompt condition only: the instruction's demonstrations were rewritten in this template
    rerendered: bool = False
    # per answer: it reached max_new_tokens before its stop token (an incomplete answer)
    cut: list[bool] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


def _cut(text: str) -> str:
    return text.split("\n", 1)[0].strip()


class NewlineStop:
    """Stop a row once its continuation holds a newline (or EOS); all rows done -> generation ends.

    The stopping criterion for ``transformers.generate``; transmute decodes with ``greedy_rows``
    instead, and this is the reference it is tested against (``tests/test_generate.py``,
    ``benchmarks/bench_generate.py``).  Why not transformers' ``stop_strings=["\n"]``: its
    ``StopStringCriteria`` fires only when the stop string overlaps the *start* of the last token,
    so a token such as ``".\n"`` (byte-level BPE vocabularies commonly have them; Gemma 3's has
    none) lets generation run on to ``max_new_tokens``; it also costs 1.2-1.4x per call
    (``python benchmarks/bench_stop.py``).  Neither lets a finished row leave the batch.
    """

    def __init__(self, tokenizer, start: int):
        self.tok, self.start = tokenizer, start

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tok.batch_decode(input_ids[:, self.start :], skip_special_tokens=False)
        return torch.tensor(["\n" in t for t in texts], device=input_ids.device)


def stop_cut(tokenizer, row: Sequence[int]) -> list[int]:
    """The generated ids up to and including the first one that holds a newline or is EOS."""
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for t in row:
        out.append(int(t))
        if t == eos or "\n" in tokenizer.decode([int(t)], skip_special_tokens=False):
            break
    return out


def reference_rows(model: nn.Module, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int) -> list[list[int]]:
    """What ``greedy_rows`` replaces, kept as its ground truth: ``transformers.generate`` (greedy,
    left padding) stopped by ``NewlineStop``, each row cut after its stop token."""
    from transformers import StoppingCriteriaList

    ids, mask = left_pad(tokenizer, prompts)
    width, dev = ids.shape[1], model_device(model)
    with torch.no_grad():
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, top_p=None, top_k=None, temperature=None,
                             pad_token_id=pad_id(tokenizer),
                             stopping_criteria=StoppingCriteriaList([NewlineStop(tokenizer, width)]))
    return [stop_cut(tokenizer, row.tolist())[:max_new_tokens] for row in gen[:, width:]]


def end_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """The tokens that end an answer besides a newline: the model's ``generation_config``
    ``eos_token_id`` (an int or a list) and the tokenizer's EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    return list(dict.fromkeys(ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])))


def same_answers(answers: Sequence[str], others: Sequence[str]) -> float:
    """The share of queries whose two greedy answers are identical (0 for none)."""
    n = len(others)
    return sum(x == y for x, y in zip(answers, others)) / n if n else 0.0


def correct_answers(answers: Sequence[str], pairs: Sequence[Pair], contains: bool = False) -> int:
    """Exact matches of greedy answers (already cut at the newline) with the pairs' outputs;
    ``contains`` (chat answers, which are sentences): the output appears in the answer as whole
    words, case and spacing aside."""
    if not contains:
        return sum(a == p.output.strip() for a, p in zip(answers, pairs))
    return sum(label_in(p.output, a) for a, p in zip(answers, pairs))


def label_in(label: str, answer: str) -> bool:
    """``label`` occurs in ``answer`` as whole words, ignoring case and runs of spaces."""
    words = " ".join(label.split()).lower().strip(" .!?")
    if not words:
        return False
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words.split(" ")) + r"(?!\w)"
    return re.search(pattern, answer.lower()) is not None


def newline_token_ids(tokenizer) -> list[int]:
    """Every token whose text holds a newline: generation that ends on any of them (or EOS) ends
    where ``NewlineStop`` ends it and where answers are cut -- what a patched checkpoint's
    ``generation_config`` lists as its end tokens."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
    return [i for i, text in enumerate(texts) if "\n" in text]


def generate_answers(
    model: nn.Module, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int = 16, batch_size: int = 64,
    ids_out: list[list[int]] | None = None, prefix: Sequence[int] = (), newline: bool = True,
) -> list[str]:
    """Greedy continuations of token-id prompts (each after ``prefix``, see ``greedy_rows``), cut
    at the first newline and stripped (``newline=False``: run to an end token, newlines kept).
    ``ids_out``, when given, receives each continuation's token ids up to its stop token."""
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        for row in greedy_rows(model, tokenizer, prompts[s : s + batch_size], max_new_tokens, prefix, newline):
            text = tokenizer.decode(row, skip_special_tokens=True)
            out.append(_cut(text) if newline else text.strip())
            if ids_out is not None:
                ids_out.append(row)
    return out


@torch.no_grad()
def greedy_rows(model: nn.Module, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int,
                prefix: Sequence[int] = (), newline: bool = True) -> list[list[int]]:
    """Greedy decoding of a batch in which each row leaves the batch (and the KV cache) at its
    stop token (one holding a newline, or an end token) or at ``max_new_tokens``: a batch costs
    what its answers cost, not its longest answer times its rows (``transformers.generate`` keeps
    finished rows to the end; on the eval about half its row-steps were such padding).  The same
    argmax as ``generate(do_sample=False)`` step by step; positions follow the left padding.

    ``prefix``: tokens every row starts with (the prompt condition's ``pre + instruction``), run
    once with its KV cache copied to every row instead of once per row; each row's padding then
    sits between the prefix and its own tokens (masked; positions count real tokens).  A
    sliding-window model would count that padding in its window, so when the prefix, the longest
    row and the answers do not fit in the window the prefix simply goes in front of every row.
    ``newline=False`` (chat answers): only an end token stops a row."""
    from transformers import DynamicCache

    dev = model_device(model)
    ends = set(end_token_ids(model, tokenizer))
    holds_newline: dict[int, bool] = {}

    def stops(token: int) -> bool:
        if token not in holds_newline:
            holds_newline[token] = token in ends or (
                newline and "\n" in tokenizer.decode([token], skip_special_tokens=False))
        return holds_newline[token]

    window = getattr(text_config(model), "sliding_window", None)
    if prefix and window is not None and len(prefix) + max(map(len, prompts)) + max_new_tokens > window:
        prompts, prefix = [list(prefix) + list(p) for p in prompts], ()
    ids, mask = left_pad(tokenizer, prompts)
    ids, mask, width = ids.to(dev), mask.to(dev), ids.shape[1]
    cache = DynamicCache(config=getattr(model, "config", None))
    with_cache = cache_kwargs(model, cache)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}
    if prefix:
        shared = torch.tensor([list(prefix)], dtype=torch.long, device=dev)
        model(input_ids=shared, attention_mask=torch.ones_like(shared),
              position_ids=torch.arange(shared.shape[1], device=dev)[None], **with_cache, **extra)
        cache.batch_repeat_interleave(len(prompts))
        mask = torch.cat([mask.new_ones((len(prompts), shared.shape[1])), mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions[:, -width:], **with_cache,
                   **extra).logits[:, -1]
    rows: list[list[int]] = [[] for _ in prompts]
    alive = list(range(len(prompts)))
    while True:
        tokens = logits.float().argmax(-1).tolist()
        keep = []
        for j, (r, t) in enumerate(zip(alive, tokens)):
            rows[r].append(t)
            if not stops(t) and len(rows[r]) < max_new_tokens:
                keep.append(j)
        if not keep:
            return rows
        if len(keep) < len(alive):
            index = torch.tensor(keep, device=dev)
            cache.batch_select_indices(index)
            mask, positions = mask[index], positions[index]
            alive = [alive[j] for j in keep]
        step = torch.tensor([[tokens[j]] for j in keep], dtype=torch.long, device=dev)
        mask = torch.cat([mask, mask.new_ones((len(keep), 1))], 1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=step, attention_mask=mask, position_ids=positions, **with_cache).logits[:, -1]


def evaluate(
    model: nn.Module,
    tokenizer,
    instruction: str,
    pairs: Sequence[Pair],
    templates: Sequence[str],
    patch: ThoughtPatch | None = None,
    *,
    conditions: Sequence[str] = CONDITIONS,
    max_new_tokens: int = 16,
    scale: float = 1.0,
    family: str | Family | None = None,
    progress: Callable[[str, str], None] | None = None,
    demonstrations: str | None = None,
    chat: ChatFormat | None = None,
) -> list[Result]:
    """One Result per (template, condition); ``patched`` needs ``patch``.

    ``demonstrations``: the template the instruction's demonstrations are written in (the
    recipe's).  For any other template the prompt condition gets them rewritten in that template
    (``datafiles.rerender``), as a user prompting in that format would write them.
    ``chat``: a chat recipe's format (``instruction`` is then its system message and the one
    template is ``CHAT_TEMPLATE``)."""
    # only the patched condition hooks into the model (a model under test may carry other modules:
    # a LoRA injected by peft, which the family's check would refuse)
    fam: Family | None = family_for(model, family) if "patched" in conditions else None
    results: list[Result] = []
    for template in templates:
        instr, pre, queries = query_ids(tokenizer, instruction, pairs, template, chat)
        rewritten = None
        if demonstrations is not None and template != demonstrations and chat is None:
            rewritten = rerender(instruction, demonstrations, template)
        for cond in conditions:
            if progress:
                progress(template, cond)
            # the prompt condition: every query after the same pre + instruction, run once (the
            # patched condition keeps whole rows: the hooks see each forward as it comes)
            prompts, prefix = [pre + q for q in queries], ()
            if cond == "prompt":
                prompts, prefix = queries, (instr if rewritten is None else
                                            special_prefix(tokenizer) + token_ids(tokenizer, rewritten))
            if cond == "patched" and patch is None:
                raise ValueError("the patched condition needs a patch")
            with ThoughtHooks(model, fam) if cond == "patched" else contextlib.nullcontext() as hooks:
                if hooks is not None:
                    hooks.scale = scale
                    hooks.set_patch(patch)
                answers = generate_answers(model, tokenizer, prompts, max_new_tokens, ids_out=(got := []), prefix=prefix,
                                           newline=chat is None)
            correct = correct_answers(answers, pairs, contains=chat is not None)
            ends = set(end_token_ids(model, tokenizer))
            cut = [len(r) >= max_new_tokens and not (r[-1] in ends or (
                chat is None and "\n" in tokenizer.decode(r[-1:], skip_special_tokens=False))) for r in got]
            results.append(Result(template, cond, correct, len(pairs), answers, got,
                                  rerendered=cond == "prompt" and rewritten is not None, cut=cut))
    return results


def query_ids(tokenizer, instruction: str, pairs: Sequence[Pair], template: str,
              chat: ChatFormat | None = None) -> tuple[list[int], list[int], list[list[int]]]:
    """Token ids of (what the prompted model sees before a query, what the model without the prompt
    sees before it, each query): ``pre + I`` / ``pre`` / the template up to the answer, or for a
    chat recipe the template's text with / without the system message and each conversation up
    to where the assistant answers."""
    if chat is None:
        pre = special_prefix(tokenizer)
        return (pre + token_ids(tokenizer, instruction), pre,
                [token_ids(tokenizer, render(template, p.input)) for p in pairs])
    queries = chat.texts(pairs, answer=False, where="eval")
    return (token_ids(tokenizer, chat.system), token_ids(tokenizer, chat.plain),
            [token_ids(tokenizer, q) for q in queries])
