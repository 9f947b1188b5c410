"""Second moments of every layer's inputs on broad text, computed once per model and cached.

The locality term of the default fit (``broad: original``): on the shipped broad texts
(``transmute_cli/data/broad.txt``) the patch should change nothing — the original model is the
target.  A token with that target adds ``n nᵀ`` to the thought matrix's normal equations (its
``dz`` is 0) and ``a aᵀ``, ``a`` to the down-projection solve (its gap ``e`` is 0), so the
whole term is three sums per layer: ``Σ n nᵀ`` [d, d], ``Σ a aᵀ`` [f, f] and ``Σ a`` [f] (``a``
scaled by the post-norm's per-token rms on Gemma, as the joint solve scales it).  They do not
depend on the instruction, so they are computed once per model (MEMIT's cached C₀) instead of
running the texts through both passes of every compute.  What they leave out: the drift that
the patches of earlier layers cause on these texts (the states are the unpatched model's);
Nor the effect of the same layer's input-side
matrix A on these tokens (the down-projection solve sees them with A's change unaccounted).
``broad: prompted`` runs the texts through the loop instead (exact, several times the cost).
Every batch's solves get the whole moments, as they get the preservation texts: with several
batches the term counts once per batch (``broad_weight`` was chosen at one batch, the default).

No printing; the cache is a safetensors file whose name holds the model's fingerprint and the
texts' hash, written whole or not at all.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from transmute_cli.model.families import Family, base_model, decoder_layers, get_module, model_device, post_norm, select
from transmute_cli.engine.hooks import capture
from transmute_cli.engine.solve import rms_scaled
from transmute_cli.model.tokens import context_length, encode, micro_batches, pad_id

VERSION = "1"  # bump when what is summed changes: older cache files are then ignored


@dataclass
class Moments:
    """Per layer: ``nn`` Σ n nᵀ [d, d], ``aa`` Σ a aᵀ [f, f], ``a`` Σ a [f], over ``count``
    tokens; summed in float64, kept in float32 (the solve takes each layer's in float64)."""

    count: int
    sum_nn: list[torch.Tensor]
    sum_aa: list[torch.Tensor]
    sum_a: list[torch.Tensor]


def texts_key(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]


def compute_moments(model: nn.Module, fam: Family, tokenizer, texts: list[str], micro_batch: int = 8) -> Moments:
    """The sums over every token of ``texts`` (each after the tokenizer's BOS, no instruction),
    the model as it is (no thought patch in place)."""
    layers = decoder_layers(model, fam)
    enc = encode(tokenizer, "", [], preserve=texts)
    limit = context_length(model)
    if limit is not None:  # a text longer than the model's context counts up to it
        enc = replace(enc, preserve=tuple(z[: limit - len(enc.npre)] for z in enc.preserve))
    p = len(enc.npre)
    mbs = micro_batches(enc, list(range(len(texts))), micro_batch, pad_id(tokenizer), model_device(model), preserve=True)
    nn_s: list[torch.Tensor | None] = [None] * len(layers)
    aa_s: list[torch.Tensor | None] = [None] * len(layers)
    a_s: list[torch.Tensor | None] = [None] * len(layers)
    norms = [post_norm(layer, fam) for layer in layers]
    count = 0
    with torch.no_grad():
        for mb in mbs:
            with ExitStack() as stack:
                caps = [stack.enter_context(capture(layer, fam)) for layer in layers]
                base_model(model, fam)(input_ids=mb.nctx_ids, use_cache=False)  # the states only, no head
            m = mb.xmask
            count += int(m.sum())
            for l, c in enumerate(caps):
                n = select(c["n"], p, m).double().cpu()
                a = select(c["a"], p, m).double().cpu()
                if norms[l] is not None:
                    a = rms_scaled(a, select(c["m"], p, m).double().cpu(), norms[l][1])
                nn_s[l] = n.T @ n if nn_s[l] is None else nn_s[l].addmm_(n.T, n)
                aa_s[l] = a.T @ a if aa_s[l] is None else aa_s[l].addmm_(a.T, a)
                a_s[l] = a.sum(0) if a_s[l] is None else a_s[l] + a.sum(0)
            del caps
    return Moments(count, nn_s, aa_s, a_s)


def cache_file(folder: Path, fingerprint: str, texts: list[str], dtype: torch.dtype) -> Path:
    key = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]  # the model (and family: the caller's key)
    name = f"moments-v{VERSION}-{key}-{texts_key(texts)}-{str(dtype).removeprefix('torch.')}.safetensors"
    return folder / name


def load_or_compute(model: nn.Module, fam: Family, tokenizer, texts: list[str], fingerprint: str,
                    folder: Path | None) -> tuple[Moments, bool]:
    """The moments from the cache (``folder``; None: no cache), else computed and cached.
    Returns (moments, whether they came from the cache).  Float32, in memory and on disk (half
    the size; the sums are a regulariser, not the solve's data): L·(d² + f²) numbers, 330 MB on
    Gemma 3 270M."""
    from safetensors.torch import load_file, save_file

    dtype = next(model.parameters()).dtype
    path = cache_file(folder, fingerprint, texts, dtype) if folder is not None else None
    if path is not None and path.is_file():
        try:
            t = load_file(str(path))
            L = len([k for k in t if k.startswith("nn.")])
            layers = decoder_layers(model, fam)
            if L != len(layers) or any(t[f"aa.{l}"].shape[0] != get_module(layer, fam.mlp_down).weight.shape[1]
                                       for l, layer in enumerate(layers)):
                raise ValueError("the cached moments do not fit this model")
            return Moments(int(t["count"][0]), [t[f"nn.{l}"] for l in range(L)], [t[f"aa.{l}"] for l in range(L)],
                           [t[f"a.{l}"] for l in range(L)]), True
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, never trusted
            pass
    mom = compute_moments(model, fam, tokenizer, texts)
    # float32, as a cached run reads them: the same patch whether or not the cache was there
    mom = Moments(mom.count, *([t.float() for t in ts] for ts in (mom.sum_nn, mom.sum_aa, mom.sum_a)))
    if path is not None:
        tensors = {"count": torch.tensor([mom.count], dtype=torch.int64)}
        for l in range(len(mom.sum_nn)):
            tensors[f"nn.{l}"] = mom.sum_nn[l].float().contiguous()
            tensors[f"aa.{l}"] = mom.sum_aa[l].float().contiguous()
            tensors[f"a.{l}"] = mom.sum_a[l].float().contiguous()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".moments-", dir=path.parent)
            os.close(fd)
            try:
                save_file(tensors, tmp)
                os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is an ordinary folder
                os.replace(tmp, path)  # whole or not at all
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except Exception:  # noqa: BLE001 - a full disk or a read-only cache costs only the recomputation next time
            pass
    return mom, False
