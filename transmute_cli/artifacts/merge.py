"""A patch folded into a model's weights: the thought matrices exactly (W + W A, W_down + D), the
thought vector as a bias where the architecture has one, else folded into W_down by least squares
over the patched model's activations (fold statistics)."""

from __future__ import annotations


import contextlib
from pathlib import Path

import torch
from torch import nn

from transmute_cli.errors import PatchError
from transmute_cli.model.families import Family, base_model, decoder_layers, get_module, post_norm
from transmute_cli.engine.lowrank import LowRank, apply, dense
from transmute_cli.engine.solve import ridge_solve, rms_scaled, unscale_rows
from transmute_cli.artifacts.patch import ThoughtPatch


# --------------------------------------------------------------------------- merging into weights


def vector_fold_kind(model: nn.Module, fam: Family) -> str:
    """'bias' where a standard checkpoint can carry δ exactly (Llama's mlp_bias), else 'least-squares'."""
    return "bias" if fam.bias_flag and hasattr(model.config, fam.bias_flag) else "least-squares"


@torch.no_grad()
def merge(model: nn.Module, fam: Family, patch: ThoughtPatch, scale: float = 1.0, fold_stats: dict | None = None,
          spill: Path | None = None) -> dict:
    """Fold the patch into the model's weights in place so a plain checkpoint carries it.

    Matrices are exact (``W + W A``, ``W_down + D``).  Vectors: exact as ``down_proj.bias`` where
    the family has a config bias switch; otherwise folded into ``W_down`` by least squares over
    the activations in ``fold_stats`` (see ``fold_statistics``) — an approximation whose cost
    the caller measures.  ``info["undo"]()`` puts the original weights back: kept in host memory,
    or with ``spill`` (a folder) written there one layer at a time before the layer changes, so
    the merge holds at most one layer's weights beside the model.
    """
    patch.check_finite()
    if any(p.device.type == "meta" for p in model.parameters()):
        raise PatchError("merging into weights needs them in memory: this model has disk-offloaded layers "
                         "(load it without --device-map, or with more memory)")
    layers = decoder_layers(model, fam)
    kind = vector_fold_kind(model, fam)
    info: dict = {"vector_fold": kind if patch.vectors else "none", "layers": patch.layers}
    # what to put back so the caller can undo the merge (a cached model stays the base model)
    saved = _Originals(spill)
    added_bias = patch.vectors and kind == "bias" and not getattr(model.config, fam.bias_flag)
    biases = [(l, get_module(layers[l], fam.mlp_down).bias.detach().clone()) for l in patch.vectors
              if get_module(layers[l], fam.mlp_down).bias is not None]

    def undo() -> None:
        saved.restore()
        if added_bias:
            setattr(model.config, fam.bias_flag, False)
            for layer in layers:
                for path in (*fam.mlp_in, fam.mlp_down):
                    get_module(layer, path).bias = None
        else:
            for l, b in biases:
                get_module(layers[l], fam.mlp_down).bias.data.copy_(b)

    info["undo"] = undo
    if added_bias:
        # every layer's projections need a bias parameter once the config says so
        setattr(model.config, fam.bias_flag, True)
        for layer in layers:
            for path in (*fam.mlp_in, fam.mlp_down):
                lin = get_module(layer, path)
                if lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
    for l in patch.layers:
        layer = layers[l]
        saved.keep(l, [(path, get_module(layer, path)) for path in (*fam.mlp_in, fam.mlp_down)])
        if l in patch.matrices:
            a = scale * patch.matrices[l]
            for path in fam.mlp_in:
                lin = get_module(layer, path)
                w = lin.weight.float()
                lin.weight.copy_((w + _times(w, a)).to(lin.weight.dtype))
        down = get_module(layer, fam.mlp_down)
        if l in patch.downs:
            w = down.weight.float()
            down.weight.copy_((w + dense((scale * patch.downs[l]).to(w.device))).to(down.weight.dtype))
        if l in patch.vectors:
            v = scale * patch.vectors[l].to(down.weight.device)
            if kind == "bias":
                down.bias.add_(v.to(down.bias.dtype))
            else:
                if fold_stats is None or l not in fold_stats:
                    raise PatchError(f"layer {l}: folding a thought vector into weights needs activation statistics")
                w = down.weight.float()
                down.weight.copy_((w + dense(fold_matrix(v, fold_stats[l]).to(w.device))).to(down.weight.dtype))
    return info


class _Originals:
    """The MLP weights a merge overwrites: copies in host memory (a model on a GPU needs no room
    there for a second copy of its MLPs), or one safetensors file per layer in ``spill``."""

    def __init__(self, spill: Path | None):
        self.spill = spill
        self.kept: list[tuple[nn.Module, torch.Tensor | None, Path | None, str]] = []

    def keep(self, l: int, modules: list[tuple[str, nn.Module]]) -> None:
        if self.spill is None:
            self.kept += [(lin, lin.weight.detach().to("cpu", copy=True), None, name) for name, lin in modules]
            return
        from safetensors.torch import save_file

        file = Path(self.spill) / f"layer{l}.safetensors"
        save_file({name: lin.weight.detach().cpu().contiguous() for name, lin in modules}, str(file))
        self.kept += [(lin, None, file, name) for name, lin in modules]

    def restore(self) -> None:
        from safetensors import safe_open

        for lin, w, file, name in self.kept:
            if w is None:
                with safe_open(str(file), framework="pt") as f:
                    w = f.get_tensor(name)
            lin.weight.data.copy_(w)
            del w


def _times(w: torch.Tensor, a) -> torch.Tensor:
    """``W A`` (factored: ``(W left) right``, never the d×d A)."""
    if isinstance(a, LowRank):
        return (w @ a.left.to(w)) @ a.right.to(w)
    return w @ a.to(w.device)


def fold_matrix(v: torch.Tensor, st: dict) -> LowRank:
    """ΔD with ``ΔD a_t ≈ v`` in what joins the residual: ridge regression of the constant target
    on the (rms-scaled) down inputs, ``ΔD' = v (Σ ã)ᵀ (Σ ã ãᵀ + λ I)⁻¹ = v gᵀ`` — rank one, its
    direction g from ``fold_statistics`` — then the post-norm scale divided out (Gemma)."""
    left = v.double().reshape(-1, 1).to(st["g"].device)
    scale = st.get("scale")
    if scale is not None:
        left = unscale_rows(left, scale.to(left.device))
    return LowRank(left.float().to(v.device), st["g"].reshape(1, -1).float().to(v.device))


def fold_direction(rows: list[torch.Tensor] | None = None, aa: torch.Tensor | None = None,
                   asum: torch.Tensor | None = None) -> torch.Tensor:
    """``g = (Σ ã ãᵀ + λ I)⁻¹ Σ ã`` [f], λ = 1e-3 of the mean eigenvalue (``ridge_solve``'s
    relative ρ over the f dimensions).  From token rows X [T, f] it is the T×T system
    ``Xᵀ (X Xᵀ + λ I)⁻¹ 1`` (push-through identity); from the sums, the f×f one."""
    if rows is not None:
        x = torch.cat(rows)
        ones = torch.ones(1, x.shape[0], dtype=x.dtype, device=x.device)
        return (ridge_solve(x @ x.T, ones, 1e-3, overwrite=True, dim=x.shape[1]) @ x)[0]
    return ridge_solve(aa, asum.reshape(1, -1), 1e-3, overwrite=True)[0]


FOLD_BUDGET_FLOOR = 1 << 30  # 1 GiB: a small model's layers all fit in one pass over the texts


def fold_budget(d: int, f: int) -> int:
    """Bytes the fold statistics may hold at once: four times one layer's MLP weights in float32,
    at least ``FOLD_BUDGET_FLOOR``.  Each group of layers that fits costs one forward pass over
    the texts: with the bare four-weights budget a chat recipe on SmolLM2 (97 texts, f×f sums of
    19 MB a layer) took 15 passes and 381 s; the groups change nothing in the sums themselves."""
    return max(4 * 3 * d * f * 4, FOLD_BUDGET_FLOOR)


@torch.no_grad()
def fold_statistics(model: nn.Module, fam: Family, patch: ThoughtPatch, id_batches: list[torch.Tensor],
                    budget: int | None = None) -> dict:
    """Per layer with a thought vector, the direction ``g`` of its least-squares fold (see
    ``fold_matrix``) over the down-projection inputs ã of the *patched* model (hooks), rms-scaled
    where a post-norm follows, over the given token batches (right-padded rows are harmless:
    pads come last).

    Memory stays within ``budget`` (``fold_budget``): while the batches hold at most f/2 tokens
    each layer keeps its token rows [T, f] (float64), past that its f×f sum; layers are taken in
    groups that fit, one forward pass over the batches per group — never every layer's f×f
    statistics at once."""
    from transmute_cli.engine.hooks import ThoughtHooks, capture

    layers = decoder_layers(model, fam)
    want = sorted(patch.vectors)
    if not want:
        return {}
    down0 = get_module(layers[0], fam.mlp_down).weight
    d, f = int(down0.shape[0]), int(down0.shape[1])
    tokens = sum(int(mask.sum()) for _, mask in id_batches)
    rows = tokens <= f // 2
    per_layer = (tokens if rows else f + 1) * f * 8
    group = max(1, (budget or fold_budget(d, f)) // max(per_layer, 1))
    norms = {l: post_norm(layers[l], fam) for l in want}
    downs = {l: patch.downs[l].double().cpu() for l in want if l in patch.downs}  # once, not per batch
    stats: dict[int, dict] = {}
    with ThoughtHooks(model, fam) as hooks:
        hooks.set_patch(patch)
        for i in range(0, len(want), group):
            chunk = want[i : i + group]
            acc: dict[int, dict] = {l: {"rows": []} if rows else {"aa": torch.zeros(f, f, dtype=torch.float64),
                                                                    "asum": torch.zeros(f, dtype=torch.float64)}
                                    for l in chunk}
            for ids, mask in id_batches:
                with contextlib.ExitStack() as stack:
                    caps = {l: stack.enter_context(capture(layers[l], fam)) for l in chunk}
                    base_model(model, fam)(input_ids=ids, use_cache=False)
                for l in chunk:
                    a = caps[l]["a"][mask.to(caps[l]["a"].device)].double().cpu()
                    pn = norms[l]
                    if pn is not None:
                        m = caps[l]["m"][mask.to(caps[l]["m"].device)].double().cpu()
                        if l in downs:
                            # capture() sees W_down a before the patch's D; the norm (in process and in
                            # the merged checkpoint alike) normalises (W_down + D) a
                            m = m + apply(downs[l], a)
                        a = rms_scaled(a, m, pn[1])
                    if rows:
                        acc[l]["rows"].append(a)
                    else:
                        acc[l]["aa"].addmm_(a.T, a)
                        acc[l]["asum"] += a.sum(0)
                del caps
            for l in chunk:
                st = acc.pop(l)
                stats[l] = {"g": fold_direction(**st), "count": tokens}
                if norms[l] is not None:
                    stats[l]["scale"] = norms[l][0].detach().double().cpu()
    return stats
