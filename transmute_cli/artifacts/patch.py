"""The patch artifact (safetensors + provenance metadata); folding it into weights: ``merge.py``.

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


import json
import re
from pathlib import Path

import torch
from torch import nn

from transmute_cli import __version__
from transmute_cli.errors import PatchError
from transmute_cli.model.families import Family, decoder_layers, get_module
from transmute_cli.engine.lowrank import LowRank, add
from transmute_cli.engine.thought import ThoughtPatch

FORMAT = "transmute-patch/2"  # /2: factored matrices (``.left``/``.right``)
READABLE = ("transmute-patch/1", FORMAT)  # /1 held dense matrices only: still read
_KEY = re.compile(r"^layers\.(\d+)\.(matrix|vector|down)(?:\.(left|right))?$")


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
