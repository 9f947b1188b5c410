"""Ground truth: the exact token patch.  Token-dependent rank-one matrix updates plus residual
vectors that make the run *without* the instruction reproduce the run *with* it at every layer —
what the ridge solves approximate with one patch for all tokens.  Tests compare against it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from transmute_cli.model.families import Family, decoder_layers, family_for, model_device
from transmute_cli.engine.hooks import TokenPatchHooks, capture, record_layer_inputs
from transmute_cli.model.tokens import check_lengths, encode, micro_batches, pad_id


@dataclass
class TokenPatchResult:
    """Ground truth: token-dependent patches for one batch and the errors they leave."""

    hooks: TokenPatchHooks  # install with ``with result.hooks:`` to run the patched model
    nctx_ids: torch.Tensor  # [B, p + Tx] the non-contextual inputs the patch was built for
    ctx_ids: torch.Tensor  # [B, P + Tx]
    xmask: torch.Tensor  # [B, Tx]
    layer_errors: list[float]  # max |h_nctx − h_ctx| at the positions of x after each layer
    layer_scales: list[float]  # max |h_ctx| there: the errors' yardstick (Gemma's states reach 1e3)
    prefix_len: int
    pre_len: int


def exact_token_patch(model, tokenizer, instruction: str, texts: Sequence[str], *, family: str | Family | None = None,
                      plain: str | None = None) -> TokenPatchResult:
    """Token patches (rank-one matrix updates + residual vectors) that make the non-contextual
    run reproduce the contextual hidden states exactly, built by the same incremental loop.
    ``plain``: the non-contextual pass's own prefix (chat recipes, ``engine.compute_patch``)."""
    fam = family_for(model, family)
    layers = decoder_layers(model, fam)
    enc = encode(tokenizer, instruction, texts, plain=plain)
    check_lengths(model, enc)
    pad = pad_id(tokenizer)
    (mb,) = micro_batches(enc, list(range(len(texts))), len(texts), pad, model_device(model))
    P, p = enc.prefix_len, len(enc.npre)
    tp = TokenPatchHooks(model, fam)
    errors, scales = [], []
    with torch.no_grad():
        h_ctx, ctx_call = record_layer_inputs(model, fam, mb.ctx_ids)
        h_n, nctx_call = record_layer_inputs(model, fam, mb.nctx_ids)
        xc, xn = h_ctx, h_n
        m = mb.xmask
        with tp:
            for l, layer in enumerate(layers):
                with capture(layer, fam) as c:
                    xc_next = ctx_call[l](layer, xc)
                uc, nc = c["u"][:, P:], c["n"][:, P:]
                with capture(layer, fam) as c:
                    nctx_call[l](layer, xn)
                n, u = c["n"], c["u"]
                # full-sequence tensors, zero outside the positions of x: [B, p + Tx, d]
                mask = torch.zeros(n.shape[:2], dtype=torch.bool, device=n.device)
                mask[:, p:] = m
                dz = torch.zeros_like(n)
                delta = torch.zeros_like(u)
                dz[:, p:] = torch.where(m[..., None], nc - n[:, p:], 0)
                delta[:, p:] = torch.where(m[..., None], uc - u[:, p:], 0)
                tp.set(l, torch.where(mask[..., None], n, 0), dz, delta)
                xn = nctx_call[l](layer, xn)
                xc = xc_next
                err = (xn[:, p:][m] - xc[:, P:][m]).abs().max().item()
                errors.append(err)
                scales.append(xc[:, P:][m].abs().max().item())
    return TokenPatchResult(tp, mb.nctx_ids, mb.ctx_ids, mb.xmask, errors, scales, P, p)
