"""The patch artifact (safetensors + provenance metadata) and folding a patch into weights.

File layout (``patch.safetensors``), all float32, ``l`` a layer index:

* ``layers.{l}.matrix`` [d, d] — input-space thought matrix A: each MLP input projection W
  becomes ``W + W A`` (gate and up alike);
* ``layers.{l}.vector`` [d]    — thought vector, added where the MLP output joins the residual;
* ``layers.{l}.down``   [d, f] — down-projection thought matrix D (joint solver): ``W_down + D``.

A matrix of rank r stored as its exact factors (``lowrank.LowRank``: whenever that is smaller,
i.e. a recipe of fewer tokens than half the matrix's side) is two tensors instead of one:
``layers.{l}.matrix.left`` [d, r] and ``.right`` [r, d] (``A = left @ right``), likewise
``layers.{l}.down.left`` [d, r] / ``.right`` [r, f].  ``right`` has orthonormal rows (the engine
stores ``lowrank.stored``: float32 keeps the product as precise as a dense float32 matrix); the
factors are what the engine computed and what every reader applies, so a patch loaded from the file acts bit for bit like the one in
the process that wrote it.

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
from .lowrank import LowRank, add, apply, dense, is_finite
from .solve import ridge_solve, rms_scaled, unscale_rows

FORMAT = "transmute-patch/2"  # /2: factored matrices (``.left``/``.right``)
READABLE = ("transmute-patch/1", FORMAT)  # /1 held dense matrices only: still read
_KEY = re.compile(r"^layers\.(\d+)\.(matrix|vector|down)(?:\.(left|right))?$")


@dataclass
class ThoughtPatch:
    """Per-layer thought matrices and vectors.

    ``matrices[l]`` is the *input-space* form ``A`` [d, d]: the thought matrix of every MLP input
    projection W of layer l is ``Δ(W) = W A`` (gate and up share it; it is how the ridge solution
    factorises).  ``vectors[l]`` [d] is added where the MLP output joins the residual stream.
    Matrices are dense tensors or exact ``LowRank`` factors (``lowrank.dense`` gives either dense).
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
                if not is_finite(t):
                    raise EngineError(f"the thought {kind} of layer {l} has NaN or Inf values")


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().contiguous()


def save_patch(patch: ThoughtPatch, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    patch.check_finite()  # refuse to write NaN/Inf
    tensors: dict[str, torch.Tensor] = {}
    for l in patch.layers:
        for kind, store in (("matrix", patch.matrices), ("vector", patch.vectors), ("down", patch.downs)):
            t = store.get(l)
            if isinstance(t, LowRank):
                tensors[f"layers.{l}.{kind}.left"], tensors[f"layers.{l}.{kind}.right"] = _plain(t.left), _plain(t.right)
            elif t is not None:
                tensors[f"layers.{l}.{kind}"] = _plain(t)
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
    if meta.get("format") not in READABLE:
        raise PatchError(f"not a transmute patch (metadata format is {meta.get('format')!r}, expected {FORMAT!r})", source=str(path))
    try:
        n_layers, d = int(meta["n_layers"]), int(meta["d_model"])
    except (KeyError, ValueError):
        raise PatchError("metadata lacks n_layers/d_model", source=str(path)) from None
    patch = ThoughtPatch(n_layers, d, metadata=meta)
    problems = []
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    bad: set[tuple[int, str]] = set()  # one problem per tensor is enough
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m or (m.group(3) and m.group(2) == "vector"):
            problems.append(f"unexpected tensor {key!r}")
            continue
        l, kind, half = int(m.group(1)), m.group(2), m.group(3)
        if l >= n_layers:
            problems.append(f"{key}: layer {l} >= n_layers {n_layers}")
        elif not torch.isfinite(t).all():
            problems.append(f"{key}: contains NaN or Inf")
            bad.add((l, kind))
        elif half:
            halves.setdefault((l, kind), {})[half] = t.float()
        else:
            problem = _shape_problem(kind, tuple(t.shape), d)
            if problem:
                problems.append(f"{key}: {problem}")
            else:
                _store(patch, kind)[l] = t.float()
    for (l, kind), h in sorted(halves.items()):
        key = f"layers.{l}.{kind}"
        if (l, kind) in bad:
            continue
        if set(h) != {"left", "right"}:
            problems.append(f"{key}: has .{next(iter(h))} but not .{({'left', 'right'} - set(h)).pop()}")
        elif h["left"].dim() != 2 or h["right"].dim() != 2 or h["left"].shape[1] != h["right"].shape[0]:
            problems.append(f"{key}: factors {tuple(h['left'].shape)} and {tuple(h['right'].shape)} do not chain")
        elif l in _store(patch, kind):
            problems.append(f"{key}: stored both dense and factored")
        else:
            shape = (h["left"].shape[0], h["right"].shape[1])
            problem = _shape_problem(kind, shape, d)
            if problem:
                problems.append(f"{key}: {problem}")
            else:
                _store(patch, kind)[l] = LowRank(h["left"], h["right"])
    if problems:
        raise PatchError("; ".join(problems), source=str(path))
    return patch


def _store(patch: ThoughtPatch, kind: str) -> dict:
    return {"matrix": patch.matrices, "vector": patch.vectors, "down": patch.downs}[kind]


def _shape_problem(kind: str, shape: tuple, d: int) -> str | None:
    want = {"matrix": (d, d), "vector": (d,)}.get(kind)
    if want is not None and shape != want:
        return f"shape {shape}, expected {want}"
    if kind == "down" and (len(shape) != 2 or shape[0] != d):
        return f"shape {shape}, expected ({d}, d_ffn)"
    return None


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
                dst[l] = add(dst[l], s * t) if l in dst else s * t
    return out


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
    from .hooks import ThoughtHooks, capture

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
