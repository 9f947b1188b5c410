"""Export a thought patch as a PEFT LoRA adapter (`PeftModel.from_pretrained(base, DIR)`).

Each update ``ΔW`` (``W A`` on the MLP input projections, ``D`` plus the folded thought vector on
the down projection) becomes a rank-R LoRA pair by truncated SVD, ``ΔW ≈ B A`` with
``lora_alpha = R`` so PEFT's scale is 1.  The fraction of ``|ΔW|²`` the rank keeps (the
captured energy) is reported per layer and module.  LoRA has no slot for a constant, so thought
vectors are carried the only way the format allows: folded into the down projection's update by
least squares (as in a merged Gemma checkpoint), then truncated with it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import InputError
from .families import Family, decoder_layers, get_module
from .patch import ThoughtPatch, fold_matrix
from .solve import spectrum


def lora_pair(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(lora_A [r, in], lora_B [out, r], captured energy) with ``B A`` the best rank-r ΔW.

    The top singular triplets come from the eigendecomposition of the Gram matrix on the smaller
    side (640 × 640 for Gemma 3 270M's 2048 × 640 updates; ``solve.spectrum``), ~5x faster than
    a full SVD of ΔW: ``ΔWᵀΔW = V S² Vᵀ``, ``U = ΔW V / S``.  Directions with ``s <= 1e-7·s_max``
    carry under 1e-14 of the energy and are left at zero (their U would be rounding noise)."""
    d = delta.detach().double()
    wide = d.shape[0] < d.shape[1]
    m = d.T if wide else d  # [long, short]
    s, vectors = spectrum(m.T, left_vectors=True)  # left vectors of mᵀ: the right ones of m
    r = min(rank, s.numel())
    total = float((m * m).sum())
    energy = min(1.0, float((s[:r] ** 2).sum()) / total) if total > 0 else 1.0
    v = vectors[:, :r]  # [short, r]
    keep = s[:r] > s[0] * 1e-7 if s.numel() and s[0] > 0 else torch.zeros(r, dtype=torch.bool)
    u = torch.where(keep, (m @ v) / s[:r].clamp_min(torch.finfo(torch.float64).tiny), torch.zeros((), dtype=d.dtype))
    root = torch.where(keep, s[:r], torch.zeros((), dtype=d.dtype)).sqrt()
    left, right = (v, u) if wide else (u, v)  # delta = left · diag(s) · rightᵀ
    b = (left * root).float()  # [out, r]
    a = (root[:, None] * right.T).float()  # [r, in]
    if r < rank:  # PEFT wants exactly `rank` columns: pad with zeros
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0)
    return a, b, energy


@torch.no_grad()
def deltas(model: nn.Module, fam: Family, patch: ThoughtPatch, fold_stats: dict | None) -> dict[str, torch.Tensor]:
    """Full-rank weight updates per module name (relative to the CausalLM root)."""
    layers = decoder_layers(model, fam)
    out: dict[str, torch.Tensor] = {}
    for l in patch.layers:
        layer = layers[l]
        if l in patch.matrices:
            for path in fam.mlp_in:
                w = get_module(layer, path).weight.float()
                out[f"{fam.layers}.{l}.{path}"] = w @ patch.matrices[l].to(w.device)
        down = None
        if l in patch.downs:
            down = patch.downs[l].float()
        if l in patch.vectors:
            if fold_stats is None or l not in fold_stats:
                raise InputError(f"layer {l}: exporting a thought vector needs activation statistics")
            fold = fold_matrix(patch.vectors[l], fold_stats[l]).float()
            down = fold if down is None else down + fold.to(down.device)
        if down is not None:
            out[f"{fam.layers}.{l}.{fam.mlp_down}"] = down
    return out


@torch.no_grad()
def export_peft(model: nn.Module, fam: Family, patch: ThoughtPatch, rank: int, out: Path, base_spec: str,
                fold_stats: dict | None) -> dict:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT itself."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise InputError("--format peft needs the 'peft' package (pip install peft)", field="--format") from None
    if rank < 1:
        raise InputError(f"must be >= 1, got {rank}", field="--rank")
    ups = deltas(model, fam, patch, fold_stats)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=sorted(ups))
    peft_model = get_peft_model(model, config)
    # get_peft_model records the folder the weights came from (for an alias, a path in this
    # machine's cache); record what a user can resolve anywhere instead
    peft_model.peft_config["default"].base_model_name_or_path = base_spec
    energy: list[dict] = []
    try:
        for name, delta in ups.items():
            module = peft_model.base_model.model.get_submodule(name)
            a, b, e = lora_pair(delta, rank)
            module.lora_A["default"].weight.copy_(a.to(module.lora_A["default"].weight))
            module.lora_B["default"].weight.copy_(b.to(module.lora_B["default"].weight))
            layer = int(name.split(".")[len(fam.layers.split("."))])
            energy.append({"layer": layer, "module": name.split(f".{layer}.", 1)[1], "energy": e})
        # no embedding layer is a target: say so, or peft asks the hub whether the vocabulary changed
        peft_model.save_pretrained(str(out), save_embedding_layers=False)
    finally:
        peft_model.unload()  # the loaded model is the base model again (LoRA layers removed, not merged)
    return {"rank": rank, "modules": len(ups), "energy": energy,
            "mean_energy": sum(x["energy"] for x in energy) / max(len(energy), 1)}
