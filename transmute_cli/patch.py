"""The patch artifact (safetensors + provenance metadata) and folding a patch into weights.

File layout (``patch.safetensors``), all float32, ``l`` a layer index:

* ``layers.{l}.matrix`` [d, d] — input-space thought matrix A: each MLP input projection W
  becomes ``W + W A`` (gate and up alike);
* ``layers.{l}.vector`` [d]    — thought vector, added where the MLP output joins the residual;
* ``layers.{l}.down``   [d, f] — down-projection thought matrix D (joint solver): ``W_down + D``.

Metadata (strings): format, tool version, base model spec and fingerprint, architecture sizes,
the recipe text and its sha256, and the knobs.  Only safetensors are ever read: no pickle.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .errors import EngineError, PatchError
from .families import Family, base_model, decoder_layers, get_module, post_norm
from .solve import ridge_solve, rms_scaled, unscale_rows

FORMAT = "transmute-patch/1"
_KEY = re.compile(r"^layers\.(\d+)\.(matrix|vector|down)$")


@dataclass
class ThoughtPatch:
    """Per-layer thought matrices and vectors.

    ``matrices[l]`` is the *input-space* form ``A`` [d, d]: the thought matrix of every MLP input
    projection W of layer l is ``Δ(W) = W A`` (gate and up share it; it is how the ridge solution
    factorises).  ``vectors[l]`` [d] is added where the MLP output joins the residual stream.
    """

    n_layers: int
    d_model: int
    matrices: dict[int, torch.Tensor] = field(default_factory=dict)
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    # joint solver only: down-projection thought matrix D [d, f], W_down -> W_down + D
    downs: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.matrices) | set(self.vectors) | set(self.downs))

    def scaled(self, s: float) -> "ThoughtPatch":
        return ThoughtPatch(
            self.n_layers,
            self.d_model,
            {l: s * a for l, a in self.matrices.items()},
            {l: s * v for l, v in self.vectors.items()},
            dict(self.metadata),
            {l: s * d for l, d in self.downs.items()},
        )

    def check_finite(self) -> None:
        for kind, tensors in (("matrix", self.matrices), ("vector", self.vectors), ("down matrix", self.downs)):
            for l, t in tensors.items():
                if not torch.isfinite(t).all():
                    raise EngineError(f"the thought {kind} of layer {l} has NaN or Inf values")



def save_patch(patch: ThoughtPatch, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    patch.check_finite()  # refuse to write NaN/Inf
    tensors: dict[str, torch.Tensor] = {}
    for l in patch.layers:
        if l in patch.matrices:
            tensors[f"layers.{l}.matrix"] = patch.matrices[l].detach().float().cpu().contiguous()
        if l in patch.vectors:
            tensors[f"layers.{l}.vector"] = patch.vectors[l].detach().float().cpu().contiguous()
        if l in patch.downs:
            tensors[f"layers.{l}.down"] = patch.downs[l].detach().float().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "tool_version": __version__,
        "n_layers": str(patch.n_layers),
        "d_model": str(patch.d_model),
    }
    meta.update({k: str(v) for k, v in metadata.items()})
    save_file(tensors, str(path), metadata=meta)
    _canonical_header(Path(path))


def _canonical_header(path: Path) -> None:
    """safetensors writes its JSON header from a hash map, so key order (and the file's bytes)
    change from run to run.  Rewrite the header with sorted keys: same recipe, same seed, same
    bytes.  Tensor offsets are relative to the end of the header, so its length may change."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    new = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    new += b" " * (-len(new) % 8)  # keep the data 8-byte aligned
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])
    tmp.replace(path)


def load_patch(path: str | Path) -> ThoughtPatch:
    """Read and validate a patch file; every problem is a one-line PatchError naming the file."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise PatchError("patch file not found", source=str(path))
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types on corrupt headers/data
        raise PatchError(f"not a readable safetensors file ({' '.join(str(e).split())[:160]})", source=str(path)) from None
    if meta.get("format") != FORMAT:
        raise PatchError(f"not a transmute patch (metadata format is {meta.get('format')!r}, expected {FORMAT!r})", source=str(path))
    try:
        n_layers, d = int(meta["n_layers"]), int(meta["d_model"])
    except (KeyError, ValueError):
        raise PatchError("metadata lacks n_layers/d_model", source=str(path)) from None
    patch = ThoughtPatch(n_layers, d, metadata=meta)
    problems = []
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m:
            problems.append(f"unexpected tensor {key!r}")
            continue
        l, kind = int(m.group(1)), m.group(2)
        want = {"matrix": (d, d), "vector": (d,)}.get(kind)
        if l >= n_layers:
            problems.append(f"{key}: layer {l} >= n_layers {n_layers}")
        elif want is not None and tuple(t.shape) != want:
            problems.append(f"{key}: shape {tuple(t.shape)}, expected {want}")
        elif kind == "down" and (t.dim() != 2 or t.shape[0] != d):
            problems.append(f"{key}: shape {tuple(t.shape)}, expected ({d}, d_ffn)")
        elif not torch.isfinite(t).all():
            problems.append(f"{key}: contains NaN or Inf")
        else:
            {"matrix": patch.matrices, "vector": patch.vectors, "down": patch.downs}[kind][l] = t.float()
    if problems:
        raise PatchError("; ".join(problems), source=str(path))
    return patch


def check_compatible(patch: ThoughtPatch, model: nn.Module, fam: Family, fingerprint: str | None, *, force: bool, source: str) -> None:
    """Refuse a base model whose shapes (always) or fingerprint (unless ``force``) differ."""
    layers = decoder_layers(model, fam)
    d = get_module(layers[0], fam.mlp_in[0]).weight.shape[1]
    f = get_module(layers[0], fam.mlp_down).weight.shape[1]
    problems = []
    if patch.n_layers != len(layers):
        problems.append(f"made for {patch.n_layers} layers, the model has {len(layers)}")
    if patch.d_model != d:
        problems.append(f"made for hidden size {patch.d_model}, the model has {d}")
    for l, t in patch.downs.items():
        if t.shape[1] != f:
            problems.append(f"layer {l} down matrix is for MLP width {t.shape[1]}, the model has {f}")
            break
    if problems:
        raise PatchError("patch made for another model: " + "; ".join(problems), source=source)
    want = patch.metadata.get("base_fingerprint")
    if fingerprint and want and want != fingerprint and not force:
        raise PatchError(
            f"patch made for another model: base fingerprint {want}, this model's is {fingerprint} "
            "(pass --force to apply it anyway)",
            source=source,
        )


def combine(patches: list[tuple[ThoughtPatch, float]]) -> ThoughtPatch:
    """Σ scale_i · patch_i (patch arithmetic); the first patch's metadata is kept."""
    first = patches[0][0]
    out = ThoughtPatch(first.n_layers, first.d_model, metadata=dict(first.metadata))
    for p, s in patches:
        for src, dst in ((p.matrices, out.matrices), (p.vectors, out.vectors), (p.downs, out.downs)):
            for l, t in src.items():
                dst[l] = dst[l] + s * t if l in dst else s * t
    return out


# --------------------------------------------------------------------------- merging into weights


def vector_fold_kind(model: nn.Module, fam: Family) -> str:
    """'bias' where a standard checkpoint can carry δ exactly (Llama's mlp_bias), else 'least-squares'."""
    return "bias" if fam.bias_flag and hasattr(model.config, fam.bias_flag) else "least-squares"


@torch.no_grad()
def merge(model: nn.Module, fam: Family, patch: ThoughtPatch, scale: float = 1.0, fold_stats: dict | None = None) -> dict:
    """Fold the patch into the model's weights in place so a plain checkpoint carries it.

    Matrices are exact (``W + W A``, ``W_down + D``).  Vectors: exact as ``down_proj.bias`` where
    the family has a config bias switch; otherwise folded into ``W_down`` by least squares over
    the activations in ``fold_stats`` (see ``fold_statistics``) — an approximation whose cost
    the caller measures.
    """
    patch.check_finite()
    if any(p.device.type == "meta" for p in model.parameters()):
        raise PatchError("merging into weights needs them in memory: this model has disk-offloaded layers "
                         "(load it without --device-map, or with more memory)")
    layers = decoder_layers(model, fam)
    kind = vector_fold_kind(model, fam)
    info: dict = {"vector_fold": kind if patch.vectors else "none", "layers": patch.layers}
    # what to put back so the caller can undo the merge (a cached model stays the base model)
    saved = [(get_module(layers[l], path), get_module(layers[l], path).weight.detach().clone())
             for l in patch.layers for path in (*fam.mlp_in, fam.mlp_down)]
    added_bias = patch.vectors and kind == "bias" and not getattr(model.config, fam.bias_flag)
    biases = [(l, get_module(layers[l], fam.mlp_down).bias.detach().clone()) for l in patch.vectors
              if get_module(layers[l], fam.mlp_down).bias is not None]

    def undo() -> None:
        for lin, w in saved:
            lin.weight.data.copy_(w)
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
        if l in patch.matrices:
            a = scale * patch.matrices[l]
            for path in fam.mlp_in:
                lin = get_module(layer, path)
                w = lin.weight.float()
                lin.weight.copy_((w + w @ a.to(w.device)).to(lin.weight.dtype))
        down = get_module(layer, fam.mlp_down)
        if l in patch.downs:
            w = down.weight.float()
            down.weight.copy_((w + scale * patch.downs[l].to(w.device)).to(down.weight.dtype))
        if l in patch.vectors:
            v = scale * patch.vectors[l].to(down.weight.device)
            if kind == "bias":
                down.bias.add_(v.to(down.bias.dtype))
            else:
                if fold_stats is None or l not in fold_stats:
                    raise PatchError(f"layer {l}: folding a thought vector into weights needs activation statistics")
                w = down.weight.float()
                down.weight.copy_((w + fold_matrix(v, fold_stats[l])).to(down.weight.dtype))
    return info


def fold_matrix(v: torch.Tensor, st: dict) -> torch.Tensor:
    """ΔD with ``ΔD a_t ≈ v`` in what joins the residual: ridge regression of the constant target
    on the (rms-scaled) down inputs, ``ΔD' = v (Σ ã)ᵀ (Σ ã ãᵀ + λ I)⁻¹``, then the post-norm
    scale divided out (Gemma).  λ is relative (1e-3 of the mean eigenvalue)."""
    aa, asum = st["aa"], st["a"]
    target = torch.outer(v.double().to(aa.device), asum)  # Σ v ãᵀ  [d, f]
    dprime = ridge_solve(aa, target, 1e-3)
    scale = st.get("scale")
    if scale is not None:
        dprime = unscale_rows(dprime, scale)
    return dprime.float().to(v.device)


@torch.no_grad()
def fold_statistics(model: nn.Module, fam: Family, patch: ThoughtPatch, id_batches: list[torch.Tensor]) -> dict:
    """Per layer Σ ã ãᵀ and Σ ã of the down-projection inputs of the *patched* model (hooks),
    over the given token batches (right-padded rows are harmless: pads come last)."""
    from .hooks import ThoughtHooks, capture

    layers = decoder_layers(model, fam)
    want = sorted(patch.vectors)
    norms = {l: post_norm(layers[l], fam) for l in want}
    stats: dict[int, dict] = {}
    with ThoughtHooks(model, fam) as hooks:
        hooks.set_patch(patch)
        for ids, mask in id_batches:
            with contextlib.ExitStack() as stack:
                caps = {l: stack.enter_context(capture(layers[l], fam)) for l in want}
                base_model(model, fam)(input_ids=ids, use_cache=False)
            for l in want:
                a = caps[l]["a"][mask.to(caps[l]["a"].device)].double().cpu()
                pn = norms[l]
                if pn is not None:
                    m = caps[l]["m"][mask.to(caps[l]["m"].device)].double().cpu()
                    if l in patch.downs:
                        # capture() sees W_down a before the patch's D; the norm (in process and in
                        # the merged checkpoint alike) normalises (W_down + D) a
                        m = m + a @ patch.downs[l].double().cpu().T
                    a = rms_scaled(a, m, pn[1])
                s = stats.setdefault(l, {"aa": 0.0, "a": 0.0, "count": 0})
                s["aa"] = s["aa"] + a.T @ a
                s["a"] = s["a"] + a.sum(0)
                s["count"] += a.shape[0]
    for l in want:
        if norms[l] is not None:
            stats[l]["scale"] = norms[l][0].cpu()
    return stats
