"""Token ids for the two passes: the instruction and each text tokenised separately (so the
positions of x align with and without the instruction), checked against the model's context, and
batched into right-padded micro-batches.  No model is run here."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from transmute_cli.errors import InputError
from transmute_cli.model.families import text_config

if TYPE_CHECKING:  # the engine's replay of a layer, held here with the ids it ran on
    from transmute_cli.engine.hooks import LayerCall


def token_ids(tokenizer, text: str) -> list[int]:
    """The ids of ``text`` alone, without the special tokens the tokenizer would add."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Encoded:
    """Token ids: ``pre`` (BOS or nothing), the instruction, each example text x, and each
    preservation text z (run without the instruction in both passes), and each broad text b
    (patched like an example, under the first instruction, with its own weight: the prompt's
    effect on text that is not the task's).  ``plain``: what the
    non-contextual pass (and both passes of a preservation text) starts with in place of ``pre``
    — chat recipes: the chat template's text without a system message (``chat.ChatFormat``);
    ``None``: ``pre``.

    ``contexts`` (many-shot recipes): the distinct instructions the example texts are patched
    under, and ``context_of[i]`` the one text i sees; empty when every text sees ``instruction``.

    ``weights``: per example text, each token's weight in the least-squares sums (0: the position
    is not fitted); empty when every token counts once."""

    pre: tuple[int, ...]
    instruction: tuple[int, ...]
    texts: tuple[tuple[int, ...], ...]
    preserve: tuple[tuple[int, ...], ...] = ()
    contexts: tuple[tuple[int, ...], ...] = ()
    context_of: tuple[int, ...] = ()
    plain: tuple[int, ...] | None = None
    broad: tuple[tuple[int, ...], ...] = ()
    weights: tuple[tuple[float, ...], ...] = ()

    @property
    def npre(self) -> tuple[int, ...]:
        """The tokens before x (before z) in the non-contextual pass."""
        return self.pre if self.plain is None else self.plain

    @property
    def prefix_len(self) -> int:  # tokens before x in the contextual sequence (the one instruction)
        return len(self.pre) + len(self.instruction)

    def context(self, i: int) -> int:
        """Which instruction text i is patched under (0: ``instruction``, or ``contexts[0]``)."""
        return self.context_of[i] if self.context_of else 0

    def instruction_ids(self, context: int) -> tuple[int, ...]:
        return self.contexts[context] if self.contexts else self.instruction


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text (Gemma/Llama: BOS; Qwen: nothing)."""
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = token_ids(tokenizer, "a")
    k = len(with_sp) - len(without)
    if k > 0 and with_sp[k:] == without:
        return list(with_sp[:k])
    return []


def encode(tokenizer, instruction: str, texts: Sequence[str], preserve: Sequence[str] = (),
           contexts: Sequence[str] | None = None, plain: str | None = None, broad: Sequence[str] = (),
           weights: Sequence[Sequence[float]] | None = None) -> Encoded:
    """Tokenize I and each x separately so the positions of x align in both passes.
    ``contexts``: one instruction per text (many-shot), in place of ``instruction`` for that text.
    ``plain`` (chat): the text before x in the non-contextual pass; then nothing is added before
    either pass's text (the chat template writes any BOS itself).  ``weights``: one weight per
    token of each text (``Encoded.weights``; checked by ``check_lengths``)."""
    ids = lambda s: tuple(token_ids(tokenizer, s))  # noqa: E731
    distinct: tuple[tuple[int, ...], ...] = ()
    context_of: tuple[int, ...] = ()
    if weights is not None and len(weights) != len(texts):
        raise ValueError(f"{len(weights)} token weight lists for {len(texts)} texts")
    if contexts is not None:
        if len(contexts) != len(texts):
            raise ValueError(f"{len(contexts)} contexts for {len(texts)} texts")
        order = list(dict.fromkeys(contexts))
        distinct, context_of = tuple(ids(c) for c in order), tuple(order.index(c) for c in contexts)
    pre = tuple(special_prefix(tokenizer)) if plain is None else ()
    return Encoded(pre, ids(instruction), tuple(ids(t) for t in texts), tuple(ids(t) for t in preserve), distinct,
                   context_of, None if plain is None else ids(plain), tuple(ids(t) for t in broad),
                   tuple(tuple(float(v) for v in w) for w in weights) if weights is not None else ())


def context_length(model: nn.Module) -> int | None:
    return getattr(text_config(model), "max_position_embeddings", None)


def check_lengths(model: nn.Module, enc: Encoded) -> None:
    """Examples whose contextual sequence exceeds the model's context are bad input."""
    limit = context_length(model)
    for i, x in enumerate(enc.texts):
        if not x:
            raise InputError("the example text is empty after tokenization", field=f"examples[{i}]")
        prefix = len(enc.pre) + len(enc.instruction_ids(enc.context(i)))
        if limit is not None and prefix + len(x) > limit:
            raise InputError(
                f"instruction + example is {prefix + len(x)} tokens; the model's context is {limit}",
                field=f"examples[{i}]",
            )
        if enc.weights:
            w = enc.weights[i]
            if len(w) != len(x):
                raise ValueError(f"text {i}: {len(w)} token weights for {len(x)} tokens")
            if not all(v >= 0 and math.isfinite(v) for v in w) or not any(v > 0 for v in w):
                raise InputError("token weights must be finite, >= 0, and not all 0", field=f"examples[{i}]")
    for i, z in enumerate(enc.preserve):
        if not z:
            raise InputError("the text is empty after tokenization", field=f"preserve[{i}]")
        if limit is not None and len(enc.npre) + len(z) > limit:
            raise InputError(f"the text is {len(enc.npre) + len(z)} tokens; the model's context is {limit}",
                             field=f"preserve[{i}]")
    for i, b in enumerate(enc.broad):
        if not b:
            raise InputError("the text is empty after tokenization", field=f"broad[{i}]")
        prefix = len(enc.pre) + len(enc.instruction_ids(0))
        if limit is not None and prefix + len(b) > limit:
            raise InputError(f"instruction + text is {prefix + len(b)} tokens; the model's context is {limit}",
                             field=f"broad[{i}]")


# --------------------------------------------------------------------------- batches of sequences


def pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0


def left_pad(tokenizer, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both ``[rows, longest]``, of token-id prompts padded on the left
    with ``pad_id``: every row ends where generation starts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[r, width - len(p) :] = 1
    return ids, mask


@dataclass
class MicroBatch:
    """Right-padded sequences of a few examples.  Causal attention means padding at the end never
    changes a real position, so no attention mask is needed and positions stay 0..T-1.

    A *preservation* micro-batch holds texts z whose target is the original model itself: both
    "passes" run ``pre + z`` (the contextual one unpatched, the other patched), ``start`` is
    ``p`` and the contextual state covers the whole sequence (there is no shared prefix)."""

    index: list[int]  # example indices
    ctx_ids: torch.Tensor  # [B, P + Tx]   pre + I + x (every row under the same instruction)
    nctx_ids: torch.Tensor  # [B, p + Tx]  pre + x
    xmask: torch.Tensor  # [B, Tx] bool: real tokens of x
    xweight: torch.Tensor | None = None  # [B, Tx] each token's weight (Encoded.weights); None: all 1
    start: int = 0  # where x starts in ctx_ids (P; p for preservation)
    preserve: bool = False
    weight: float = 1.0  # of each token in the least-squares sums
    context: int = 0  # which instruction (Encoded.context)
    # incremental state (hidden states entering the current layer)
    xc: torch.Tensor | None = None  # [B, Tx, d]   contextual, positions of x only (preservation: whole sequence)
    xn: torch.Tensor | None = None  # [B, p + Tx, d] non-contextual, whole sequence
    ctx_call: list[LayerCall] | None = None
    nctx_call: list[LayerCall] | None = None

    def groups(self) -> Iterator[tuple[torch.Tensor, float]]:
        """(mask [B, Tx], weight) of the tokens fitted with one weight each: every real token with
        ``weight``, or, with token weights, each distinct non-zero weight's tokens (the sums are
        order-free, so a micro-batch's tokens may enter them group by group)."""
        if self.xweight is None:
            yield self.xmask, self.weight
            return
        for v in torch.unique(self.xweight[self.xmask]).tolist():
            if v > 0:
                yield self.xmask & (self.xweight == v), self.weight * v


def micro_batches(enc: Encoded, index: Sequence[int], size: int, pad: int, device, *, preserve: bool = False,
                   weight: float = 1.0, broad: bool = False) -> list[MicroBatch]:
    """Micro-batches of at most ``size`` texts; the texts of one micro-batch share their
    instruction (grouped by ``Encoded.context``, order kept within a group).  ``index`` counts
    the example texts, or the preservation texts (``preserve``), or the broad texts (``broad``:
    patched like examples, all under the first instruction)."""
    texts = enc.preserve if preserve else enc.broad if broad else enc.texts
    weights = () if preserve or broad else enc.weights
    groups: dict[int, list[int]] = {}
    for i in index:
        groups.setdefault(0 if preserve or broad else enc.context(i), []).append(i)
    out = []
    for context, members in groups.items():
        ctx_prefix = enc.npre if preserve else enc.pre + enc.instruction_ids(context)
        out += _chunks(texts, members, size, pad, device, ctx_prefix, enc.npre, preserve, weight, context, weights)
    return out


def _chunks(texts, index, size, pad, device, ctx_prefix, pre, preserve, weight, context, weights) -> list[MicroBatch]:
    out = []
    for s in range(0, len(index), size):
        idx = list(index[s : s + size])
        tx = max(len(texts[i]) for i in idx)
        xs = torch.full((len(idx), tx), pad, dtype=torch.long)
        xmask = torch.zeros((len(idx), tx), dtype=torch.bool)
        xweight = torch.zeros((len(idx), tx), dtype=torch.float64) if weights else None
        for r, i in enumerate(idx):
            xs[r, : len(texts[i])] = torch.tensor(texts[i])
            xmask[r, : len(texts[i])] = True
            if xweight is not None:
                xweight[r, : len(texts[i])] = torch.tensor(weights[i], dtype=torch.float64)
        ctx_pre = torch.tensor(ctx_prefix, dtype=torch.long).reshape(1, -1).expand(len(idx), -1)
        nctx_pre = torch.tensor(pre, dtype=torch.long).reshape(1, -1).expand(len(idx), -1)
        out.append(
            MicroBatch(
                idx,
                torch.cat([ctx_pre, xs], 1).to(device),
                torch.cat([nctx_pre, xs], 1).to(device),
                xmask.to(device),
                None if xweight is None else xweight.to(device),
                start=len(ctx_prefix),
                preserve=preserve,
                weight=weight,
                context=context,
            )
        )
    return out


def deal(n: int, batches: int, seed: int) -> list[list[int]]:
    """Shuffle example indices with ``seed`` and deal them into ``batches`` near-equal batches."""
    if batches > n:
        raise InputError(f"must be <= the number of examples ({n}), got {batches}", field="batches")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist() if batches > 1 else list(range(n))
    return [perm[b::batches] for b in range(batches)]
