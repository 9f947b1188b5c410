"""End-to-end fidelity of a patch: top-1 agreement and KL(prompted ‖ patched) at the positions
of the patch examples, through the model's ordinary forward with the patch in hooks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from transmute_cli.engine.distributed import rank_world
from transmute_cli.model.families import Family, base_model, get_module, model_device, select
from transmute_cli.engine.hooks import ThoughtHooks
from transmute_cli.engine.thought import ThoughtPatch
from transmute_cli.model.tokens import Encoded, micro_batches


@dataclass
class LayerFidelity:
    layer: int
    tokens: int
    matrix_residual: float | None  # |M N − W dZ| / |W dZ| over the MLP input projections
    vector_residual: float | None  # |delta_t − δ| / |delta_t| summed over tokens
    vector_norm: float
    matrix_norm: float


@dataclass
class Fidelity:
    layers: list[LayerFidelity]
    tokens: int = 0
    top1_agreement: float | None = None  # patched, no prompt  vs  original, with prompt
    mean_kl: float | None = None  # KL(prompted ‖ patched), nats per position of x
    base_top1_agreement: float | None = None  # unpatched, no prompt  vs  original, with prompt
    base_mean_kl: float | None = None
    # preservation texts: patched vs original model on the same text (what the patch disturbs)
    preserve_tokens: int = 0
    preserve_top1_agreement: float | None = None
    preserve_mean_kl: float | None = None


def final_logits(model: nn.Module, fam: Family, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from last-layer states (final norm + lm_head), in float32."""
    h = get_module(model, fam.final_norm)(hidden)
    logits = get_module(model, fam.lm_head)(h).float()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def compare_logits(p_logits: torch.Tensor, q_logits: torch.Tensor) -> tuple[float, float]:
    """Sum over positions of KL(p ‖ q) and of top-1 agreement; inputs [tokens, vocab]."""
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0).sum().item()
    agree = (p_logits.argmax(-1) == q_logits.argmax(-1)).sum().item()
    return kl, float(agree)


def end_to_end(model, fam: Family, patch: ThoughtPatch, enc: Encoded, pad: int, fid: Fidelity, micro_batch: int,
               distributed: bool = False, texts: int | None = None) -> None:
    """Top-1 agreement and mean KL at the positions of x: the patched model *without* I against
    the original model *with* I, through the model's ordinary forward (hooks, not the loop);
    over the first ``texts`` example texts (None: all).
    On the preservation texts: the patched model against the original one, same text."""
    base = base_model(model, fam)
    p = len(enc.npre)
    tot = {"kl": 0.0, "agree": 0.0, "bkl": 0.0, "bagree": 0.0, "n": 0, "pkl": 0.0, "pagree": 0.0, "pn": 0}
    rank, world = rank_world(distributed)
    k = len(enc.texts) if texts is None else min(texts, len(enc.texts))
    mbs = micro_batches(enc, list(range(k))[rank::world], micro_batch, pad, model_device(model))
    with torch.no_grad(), ThoughtHooks(model, fam) as hooks:
        hooks.set_patch(patch)
        for mb in mbs:
            m = mb.xmask
            hooks.enabled = False
            ref = final_logits(model, fam, select(last_hidden(base, mb.ctx_ids), mb.start, m))
            plain = final_logits(model, fam, select(last_hidden(base, mb.nctx_ids), p, m))
            hooks.enabled = True
            patched = final_logits(model, fam, select(last_hidden(base, mb.nctx_ids), p, m))
            kl, agree = compare_logits(ref, patched)
            bkl, bagree = compare_logits(ref, plain)
            tot["kl"] += kl
            tot["agree"] += agree
            tot["bkl"] += bkl
            tot["bagree"] += bagree
            tot["n"] += int(m.sum())
        pmbs = micro_batches(enc, list(range(len(enc.preserve)))[rank::world], micro_batch, pad, model_device(model),
                              preserve=True)
        for mb in pmbs:
            m = mb.xmask
            hooks.enabled = False
            ref = final_logits(model, fam, select(last_hidden(base, mb.nctx_ids), p, m))
            hooks.enabled = True
            patched = final_logits(model, fam, select(last_hidden(base, mb.nctx_ids), p, m))
            kl, agree = compare_logits(ref, patched)
            tot["pkl"] += kl
            tot["pagree"] += agree
            tot["pn"] += int(m.sum())
    if distributed:
        import torch.distributed as dist

        keys = sorted(tot)
        t = torch.tensor([float(tot[k]) for k in keys], dtype=torch.float64, device=model_device(model))
        dist.all_reduce(t)
        tot = dict(zip(keys, t.tolist()))
        tot["n"], tot["pn"] = int(tot["n"]), int(tot["pn"])
    if tot["pn"]:
        fid.preserve_tokens = tot["pn"]
        fid.preserve_mean_kl, fid.preserve_top1_agreement = tot["pkl"] / tot["pn"], tot["pagree"] / tot["pn"]
    n = max(tot["n"], 1)
    fid.tokens = tot["n"]
    fid.mean_kl, fid.top1_agreement = tot["kl"] / n, tot["agree"] / n
    fid.base_mean_kl, fid.base_top1_agreement = tot["bkl"] / n, tot["bagree"] / n


def last_hidden(base: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Hidden states after the last layer, *before* the final norm [B, T, d]."""
    store: dict[str, torch.Tensor] = {}
    norm = base.norm

    def pre(_m, args):
        store["h"] = args[0]

    h = norm.register_forward_pre_hook(pre)
    try:
        base(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    return store["h"]


# --------------------------------------------------------------------------- locality


@dataclass
class Locality:
    """How the patched model (no prompt) compares with the prompted one on a text that is not the
    task's (``transmute_cli/data/locality.txt``): at each position of the text, KL(prompted ‖
    patched) beside KL(prompted ‖ unpatched) — what the prompt itself changes there — and top-1
    agreement with the prompted model, plus the text's perplexity under each condition.  A patch
    as local as the prompt has KL near 0 and agreement near 1, whatever the unpatched KL."""

    tokens: int
    mean_kl: float  # KL(prompted ‖ patched), nats per position
    top1_agreement: float
    base_mean_kl: float  # KL(prompted ‖ unpatched): the prompt's own effect on the text
    base_top1_agreement: float
    perplexity_prompted: float
    perplexity_patched: float
    perplexity_base: float


def text_logits(model: nn.Module, fam: Family, prefix: Sequence[int], text: Sequence[int],
                patch: ThoughtPatch | None = None) -> torch.Tensor:
    """Float32 logits predicting each token of ``text`` but its first, after ``prefix`` and the
    text's tokens before it, ``[len(text) - 1, vocab]`` (the same positions whatever the prefix,
    even an empty one), with ``patch`` in hooks (none: the model as it is)."""
    ids = torch.tensor([list(prefix) + list(text)], dtype=torch.long, device=model_device(model))
    with torch.no_grad(), ThoughtHooks(model, fam) as hooks:
        if patch is not None:
            hooks.set_patch(patch)
        else:
            hooks.enabled = False
        h = last_hidden(base_model(model, fam), ids)
        return final_logits(model, fam, h[0, len(prefix) : len(prefix) + len(text) - 1])


def locality(prompted: torch.Tensor, patched: torch.Tensor, base: torch.Tensor, text: Sequence[int]) -> Locality:
    """The locality figures from the three conditions' ``text_logits`` on the same text."""
    import math

    target = torch.tensor(list(text)[1:], dtype=torch.long, device=prompted.device)
    n = len(target)

    def ppl(logits: torch.Tensor) -> float:
        return math.exp(float(torch.nn.functional.cross_entropy(logits, target.to(logits.device))))

    kl, agree = compare_logits(prompted, patched.to(prompted.device))
    bkl, bagree = compare_logits(prompted, base.to(prompted.device))
    return Locality(n, kl / n, agree / n, bkl / n, bagree / n, ppl(prompted), ppl(patched), ppl(base))
