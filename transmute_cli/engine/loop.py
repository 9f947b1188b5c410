"""The layer-wise patching loop (DESIGN.md §2–3).

For each batch of examples and each layer l in order:

1. the contextual pass runs the *unpatched* layer l on ``[prefix ; I ; x]``;
2. the non-contextual pass runs layer l, with the patches of layers < l applied, on ``[prefix ; x]``;
3. at the positions of x, the discrepancies ``dz = n^C − n`` and ``delta = u^C − u`` are folded
   into streaming sums (``stats.LayerStats``) and solved for ``(A, δ)``;
4. ``η·(A, δ)`` is added to layer l's patch and the non-contextual states are pushed one layer on.

Both passes are propagated **incrementally**: the hidden states entering layer l are kept and
each layer is run once per pass (plus one rerun of the non-contextual layer after its patch
changed), never the whole model per layer.  The instruction is a shared prefix and the
contextual pass always runs the *unpatched* model, so its keys and values at every layer are
computed once (one prefill per distinct instruction, ``hooks.PrefixCache``) and every example's
tokens attend to them: the contextual pass costs the examples' tokens, not instruction length ×
examples.  Many-shot recipes patch the examples under several instructions (``contexts``): one
prefill each.  Per example we keep only the states at the positions of x, so memory is one
layer's statistics (the token rows while they are fewer than d/2, else d×d sums; f×f or T×f for
the joint solve) plus O(examples·|x|·d) states, the instructions' keys and values (every layer,
one row each), plus the patch itself (factored: O(L·T·(d + f))) — no list of all activations.

No printing: progress goes through a callback (``config.Progress``).  The CLI and reports live
elsewhere.
"""

from __future__ import annotations


import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from transmute_cli.engine.distributed import rank_world
from transmute_cli.errors import EngineError, InputError
from transmute_cli.model.families import (
    Family, decoder_layers, family_for, get_module, model_device, post_norm, resolve_layers, select, weight_of,
)
from transmute_cli.engine.fidelity import Fidelity, LayerFidelity, end_to_end
from transmute_cli.engine.hooks import PrefixCache, ThoughtHooks, capture, record_layer_inputs
from transmute_cli.engine.lowrank import add, stored
from transmute_cli.engine.moments import Moments
from transmute_cli.engine.thought import ThoughtPatch
from transmute_cli.engine.stats import DownStats, LayerStats, mean_vector
from transmute_cli.engine.solve import (
    fit_residual, fit_residual_rows, null_projector, ridge_intercept_solve, rms_scaled, unscale_rows,
)
from transmute_cli.model.tokens import MicroBatch, check_lengths, deal, encode, micro_batches, pad_id
from transmute_cli.engine.config import EngineConfig, PatchResult, Progress, ProgressFn


# --------------------------------------------------------------------------- the loop


def _gram(layer: nn.Module, fam: Family) -> torch.Tensor:
    """Σ_W WᵀW over the MLP input projections [d, d] (for the fit residual).  A figure, not the
    solve: float32 is plenty and several times cheaper than float64 on a CPU."""
    g = None
    for path in fam.mlp_in:
        w = weight_of(get_module(layer, path)).detach().float()
        g = w.T @ w if g is None else g + w.T @ w
    return g.double()


@dataclass
class _Residuals:
    """Sums behind a layer's fit residuals, over batches: |M N − W dZ|² and |W dZ|² (matrix),
    the vector's or joint fit's squared residual and its reference (vector)."""

    matrix_num: float = 0.0
    matrix_den: float = 0.0
    vector_num: float = 0.0
    vector_den: float = 0.0


class _Loop:
    def __init__(self, model, tokenizer, instruction, texts, cfg: EngineConfig, progress, family, preserve=(),
                 contexts=None, plain=None, broad=(), moments=None, weights=None):
        cfg.validate()
        self.model, self.cfg, self.progress = model, cfg, progress or (lambda _p: None)
        self.fam = family_for(model, family)
        self.layers = decoder_layers(model, self.fam)
        self.L = len(self.layers)
        self.patch_layers = resolve_layers(cfg.layers, self.L)
        self.device = model_device(model)
        self.enc = encode(tokenizer, instruction, texts, preserve, contexts, plain, broad, weights)
        self.moments = moments
        self._projectors: dict[tuple[str, int], torch.Tensor] = {}  # null_space: per (moment, layer)
        if not self.enc.texts:
            raise InputError("at least one example is required", field="examples")
        if not self.enc.instruction or not all(self.enc.contexts):
            raise InputError("must not be empty", field="instruction")
        check_lengths(model, self.enc)
        self.pad = pad_id(tokenizer)
        self.d = int(get_module(self.layers[0], self.fam.mlp_in[0]).weight.shape[1])
        self.f = int(get_module(self.layers[0], self.fam.mlp_down).weight.shape[1])
        self.p = len(self.enc.npre)  # where x starts in the non-contextual sequence
        self.matrices: dict[int, torch.Tensor] = {}
        self.vectors: dict[int, torch.Tensor] = {}
        self.downs: dict[int, torch.Tensor] = {}
        self.fid = {l: _Residuals() for l in self.patch_layers}
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
    def _ctx_pass(self, l: int, mb: MicroBatch, prefixes: dict[int, torch.Tensor], hooks: ThoughtHooks):
        """Captures, layer output, and where x starts in them (0 when the prefix is cached)."""
        layer = self.layers[l]
        hooks.enabled = False  # the contextual pass always sees the original model
        start = mb.start
        try:
            with capture(layer, self.fam) as c:
                if self.cfg.propagation == "naive":
                    self.model(input_ids=mb.ctx_ids, use_cache=False)  # the whole model, lm_head included
                    out = None
                elif mb.preserve:
                    out = mb.ctx_call[l](layer, mb.xc)
                elif self.cfg.prefix_cache:  # x alone, attending to the cached prefix
                    out, start = mb.ctx_call[l](layer, mb.xc), 0
                else:
                    B = mb.ctx_ids.shape[0]
                    out = mb.ctx_call[l](layer, torch.cat([prefixes[mb.context].expand(B, -1, -1), mb.xc], 1))
        finally:
            hooks.enabled = True
        return c, out, start

    def _nctx_pass(self, l: int, mb: MicroBatch):
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
        batches = deal(len(self.enc.texts), cfg.batches, cfg.seed)
        rank, world = rank_world(cfg.distributed)
        with torch.no_grad(), ThoughtHooks(self.model, self.fam) as hooks:
            for b, index in enumerate(batches):
                self.progress(Progress("prepare", b, len(batches), 0, self.L))
                mbs = micro_batches(self.enc, index[rank::world], cfg.micro_batch, self.pad, self.device)
                # every batch's solve keeps the preservation texts' anchors (sharded over ranks too)
                mbs += micro_batches(self.enc, list(range(len(self.enc.preserve)))[rank::world], cfg.micro_batch,
                                      self.pad, self.device, preserve=True, weight=cfg.preserve_weight)
                # ... and the broad texts' pull toward what the prompt does on them
                mbs += micro_batches(self.enc, list(range(len(self.enc.broad)))[rank::world], cfg.micro_batch,
                                      self.pad, self.device, broad=True, weight=cfg.broad_weight)
                prefixes: dict[int, torch.Tensor] = {}  # without the cache: states entering the layer
                if cfg.propagation == "incremental":
                    hooks.enabled = False
                    try:
                        self._record(mbs, prefixes)
                    finally:
                        hooks.enabled = True
                t0 = self._tick("record", t0)
                for l in range(self.L):
                    self.progress(Progress("layer", b, len(batches), l, self.L))
                    prefixes = self._layer(l, mbs, hooks, prefixes)
                    t0 = self._tick("layers", t0)
                del mbs
        patch = ThoughtPatch(self.L, self.d, dict(self.matrices), dict(self.vectors), downs=dict(self.downs))
        patch.check_finite()
        fid = Fidelity([self._layer_fidelity(l) for l in self.patch_layers])
        if cfg.fidelity:
            self.progress(Progress("fidelity", len(batches) - 1, len(batches), self.L - 1, self.L))
            end_to_end(self.model, self.fam, patch, self.enc, self.pad, fid, cfg.micro_batch, cfg.distributed,
                       texts=cfg.fidelity_texts)
            t0 = self._tick("fidelity", t0)
        return PatchResult(patch, fid, self.timings)

    def _record(self, mbs: list[MicroBatch], prefixes: dict[int, torch.Tensor]) -> None:
        """The states entering layer 0 and each layer's call arguments, for both passes (the model
        unpatched); the contextual pass's prefix is filled once per instruction in this batch."""
        caches: dict[int, PrefixCache] = {}
        for mb in mbs:
            h_n, mb.nctx_call = record_layer_inputs(self.model, self.fam, mb.nctx_ids)
            if mb.preserve:  # same tokens in both passes: one recording serves both
                # (no copy: both states are replaced, never written, as the loop moves on)
                mb.ctx_call, mb.xc, mb.xn = mb.nctx_call, h_n, h_n
                continue
            mb.xn = h_n
            if self.cfg.prefix_cache:
                if mb.context not in caches:
                    caches[mb.context] = PrefixCache(self.model).fill(self.model, self.fam, mb.ctx_ids[:1, : mb.start])
                mb.xc, mb.ctx_call = record_layer_inputs(self.model, self.fam, mb.ctx_ids[:, mb.start :],
                                                         caches[mb.context])
            else:
                h_ctx, mb.ctx_call = record_layer_inputs(self.model, self.fam, mb.ctx_ids)
                # the shared prefix, identical in every row; copies, not views: a view would keep
                # every example's prefix states alive
                prefixes.setdefault(mb.context, h_ctx[:1, : mb.start].clone())
                mb.xc = h_ctx[:, mb.start :].clone()

    def _layer_fidelity(self, l: int) -> LayerFidelity:
        r = self.fid[l]
        mn, md, vn, vd = r.matrix_num, r.matrix_den, r.vector_num, r.vector_den
        return LayerFidelity(
            l,
            self.tokens[l],
            math.sqrt(mn / md) if md > 0 and l in self.matrices else None,
            math.sqrt(vn / vd) if vd > 0 and (l in self.vectors or l in self.downs) else None,
            float(self.vectors[l].norm()) if l in self.vectors else 0.0,
            float(self.matrices[l].norm()) if l in self.matrices else 0.0,
        )

    def _layer(self, l: int, mbs: list[MicroBatch], hooks: ThoughtHooks, prefixes: dict[int, torch.Tensor]):
        cfg, p = self.cfg, self.p
        patched = l in self.patch_layers
        joint = cfg.solver == "joint"
        # with moments the factored solve is the cheaper one while T < d (a d×d solve either way)
        stats = LayerStats(self.d, cfg.stats_dtype, self.device, residual=cfg.diagnostics is True,
                           row_limit=self.d - 1 if self.moments is not None else None) if patched else None
        # joint: contextual layer output u^C + y^C at x [tokens, d], per micro-batch and token group
        ctx_out: list[list[torch.Tensor]] = []
        next_prefixes: dict[int, torch.Tensor] = {}
        for mb in mbs:
            if patched or cfg.propagation == "incremental":
                c, out, P = self._ctx_pass(l, mb, prefixes, hooks)
                # the contextual state moves on at once (it is read once per layer): one copy alive
                if out is not None and (mb.preserve or P == 0):
                    mb.xc = out
                elif out is not None:
                    mb.xc = out[:, P:].clone()  # drop the prefix rows
                    next_prefixes.setdefault(mb.context, out[:1, :P].clone())
            if not patched:
                continue
            groups = list(mb.groups())
            ucs = [select(c["u"], P, m) for m, _ in groups]
            ncs = [select(c["n"], P, m) for m, _ in groups]
            if joint:  # summed in the statistics' dtype: a bf16 model's states are not added in bf16
                ctx_out.append([uc.to(cfg.stats_dtype) + select(c["y"], P, m).to(cfg.stats_dtype)
                                for uc, (m, _) in zip(ucs, groups)])
            c, _ = self._nctx_pass(l, mb)
            for (m, w), uc, nc in zip(groups, ucs, ncs):
                stats.add(select(c["n"], p, m), nc, select(c["u"], p, m), uc, w)
        if patched and cfg.distributed:
            stats.all_reduce()
        if patched and stats.count and self.moments is not None:  # after the all_reduce: added once
            stats.add_moments(self.moments.sum_nn[l], self.moments.count, cfg.broad_weight)
        if patched and stats.count:
            self._solve(l, stats, mbs, ctx_out, hooks)
        if cfg.propagation == "incremental":
            for mb in mbs:
                mb.xn = mb.nctx_call[l](self.layers[l], mb.xn)  # with layer l's (new) patch
        return next_prefixes

    def _solve(self, l: int, stats: LayerStats, mbs, ctx_out, hooks: ThoughtHooks) -> None:
        cfg = self.cfg
        if not stats.finite():
            raise EngineError(f"non-finite activations at layer {l}: the model produced NaN or Inf")
        if cfg.null_space > 0 and self.moments is not None:
            stats.project(self._projector("sum_nn", l))
        thought = stats.solve_matrix(cfg.rho) if "matrix" in cfg.components else None
        if thought is not None and stats.rows is not None and cfg.diagnostics is not False:  # rows kept: cheap
            weights = [weight_of(get_module(self.layers[l], p)) for p in self.fam.mlp_in]
            num, den = fit_residual_rows(stats, thought, weights)
        elif thought is not None and stats.sum_dzdz is not None:
            num, den = fit_residual(stats, thought, _gram(self.layers[l], self.fam))
        else:
            num = den = 0.0
        self.fid[l].matrix_num += num
        self.fid[l].matrix_den += den
        vec = down = None
        if cfg.solver == "joint":
            # "matrix" is A and D, "vector" the intercept: components [vector] is a vector only
            down, vec, rel = self._joint(l, thought, mbs, ctx_out, hooks, intercept="vector" in cfg.components,
                                         matrix="matrix" in cfg.components)
            self.fid[l].vector_num += rel**2
            self.fid[l].vector_den += 1.0
        elif "vector" in cfg.components:
            vec = mean_vector(stats)
            self.fid[l].vector_num += max(stats.delta_sq.item() - stats.weight * float(vec @ vec), 0.0)
            self.fid[l].vector_den += stats.delta_sq.item()
        self.tokens[l] += stats.count - stats.moment_count  # the examples' tokens, not the moments'
        eta = cfg.step
        for store, t in ((self.matrices, thought), (self.vectors, vec), (self.downs, down)):
            if t is not None:
                # summed over batches in float64, kept factored (rank T) with orthonormal right rows
                t = eta * t
                store[l] = stored(add(store[l], t) if l in store else t)
        self._install(hooks, l)

    def _projector(self, which: str, l: int) -> torch.Tensor:
        """The null-space projector of layer ``l``'s ``sum_nn`` or ``sum_aa`` moment (once per layer)."""
        if (which, l) not in self._projectors:
            moment = getattr(self.moments, which)[l].to(self.device)
            self._projectors[(which, l)] = null_projector(moment, self.cfg.null_space)
        return self._projectors[(which, l)]

    def _joint(self, l: int, thought, mbs, ctx_out, hooks: ThoughtHooks, intercept: bool, matrix: bool = True):
        """Down-projection thought matrix D and thought vector c fitted *jointly* (ridge with an
        intercept) to the token-dependent gap e_t = h'^C_t − h'_t(A) that this batch's input-side
        matrix A leaves at the layer output — the part of the attention discrepancy that a
        constant vector cannot carry (e.g. "a newline comes next" only after an answer)."""
        layer = self.layers[l]
        hooks.clear(l)
        hooks.set(l, thought.float() if thought is not None else None)  # this batch's own A, no vector, no D
        st = DownStats(self.f, self.d, self.cfg.stats_dtype, self.device,
                       row_limit=self.f - 1 if self.moments is not None else None)
        pn = post_norm(layer, self.fam)
        scale, eps = (pn[0].to(self.device, self.cfg.stats_dtype), pn[1]) if pn else (None, 0.0)
        try:
            dt = self.cfg.stats_dtype
            for mb, targets in zip(mbs, ctx_out):
                c, _ = self._nctx_pass(l, mb)
                for (m, w), target in zip(mb.groups(), targets):
                    e = target - (select(c["u"], self.p, m).to(dt) + select(c["y"], self.p, m).to(dt))
                    act = select(c["a"], self.p, m).to(dt)
                    if scale is not None:
                        act = rms_scaled(act, select(c["m"], self.p, m).to(dt), eps)
                    st.add(act, e, w)
        finally:
            self._install(hooks, l)
        if self.cfg.distributed:
            st.all_reduce()
        if self.moments is not None:
            st.add_moments(self.moments.sum_aa[l], self.moments.sum_a[l], self.moments.count, self.cfg.broad_weight)
        if self.cfg.null_space > 0 and self.moments is not None:
            st.project(self._projector("sum_aa", l))
        dmat, vec, rel = ridge_intercept_solve(st, self.cfg.rho, intercept=intercept, consume=True, matrix=matrix)
        if dmat is None:
            return None, vec, rel
        if scale is not None:
            dmat = unscale_rows(dmat, scale)
        return dmat, (vec if intercept else None), rel


def compute_patch(
    model: nn.Module,
    tokenizer,
    instruction: str,
    texts: Sequence[str],
    config: EngineConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    family: str | Family | None = None,
    preserve: Sequence[str] = (),
    contexts: Sequence[str] | None = None,
    plain: str | None = None,
    broad: Sequence[str] = (),
    moments: Moments | None = None,
    weights: Sequence[Sequence[float]] | None = None,
) -> PatchResult:
    """Compute a thought patch that makes ``model`` without ``instruction`` act as if it were there.

    ``texts`` are the example texts x (a rendered template, including the end-of-answer newline).
    ``preserve`` are texts on which the patched model should act like the *original* one (other
    prompted tasks, plain prose): their tokens enter every least-squares fit with the original
    model's states as the target and ``config.preserve_weight`` as the weight, so the patch
    learns to leave them alone.  ``broad`` are texts patched like the examples — the contextual
    pass on ``[I ; b]`` is the target, so the patch learns what the prompt does to text that is
    not the task's (mostly: nothing) — with ``config.broad_weight`` per token; every batch keeps
    all of them, as it keeps the preservation texts.  ``moments`` (``moments.Moments``): tokens
    whose target is the original model given by their per-layer second moments (cached once per
    model), weighted ``config.broad_weight``: the locality term of the default fit.
    ``contexts`` (many-shot): one instruction per text, used in place
    of ``instruction`` in that text's contextual pass.  ``plain`` (chat recipes): the text the
    non-contextual pass starts with — the chat template without a system message — while the
    contextual one starts with ``instruction``, the template with it (``chat.ChatFormat``); nothing
    else is put before either.  ``weights``: per text, one weight per token of it (its ids as
    ``tokens.token_ids`` gives them), multiplying that position's terms in every least-squares sum;
    0 leaves the position unfitted (chat recipes: ``chat.ChatFormat.token_weights``).  The model is
    left exactly as it was:
    patches live in hooks during the computation.
    """
    return _Loop(model, tokenizer, instruction, texts, config or EngineConfig(), progress, family, preserve,
                 contexts, plain, broad, moments, weights).run()
