"""The layer-wise patching loop (DESIGN.md §2–3).

For each batch of examples and each layer l in order:

1. the contextual pass runs the *unpatched* layer l on ``[prefix ; I ; x]``;
2. the non-contextual pass runs layer l, with the patches of layers < l applied, on ``[prefix ; x]``;
3. at the positions of x, the discrepancies ``dz = n^C − n`` and ``delta = u^C − u`` are folded
   into streaming sums (``solve.LayerStats``) and solved for ``(A, δ)``;
4. ``η·(A, δ)`` is added to layer l's patch and the non-contextual states are pushed one layer on.

Both passes are propagated **incrementally**: the hidden states entering layer l are kept and
each layer is run once per pass (plus one rerun of the non-contextual layer after its patch
changed), never the whole model per layer.  The instruction is a shared prefix, so its hidden
states are kept once per layer, not once per example; per example we keep only the states at
the positions of x, so memory is O(L·d²) for the statistics plus O(examples·|x|·d) for the
current layer — no list of all activations.

No printing: progress goes through a callback.  The CLI and reports live elsewhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import defaults
from .errors import EngineError, InputError
from .families import (
    Family, base_model, decoder_layers, family_for, get_module, model_device, resolve_layers, select, weight_of,
)
from .hooks import LayerCall, ThoughtHooks, TokenPatchHooks, capture, record_layer_inputs
from .solve import DownStats, LayerStats, fit_residual, mean_vector, ridge_intercept_solve, ridge_solve

COMPONENTS = defaults.COMPONENTS
SOLVERS = defaults.SOLVERS


@dataclass(frozen=True)
class EngineConfig:
    rho: float = defaults.RHO
    eta: float | None = None  # None: 1/batches (the paper's choice)
    batches: int = defaults.BATCHES
    components: tuple[str, ...] = COMPONENTS
    layers: str | Sequence[int] = "all"
    solver: str = defaults.SOLVER
    seed: int = defaults.SEED  # order in which examples are dealt into batches
    micro_batch: int = 16  # examples run through a layer at once (memory, not maths)
    stats_dtype: torch.dtype = torch.float64
    # "naive": rerun the whole model (lm_head included) for every layer — the benchmark baseline
    # and a test oracle for the incremental propagation
    propagation: str = "incremental"
    fidelity: bool = True  # end-to-end KL / top-1 on the patch examples
    # shard examples over an initialised torch.distributed group: each rank accumulates its
    # share and the sums are all_reduce'd before every solve (they are sums, so this is exact)
    distributed: bool = False
    # weight of each token of the preservation texts relative to a token of an example
    preserve_weight: float = 1.0

    @property
    def step(self) -> float:
        return self.eta if self.eta is not None else 1.0 / self.batches

    def validate(self) -> None:
        if not (self.rho >= 0 and math.isfinite(self.rho)):
            raise InputError(f"must be a number >= 0, got {self.rho}", field="rho")
        if not (self.step > 0 and math.isfinite(self.step)):
            raise InputError(f"must be a number > 0, got {self.eta}", field="eta")
        if self.batches < 1:
            raise InputError(f"must be >= 1, got {self.batches}", field="batches")
        if not self.components or any(c not in COMPONENTS for c in self.components):
            raise InputError(f"must be a non-empty subset of {list(COMPONENTS)}", field="components")
        if self.solver not in SOLVERS:
            raise InputError(f"must be one of {list(SOLVERS)}, got {self.solver!r}", field="solver")
        if not (self.preserve_weight > 0 and math.isfinite(self.preserve_weight)):
            raise InputError(f"must be a number > 0, got {self.preserve_weight}", field="preserve_weight")
        if self.propagation not in ("incremental", "naive"):
            raise InputError(f"unknown propagation {self.propagation!r}", field="propagation")


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


@dataclass
class PatchResult:
    patch: ThoughtPatch
    fidelity: Fidelity
    timings: dict[str, float]


@dataclass(frozen=True)
class Progress:
    """What the callback receives: ``stage`` is 'prepare', 'layer' or 'fidelity'."""

    stage: str
    batch: int
    batches: int
    layer: int
    layers: int


ProgressFn = Callable[[Progress], None]


# --------------------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class Encoded:
    """Token ids: ``pre`` (BOS or nothing), the instruction, each example text x, and each
    preservation text z (run without the instruction in both passes)."""

    pre: tuple[int, ...]
    instruction: tuple[int, ...]
    texts: tuple[tuple[int, ...], ...]
    preserve: tuple[tuple[int, ...], ...] = ()

    @property
    def prefix_len(self) -> int:  # tokens before x in the contextual sequence
        return len(self.pre) + len(self.instruction)


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text (Gemma/Llama: BOS; Qwen: nothing)."""
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    k = len(with_sp) - len(without)
    if k > 0 and with_sp[k:] == without:
        return list(with_sp[:k])
    return []


def encode(tokenizer, instruction: str, texts: Sequence[str], preserve: Sequence[str] = ()) -> Encoded:
    """Tokenize I and each x separately so the positions of x align in both passes."""
    ids = lambda s: tuple(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    return Encoded(tuple(special_prefix(tokenizer)), ids(instruction), tuple(ids(t) for t in texts),
                   tuple(ids(t) for t in preserve))


def context_length(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None)


def check_lengths(model: nn.Module, enc: Encoded) -> None:
    """Examples whose contextual sequence exceeds the model's context are bad input."""
    limit = context_length(model)
    for i, x in enumerate(enc.texts):
        if not x:
            raise InputError("the example text is empty after tokenization", field=f"examples[{i}]")
        if limit is not None and enc.prefix_len + len(x) > limit:
            raise InputError(
                f"instruction + example is {enc.prefix_len + len(x)} tokens; the model's context is {limit}",
                field=f"examples[{i}]",
            )
    for i, z in enumerate(enc.preserve):
        if not z:
            raise InputError("the text is empty after tokenization", field=f"preserve[{i}]")
        if limit is not None and len(enc.pre) + len(z) > limit:
            raise InputError(f"the text is {len(enc.pre) + len(z)} tokens; the model's context is {limit}",
                             field=f"preserve[{i}]")


# --------------------------------------------------------------------------- batches of sequences


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0


@dataclass
class _MicroBatch:
    """Right-padded sequences of a few examples.  Causal attention means padding at the end never
    changes a real position, so no attention mask is needed and positions stay 0..T-1.

    A *preservation* micro-batch holds texts z whose target is the original model itself: both
    "passes" run ``pre + z`` (the contextual one unpatched, the other patched), ``start`` is
    ``p`` and the contextual state covers the whole sequence (there is no shared prefix)."""

    index: list[int]  # example indices
    ctx_ids: torch.Tensor  # [B, P + Tx]   pre + I + x
    nctx_ids: torch.Tensor  # [B, p + Tx]  pre + x
    xmask: torch.Tensor  # [B, Tx] bool: real tokens of x
    start: int = 0  # where x starts in ctx_ids (P; p for preservation)
    preserve: bool = False
    weight: float = 1.0  # of each token in the least-squares sums
    # incremental state (hidden states entering the current layer)
    xc: torch.Tensor | None = None  # [B, Tx, d]   contextual, positions of x only (preservation: whole sequence)
    xn: torch.Tensor | None = None  # [B, p + Tx, d] non-contextual, whole sequence
    ctx_call: list[LayerCall] | None = None
    nctx_call: list[LayerCall] | None = None


def _micro_batches(enc: Encoded, index: Sequence[int], size: int, pad: int, device, *, preserve: bool = False,
                   weight: float = 1.0) -> list[_MicroBatch]:
    texts = enc.preserve if preserve else enc.texts
    ctx_prefix = enc.pre if preserve else enc.pre + enc.instruction
    out = []
    for s in range(0, len(index), size):
        idx = list(index[s : s + size])
        tx = max(len(texts[i]) for i in idx)
        xs = torch.full((len(idx), tx), pad, dtype=torch.long)
        xmask = torch.zeros((len(idx), tx), dtype=torch.bool)
        for r, i in enumerate(idx):
            xs[r, : len(texts[i])] = torch.tensor(texts[i])
            xmask[r, : len(texts[i])] = True
        ctx_pre = torch.tensor(ctx_prefix, dtype=torch.long).reshape(1, -1).expand(len(idx), -1)
        nctx_pre = torch.tensor(enc.pre, dtype=torch.long).reshape(1, -1).expand(len(idx), -1)
        out.append(
            _MicroBatch(
                idx,
                torch.cat([ctx_pre, xs], 1).to(device),
                torch.cat([nctx_pre, xs], 1).to(device),
                xmask.to(device),
                start=len(ctx_prefix),
                preserve=preserve,
                weight=weight,
            )
        )
    return out


def _deal(n: int, batches: int, seed: int) -> list[list[int]]:
    """Shuffle example indices with ``seed`` and deal them into ``batches`` near-equal batches."""
    if batches > n:
        raise InputError(f"must be <= the number of examples ({n}), got {batches}", field="batches")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist() if batches > 1 else list(range(n))
    return [perm[b::batches] for b in range(batches)]


# --------------------------------------------------------------------------- the loop


def _gram(layer: nn.Module, fam: Family) -> torch.Tensor:
    """Σ_W WᵀW over the MLP input projections [d, d] (for the fit residual).  A figure, not the
    solve: float32 is plenty and several times cheaper than float64 on a CPU."""
    g = None
    for path in fam.mlp_in:
        w = weight_of(get_module(layer, path)).detach().float()
        g = w.T @ w if g is None else g + w.T @ w
    return g.double()


class _Loop:
    def __init__(self, model, tokenizer, instruction, texts, cfg: EngineConfig, progress, family, preserve=()):
        cfg.validate()
        self.model, self.cfg, self.progress = model, cfg, progress or (lambda _p: None)
        self.fam = family_for(model, family)
        self.layers = decoder_layers(model, self.fam)
        self.L = len(self.layers)
        self.patch_layers = resolve_layers(cfg.layers, self.L)
        self.device = model_device(model)
        self.enc = encode(tokenizer, instruction, texts, preserve)
        if not self.enc.texts:
            raise InputError("at least one example is required", field="examples")
        if not self.enc.instruction:
            raise InputError("must not be empty", field="instruction")
        check_lengths(model, self.enc)
        self.pad = _pad_id(tokenizer)
        self.d = int(get_module(self.layers[0], self.fam.mlp_in[0]).weight.shape[1])
        self.f = int(get_module(self.layers[0], self.fam.mlp_down).weight.shape[1])
        self.p = len(self.enc.pre)  # where x starts in the non-contextual sequence
        self.P = self.enc.prefix_len  # where x starts in the contextual sequence
        self.matrices: dict[int, torch.Tensor] = {}
        self.vectors: dict[int, torch.Tensor] = {}
        self.downs: dict[int, torch.Tensor] = {}
        self.fid = {l: [0.0, 0.0, 0.0, 0.0] for l in self.patch_layers}  # matrix num/den, vector num/den
        self.tokens = {l: 0 for l in self.patch_layers}
        self.timings: dict[str, float] = {}

    def _tick(self, name: str, t0: float) -> float:
        t = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + t - t0
        return t

    def _install(self, hooks: ThoughtHooks, l: int) -> None:
        hooks.clear(l)
        hooks.set(l, self.matrices.get(l), self.vectors.get(l), self.downs.get(l))

    # -- one pass of one layer -----------------------------------------------------------
    # incremental: replay layer l on the kept states; naive: the whole model, captured at l
    def _ctx_pass(self, l: int, mb: _MicroBatch, prefix: torch.Tensor, hooks: ThoughtHooks):
        layer = self.layers[l]
        hooks.enabled = False  # the contextual pass always sees the original model
        try:
            with capture(layer, self.fam) as c:
                if self.cfg.propagation == "naive":
                    self.model(input_ids=mb.ctx_ids, use_cache=False)  # the whole model, lm_head included
                    out = None
                elif mb.preserve:
                    out = mb.ctx_call[l](layer, mb.xc)
                else:
                    B = mb.ctx_ids.shape[0]
                    out = mb.ctx_call[l](layer, torch.cat([prefix.expand(B, -1, -1), mb.xc], 1))
        finally:
            hooks.enabled = True
        return c, out

    def _nctx_pass(self, l: int, mb: _MicroBatch):
        layer = self.layers[l]
        with capture(layer, self.fam) as c:
            if self.cfg.propagation == "naive":
                self.model(input_ids=mb.nctx_ids, use_cache=False)
                out = None
            else:
                out = mb.nctx_call[l](layer, mb.xn)
        return c, out

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> PatchResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        batches = _deal(len(self.enc.texts), cfg.batches, cfg.seed)
        rank, world = _dist_rank_world(cfg.distributed)
        with torch.no_grad(), ThoughtHooks(self.model, self.fam) as hooks:
            for b, index in enumerate(batches):
                self.progress(Progress("prepare", b, len(batches), 0, self.L))
                mbs = _micro_batches(self.enc, index[rank::world], cfg.micro_batch, self.pad, self.device)
                # every batch's solve keeps the preservation texts' anchors (sharded over ranks too)
                mbs += _micro_batches(self.enc, list(range(len(self.enc.preserve)))[rank::world], cfg.micro_batch,
                                      self.pad, self.device, preserve=True, weight=cfg.preserve_weight)
                prefix = None
                if cfg.propagation == "incremental":
                    hooks.enabled = False
                    for mb in mbs:
                        h_n, mb.nctx_call = record_layer_inputs(self.model, self.fam, mb.nctx_ids)
                        if mb.preserve:  # same tokens in both passes: one recording serves both
                            # (no copy: both states are replaced, never written, as the loop moves on)
                            mb.ctx_call, mb.xc, mb.xn = mb.nctx_call, h_n, h_n
                            continue
                        h_ctx, mb.ctx_call = record_layer_inputs(self.model, self.fam, mb.ctx_ids)
                        prefix = h_ctx[:1, : self.P].clone()  # the shared prefix, identical in every row
                        # copies, not views: a view would keep every example's prefix states alive
                        mb.xc, mb.xn = h_ctx[:, self.P :].clone(), h_n
                    hooks.enabled = True
                t0 = self._tick("record", t0)
                for l in range(self.L):
                    self.progress(Progress("layer", b, len(batches), l, self.L))
                    prefix = self._layer(l, mbs, hooks, prefix)
                    t0 = self._tick("layers", t0)
                del mbs
        patch = ThoughtPatch(self.L, self.d, dict(self.matrices), dict(self.vectors), downs=dict(self.downs))
        patch.check_finite()
        fid = Fidelity([self._layer_fidelity(l) for l in self.patch_layers])
        if cfg.fidelity:
            self.progress(Progress("fidelity", len(batches) - 1, len(batches), self.L - 1, self.L))
            end_to_end(self.model, self.fam, patch, self.enc, self.pad, fid, cfg.micro_batch, cfg.distributed)
            t0 = self._tick("fidelity", t0)
        return PatchResult(patch, fid, self.timings)

    def _layer_fidelity(self, l: int) -> LayerFidelity:
        mn, md, vn, vd = self.fid[l]
        return LayerFidelity(
            l,
            self.tokens[l],
            math.sqrt(mn / md) if md > 0 and l in self.matrices else None,
            math.sqrt(vn / vd) if vd > 0 and (l in self.vectors or l in self.downs) else None,
            float(self.vectors[l].norm()) if l in self.vectors else 0.0,
            float(self.matrices[l].norm()) if l in self.matrices else 0.0,
        )

    def _layer(self, l: int, mbs: list[_MicroBatch], hooks: ThoughtHooks, prefix):
        cfg, p = self.cfg, self.p
        patched = l in self.patch_layers
        joint = cfg.solver == "joint"
        stats = LayerStats(self.d, cfg.stats_dtype, self.device) if patched else None
        ctx_out: list[torch.Tensor] = []  # joint: contextual layer output u^C + y^C at x [tokens, d]
        next_prefix = prefix
        for mb in mbs:
            P = mb.start
            if patched or cfg.propagation == "incremental":
                c, out = self._ctx_pass(l, mb, prefix, hooks)
                # the contextual state moves on at once (it is read once per layer): one copy alive
                if out is not None and mb.preserve:
                    mb.xc = out
                elif out is not None:
                    mb.xc = out[:, P:].clone()  # drop the prefix rows
                    if next_prefix is prefix:
                        next_prefix = out[:1, :P].clone()
            if not patched:
                continue
            m = mb.xmask
            uc, nc = select(c["u"], P, m), select(c["n"], P, m)
            if joint:
                ctx_out.append(uc + select(c["y"], P, m))
            c, _ = self._nctx_pass(l, mb)
            stats.add(select(c["n"], p, m), nc, select(c["u"], p, m), uc, mb.weight)
        if patched and cfg.distributed:
            stats.all_reduce()
        if patched and stats.count:
            self._solve(l, stats, mbs, ctx_out, hooks)
        if cfg.propagation == "incremental":
            for mb in mbs:
                mb.xn = mb.nctx_call[l](self.layers[l], mb.xn)  # with layer l's (new) patch
        return next_prefix

    def _solve(self, l: int, stats: LayerStats, mbs, ctx_out, hooks: ThoughtHooks) -> None:
        cfg = self.cfg
        if not torch.isfinite(stats.nn).all() or not torch.isfinite(stats.dzn).all():
            raise EngineError(f"non-finite activations at layer {l}: the model produced NaN or Inf")
        a = ridge_solve(stats.nn, stats.dzn, cfg.rho, rank=stats.count) if "matrix" in cfg.components else None
        if a is not None:
            num, den = fit_residual(stats, a, _gram(self.layers[l], self.fam))
            self.fid[l][0] += num
            self.fid[l][1] += den
        vec = down = None
        if cfg.solver == "joint":
            # "matrix" is A and D, "vector" the intercept: components [vector] is a vector only
            down, vec, rel = self._joint(l, a, mbs, ctx_out, hooks, intercept="vector" in cfg.components,
                                         matrix="matrix" in cfg.components)
            self.fid[l][2] += rel**2
            self.fid[l][3] += 1.0
        elif "vector" in cfg.components:
            vec = mean_vector(stats)
            self.fid[l][2] += max(stats.delta_sq.item() - stats.weight * float(vec @ vec), 0.0)
            self.fid[l][3] += stats.delta_sq.item()
        self.tokens[l] += stats.count
        eta = cfg.step
        for store, t in ((self.matrices, a), (self.vectors, vec), (self.downs, down)):
            if t is not None:
                t32 = (eta * t).float()
                store[l] = store[l] + t32 if l in store else t32
        self._install(hooks, l)

    def _joint(self, l: int, a, mbs, ctx_out, hooks: ThoughtHooks, intercept: bool, matrix: bool = True):
        """Down-projection thought matrix D and thought vector c fitted *jointly* (ridge with an
        intercept) to the token-dependent gap e_t = h'^C_t − h'_t(A) that this batch's input-side
        matrix A leaves at the layer output — the part of the attention discrepancy that a
        constant vector cannot carry (e.g. "a newline comes next" only after an answer)."""
        layer = self.layers[l]
        hooks.clear(l)
        hooks.set(l, a.float() if a is not None else None)  # this batch's own A, no vector, no D
        st = DownStats(self.f, self.d, self.cfg.stats_dtype, self.device)
        scale = None
        if self.fam.out_norm == "gemma":
            norm = get_module(layer, self.fam.mlp_out)
            scale = 1.0 + weight_of(norm).detach().to(self.device, self.cfg.stats_dtype)
            eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
        try:
            for mb, target in zip(mbs, ctx_out):
                c, _ = self._nctx_pass(l, mb)
                m = mb.xmask
                e = target - (select(c["u"], self.p, m) + select(c["y"], self.p, m))
                act = select(c["a"], self.p, m).to(self.cfg.stats_dtype)
                if scale is not None:
                    # y = s ⊙ m / rms(m): with rms frozen per token, y is linear in D a / rms
                    mm = select(c["m"], self.p, m).to(self.cfg.stats_dtype)
                    act = act / torch.sqrt(mm.pow(2).mean(-1, keepdim=True) + eps)
                st.add(act, e, mb.weight)
        finally:
            self._install(hooks, l)
        if self.cfg.distributed:
            st.all_reduce()
        dmat, vec, rel = ridge_intercept_solve(st, self.cfg.rho, intercept=intercept, consume=True, matrix=matrix)
        if dmat is None:
            return None, vec, rel
        if scale is not None:
            # a channel whose norm scale is ~0 cannot be moved by D at all: leave its row at 0
            live = scale.abs() > 1e-3 * scale.abs().max()
            dmat = torch.where(live[:, None], dmat / torch.where(live, scale, 1.0)[:, None], 0.0)
        return dmat, (vec if intercept else None), rel


def compute_patch(
    model: nn.Module,
    tokenizer,
    instruction: str,
    texts: Sequence[str],
    config: EngineConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    family: str | None = None,
    preserve: Sequence[str] = (),
) -> PatchResult:
    """Compute a thought patch that makes ``model`` without ``instruction`` act as if it were there.

    ``texts`` are the example texts x (a rendered template, including the end-of-answer newline).
    ``preserve`` are texts on which the patched model should act like the *original* one (other
    prompted tasks, plain prose): their tokens enter every least-squares fit with the original
    model's states as the target and ``config.preserve_weight`` as the weight, so the patch
    learns to leave them alone.  The model is left exactly as it was: patches live in hooks
    during the computation.
    """
    return _Loop(model, tokenizer, instruction, texts, config or EngineConfig(), progress, family, preserve).run()


# --------------------------------------------------------------------------- end-to-end fidelity


def final_logits(model: nn.Module, fam: Family, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from last-layer states (final norm + lm_head), in float32."""
    h = get_module(model, fam.final_norm)(hidden)
    logits = get_module(model, fam.lm_head)(h).float()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _compare(p_logits: torch.Tensor, q_logits: torch.Tensor) -> tuple[float, float]:
    """Sum over positions of KL(p ‖ q) and of top-1 agreement; inputs [tokens, vocab]."""
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0).sum().item()
    agree = (p_logits.argmax(-1) == q_logits.argmax(-1)).sum().item()
    return kl, float(agree)


def _dist_rank_world(enabled: bool) -> tuple[int, int]:
    if not enabled:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        raise EngineError("distributed compute needs an initialised torch.distributed process group (torchrun)")
    return dist.get_rank(), dist.get_world_size()


def leave_distributed(barrier: bool = True) -> None:
    """Take the default process group down after the last collective.

    gloo runs collectives on worker threads, and the worker drops its reference to the
    all-reduced tensors *after* waking the caller; dropping a tensor Python also knew needs the
    GIL. A process that reaches interpreter shutdown before that worker got the GIL dies in
    std::terminate (SIGABRT, "terminate called without an active exception"; once in CI). So: a barrier (no rank leaves while a peer is mid-
    collective; skipped after a failure, when peers may wait in a collective this rank never
    joins), destroy, then a short GIL-free sleep that lets the workers finish their last
    release. Before: 3 aborts in 35 spawned 2-rank runs; with the sleep alone: 0 in 40."""
    import time

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        if barrier:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        time.sleep(0.2)


def end_to_end(model, fam: Family, patch: ThoughtPatch, enc: Encoded, pad: int, fid: Fidelity, micro_batch: int,
               distributed: bool = False) -> None:
    """Top-1 agreement and mean KL at the positions of x: the patched model *without* I against
    the original model *with* I, through the model's ordinary forward (hooks, not the loop).
    On the preservation texts: the patched model against the original one, same text."""
    base = base_model(model, fam)
    P, p = enc.prefix_len, len(enc.pre)
    tot = {"kl": 0.0, "agree": 0.0, "bkl": 0.0, "bagree": 0.0, "n": 0, "pkl": 0.0, "pagree": 0.0, "pn": 0}
    rank, world = _dist_rank_world(distributed)
    mbs = _micro_batches(enc, list(range(len(enc.texts)))[rank::world], micro_batch, pad, model_device(model))
    with torch.no_grad(), ThoughtHooks(model, fam) as hooks:
        hooks.set_patch(patch)
        for mb in mbs:
            m = mb.xmask
            hooks.enabled = False
            ref = final_logits(model, fam, select(last_hidden(base, mb.ctx_ids), P, m))
            plain = final_logits(model, fam, select(last_hidden(base, mb.nctx_ids), p, m))
            hooks.enabled = True
            patched = final_logits(model, fam, select(last_hidden(base, mb.nctx_ids), p, m))
            kl, agree = _compare(ref, patched)
            bkl, bagree = _compare(ref, plain)
            tot["kl"] += kl
            tot["agree"] += agree
            tot["bkl"] += bkl
            tot["bagree"] += bagree
            tot["n"] += int(m.sum())
        pmbs = _micro_batches(enc, list(range(len(enc.preserve)))[rank::world], micro_batch, pad, model_device(model),
                              preserve=True)
        for mb in pmbs:
            m = mb.xmask
            hooks.enabled = False
            ref = final_logits(model, fam, select(last_hidden(base, mb.nctx_ids), p, m))
            hooks.enabled = True
            patched = final_logits(model, fam, select(last_hidden(base, mb.nctx_ids), p, m))
            kl, agree = _compare(ref, patched)
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


# --------------------------------------------------------------------------- exact token patch


@dataclass
class TokenPatchResult:
    """Ground truth: token-dependent patches for one batch and the errors they leave."""

    hooks: TokenPatchHooks  # install with ``with result.hooks:`` to run the patched model
    nctx_ids: torch.Tensor  # [B, p + Tx] the non-contextual inputs the patch was built for
    ctx_ids: torch.Tensor  # [B, P + Tx]
    xmask: torch.Tensor  # [B, Tx]
    layer_errors: list[float]  # max |h_nctx − h_ctx| at the positions of x after each layer
    prefix_len: int
    pre_len: int


def exact_token_patch(model, tokenizer, instruction: str, texts: Sequence[str], *, family: str | None = None) -> TokenPatchResult:
    """Token patches (rank-one matrix updates + residual vectors) that make the non-contextual
    run reproduce the contextual hidden states exactly, built by the same incremental loop."""
    fam = family_for(model, family)
    layers = decoder_layers(model, fam)
    enc = encode(tokenizer, instruction, texts)
    check_lengths(model, enc)
    pad = _pad_id(tokenizer)
    (mb,) = _micro_batches(enc, list(range(len(texts))), len(texts), pad, model_device(model))
    P, p = enc.prefix_len, len(enc.pre)
    tp = TokenPatchHooks(model, fam)
    errors = []
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
    return TokenPatchResult(tp, mb.nctx_ids, mb.ctx_ids, mb.xmask, errors, P, p)
