"""Ground truth: the exact token patch reproduces the contextual run; the ridge solve reduces to
the rank-one patch; incremental propagation equals rerunning the whole model per layer."""

from __future__ import annotations

import pytest
import torch

from transmute_cli.engine.loop import EngineConfig, compute_patch
from transmute_cli.engine.exact import exact_token_patch
from transmute_cli.engine.lowrank import LowRank, dense
from transmute_cli.engine.stats import LayerStats
from transmute_cli.engine.solve import ridge_solve

from tiny import tiny_model, tiny_tokenizer

FAMILIES = ["gemma3", "llama", "qwen2", "qwen3", "mistral"]
INSTRUCTION = "Translate to pig latin:\ncat -> atcay\nhat -> athay\n"
TEXTS = ["dog -> ogday\n", "moon -> oonmay\n", "sun -> unsay\n", "a -> aay\n"]


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_token_patch_reproduces_contextual_run(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    res = exact_token_patch(model, tok, INSTRUCTION, TEXTS)
    # hidden states after every layer, at every position of x
    assert len(res.layer_errors) == model.config.num_hidden_layers
    assert max(res.layer_errors) < 1e-4, res.layer_errors
    assert max(e / s for e, s in zip(res.layer_errors, res.layer_scales)) < 1e-5
    with torch.no_grad():
        ctx = model(input_ids=res.ctx_ids).logits[:, res.prefix_len :][res.xmask]
        plain = model(input_ids=res.nctx_ids).logits[:, res.pre_len :][res.xmask]
        with res.hooks:
            patched = model(input_ids=res.nctx_ids).logits[:, res.pre_len :][res.xmask]
    scale = ctx.abs().max().item()
    assert (plain - ctx).abs().max().item() > 1e-2 * scale  # the instruction matters at all
    assert (patched - ctx).abs().max().item() < 1e-4 * max(scale, 1.0)


def test_ridge_one_token_equals_rank_one_patch():
    torch.manual_seed(0)
    d = 16
    n, nc = torch.randn(1, d, dtype=torch.float64), torch.randn(1, d, dtype=torch.float64)
    u = torch.zeros(1, d, dtype=torch.float64)
    st = LayerStats(d, keep_rows=False)
    st.add(n, nc, u, u)
    w = torch.randn(40, d, dtype=torch.float64)  # an MLP input projection
    rank_one = w @ (nc - n).T @ n / (n @ n.T)  # W dz nᵀ / |n|²
    # ρ = 0 is the pseudo-inverse: exact; ρ → 0 converges to it (Sherman–Morrison: the gap is
    # a factor ρ·s/(|n|² + ρ·s), up to the conditioning of a rank-one system)
    assert torch.allclose(w @ ridge_solve(st.sum_nn, st.sum_dzn, 0.0), rank_one, rtol=1e-12, atol=1e-13)
    gaps = [(w @ ridge_solve(st.sum_nn, st.sum_dzn, rho) - rank_one).norm().item() for rho in (1e-2, 1e-4, 1e-6)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-5 * rank_one.norm().item()
    # and the patched projection maps n to W n^C exactly
    assert torch.allclose((w + w @ ridge_solve(st.sum_nn, st.sum_dzn, 0.0)) @ n.T, w @ nc.T)


@pytest.mark.parametrize("d,t,seed", [(8, 50, 1), (32, 5, 4)])
def test_ridge_matches_closed_form_and_shrinks(d, t, seed):
    """ρ is relative to the mean non-zero eigenvalue of Σ n nᵀ: tr/d with more tokens than
    dimensions, tr/T with fewer (only T eigenvalues are non-zero)."""
    torch.manual_seed(seed)
    n, nc = torch.randn(t, d, dtype=torch.float64), torch.randn(t, d, dtype=torch.float64)
    st = LayerStats(d, keep_rows=False)
    st.add(n, nc, n, n)
    rho = 0.3
    s = torch.trace(n.T @ n) / min(t, d)
    want = (nc - n).T @ n @ torch.linalg.inv(n.T @ n + rho * s * torch.eye(d, dtype=torch.float64))
    assert torch.allclose(ridge_solve(st.sum_nn, st.sum_dzn, rho, rank=st.count), want, atol=1e-10)
    assert ridge_solve(st.sum_nn, st.sum_dzn, 10.0, rank=st.count).norm() < ridge_solve(st.sum_nn, st.sum_dzn, 0.1, rank=st.count).norm()


@pytest.mark.parametrize("t", [1, 3, 12])
@pytest.mark.parametrize("rho", [0.1, 1.0])
def test_rho_shrinks_the_same_at_any_number_of_tokens(t, rho):
    """Tokens with orthogonal inputs of equal norm: every non-zero eigenvalue is tr/T, so the
    ridge solution is exactly 1/(1+ρ) of the least-squares one — whatever T (and d)."""
    torch.manual_seed(5)
    d = 16
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    n = 3.0 * q[:t]  # t orthogonal rows, |n_t| = 3
    nc = n + torch.randn(t, d, dtype=torch.float64)
    st = LayerStats(d, keep_rows=False)
    st.add(n, nc, n, n)
    exact = ridge_solve(st.sum_nn, st.sum_dzn, 0.0)
    got = ridge_solve(st.sum_nn, st.sum_dzn, rho, rank=st.count)
    assert torch.allclose(got, exact / (1 + rho), atol=1e-12)


def test_joint_solve_with_vector_only_fits_no_matrix():
    """components [vector] with the joint solver: the intercept alone, the mean gap at the layer
    output (no A, no D stored or applied)."""
    from transmute_cli.model.tokens import encode

    model, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = EngineConfig(solver="joint", components=("vector",), layers=[0], fidelity=False)
    patch = compute_patch(model, tok, INSTRUCTION, TEXTS, cfg).patch
    assert not patch.matrices and not patch.downs and set(patch.vectors) == {0}
    # closed form at layer 0 (nothing before it is patched): mean of h'^C − h' over the tokens of x
    enc = encode(tok, INSTRUCTION, TEXTS)
    pre, instr = list(enc.pre), list(enc.instruction)
    gaps = []
    with torch.no_grad():
        for x in enc.texts:
            hc = model(input_ids=torch.tensor([pre + instr + list(x)]), output_hidden_states=True).hidden_states[1]
            hn = model(input_ids=torch.tensor([pre + list(x)]), output_hidden_states=True).hidden_states[1]
            gaps.append((hc[0, len(pre) + len(instr):] - hn[0, len(pre):]).double())
    want = torch.cat(gaps).mean(0)
    assert torch.allclose(patch.vectors[0].double(), want, atol=1e-5), (patch.vectors[0].double() - want).abs().max()


@pytest.mark.parametrize("family", ["gemma3", "llama"])
@pytest.mark.parametrize("solver", ["independent", "joint"])
def test_incremental_equals_naive(family, solver):
    model, tok = tiny_model(family), tiny_tokenizer()
    base = dict(rho=0.05, batches=2, solver=solver, micro_batch=3, fidelity=False)
    inc = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(**base)).patch
    nai = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(propagation="naive", **base)).patch
    assert inc.layers == nai.layers == [0, 1, 2]
    for l in inc.layers:
        assert torch.allclose(dense(inc.matrices[l]), dense(nai.matrices[l]), atol=1e-5, rtol=1e-4)
        assert torch.allclose(inc.vectors[l], nai.vectors[l], atol=1e-5, rtol=1e-4)
        assert (l in inc.downs) == (l in nai.downs) == (solver == "joint")
        if solver == "joint":
            assert torch.allclose(dense(inc.downs[l]), dense(nai.downs[l]), atol=1e-5, rtol=1e-4)


def test_model_is_left_untouched():
    model, tok = tiny_model("gemma3"), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    compute_patch(model, tok, INSTRUCTION, TEXTS)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks
    assert all("forward" not in vars(layer) for layer in model.model.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_thought_patch_moves_model_toward_prompt(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    # 48 tokens > d/2 = 16: the solve runs on the d×d sums, where the matrix residual costs more
    # than the solve and is computed only when asked for
    assert all(lf.matrix_residual is None for lf in compute_patch(
        model, tok, INSTRUCTION, TEXTS, EngineConfig(rho=1e-3, fidelity=False)).fidelity.layers)
    res = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(rho=1e-3, diagnostics=True))
    f = res.fidelity
    assert f.tokens == sum(len(t) for t in TEXTS)
    assert f.mean_kl < f.base_mean_kl
    # near-interpolation at ρ = 1e-3 (48 tokens, d = 32): measured 0.13–0.27 on every family
    assert f.mean_kl < 0.05 * f.base_mean_kl
    assert all(0 <= lf.matrix_residual < 0.35 for lf in f.layers)
    assert all(0 <= lf.vector_residual < 0.35 for lf in f.layers)
    # a larger ridge fits worse, layer by layer (measured 0.41–0.77)
    g = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(rho=1.0, diagnostics=True)).fidelity
    assert all(b.matrix_residual > a.matrix_residual for a, b in zip(f.layers, g.layers))
    assert all(b.vector_residual > a.vector_residual for a, b in zip(f.layers, g.layers))


def test_components_and_layers_select_what_is_patched():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    vec = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(components=("vector",), layers=[1], fidelity=False)).patch
    assert vec.layers == [1] and not vec.matrices and set(vec.vectors) == {1}
    mat = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(components=("matrix",), fidelity=False)).patch
    assert not mat.vectors and set(mat.matrices) == {0, 1, 2}


@pytest.mark.parametrize("rho", [0.3, 1e-3, 0.0])
@pytest.mark.parametrize("intercept", [True, False])
def test_token_space_joint_solve_equals_the_sums(rho, intercept):
    """Fewer tokens than f: the joint solve runs on the kept rows (T×T); it must give the f×f
    solve's D, c and residual, weights included."""
    from transmute_cli.engine.stats import DownStats
    from transmute_cli.engine.solve import ridge_intercept_solve

    torch.manual_seed(2)
    f, d = 48, 12
    rows = DownStats(f, d)
    sums = DownStats(f, d, keep_rows=False)
    for t, w in ((7, 1.0), (9, 0.25), (5, 3.0)):
        a, e = torch.randn(t, f, dtype=torch.float64), torch.randn(t, d, dtype=torch.float64)
        rows.add(a, e, w)
        sums.add(a, e, w)
    assert rows.rows is not None and sums.rows is None
    d1, c1, r1 = ridge_intercept_solve(rows, rho, intercept)
    d2, c2, r2 = ridge_intercept_solve(sums, rho, intercept)
    assert isinstance(d1, LowRank) and d1.rank == 21  # rows: the exact factors, rank T
    d1 = dense(d1)
    assert torch.allclose(d1, d2, atol=1e-8, rtol=1e-6), (d1 - d2).abs().max()
    assert torch.allclose(c1, c2, atol=1e-8, rtol=1e-6)
    assert abs(r1 - r2) < 1e-6
    # past f tokens the rows are folded into the sums (bounded memory) and the answer is unchanged
    a, e = torch.randn(f, f, dtype=torch.float64), torch.randn(f, d, dtype=torch.float64)
    rows.add(a, e)
    sums.add(a, e)
    assert rows.rows is None
    assert torch.allclose(dense(ridge_intercept_solve(rows, rho, intercept)[0]), ridge_intercept_solve(sums, rho, intercept)[0],
                          atol=1e-8, rtol=1e-6)


def test_consuming_joint_solve_gives_the_same_answer_and_spends_the_sums():
    from transmute_cli.engine.stats import DownStats
    from transmute_cli.engine.solve import ridge_intercept_solve

    torch.manual_seed(3)
    f, d = 40, 10
    st = DownStats(f, d, keep_rows=False)
    st.add(torch.randn(60, f, dtype=torch.float64), torch.randn(60, d, dtype=torch.float64), 0.5)
    keep = ridge_intercept_solve(st, 0.2)
    assert st.sum_aa is not None
    spent = ridge_intercept_solve(st, 0.2, consume=True)
    assert torch.allclose(keep[0], spent[0], atol=1e-12) and torch.allclose(keep[1], spent[1], atol=1e-12)
    assert abs(keep[2] - spent[2]) < 1e-9 and st.sum_aa is None


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_joint_solve_on_one_layer_matches_its_closed_form(family):
    """Layer 0 alone, one batch, written out from the model's own modules (torch hooks, no
    transmute code): A by ridge on the MLP inputs; then, with A in place, the gap e at the layer
    output fitted by a ridge with an unshrunk intercept on the down inputs — scaled by 1/rms of
    the down output and with the post-norm scale (1 + w) divided out of D on Gemma 3."""
    model, tok = tiny_model(family), tiny_tokenizer()
    rho = 0.1
    patch = compute_patch(model, tok, INSTRUCTION, TEXTS,
                          EngineConfig(rho=rho, solver="joint", layers=[0], fidelity=False)).patch
    layer = model.model.layers[0]
    gemma = family == "gemma3"
    norm_in = layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm
    down = layer.mlp.down_proj
    store: dict[str, torch.Tensor] = {}
    hooks = [norm_in.register_forward_hook(lambda _m, i, o: store.update(u=i[0], n=o)),
             down.register_forward_hook(lambda _m, i, o: store.update(a=i[0], m=o))]
    if gemma:
        hooks.append(layer.post_feedforward_layernorm.register_forward_hook(lambda _m, i, o: store.update(y=o)))
    else:
        hooks.append(down.register_forward_hook(lambda _m, i, o: store.update(y=o)))

    def states(ids, start):
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), use_cache=False)
        return {k: v[0, start:].double() for k, v in store.items()}

    pre, instr = [tok.bos_token_id], tok(INSTRUCTION, add_special_tokens=False)["input_ids"]
    xs = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    ctx = [states(pre + instr + x, 1 + len(instr)) for x in xs]
    plain = [states(pre + x, 1) for x in xs]
    cat = lambda runs, k: torch.cat([r[k] for r in runs])  # noqa: E731
    n, dz = cat(plain, "n"), cat(ctx, "n") - cat(plain, "n")
    t, d = n.shape
    nn_ = n.T @ n
    a_want = dz.T @ n @ torch.linalg.inv(nn_ + rho * torch.trace(nn_) / min(t, d) * torch.eye(d, dtype=torch.float64))
    assert torch.allclose(dense(patch.matrices[0]).double(), a_want, atol=1e-5, rtol=1e-4)

    a_f = dense(patch.matrices[0])
    hooks.append(norm_in.register_forward_hook(lambda _m, i, o: o + o @ a_f.T))  # n -> n + A n, after the record
    withA = [states(pre + x, 1) for x in xs]
    for h in hooks:
        h.remove()
    e = cat(ctx, "u") + cat(ctx, "y") - cat(withA, "u") - cat(withA, "y")
    act = cat(withA, "a")
    if gemma:
        m, eps = cat(withA, "m"), layer.post_feedforward_layernorm.eps
        act = act / torch.sqrt(m.pow(2).mean(-1, keepdim=True) + eps)
    ac, ec = act - act.mean(0), e - e.mean(0)
    caa, f = ac.T @ ac, act.shape[1]
    lam = rho * torch.trace(caa) / min(f, t - 1)
    d_want = ec.T @ ac @ torch.linalg.inv(caa + lam * torch.eye(f, dtype=torch.float64))
    c_want = e.mean(0) - d_want @ act.mean(0)
    if gemma:
        d_want = d_want / (1.0 + layer.post_feedforward_layernorm.weight.double())[:, None]
    assert torch.allclose(dense(patch.downs[0]).double(), d_want, atol=1e-5, rtol=1e-3), (dense(patch.downs[0]) - d_want).abs().max()
    assert torch.allclose(patch.vectors[0].double(), c_want, atol=1e-5, rtol=1e-3), (patch.vectors[0] - c_want).abs().max()
    assert patch.layers == [0]


@pytest.mark.parametrize("d,t,rho", [(16, 5, 0.0), (16, 5, 0.03), (32, 12, 1.0), (24, 12, 0.3)])
def test_token_space_solve_is_the_dense_solve_as_exact_factors(d, t, rho):
    """With the token rows kept (T <= d/2) the thought matrix comes from the T×T system as
    factors of rank T, and equals the d×d solve from the sums (weights and several batches
    included); the fit residual from the rows equals the one from the sums."""
    from transmute_cli.engine.lowrank import LowRank, dense
    from transmute_cli.engine.solve import fit_residual, fit_residual_rows

    g = torch.Generator().manual_seed(d + t)
    rows, sums = LayerStats(d), LayerStats(d, keep_rows=False)
    for k, w in ((t // 2, 1.0), (t - t // 2, 0.25)):  # two batches, the second down-weighted
        n, nc = torch.randn(k, d, generator=g, dtype=torch.float64), torch.randn(k, d, generator=g, dtype=torch.float64)
        for st in (rows, sums):
            st.add(n, nc, n, nc, w)
    a_rows, a_sums = rows.solve_matrix(rho), sums.solve_matrix(rho)
    assert isinstance(a_rows, LowRank) and a_rows.rank == t and a_rows.shape == (d, d)
    assert torch.allclose(dense(a_rows), a_sums, rtol=1e-9, atol=1e-11)
    weights = [torch.randn(3 * d, d, generator=g, dtype=torch.float64)]
    num_r, den_r = fit_residual_rows(rows, a_rows, weights)
    num_s, den_s = fit_residual(sums, a_sums, weights[0].T @ weights[0])
    assert num_r == pytest.approx(num_s, rel=1e-4, abs=1e-6 * den_s) and den_r == pytest.approx(den_s, rel=1e-5)


def test_rows_fold_into_sums_past_half_the_width():
    d = 8
    st = LayerStats(d)
    st.add(torch.randn(3, d), torch.randn(3, d), torch.randn(3, d), torch.randn(3, d))
    assert st.rows is not None and st.sum_nn is None  # 3 <= d/2: rows, no d×d sums
    st.add(torch.randn(2, d), torch.randn(2, d), torch.randn(2, d), torch.randn(2, d))
    assert st.rows is None and st.count == 5 and st.sum_nn.shape == (d, d)  # 5 > d/2: folded
    assert not isinstance(st.solve_matrix(0.1), type(None)) and st.solve_matrix(0.1).shape == (d, d)
