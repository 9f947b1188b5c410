"""Factored patches: the file holds the engine's exact factors, a loaded patch acts bit for bit
like the one computed in the process, every kind of bad factored file is a one-line error, and
the old dense format is still read."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from transmute_cli.engine.loop import EngineConfig, compute_patch
from transmute_cli.errors import PatchError
from transmute_cli.model.families import family_for
from transmute_cli.engine.hooks import ThoughtHooks
from transmute_cli.engine.lowrank import LowRank, add, apply, compact, dense
from transmute_cli.artifacts.patch import ThoughtPatch, combine, load_patch, save_patch
from transmute_cli.artifacts.merge import merge

from tiny import tiny_model, tiny_tokenizer

TEXTS = ["a -> b\n", "c -> d\n"]  # 14 tokens <= d/2 = 16 on the tiny models: factored


def test_lowrank_algebra_matches_dense():
    g = torch.Generator().manual_seed(0)
    m = LowRank(torch.randn(10, 2, generator=g, dtype=torch.float64), torch.randn(2, 12, generator=g, dtype=torch.float64))
    x = torch.randn(4, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 10, generator=g, dtype=torch.float64)
    assert torch.allclose(apply(m, x), x @ m.dense().T)
    assert torch.allclose(m.premul(w).dense(), w @ m.dense())
    assert float(m.norm()) == pytest.approx(float(m.dense().norm()), rel=1e-12)
    assert torch.allclose((2.5 * m).dense(), 2.5 * m.dense())
    s = add(m, m)  # rank 4: 88 numbers, still fewer than 10×12
    assert isinstance(s, LowRank) and s.rank == 4 and torch.allclose(s.dense(), 2 * m.dense())
    big = add(add(s, s), m)  # rank 10: 220 numbers > 120: dense
    assert not isinstance(big, LowRank) and torch.allclose(big, 5 * m.dense())
    assert torch.equal(compact(m).left, m.left)


def _patch(family="llama", **cfg):
    model, tok = tiny_model(family), tiny_tokenizer()
    return model, compute_patch(model, tok, "Reverse:\nxy -> yx\n", TEXTS, EngineConfig(**cfg)).patch


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_saved_factors_act_bit_for_bit_like_the_computed_patch(tmp_path, family):
    model, patch = _patch(family)
    assert patch.matrices and all(isinstance(m, LowRank) for m in patch.matrices.values())
    assert patch.downs and all(isinstance(m, LowRank) for m in patch.downs.values())
    save_patch(patch, tmp_path / "p.safetensors", {})
    got = load_patch(tmp_path / "p.safetensors")
    assert got.metadata["format"] == "transmute-patch/2"
    for store in ("matrices", "downs"):
        for l, m in getattr(patch, store).items():
            g = getattr(got, store)[l]
            assert isinstance(g, LowRank) and torch.equal(g.left, m.left) and torch.equal(g.right, m.right)
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15]])
    fam = family_for(model)
    logits = []
    for p in (patch, got):
        with torch.no_grad(), ThoughtHooks(model, fam) as hooks:
            hooks.set_patch(p)
            logits.append(model(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[1])
    # and the factors are the patch: applying them dense gives the same model to float rounding
    dense_patch = ThoughtPatch(patch.n_layers, patch.d_model, {l: dense(m) for l, m in patch.matrices.items()},
                               dict(patch.vectors), downs={l: dense(m) for l, m in patch.downs.items()})
    with torch.no_grad(), ThoughtHooks(model, fam) as hooks:
        hooks.set_patch(dense_patch)
        ref = model(input_ids=ids).logits
    assert torch.allclose(ref, logits[0], atol=1e-5, rtol=1e-5)


def test_merge_and_combine_take_factors(tmp_path):
    model, patch = _patch("llama")
    fam = family_for(model)
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    assert isinstance(combine([(patch, 0.5)]).matrices[0], LowRank)
    both = combine([(patch, 0.5), (patch, 0.5)])  # factors side by side: rank 2T = 28 > d/2, so dense
    assert not isinstance(both.matrices[0], LowRank)
    assert torch.allclose(both.matrices[0], dense(patch.matrices[0]), atol=1e-6)
    with torch.no_grad(), ThoughtHooks(model, fam) as hooks:
        hooks.set_patch(patch)
        ref = model(input_ids=ids).logits
        hooks.set_patch(both)
        assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-5)
    with torch.no_grad():
        info = merge(model, fam, patch)
        try:
            assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)
        finally:
            info["undo"]()


def _meta(**extra):
    return {"format": "transmute-patch/2", "n_layers": "3", "d_model": "32", **extra}


@pytest.mark.parametrize("tensors, problem", [
    ({"layers.0.matrix.left": torch.zeros(32, 4)}, "layers.0.matrix: has .left but not .right"),
    ({"layers.0.matrix.left": torch.zeros(32, 4), "layers.0.matrix.right": torch.zeros(3, 32)},
     "layers.0.matrix: factors (32, 4) and (3, 32) do not chain"),
    ({"layers.0.matrix.left": torch.zeros(30, 4), "layers.0.matrix.right": torch.zeros(4, 32)},
     "layers.0.matrix: shape (30, 32), expected (32, 32)"),
    ({"layers.1.down.left": torch.zeros(32, 2), "layers.1.down.right": torch.full((2, 64), float("inf"))},
     "layers.1.down.right: contains NaN or Inf"),
    ({"layers.0.vector.left": torch.zeros(32, 1)}, "unexpected tensor 'layers.0.vector.left'"),
    ({"layers.2.matrix": torch.zeros(32, 32), "layers.2.matrix.left": torch.zeros(32, 1),
      "layers.2.matrix.right": torch.zeros(1, 32)}, "layers.2.matrix: stored both dense and factored"),
])
def test_bad_factored_patch_is_one_line(tmp_path, tensors, problem):
    p = tmp_path / "bad.safetensors"
    save_file(tensors, str(p), metadata=_meta())
    with pytest.raises(PatchError) as e:
        load_patch(p)
    assert str(e.value) == f"{p}: {problem}"


def test_dense_format_1_is_still_read(tmp_path):
    p = tmp_path / "old.safetensors"
    a = torch.randn(32, 32)
    save_file({"layers.1.matrix": a, "layers.1.vector": torch.ones(32)}, str(p),
              metadata={**_meta(), "format": "transmute-patch/1"})
    got = load_patch(p)
    assert torch.equal(got.matrices[1], a) and not isinstance(got.matrices[1], LowRank)


def test_diff_compares_factors_as_the_matrices_they_are():
    from transmute_cli.artifacts.diff import diff_patches

    _model, patch = _patch("llama")
    as_dense = ThoughtPatch(patch.n_layers, patch.d_model, {l: dense(m) for l, m in patch.matrices.items()},
                            dict(patch.vectors), downs={l: dense(m) for l, m in patch.downs.items()})
    rep = diff_patches(patch, as_dense, "factored", "dense")
    assert rep.tensors and all(t.diff_norm == 0.0 and t.cosine == pytest.approx(1.0) for t in rep.tensors)
    assert {t.tensor for t in rep.tensors} == {"matrix", "vector", "down"}


# --------------------------------------------------------------------------- bounded memory


def test_merge_spills_the_originals_to_disk_and_puts_them_back(tmp_path):
    """With ``spill`` the weights a merge overwrites go to one file per layer (not to memory), and
    undo restores them bit for bit."""
    model, patch = _patch("llama")  # the vector as down_proj's bias: new parameters, removed on undo
    fam = family_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = merge(model, fam, patch, spill=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"layer{l}.safetensors" for l in sorted(patch.layers)]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    info["undo"]()
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], v) for k, v in after.items())


def test_fold_direction_rows_sums_and_layer_groups_agree():
    """The fold direction from token rows (T×T) equals the f×f one, and fold statistics taken in
    groups of layers under a small memory budget (one forward per group) equal one pass."""
    from transmute_cli.artifacts.merge import fold_direction, fold_statistics

    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 20, generator=g, dtype=torch.float64)
    rows = fold_direction(rows=[x[:3], x[3:]])
    sums = fold_direction(aa=x.T @ x, asum=x.sum(0))
    assert torch.allclose(rows, sums, rtol=1e-9, atol=1e-12)

    model, patch = _patch("gemma3")
    fam = family_for(model)
    ids = torch.tensor([[2, 10, 11, 12, 13, 14], [2, 15, 16, 17, 0, 0]])
    mask = ids != 0
    one = fold_statistics(model, fam, patch, [(ids, mask)])
    f = model.config.intermediate_size
    grouped = fold_statistics(model, fam, patch, [(ids, mask)], budget=int(mask.sum()) * f * 8)  # one layer a group
    assert set(one) == set(grouped) == set(patch.vectors)
    for l in one:
        assert torch.allclose(one[l]["g"], grouped[l]["g"], rtol=1e-10, atol=1e-12)


def test_batches_accumulate_factors_side_by_side():
    """Two batches in token space: η·A₁ + η·A₂ kept as factors of rank T₁ + T₂ (still smaller
    than dense), and the incremental loop equals rerunning the whole model per layer."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    texts = ["ab\n", "cd\n", "ef\n", "gh\n"]  # 3 tokens each: 6 per batch, 12 in all
    cfg = dict(rho=0.1, batches=2, fidelity=False)
    inc = compute_patch(model, tok, "Swap:\nxy -> yx\n", texts, EngineConfig(**cfg)).patch
    nai = compute_patch(model, tok, "Swap:\nxy -> yx\n", texts, EngineConfig(propagation="naive", **cfg)).patch
    for l, m in inc.matrices.items():
        assert isinstance(m, LowRank) and m.rank == 12
        assert torch.allclose(dense(m), dense(nai.matrices[l]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("texts", [["ab\n"], ["dog -> god\n"] * 4], ids=["token rows", "d×d sums"])
def test_non_finite_activations_are_one_clear_error(texts):
    """A model that produces NaN (here: an Inf weight in layer 0's MLP) stops the solve with an
    EngineError naming the layer, whether the statistics are token rows or sums."""
    from transmute_cli.errors import EngineError
    from transmute_cli.model.families import decoder_layers, get_module

    model, tok = tiny_model("llama"), tiny_tokenizer()
    fam = family_for(model)
    with torch.no_grad():
        get_module(decoder_layers(model, fam)[0], fam.mlp_down).weight[0, 0] = float("inf")
    with pytest.raises(EngineError, match=r"non-finite activations at layer \d+: the model produced NaN or Inf"):
        compute_patch(model, tok, "Swap:\nxy -> yx\n", texts, EngineConfig(fidelity=False))
