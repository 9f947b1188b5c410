"""Held-out fidelity against the prompted model: KL on the prompted model's answers, identical
answers, identical first tokens."""

from __future__ import annotations


from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from transmute_cli.recipe.chat import ChatFormat
from transmute_cli.recipe.datafiles import Pair
from transmute_cli.model.families import Family, base_model, family_for, model_device, select
from transmute_cli.engine.fidelity import compare_logits, final_logits, last_hidden
from transmute_cli.engine.hooks import ThoughtHooks
from transmute_cli.engine.thought import ThoughtPatch
from transmute_cli.evaluation.generate import FIRST_TOKENS, Result, same_answers, query_ids


@dataclass
class HeldoutFidelity:
    """How closely the patched model (no prompt) follows the prompted one on held-out queries:
    the share of identical greedy answers, and KL(prompted ‖ patched) per answer position with
    the prompted model's own answer (its stop token included) fed to both."""

    template: str
    n: int
    answer_agreement: float
    mean_kl: float
    positions: int
    base_answer_agreement: float  # unpatched, no prompt, against the prompted model
    base_mean_kl: float
    # share of queries whose first FIRST_TOKENS answer tokens (the whole answer when shorter) are
    # the prompted model's: the measure for open-ended answers, where whole answers rarely agree
    first_tokens_agreement: float = float("nan")
    base_first_tokens_agreement: float = float("nan")
    first_tokens: int = FIRST_TOKENS


def answer_logits(model: nn.Module, fam: Family, seqs: Sequence[list[int]], starts: Sequence[int],
                   lengths: Sequence[int], batch_size: int = 32) -> list[torch.Tensor]:
    """Per sequence, the float32 logits at the positions that predict its last ``lengths[i]``
    tokens (which begin at ``starts[i]``): the head runs on those positions only (a vocabulary
    of 262k makes whole-sequence logits the cost).  Right padding: causal attention means the
    padding never changes a real position."""
    dev = model_device(model)
    base = base_model(model, fam)
    out: list[torch.Tensor] = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s : s + batch_size]
        ids = torch.zeros((len(chunk), max(len(q) for q in chunk)), dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for r, q in enumerate(chunk):
            ids[r, : len(q)] = torch.tensor(q)
            mask[r, starts[s + r] - 1 : starts[s + r] - 1 + lengths[s + r]] = True
        with torch.no_grad():
            logits = final_logits(model, fam, select(last_hidden(base, ids.to(dev)), 0, mask)).cpu()
        out += list(torch.split(logits, [lengths[s + r] for r in range(len(chunk))]))
    return out


@dataclass
class PromptedReference:
    """The prompted model's greedy answers to held-out queries, as teacher-forcing targets: per
    query with a non-empty answer, the no-prompt sequence ``pre + query + answer``, where the
    answer starts, its length, and the prompted model's logits on it (they do not depend on any
    patch, so one reference serves every patch compared against it)."""

    template: str
    prompted: Result
    plain: list[list[int]]
    starts: list[int]
    lengths: list[int]
    logits: list[torch.Tensor]


def prompted_reference(model: nn.Module, tokenizer, instruction: str, pairs: Sequence[Pair], template: str,
                       prompted: Result, *, family: str | Family | None = None,
                       chat: ChatFormat | None = None) -> PromptedReference:
    """``prompted`` is ``evaluate``'s prompt-condition result (it carries ``answer_ids``)."""
    fam: Family = family_for(model, family)
    instr, pre, queries = query_ids(tokenizer, instruction, pairs, template, chat)
    keep = [i for i, a in enumerate(prompted.answer_ids) if a]
    lengths = [len(prompted.answer_ids[i]) for i in keep]
    ctx = [instr + queries[i] + prompted.answer_ids[i] for i in keep]
    logits = answer_logits(model, fam, ctx, [len(instr + queries[i]) for i in keep], lengths)
    plain = [pre + queries[i] + prompted.answer_ids[i] for i in keep]
    return PromptedReference(template, prompted, plain, [len(pre + queries[i]) for i in keep], lengths, logits)


def answer_kl(model: nn.Module, ref: PromptedReference, patch: ThoughtPatch | None = None, *, scale: float = 1.0,
              family: str | Family | None = None) -> float:
    """Mean KL(prompted ‖ model without the prompt, patched when ``patch`` is given) per answer token."""
    fam: Family = family_for(model, family)
    if patch is None:
        got = answer_logits(model, fam, ref.plain, ref.starts, ref.lengths)
    else:
        with ThoughtHooks(model, fam) as hooks:
            hooks.scale = scale
            hooks.set_patch(patch)
            got = answer_logits(model, fam, ref.plain, ref.starts, ref.lengths)
    return sum(compare_logits(r, g)[0] for r, g in zip(ref.logits, got)) / max(sum(ref.lengths), 1)


def answer_agreement(answers: Sequence[str], ref: PromptedReference) -> float:
    """Share of queries whose greedy answer is the prompted model's."""
    return same_answers(answers, ref.prompted.answers)


def first_tokens_agreement(answer_ids: Sequence[Sequence[int]], reference: Sequence[Sequence[int]],
                           n: int = FIRST_TOKENS) -> float:
    """Share of answers whose first ``n`` token ids (all of them when fewer) are the reference's."""
    pairs = list(zip(answer_ids, reference))
    return sum(list(a[:n]) == list(r[:n]) for a, r in pairs) / len(pairs) if pairs else 0.0


def heldout_fidelity(
    model: nn.Module,
    tokenizer,
    instruction: str,
    pairs: Sequence[Pair],
    template: str,
    patch: ThoughtPatch,
    prompted: Result,
    patched: Result,
    base: Result | None = None,
    *,
    scale: float = 1.0,
    family: str | Family | None = None,
    reference: PromptedReference | None = None,
    chat: ChatFormat | None = None,
) -> HeldoutFidelity:
    """Held-out fidelity from the greedy answers ``evaluate`` already produced; the KL costs one
    teacher-forced forward per model compared (plus one for the reference, unless given)."""
    ref = reference or prompted_reference(model, tokenizer, instruction, pairs, template, prompted, family=family,
                                          chat=chat)
    nan = float("nan")
    return HeldoutFidelity(
        template, len(pairs), answer_agreement(patched.answers, ref),
        answer_kl(model, ref, patch, scale=scale, family=family), sum(ref.lengths),
        answer_agreement(base.answers, ref) if base is not None else nan,
        answer_kl(model, ref, None, family=family) if base is not None else nan,
        first_tokens_agreement(patched.answer_ids, prompted.answer_ids),
        first_tokens_agreement(base.answer_ids, prompted.answer_ids) if base is not None else nan,
    )
