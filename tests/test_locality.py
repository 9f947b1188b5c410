"""Locality and format robustness by default: broad texts patched toward the prompted model,
the examples patched in the shipped query formats under the instruction rewritten in each, and
the locality figure every compute reports.  Ground truth first (a broad text is an example with
its own weight; the locality figures against a direct computation), then the recipe defaults and
the shipped data (held out from everything the project measures)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from transmute_cli import defaults

from transmute_cli import pipeline
from transmute_cli.recipe.datafiles import load_texts, shipped_texts
from transmute_cli.engine.loop import EngineConfig, compute_patch
from transmute_cli.errors import InputError, RecipeError
from transmute_cli.model.families import family_for
from transmute_cli.engine.fidelity import compare_logits, locality, text_logits
from transmute_cli.recipe.schema import load_recipe, parse_recipe

from tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = "Translate to pig latin:\ncat -> atcay\nhat -> athay\n"
TEXTS = ["dog -> ogday\n", "moon -> oonmay\n", "sun -> unsay\n", "tree -> eetray\n"]
BROAD = ["the quick brown fox jumps over the lazy dog\n", "Uppercase:\nab -> AB\ncd -> CD\n"]


def _same(a, b, tol=1e-5):
    for kind in ("matrices", "vectors", "downs"):
        x, y = getattr(a, kind), getattr(b, kind)
        assert x.keys() == y.keys()
        for l in x:
            dx, dy = x[l].double() if torch.is_tensor(x[l]) else x[l].dense().double(), \
                y[l].double() if torch.is_tensor(y[l]) else y[l].dense().double()
            assert torch.allclose(dx, dy, rtol=tol, atol=tol * max(1.0, float(dy.abs().max()))), (kind, l)


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_a_broad_text_at_weight_one_is_an_example(family):
    """Broad texts are patched exactly as examples (the prompted model is their target): at weight
    1 the patch equals the one with them appended to the examples; at another weight it differs."""
    model, tok = tiny_model(family), tiny_tokenizer()
    cfg = dict(rho=0.1, micro_batch=2, fidelity=False)
    got = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(broad_weight=1.0, **cfg), broad=BROAD).patch
    want = compute_patch(model, tok, INSTRUCTION, TEXTS + BROAD, EngineConfig(**cfg)).patch
    _same(got, want)
    other = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(broad_weight=0.2, **cfg), broad=BROAD).patch
    plain = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(**cfg)).patch
    d = lambda p: p.vectors[0].double()  # noqa: E731
    assert (d(other) - d(got)).norm() > 1e-4 * d(got).norm()
    assert (d(other) - d(plain)).norm() > 1e-4 * d(plain).norm()


def test_broad_texts_incremental_equals_naive():
    model, tok = tiny_model("gemma3"), tiny_tokenizer()
    base = dict(rho=0.05, batches=2, micro_batch=2, fidelity=False, broad_weight=0.5)
    inc = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(**base), broad=BROAD).patch
    nai = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(propagation="naive", **base), broad=BROAD).patch
    _same(inc, nai, tol=1e-4)


def test_bad_broad_weight_and_empty_broad_text_are_input_errors():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(InputError, match="broad_weight"):
        compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(broad_weight=0.0), broad=BROAD)
    with pytest.raises(InputError, match=re.escape("broad[1]")):
        compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(), broad=["ok\n", ""])


def test_locality_figures_against_a_direct_computation():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    fam = family_for(model)
    text = tok("the quick brown fox\n", add_special_tokens=False)["input_ids"]
    pre = tok("a", add_special_tokens=True)["input_ids"][:-1]
    instr = tok(INSTRUCTION, add_special_tokens=False)["input_ids"]
    prompted = text_logits(model, fam, pre + instr, text)
    base = text_logits(model, fam, pre, text)
    assert prompted.shape[0] == len(text) - 1
    with torch.no_grad():  # the same positions from a plain forward
        full = model(input_ids=torch.tensor([pre + instr + text])).logits[0].float()
    k = len(pre + instr)
    assert torch.allclose(prompted, full[k : k + len(text) - 1], atol=1e-4)
    # "patched" = the unpatched model: its figures are the base's
    loc = locality(prompted, base, base, text)
    assert loc.mean_kl == pytest.approx(loc.base_mean_kl) and loc.perplexity_patched == pytest.approx(loc.perplexity_base)
    kl, agree = compare_logits(prompted, base)
    assert loc.base_mean_kl == pytest.approx(kl / (len(text) - 1)) and loc.base_top1_agreement == pytest.approx(agree / (len(text) - 1))
    ce = torch.nn.functional.cross_entropy(prompted, torch.tensor(text[1:]))
    assert loc.perplexity_prompted == pytest.approx(float(torch.exp(ce)), rel=1e-5)
    # the prompted model against itself: KL 0, agreement 1
    same = locality(prompted, prompted, base, text)
    assert same.mean_kl == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0


# --------------------------------------------------------------------------- recipe defaults


def test_a_minimal_recipe_gets_the_measured_defaults():
    r = parse_recipe("instruction: \"Do it.\\na -> b\\n\"\nexamples: [[c, d]]\n")
    assert (r.augment, r.broad, r.broad_weight) == (defaults.AUGMENT, defaults.BROAD, defaults.BROAD_WEIGHT)
    assert r.patch_formats() == tuple(dict.fromkeys((r.template, *defaults.AUGMENT_TEMPLATES))) if r.augment \
        else r.patch_formats() == (r.template,)
    n = len(load_texts(ROOT / "transmute_cli" / "data" / "broad.txt"))
    assert len(pipeline.broad_texts(r)) == (n if r.broad == "prompted" else 0)
    prompted = parse_recipe("instruction: x\nexamples: [[c, d]]\nbroad: prompted\n")
    assert len(pipeline.broad_texts(prompted)) == n
    # YAML 1.1 reads a bare off as false
    off = parse_recipe("instruction: x\nexamples: [[c, d]]\naugment: false\nbroad: off\n")
    assert off.broad == "off" and off.patch_formats() == (off.template,) and pipeline.broad_texts(off) == []
    assert pipeline.patch_contexts(off) is None


def test_augmented_formats_see_the_instruction_rewritten_in_them():
    r = parse_recipe("instruction: \"Reverse.\\nab -> ba\\n\"\nexamples: [[cd, dc], [ef, fe]]\naugment: true\n"
                     "patch_templates: ['{input} = {output}']\n")
    texts, contexts = pipeline.patch_texts(r), pipeline.patch_contexts(r)
    assert len(texts) == len(contexts) == 2 * len(r.patch_formats())
    for i, t in enumerate(r.patch_formats()):
        for j in range(2):
            k = 2 * i + j
            assert texts[k] == t.replace("{input}", r.examples[j].input).replace("{output}", r.examples[j].output) + "\n"
            assert contexts[k] == "Reverse.\n" + t.replace("{input}", "ab").replace("{output}", "ba") + "\n"
    # without demonstrations to rewrite, every text sees the instruction as written
    plain = parse_recipe("instruction: Reverse each word.\nexamples: [[cd, dc]]\naugment: true\n")
    assert pipeline.patch_contexts(plain) is None


def test_chat_recipes_refuse_the_text_defaults():
    r = parse_recipe("chat: true\ninstruction: Be brief.\nexamples: [[hi, hello]]\n", source="c.yaml")
    assert (r.augment, r.broad) == (False, "off") and pipeline.broad_texts(r) == []
    for key, value in (("augment", "true"), ("broad", "original"), ("broad", "prompted")):
        with pytest.raises(RecipeError, match=rf"^c.yaml: {key}: not supported with chat: true"):
            parse_recipe(f"chat: true\ninstruction: Be brief.\nexamples: [[hi, hello]]\n{key}: {value}\n", source="c.yaml")
    ok = parse_recipe("chat: true\ninstruction: Be brief.\nexamples: [[hi, hello]]\nbroad: off\naugment: false\n")
    assert (ok.augment, ok.broad) == (False, "off")


@pytest.mark.parametrize("bad, reason", [("broad_weight: 0", "must be a number > 0"), ("augment: 1", "must be true or false"),
                                         ("broad: maybe", "must be one of original, prompted, off"),
                                         ("broad: true", "must be one of original, prompted, off")])
def test_bad_locality_keys_are_one_line_errors(bad, reason):
    with pytest.raises(RecipeError, match=rf"^r.yaml: {bad.split(':')[0]}: {reason}"):
        parse_recipe(f"instruction: x\nexamples: [[a, b]]\n{bad}\n", source="r.yaml")


# --------------------------------------------------------------------------- the shipped texts are held out


def _measured_recipes():
    for d in ("recipes", "examples/tasks", "examples/trials"):
        for p in sorted((ROOT / d).glob("*.yaml")):
            r = load_recipe(p)
            if not r.chat:
                yield r


def test_shipped_texts_hold_none_of_the_measured_tasks():
    """The broad texts must not teach the patch a task the suite, the side-effect tables or the
    tests measure: no measured pair (input and output together), no measured instruction line,
    and the locality text is not among them, nor is examples/neutral.txt."""
    broad = load_texts(ROOT / "transmute_cli" / "data" / "broad.txt")
    (loc,) = load_texts(ROOT / "transmute_cli" / "data" / "locality.txt")
    assert len(broad) >= 16 and loc not in broad
    lines = {l.strip().lower() for b in broad for l in b.splitlines()}
    neutral = (ROOT / "examples" / "neutral.txt").read_text()
    assert not any(s.strip() and s.strip() in loc for s in neutral.split("."))
    for r in _measured_recipes():
        head = r.instruction.splitlines()[0].strip().lower()
        assert head not in lines, (r.name, head)
        for p in (*r.examples, *r.eval):  # a measured pair on one demonstration line (not prose) of a broad text
            for line in (l for l in lines if len(l.split()) <= 6):
                words = set(re.findall(r"[\w'-]+", line))
                assert not ({p.input.lower(), p.output.lower()} <= words and p.input.lower() != p.output.lower()), \
                    (r.name, p, line)


def test_the_shipped_data_is_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"data/*.txt"' in text
    assert shipped_texts("broad.txt") and shipped_texts("locality.txt")


# --------------------------------------------------------------------------- cached moments (broad: original)


def _captured(model, tok, texts):
    """Ground truth for the moments: each layer's MLP input n and down-projection input a (rms-
    scaled by the post-norm's output on Gemma) at every token of every text, from capture."""
    from transmute_cli.model.families import decoder_layers, post_norm
    from transmute_cli.engine.hooks import capture
    from transmute_cli.engine.solve import rms_scaled
    from transmute_cli.model.tokens import special_prefix, token_ids

    fam = family_for(model)
    layers = decoder_layers(model, fam)
    pre = special_prefix(tok)
    ns, as_ = [[] for _ in layers], [[] for _ in layers]
    for t in texts:
        ids = pre + token_ids(tok, t)
        for l, layer in enumerate(layers):
            with torch.no_grad(), capture(layer, fam) as c:
                model(input_ids=torch.tensor([ids]))
            a = c["a"][0, len(pre):].double()
            pn = post_norm(layer, fam)
            if pn is not None:
                a = rms_scaled(a, c["m"][0, len(pre):].double(), pn[1])
            ns[l].append(c["n"][0, len(pre):].double())
            as_[l].append(a)
    return [torch.cat(x) for x in ns], [torch.cat(x) for x in as_]


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_moments_are_the_captured_sums(family):
    from transmute_cli.engine.moments import compute_moments

    model, tok = tiny_model(family), tiny_tokenizer()
    mom = compute_moments(model, family_for(model), tok, BROAD, micro_batch=1)
    ns, as_ = _captured(model, tok, BROAD)
    assert mom.count == ns[0].shape[0]
    for l in range(len(ns)):
        assert torch.allclose(mom.sum_nn[l], ns[l].T @ ns[l], rtol=1e-4, atol=1e-5)
        assert torch.allclose(mom.sum_aa[l], as_[l].T @ as_[l], rtol=1e-4, atol=1e-5)
        assert torch.allclose(mom.sum_a[l], as_[l].sum(0), rtol=1e-4, atol=1e-5)


def test_moments_cache_round_trip(tmp_path):
    from transmute_cli.engine.moments import load_or_compute

    model, tok = tiny_model("llama"), tiny_tokenizer()
    fam = family_for(model)
    first, cached = load_or_compute(model, fam, tok, BROAD, "f" * 64, tmp_path)
    assert not cached and len(list(tmp_path.iterdir())) == 1
    again, cached = load_or_compute(model, fam, tok, BROAD, "f" * 64, tmp_path)
    assert cached and again.count == first.count
    for a, b in zip(first.sum_aa + first.sum_nn + first.sum_a, again.sum_aa + again.sum_nn + again.sum_a):
        assert torch.equal(a, b)  # the same numbers whether or not the cache was there
    # other texts, another model: another file; a damaged file is recomputed, not trusted
    load_or_compute(model, fam, tok, BROAD[:1], "f" * 64, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    from transmute_cli.engine.moments import cache_file

    cache_file(tmp_path, "f" * 64, BROAD, torch.float32).write_bytes(b"garbage")
    _, cached = load_or_compute(model, fam, tok, BROAD, "f" * 64, tmp_path)
    assert not cached


@pytest.mark.parametrize("intercept", [True, False])
def test_factored_moment_solves_equal_the_dense_sums(intercept):
    """Moments held beside the kept rows give the same A, D and intercept (and residual) as the
    same moments added to the folded d×d / f×f sums — the dense closed form."""
    from transmute_cli.engine.lowrank import LowRank
    from transmute_cli.engine.stats import DownStats, LayerStats
    from transmute_cli.engine.solve import ridge_intercept_solve

    g = torch.Generator().manual_seed(0)
    d, f, T, B = 24, 40, 7, 60  # T < d/2 and f/2: the rows are kept
    n, nc = torch.randn(T, d, generator=g, dtype=torch.float64), torch.randn(T, d, generator=g, dtype=torch.float64)
    u = torch.zeros(T, d, dtype=torch.float64)
    zn = torch.randn(B, d, generator=g, dtype=torch.float64)
    a, e = torch.randn(T, f, generator=g, dtype=torch.float64), torch.randn(T, d, generator=g, dtype=torch.float64)
    za = torch.randn(B, f, generator=g, dtype=torch.float64) + 0.5
    w = 0.7

    def layer(fold):
        st = LayerStats(d)
        st.add(n[:4], nc[:4], u[:4], u[:4], 2.0)
        st.add(n[4:], nc[4:], u[4:], u[4:])
        if fold:
            st.fold()
        st.add_moments(zn.T @ zn, B, w)
        return st.solve_matrix(0.3)

    fac, dense = layer(False), layer(True)
    assert isinstance(fac, LowRank) and fac.rank == T
    assert torch.allclose(fac.dense(), dense, atol=1e-10)

    def down(fold):
        st = DownStats(f, d)
        st.add(a[:3], e[:3], 2.0)
        st.add(a[3:], e[3:])
        if fold:
            st.fold()
        st.add_moments(za.T @ za, za.sum(0), B, w)
        return ridge_intercept_solve(st, 0.3, intercept=intercept)

    (df, cf, rf), (dd, cd, rd) = down(False), down(True)
    assert isinstance(df, LowRank) and df.rank == T + 1
    assert torch.allclose(df.dense(), dd, atol=1e-10) and torch.allclose(cf, cd, atol=1e-10)
    assert rf == pytest.approx(rd, rel=1e-6)


def test_layer0_with_moments_matches_the_closed_form():
    """Layer 0 with the broad texts' moments: ``A = ΣdZ nᵀ (Σ n nᵀ + w Σ z zᵀ + ρ s I)⁻¹`` with s the
    mean non-zero eigenvalue of the *examples'* Σ n nᵀ (ρ keeps its meaning; w alone sets how
    much the moments count), and the thought vector the mean of delta over examples and moments'
    tokens (delta = 0 there) — from activations captured directly."""
    from transmute_cli.engine.moments import compute_moments
    from transmute_cli.model.tokens import encode

    model, tok = tiny_model("gemma3"), tiny_tokenizer()
    rho, w = 0.2, 0.5
    cfg = EngineConfig(rho=rho, solver="independent", layers=[0], fidelity=False, micro_batch=2, broad_weight=w)
    mom = compute_moments(model, family_for(model), tok, BROAD)
    got = compute_patch(model, tok, INSTRUCTION, TEXTS, cfg, moments=mom).patch
    enc = encode(tok, INSTRUCTION, TEXTS)
    pre, instr = list(enc.pre), list(enc.instruction)
    from transmute_cli.model.families import decoder_layers
    from transmute_cli.engine.hooks import capture

    def states(ids, start):
        with torch.no_grad(), capture(decoder_layers(model, family_for(model))[0], family_for(model)) as c:
            model(input_ids=torch.tensor([ids]))
        return c["n"][0, start:].double(), c["u"][0, start:].double()

    n, u, nc, uc = [], [], [], []
    for x in enc.texts:
        a, b = states(pre + list(x), len(pre))
        c, d = states(pre + instr + list(x), len(pre) + len(instr))
        n.append(a), u.append(b), nc.append(c), uc.append(d)
    n, u, nc, uc = map(torch.cat, (n, u, nc, uc))
    nn_task = n.T @ n
    d = nn_task.shape[0]
    s_task = torch.trace(nn_task) / min(d, n.shape[0])
    k = nn_task + w * mom.sum_nn[0] + rho * s_task * torch.eye(d, dtype=torch.float64)
    want = (nc - n).T @ n @ torch.linalg.inv(k)
    assert torch.allclose(got.matrices[0].dense().double() if hasattr(got.matrices[0], "dense") else got.matrices[0].double(),
                          want, rtol=1e-4, atol=1e-6)
    vec = (uc - u).sum(0) / (n.shape[0] + w * mom.count)
    assert torch.allclose(got.vectors[0].double(), vec, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fold", [False, True])
def test_null_space_projection_is_alphaedit_closed_form(fold):
    """``null_projector`` + ``project`` (EngineConfig.null_space): the projector removes the
    leading directions holding the asked share of the moment's energy; A and D then equal the
    same ridge solves on the projected inputs (moments projected too), dense or factored, and
    act on none of the removed directions (AlphaEdit's ``Δ P``)."""
    from transmute_cli.engine.lowrank import LowRank
    from transmute_cli.engine.stats import DownStats, LayerStats
    from transmute_cli.engine.solve import null_projector, ridge_intercept_solve

    g = torch.Generator().manual_seed(1)
    d, f, T, B = 24, 40, 7, 60
    scale = torch.logspace(1, -2, d, dtype=torch.float64)
    zn = torch.randn(B, d, generator=g, dtype=torch.float64) * scale
    p = null_projector(zn.T @ zn, 0.9)
    evals, evecs = torch.linalg.eigh(zn.T @ zn)
    share = evals.flip(0).cumsum(0) / evals.sum()
    k = int((share < 0.9).sum()) + 1  # directions up to the one that crosses 0.9
    top = evecs.flip(1)[:, :k]
    assert torch.allclose(p @ p, p, atol=1e-10) and torch.allclose(p, p.T)
    assert int(round(float(torch.trace(p)))) == d - k and float((p @ top).abs().max()) < 1e-10

    n, nc = torch.randn(T, d, generator=g, dtype=torch.float64), torch.randn(T, d, generator=g, dtype=torch.float64)
    u = torch.zeros(T, d, dtype=torch.float64)
    st = LayerStats(d)
    st.add(n, nc, u, u)
    if fold:
        st.fold()
    st.add_moments(zn.T @ zn, B, 0.5)
    st.project(p)
    a = st.solve_matrix(0.3)
    a = a.dense() if isinstance(a, LowRank) else a
    ref = LayerStats(d)
    ref.add(n @ p, nc - n + n @ p, u, u)  # the same dz, inputs projected
    ref.fold()
    ref.add_moments(p @ (zn.T @ zn) @ p, B, 0.5)
    ref.task_sq = st.task_sq  # ρ's scale: the unprojected examples' (as the engine's)
    assert torch.allclose(a, ref.solve_matrix(0.3), atol=1e-8)
    assert float((a @ top).abs().max()) < 1e-8  # the removed directions are left alone

    za = torch.randn(B, f, generator=g, dtype=torch.float64) * torch.logspace(1, -2, f, dtype=torch.float64)
    pf = null_projector(za.T @ za, 0.9)
    x, e = torch.randn(T, f, generator=g, dtype=torch.float64), torch.randn(T, d, generator=g, dtype=torch.float64)
    ds = DownStats(f, d)
    ds.add(x, e)
    if fold:
        ds.fold()
    ds.add_moments(za.T @ za, za.sum(0), B, 0.5)
    ds.project(pf)
    dmat, c, _ = ridge_intercept_solve(ds, 0.3)
    dmat = dmat.dense() if isinstance(dmat, LowRank) else dmat
    dr = DownStats(f, d)
    dr.add(x @ pf, e)
    dr.fold()
    dr.add_moments(pf @ (za.T @ za) @ pf, pf @ za.sum(0), B, 0.5)
    dr.task_sq, dr.task_sum = ds.task_sq, ds.task_sum
    dref, cref, _ = ridge_intercept_solve(dr, 0.3)
    assert torch.allclose(dmat, dref, atol=1e-8) and torch.allclose(c, cref, atol=1e-8)
    assert float((dmat @ (torch.eye(f, dtype=torch.float64) - pf)).abs().max()) < 1e-8


def test_null_space_in_the_engine_leaves_the_broad_texts_leading_directions_alone():
    """EngineConfig.null_space end to end on the tiny model (joint solver, every layer): each
    thought matrix A and down matrix D is zero on the leading directions of that layer's moments
    (the removed ones), and without null_space they are not."""
    from transmute_cli.engine.moments import compute_moments
    from transmute_cli.engine.solve import null_projector

    model, tok = tiny_model("gemma3"), tiny_tokenizer()
    mom = compute_moments(model, family_for(model), tok, BROAD)
    dense = lambda m: (m.dense() if hasattr(m, "dense") else m).double()  # noqa: E731

    def worst(patch):
        out = 0.0
        for l, a in patch.matrices.items():
            out = max(out, float((dense(a) @ (torch.eye(a.shape[1], dtype=torch.float64)
                                               - null_projector(mom.sum_nn[l], 0.9))).abs().max()) / float(dense(a).abs().max()))
        for l, dm in patch.downs.items():
            out = max(out, float((dense(dm) @ (torch.eye(dm.shape[1], dtype=torch.float64)
                                                - null_projector(mom.sum_aa[l], 0.9))).abs().max()) / float(dense(dm).abs().max()))
        return out

    cfg = EngineConfig(rho=0.2, fidelity=False, micro_batch=2)
    plain = compute_patch(model, tok, INSTRUCTION, TEXTS, cfg, moments=mom).patch
    null = compute_patch(model, tok, INSTRUCTION, TEXTS, replace(cfg, null_space=0.9), moments=mom).patch
    assert null.matrices and null.downs
    assert worst(null) < 1e-4 < worst(plain)
    with pytest.raises(Exception, match="null_space"):
        EngineConfig(null_space=1.0).validate()
