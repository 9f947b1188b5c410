"""Export a thought patch as a PEFT LoRA adapter (`PeftModel.from_pretrained(base, DIR)`).

Each update ``ΔW`` (``W A`` on the MLP input projections, ``D`` plus the folded thought vector on
the down projection) becomes a LoRA pair ``ΔW = B A`` with ``lora_alpha = r`` so PEFT's scale is
1.  A factored patch (rank T, the number of tokens it was fitted on) needs no SVD at all: its
factors *are* the pair, ``B = W left`` and ``A = right``, so by default each module gets exactly
its patch's rank (``rank_pattern``) and the adapter is the patch.  A smaller ``rank`` truncates
through the factors (QR of each, an SVD of the r×r core); a dense update (a recipe of more tokens
than half the hidden size) through the Gram route (``solve.spectrum``).  The fraction of
``|ΔW|²`` kept (the captured energy) is reported per layer and module.

Thought vectors: where the vector is added at the down projection's own output (Llama, Qwen,
Mistral) it is that module's ``lora_bias`` — exact.  Where a norm follows (Gemma 3) LoRA has no
slot for it, so it is folded into the down projection's update by least squares, as in a merged
checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from transmute_cli.errors import InputError
from transmute_cli.model.families import Family, decoder_layers, get_module
from transmute_cli.engine.lowrank import LowRank, add, truncated
from transmute_cli.artifacts.patch import ThoughtPatch
from transmute_cli.artifacts.merge import fold_matrix
from transmute_cli.engine.solve import spectrum


def lora_pair(delta, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(lora_A [r, in], lora_B [out, r], captured energy) with ``B A`` the best rank-r ΔW,
    ``r = min(rank, rank of ΔW)``; ``rank=None``: exact (every direction ΔW has).

    ``delta`` factored (``LowRank``): exact pairs are its factors, fewer come from
    ``lowrank.truncated``.  Dense: the top singular triplets come from the eigendecomposition
    of the Gram matrix on the smaller side (``solve.spectrum``), faster than a full SVD:
    ``ΔWᵀΔW = V S² Vᵀ``, ``U = ΔW V / S``; directions with ``s <= 1e-7·s_max`` carry under
    1e-14 of the energy and do not count towards the rank (their U would be rounding noise)."""
    if isinstance(delta, LowRank):
        if rank is None or rank >= delta.rank:
            return delta.right.float(), delta.left.float(), 1.0
        u, s, vh, energy = truncated(delta, rank)
        root = s.sqrt()
        return (root[:, None] * vh).float(), (u * root).float(), energy
    d = delta.detach().double()
    wide = d.shape[0] < d.shape[1]
    m = d.T if wide else d  # [long, short]
    s, vectors = spectrum(m.T, left_vectors=True)  # left vectors of mᵀ: the right ones of m
    live = int((s > s[0] * 1e-7).sum()) if s.numel() and s[0] > 0 else 0
    r = max(1, min(live, rank if rank is not None else live))
    total = float((m * m).sum())
    energy = min(1.0, float((s[:r] ** 2).sum()) / total) if total > 0 else 1.0
    v = vectors[:, :r]  # [short, r]
    keep = s[:r] > s[0] * 1e-7 if s.numel() and s[0] > 0 else torch.zeros(r, dtype=torch.bool)
    u = torch.where(keep, (m @ v) / s[:r].clamp_min(torch.finfo(torch.float64).tiny), torch.zeros((), dtype=d.dtype))
    root = torch.where(keep, s[:r], torch.zeros((), dtype=d.dtype)).sqrt()
    left, right = (v, u) if wide else (u, v)  # delta = left · diag(s) · rightᵀ
    return (root[:, None] * right.T).float(), (left * root).float(), energy


def vector_as_bias(fam: Family) -> bool:
    """Whether a LoRA bias on the down projection carries the thought vector exactly: the vector
    is added at the output of the module that joins the residual, which must be the down
    projection itself (no norm in between)."""
    return fam.mlp_out == fam.mlp_down


@torch.no_grad()
def deltas(model: nn.Module, fam: Family, patch: ThoughtPatch, fold_stats: dict | None,
           bias: bool = False) -> Iterator[tuple[str, torch.Tensor | LowRank]]:
    """Weight updates per module name (relative to the CausalLM root), one at a time (a dense
    update is as big as its weight), factored where the patch is: ``W A = (W left) right``.
    ``bias``: the vectors are left out (they become LoRA biases)."""
    layers = decoder_layers(model, fam)
    for l in patch.layers:
        layer = layers[l]
        if l in patch.matrices:
            a = patch.matrices[l]
            for path in fam.mlp_in:
                w = get_module(layer, path).weight.detach().float()
                yield f"{fam.layers}.{l}.{path}", (a.premul(w) if isinstance(a, LowRank) else w @ a.to(w.device))
        down = patch.downs[l] if l in patch.downs else None
        if l in patch.vectors and not bias:
            if fold_stats is None or l not in fold_stats:
                raise InputError(f"layer {l}: exporting a thought vector needs activation statistics")
            fold = fold_matrix(patch.vectors[l], fold_stats[l])
            down = fold if down is None else add(down, fold.to(down.device))
        if down is not None:
            yield f"{fam.layers}.{l}.{fam.mlp_down}", down
        elif l in patch.vectors:  # a vector alone, as a bias: the module needs a (zero) pair
            lin = get_module(layer, fam.mlp_down)
            yield f"{fam.layers}.{l}.{fam.mlp_down}", LowRank(torch.zeros(lin.out_features, 1), torch.zeros(1, lin.in_features))


@torch.no_grad()
def export_peft(model: nn.Module, fam: Family, patch: ThoughtPatch, rank: int | None, out: Path, base_spec: str,
                fold_stats: dict | None) -> dict:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT itself.
    ``rank=None``: each module at its update's own rank (exact)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise InputError("--format peft needs the 'peft' package (pip install peft)", field="--format") from None
    if rank is not None and rank < 1:
        raise InputError(f"must be >= 1, got {rank}", field="--rank")
    bias = bool(patch.vectors) and vector_as_bias(fam)
    # each update turned into its pair before the next is built: never every ΔW at once
    pairs = {name: lora_pair(delta, rank) for name, delta in deltas(model, fam, patch, fold_stats, bias=bias)}
    ranks = {name: int(a.shape[0]) for name, (a, _b, _e) in pairs.items()}
    top = max(ranks.values(), default=1)
    # one r for all would pad most modules with zeros: each module gets its own (alpha = r: scale 1)
    config = LoraConfig(r=top, lora_alpha=top, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=sorted(pairs), rank_pattern=dict(ranks), alpha_pattern=dict(ranks),
                        lora_bias=bias)
    with warnings.catch_warnings():
        # with lora_bias peft warns that merge_and_unload() is impossible on a layer without a bias
        # (the adapter card says so, and `apply --format checkpoint` is the merged form)
        warnings.filterwarnings("ignore", message=".*lora_bias=True.*")
        peft_model = get_peft_model(model, config)
    # what AutoPeftModelForCausalLM loads the base from (the caller's choice: see pipeline.peft_base)
    peft_model.peft_config["default"].base_model_name_or_path = base_spec
    energy: list[dict] = []
    try:
        for name, (a, b, e) in pairs.items():
            module = peft_model.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(a.to(module.lora_A["default"].weight))
            lb = module.lora_B["default"]
            lb.weight.copy_(b.to(lb.weight))
            layer = int(name.split(".")[len(fam.layers.split("."))])
            mod = name.split(f".{layer}.", 1)[1]
            if lb.bias is not None:
                lb.bias.zero_()
                if mod == fam.mlp_down and layer in patch.vectors:
                    lb.bias.copy_(patch.vectors[layer].to(lb.bias))
            energy.append({"layer": layer, "module": mod, "rank": ranks[name], "energy": e})
        with warnings.catch_warnings():
            # peft's check for unsharded ZeRO/FSDP tensors takes every 1-D tensor, lora_B's bias too
            warnings.filterwarnings("ignore", message=".*have invalid shape.*")
            # no embedding layer is a target: say so, or peft asks the hub whether the vocabulary changed
            peft_model.save_pretrained(str(out), save_embedding_layers=False)
    finally:
        peft_model.unload()  # the loaded model is the base model again (LoRA layers removed, not merged)
    vector = ("bias" if bias else "least-squares") if patch.vectors else "none"
    return {"rank": rank, "max_rank": top, "vector": vector,
            # a dense update's exact pair drops directions under 1e-7·s_max: < 1e-12 of its energy
            "exact": vector != "least-squares" and all(x["energy"] >= 1.0 - 1e-12 for x in energy),
            "modules": len(pairs), "energy": energy,
            "mean_energy": sum(x["energy"] for x in energy) / max(len(energy), 1)}
