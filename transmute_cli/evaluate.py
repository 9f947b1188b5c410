"""Greedy evaluation: exact-match accuracy of answers cut at the first newline.

Three conditions per template: ``base`` (no prompt), ``prompt`` (the instruction in context),
``patched`` (the thought patch, no prompt).  Token ids are built exactly as in the engine —
``[pre] + ids(I) + ids(query)`` — so the prompt condition is the context the patch imitates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .engine import ThoughtPatch, special_prefix
from .families import Family, family_for, model_device
from .hooks import ThoughtHooks
from .recipe import Pair, render

CONDITIONS = ("base", "prompt", "patched")


@dataclass
class Result:
    template: str
    condition: str
    correct: int
    n: int
    answers: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


def _cut(text: str) -> str:
    return text.split("\n", 1)[0].strip()


class _NewlineStop:
    """Stop a row once its continuation holds a newline (or EOS); all rows done -> generation ends."""

    def __init__(self, tokenizer, start: int):
        self.tok, self.start = tokenizer, start

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tok.batch_decode(input_ids[:, self.start :], skip_special_tokens=False)
        return torch.tensor(["\n" in t for t in texts], device=input_ids.device)


def generate_answers(
    model: nn.Module, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int = 16, batch_size: int = 64
) -> list[str]:
    """Greedy continuations of token-id prompts, cut at the first newline and stripped."""
    from transformers import StoppingCriteriaList

    dev = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, p in enumerate(chunk):  # left padding: every row ends where generation starts
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                top_p=None,
                top_k=None,
                temperature=None,
                pad_token_id=pad,
                stopping_criteria=StoppingCriteriaList([_NewlineStop(tokenizer, width)]),
            )
        for row in gen[:, width:]:
            out.append(_cut(tokenizer.decode(row, skip_special_tokens=True)))
    return out


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
    family: str | None = None,
    progress: Callable[[str, str], None] | None = None,
) -> list[Result]:
    """One Result per (template, condition); ``patched`` needs ``patch``."""
    fam: Family = family_for(model, family)
    pre = special_prefix(tokenizer)
    ids = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    instr = ids(instruction)
    results: list[Result] = []
    for template in templates:
        queries = [ids(render(template, p.input)) for p in pairs]
        for cond in conditions:
            if progress:
                progress(template, cond)
            if cond == "prompt":
                prompts = [pre + instr + q for q in queries]
            else:
                prompts = [pre + q for q in queries]
            if cond == "patched":
                if patch is None:
                    raise ValueError("the patched condition needs a patch")
                with ThoughtHooks(model, fam) as hooks:
                    hooks.scale = scale
                    hooks.set_patch(patch)
                    answers = generate_answers(model, tokenizer, prompts, max_new_tokens)
            else:
                answers = generate_answers(model, tokenizer, prompts, max_new_tokens)
            correct = sum(a == p.output.strip() for a, p in zip(answers, pairs))
            results.append(Result(template, cond, correct, len(pairs), answers))
    return results
