"""``transmute diff A B``: how two patches, or two checkpoints, differ — layer by layer.

Pure computation (no printing).  A and B are either two patches (a ``*.safetensors`` patch file,
or a run folder holding ``patch.safetensors``) or two Hugging Face checkpoint folders
(``config.json`` + safetensors weights, single file or sharded).  Weights are only ever read
with safetensors, tensor by tensor: never pickle.

Per tensor: Frobenius norms of A and B, ``|A − B|``, the cosine ``<A,B>/(|A||B|)``, the relative
change ``|A − B|/|A|`` and, for matrices, the entropy effective rank ``exp(H(s/Σs))`` of the
singular values (Roy & Vetterli 2007) of ``B − A`` (for patches also of A and of B).  Per layer:
the combined change.  For two patches, how much they overlap (cosine of everything, and the
overlap of the top left singular subspaces of their thought matrices).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import torch

from transmute_cli.artifacts.diffstats import (
    DiffReport, TensorDiff, cosine, effective_rank, layer_summary, numerical_rank, only_note, tensor_stats,
)
from transmute_cli.errors import InputError
from transmute_cli.engine.lowrank import dense
from transmute_cli.artifacts.patch import ThoughtPatch, load_patch
from transmute_cli.engine.solve import spectrum

PATCH_FILE = "patch.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUBSPACE_K = 8  # top-k left singular vectors compared by the subspace overlap
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
_PATCH_KINDS = ("matrix", "vector", "down")


# --------------------------------------------------------------------------- patches


def diff_patches(pa: ThoughtPatch, pb: ThoughtPatch, a: str = "A", b: str = "B") -> DiffReport:
    """Compare two patches tensor by tensor; a tensor present on one side only is compared with
    zeros.  ``overlap``: ``cosine_all`` (cosine of all tensors of A against all of B, flattened
    and concatenated) and ``matrix_subspace_overlap`` (mean over layers with a thought matrix on
    both sides of ``|U_aᵀ U_b|²_F / k``, U the top-k left singular vectors, k ≤ 8 and at most
    either matrix's numerical rank: 1 = same subspace, ≈ k/d for unrelated ones)."""
    notes: list[str] = []
    fa, fb = pa.metadata.get("base_fingerprint"), pb.metadata.get("base_fingerprint")
    if fa and fb and fa != fb:
        notes.append(f"base fingerprints differ ({a}: {fa}, {b}: {fb}): the patches were made for different models")
    if (pa.n_layers, pa.d_model) != (pb.n_layers, pb.d_model):
        notes.append(
            f"patches made for different shapes ({a}: {pa.n_layers} layers, hidden size {pa.d_model}; "
            f"{b}: {pb.n_layers} layers, hidden size {pb.d_model})"
        )
    tensors: list[TensorDiff] = []
    per_layer: dict[int, dict] = {}
    only_a: list[str] = []
    only_b: list[str] = []
    shape_diff: list[str] = []
    # cosine of all tensors at once, summed as it goes (no concatenated float64 copies of both patches)
    dot = sq_a = sq_b = 0.0
    subspace: list[dict] = []
    for l in sorted(set(pa.layers) | set(pb.layers)):
        for kind in _PATCH_KINDS:
            ta = getattr(pa, _store(kind)).get(l)
            tb = getattr(pb, _store(kind)).get(l)
            # factored matrices are compared dense, one tensor at a time
            ta, tb = (dense(t) if t is not None else None for t in (ta, tb))
            if ta is None and tb is None:
                continue
            key = f"layers.{l}.{kind}"
            if ta is None:
                only_b.append(key)
                ta = torch.zeros_like(tb)
            elif tb is None:
                only_a.append(key)
                tb = torch.zeros_like(ta)
            elif ta.shape != tb.shape:
                shape_diff.append(f"{key} {tuple(ta.shape)} vs {tuple(tb.shape)}")
                continue
            ta = ta.detach().double().cpu()
            tb = tb.detach().double().cpu()
            d = tb - ta
            na, nb, nd, cos, rel, dot_ab = tensor_stats(ta, tb, d)
            # one eigendecomposition per side serves its effective rank and the subspace overlap
            sub = kind == "matrix" and na > 0 and nb > 0 and ta.dim() == 2
            (sa, ua), (sb, ub) = (spectrum(ta, True), spectrum(tb, True)) if sub else ((None, None), (None, None))
            tensors.append(
                TensorDiff(
                    layer=l,
                    tensor=kind,
                    norm_a=na,
                    norm_b=nb,
                    diff_norm=nd,
                    cosine=cos,
                    relative_change=rel,
                    effective_rank=effective_rank(d) if nd > 0 else None,
                    effective_rank_a=effective_rank(ta, sa),
                    effective_rank_b=effective_rank(tb, sb),
                )
            )
            acc = per_layer.setdefault(l, {"d2": 0.0, "a2": 0.0, "n": 0})
            acc["d2"] += nd * nd
            acc["a2"] += na * na
            acc["n"] += 1
            dot, sq_a, sq_b = dot + dot_ab, sq_a + na * na, sq_b + nb * nb
            if sub:
                subspace.append(_subspace_overlap(l, (ta, sa, ua), (tb, sb, ub)))
    if only_a:
        notes.append(only_note(only_a, a) + " (compared with zeros)")
    if only_b:
        notes.append(only_note(only_b, b) + " (compared with zeros)")
    if shape_diff:
        notes.append(f"{len(shape_diff)} tensors with different shapes not compared, e.g. {shape_diff[0]}")
    overlap = {
        "cosine_all": cosine(dot, math.sqrt(sq_a), math.sqrt(sq_b)),
        "matrix_subspace_overlap": sum(r["overlap"] for r in subspace) / len(subspace) if subspace else None,
        "matrix_layers": subspace,
    }
    rows, top = layer_summary(per_layer)
    return DiffReport("patch", str(a), str(b), tensors, rows, top, notes, overlap)


def _store(kind: str) -> str:
    return {"matrix": "matrices", "vector": "vectors", "down": "downs"}[kind]


def _subspace_overlap(layer: int, a: tuple, b: tuple) -> dict:
    """``a``, ``b``: (matrix, singular values, left singular vectors) of each side."""
    (ma, sa, ua), (mb, sb, ub) = a, b
    k = max(1, min(SUBSPACE_K, numerical_rank(ma, sa), numerical_rank(mb, sb)))
    ov = float(torch.linalg.matrix_norm(ua[:, :k].T @ ub[:, :k]) ** 2) / k
    return {"layer": layer, "k": k, "overlap": min(1.0, ov)}


# --------------------------------------------------------------------------- checkpoints


def _weight_files(folder: Path, label: str) -> dict[str, Path]:
    """tensor name -> safetensors file of a checkpoint folder (sharded via the index, or not)."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError
        except Exception:
            raise InputError(f"{index}: not a valid safetensors index (no weight_map)") from None
        out = {}
        for name, file in wm.items():
            p = folder / str(file)
            if not p.is_file():
                raise InputError(f"{label}: shard {file} listed in {INDEX_FILE} is missing")
            out[str(name)] = p
        return out
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{label}: checkpoint folder has no .safetensors weights (only safetensors are read)")
    out = {}
    for p in files:
        for name in _keys(p):
            out[name] = p
    return out


def _open(p: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(p), framework="pt")
    except Exception as e:
        raise InputError(f"{p}: not a readable safetensors file ({' '.join(str(e).split())[:160]})") from None


def _keys(p: Path) -> list[str]:
    with _open(p) as f:
        return list(f.keys())


class _Reader:
    """Open safetensors handles of one checkpoint; tensors are read one at a time."""

    def __init__(self, files: dict[str, Path], stack: contextlib.ExitStack):
        self.files = files
        self.handles = {}
        for p in sorted(set(files.values())):
            self.handles[p] = stack.enter_context(_open(p))
        missing = [n for n, p in files.items() if n not in set(self.handles[p].keys())]
        if missing:
            raise InputError(f"{files[missing[0]]}: tensor {missing[0]} listed in the index is not in the file")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[self.files[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        p = self.files[name]
        try:
            return self.handles[p].get_tensor(name)
        except Exception as e:
            raise InputError(f"{p}: cannot read tensor {name} ({' '.join(str(e).split())[:160]})") from None


def _split(names) -> dict[str, tuple[str, int, str]]:
    """layer tensor name -> (stack prefix, layer, name relative to the layer)."""
    out = {}
    for n in names:
        m = _LAYER.search(n)
        if m:
            out[n] = (n[: m.start(1) - len("layers.")], int(m.group(1)), m.group(2))
    return out


def diff_checkpoints(folder_a: str | Path, folder_b: str | Path, a: str | None = None, b: str | None = None) -> DiffReport:
    """Compare the decoder-layer tensors of two checkpoint folders, reading one tensor at a time."""
    a = str(folder_a) if a is None else a
    b = str(folder_b) if b is None else b
    wa, wb = _weight_files(Path(folder_a), a), _weight_files(Path(folder_b), b)
    with contextlib.ExitStack() as stack:
        ra, rb = _Reader(wa, stack), _Reader(wb, stack)
        return _diff_sources(ra.get, rb.get, {n: ra.shape(n) for n in wa}, {n: rb.shape(n) for n in wb}, a, b)


def diff_state_dicts(sa: dict[str, torch.Tensor], sb: dict[str, torch.Tensor], a: str = "A", b: str = "B") -> DiffReport:
    """Compare two state dicts like two checkpoints (only ``…layers.N.…`` tensors)."""
    return _diff_sources(
        sa.__getitem__, sb.__getitem__, {n: tuple(t.shape) for n, t in sa.items()}, {n: tuple(t.shape) for n, t in sb.items()}, a, b
    )


def _diff_sources(get_a, get_b, shapes_a: dict, shapes_b: dict, a: str, b: str) -> DiffReport:
    la, lb = _split(shapes_a), _split(shapes_b)
    notes: list[str] = []
    outside = sorted(n for n in set(shapes_a) | set(shapes_b) if n not in la and n not in lb)
    only_a = [n for n in la if n not in lb]
    only_b = [n for n in lb if n not in la]
    common = [n for n in la if n in lb]
    shape_diff = [n for n in common if tuple(shapes_a[n]) != tuple(shapes_b[n])]
    common = [n for n in common if tuple(shapes_a[n]) == tuple(shapes_b[n])]
    # the main stack of decoder layers is the one with the most tensors; another one (a vision
    # tower's encoder layers, say) is reported under its full names and left out of per-layer sums
    counts: dict[str, int] = {}
    for n in common:
        counts[la[n][0]] = counts.get(la[n][0], 0) + 1
    main = max(sorted(counts), key=lambda p: counts[p]) if counts else ""
    tensors: list[TensorDiff] = []
    per_layer: dict[int, dict] = {}
    identical = 0
    for n in sorted(common, key=lambda n: (la[n][0] != main, la[n][0], la[n][1], la[n][2])):
        prefix, l, rel = la[n]
        ta, tb = get_a(n), get_b(n)
        same = ta.dtype == tb.dtype and torch.equal(ta, tb)
        ta = ta.detach().float().cpu()
        if same:
            tb, d = ta, None
            na = float(torch.linalg.vector_norm(ta, dtype=torch.float64))
            nd = 0.0
        else:
            tb = tb.detach().float().cpu()
            d = tb - ta
            na, nb, nd, cos, relc, _ = tensor_stats(ta, tb, d)
        if prefix == main:
            acc = per_layer.setdefault(l, {"d2": 0.0, "a2": 0.0, "n": 0})
            acc["a2"] += na * na
            acc["d2"] += nd * nd if math.isfinite(nd) else math.inf
        if same or nd == 0:
            identical += 1
            continue
        if prefix == main:
            per_layer[l]["n"] += 1
        tensors.append(
            TensorDiff(
                layer=l,
                tensor=rel if prefix == main else n,
                norm_a=na,
                norm_b=nb,
                diff_norm=nd,
                cosine=cos,
                relative_change=relc,
                effective_rank=effective_rank(d),
            )
        )
        del ta, tb, d
    if identical:
        notes.append(f"{identical} layer tensors identical")
    if only_a:
        notes.append(only_note(only_a, a))
    if only_b:
        notes.append(only_note(only_b, b))
    if shape_diff:
        n = sorted(shape_diff)[0]
        notes.append(
            f"{len(shape_diff)} tensors with different shapes not compared, e.g. {n} "
            f"{tuple(shapes_a[n])} vs {tuple(shapes_b[n])}"
        )
    others = sorted({la[n][0] for n in common} - {main})
    if others:
        notes.append(
            f"tensors of other layer stacks ({', '.join(p + 'layers' for p in others)}) are listed under their "
            f"full names and left out of the per-layer change of {main}layers"
        )
    if outside:
        notes.append(f"{len(outside)} tensors outside the decoder layers not compared, e.g. {outside[0]}")
    rows, top = layer_summary(per_layer)
    return DiffReport("checkpoint", str(a), str(b), tensors, rows, top, notes, None)


# --------------------------------------------------------------------------- paths


def _classify(path: str) -> tuple[str, Path]:
    """("patch", patch file) or ("checkpoint", folder); one-line InputError otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError("not found", source=str(path))
    if p.is_dir():
        if (p / PATCH_FILE).is_file():
            return "patch", p / PATCH_FILE
        if (p / "config.json").is_file():
            return "checkpoint", p
        raise InputError("not a patch, run folder or checkpoint folder", source=str(path))
    if p.name == "config.json":
        return "checkpoint", p.parent
    return "patch", p


def diff_paths(a: str, b: str) -> DiffReport:
    """Compare two patches (files or run folders) or two checkpoint folders."""
    ka, pa = _classify(str(a))
    kb, pb = _classify(str(b))
    if ka != kb:
        raise InputError("cannot compare a patch with a checkpoint")
    if ka == "patch":

        return diff_patches(load_patch(pa), load_patch(pb), str(a), str(b))
    return diff_checkpoints(pa, pb, str(a), str(b))


__all__ = [
    "TensorDiff",
    "DiffReport",
    "diff_paths",
    "diff_patches",
    "diff_checkpoints",
    "diff_state_dicts",
    "effective_rank",
]
