"""`transmute diff`: patches against patches, checkpoints against checkpoints, bad inputs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from transmute_cli.artifacts.diff import diff_patches, diff_paths, diff_state_dicts
from transmute_cli.artifacts.diffstats import DiffReport, effective_rank
from transmute_cli.engine.loop import EngineConfig, compute_patch
from transmute_cli.artifacts.patch import ThoughtPatch
from transmute_cli.errors import InputError, PatchError
from transmute_cli.model.families import family_for
from transmute_cli.artifacts.merge import merge
from transmute_cli.artifacts.patch import save_patch

from tiny import tiny_model, tiny_tokenizer

INSTRUCTION = "Translate to pig latin:\ncat -> atcay\nhat -> athay\n"
OTHER = "Answer in capitals only:\nhello -> HELLO\nsun -> SUN\n"
TEXTS = ["dog -> ogday\n", "moon -> oonmay\n", "sun -> unsay\n", "a -> aay\n"]


def random_patch(seed=0, n_layers=4, d=16, f=24, scales=(1.0, 3.0, 0.5, 2.0)) -> ThoughtPatch:
    g = torch.Generator().manual_seed(seed)
    p = ThoughtPatch(n_layers, d)
    for l in range(n_layers):
        s = scales[l]
        p.matrices[l] = s * torch.randn(d, d, generator=g)
        p.vectors[l] = s * torch.randn(d, generator=g)
        p.downs[l] = s * torch.randn(d, f, generator=g)
    return p


def saved(patch, path, fingerprint="x"):
    save_patch(patch, path, {"base_fingerprint": fingerprint})
    return str(path)


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


# --------------------------------------------------------------------------- maths


def test_effective_rank_of_known_spectra():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 20))
    r, _ = torch.linalg.qr(torch.randn(12, 12))
    flat = q[:, :3] @ torch.diag(torch.tensor([2.0, 2.0, 2.0])) @ r[:3]  # 3 equal singular values
    assert effective_rank(flat) == pytest.approx(3.0, abs=1e-4)
    assert effective_rank(torch.outer(torch.randn(20), torch.randn(12))) == pytest.approx(1.0, abs=1e-4)
    skewed = q[:, :2] @ torch.diag(torch.tensor([10.0, 1.0])) @ r[:2]
    assert 1.0 < effective_rank(skewed) < 2.0
    assert effective_rank(torch.zeros(5, 5)) is None
    assert effective_rank(torch.randn(7)) is None


# --------------------------------------------------------------------------- patches


def test_patch_against_itself(tmp_path):
    path = saved(random_patch(), tmp_path / "p.safetensors")
    rep = diff_paths(path, path)
    assert rep.kind == "patch" and rep.a == path and rep.b == path
    assert len(rep.tensors) == 12 and {t.tensor for t in rep.tensors} == {"matrix", "vector", "down"}
    for t in rep.tensors:
        assert t.diff_norm == 0 and t.relative_change == 0
        assert t.cosine == pytest.approx(1.0)
        assert t.effective_rank is None  # nothing changed
        assert (t.effective_rank_a is None) == (t.tensor == "vector")
        assert t.effective_rank_a == t.effective_rank_b
    assert rep.top_layers == [] and all(r["diff_norm"] == 0 for r in rep.layer_change)
    assert rep.overlap["cosine_all"] == pytest.approx(1.0)
    assert rep.overlap["matrix_subspace_overlap"] == pytest.approx(1.0, abs=1e-6)
    assert rep.notes == []


def test_patch_against_its_double_and_layer_order(tmp_path):
    p = random_patch(scales=(1.0, 3.0, 0.5, 2.0))
    run = tmp_path / "run"
    run.mkdir()
    saved(p, run / "patch.safetensors")  # a run folder
    b = saved(p.scaled(2.0), tmp_path / "double.safetensors")
    rep = diff_paths(str(run), b)
    for t in rep.tensors:
        assert t.relative_change == pytest.approx(1.0, rel=1e-6)
        assert t.cosine == pytest.approx(1.0, rel=1e-6)
        assert t.norm_b == pytest.approx(2 * t.norm_a, rel=1e-6)
        if t.tensor != "vector":  # B − A = A: same spectrum shape
            assert t.effective_rank == pytest.approx(t.effective_rank_a, rel=1e-4)
            assert t.effective_rank_b == pytest.approx(t.effective_rank_a, rel=1e-4)
    assert rep.top_layers == [1, 3, 0, 2]
    rows = {r["layer"]: r for r in rep.layer_change}
    assert rows[1]["relative_change"] == pytest.approx(1.0, rel=1e-6)
    want = math.sqrt(sum(t.diff_norm**2 for t in rep.tensors if t.layer == 1))
    assert rows[1]["diff_norm"] == pytest.approx(want)
    assert rep.overlap["cosine_all"] == pytest.approx(1.0)
    assert rep.overlap["matrix_subspace_overlap"] == pytest.approx(1.0, abs=1e-6)


def test_missing_tensors_count_as_zeros_and_fingerprints_noted():
    pa, pb = random_patch(0), random_patch(1)
    del pb.vectors[2], pb.downs[0]
    del pa.matrices[3]
    rep = diff_patches(pa, pb, "a.st", "b.st")
    by = {(t.layer, t.tensor): t for t in rep.tensors}
    assert len(by) == 12
    assert by[2, "vector"].norm_b == 0 and by[2, "vector"].cosine is None
    assert by[2, "vector"].diff_norm == pytest.approx(by[2, "vector"].norm_a)
    assert by[3, "matrix"].relative_change is None and by[3, "matrix"].effective_rank_a is None
    assert "2 tensors only in a.st, e.g. layers.0.down (compared with zeros)" in rep.notes
    assert "1 tensor only in b.st, e.g. layers.3.matrix (compared with zeros)" in rep.notes
    assert not any("fingerprint" in n for n in rep.notes)  # neither has one
    pa.metadata["base_fingerprint"], pb.metadata["base_fingerprint"] = "aaa", "bbb"
    rep = diff_patches(pa, pb, "a.st", "b.st")
    assert any("base fingerprints differ (a.st: aaa, b.st: bbb)" in n for n in rep.notes)
    # three layers have matrices on both sides; random 16-d matrices share little of their top-8
    assert [r["layer"] for r in rep.overlap["matrix_layers"]] == [0, 1, 2]
    assert 0.2 < rep.overlap["matrix_subspace_overlap"] < 0.8


def test_two_instructions(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = EngineConfig(rho=0.05, batches=2, solver="independent", fidelity=False)  # A and δ only
    p1 = compute_patch(model, tok, INSTRUCTION, TEXTS, cfg).patch
    p2 = compute_patch(model, tok, OTHER, TEXTS, cfg).patch
    a, b = saved(p1, tmp_path / "a.safetensors", "fp"), saved(p2, tmp_path / "b.safetensors", "fp")
    rep = diff_paths(a, b)
    assert {(t.layer, t.tensor) for t in rep.tensors} == {(l, k) for l in range(3) for k in ("matrix", "vector")}
    for t in rep.tensors:
        assert t.diff_norm > 0 and t.norm_a > 0 and t.norm_b > 0
        assert -1 < t.cosine < 1 and t.relative_change > 0
        if t.tensor == "matrix":
            assert 1 <= t.effective_rank <= 32 and 1 <= t.effective_rank_a <= 32
    assert len(rep.top_layers) == 3 and sorted(rep.top_layers) == [0, 1, 2]
    diffs = {r["layer"]: r["diff_norm"] for r in rep.layer_change}
    assert [diffs[l] for l in rep.top_layers] == sorted(diffs.values(), reverse=True)
    assert -1 < rep.overlap["cosine_all"] < 1
    assert 0 <= rep.overlap["matrix_subspace_overlap"] <= 1
    assert rep.notes == []  # same fingerprint
    js = rep.to_json()
    back = json.loads(json.dumps(js, allow_nan=False))
    assert set(back) == {"kind", "a", "b", "tensors", "layer_change", "top_layers", "notes", "overlap"}
    assert back["kind"] == "patch" and back["a"] == a
    assert set(back["tensors"][0]) == {
        "layer", "tensor", "norm_a", "norm_b", "diff_norm", "cosine", "relative_change",
        "effective_rank", "effective_rank_a", "effective_rank_b",
    }
    assert set(back["layer_change"][0]) == {"layer", "diff_norm", "norm_a", "relative_change", "tensors"}
    assert set(back["overlap"]) == {"cosine_all", "matrix_subspace_overlap", "matrix_layers"}


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama saved as is (single file and sharded) and with a rank-2 matrix patch merged
    into layers 0 and 2."""
    root = tmp_path_factory.mktemp("ckpt")
    model = tiny_model("llama")
    fam = family_for(model)
    model.save_pretrained(root / "base")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    g = torch.Generator().manual_seed(3)
    d = model.config.hidden_size
    patch = ThoughtPatch(3, d)
    patch.matrices[0] = 0.01 * torch.randn(d, 2, generator=g) @ torch.randn(2, d, generator=g)  # rank 2
    patch.matrices[2] = 0.03 * torch.randn(d, 2, generator=g) @ torch.randn(2, d, generator=g)
    patched = copy.deepcopy(model)
    merge(patched, fam, patch)
    patched.save_pretrained(root / "patched")
    return root, model, patched


def test_checkpoint_diff_sees_only_the_merged_projections(checkpoints):
    root, model, _ = checkpoints
    rep = diff_paths(str(root / "base"), str(root / "patched"))
    assert rep.kind == "checkpoint" and rep.overlap is None
    assert {(t.layer, t.tensor) for t in rep.tensors} == {
        (l, f"mlp.{p}_proj.weight") for l in (0, 2) for p in ("gate", "up")
    }
    for t in rep.tensors:
        assert t.diff_norm > 0 and 0 < t.relative_change < 1 and 0.5 < t.cosine < 1
        assert 1.0 <= t.effective_rank <= 2.0 + 1e-3  # the update W A has rank ≤ rank(A) = 2
        assert t.effective_rank_a is None and t.effective_rank_b is None
    n_layer_tensors = sum(1 for k in model.state_dict() if ".layers." in k)
    assert f"{n_layer_tensors - 4} layer tensors identical" in rep.notes
    assert any(n.startswith("3 tensors outside the decoder layers not compared") for n in rep.notes)
    assert rep.top_layers == [2, 0]
    rows = {r["layer"]: r for r in rep.layer_change}
    assert rows[1]["diff_norm"] == 0 and rows[1]["relative_change"] == 0
    assert rows[2]["diff_norm"] == pytest.approx(math.sqrt(sum(t.diff_norm**2 for t in rep.tensors if t.layer == 2)))
    assert 0 < rows[0]["relative_change"] < rows[2]["relative_change"]
    json.dumps(rep.to_json(), allow_nan=False)


def test_sharded_checkpoint(checkpoints):
    root, _, _ = checkpoints
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((root / "sharded").glob("*.safetensors"))) > 1
    same = diff_paths(str(root / "base"), str(root / "sharded"))
    assert same.tensors == [] and same.top_layers == []
    assert any(n.endswith("layer tensors identical") for n in same.notes)
    rep = diff_paths(str(root / "sharded"), str(root / "patched"))
    assert {(t.layer, t.tensor) for t in rep.tensors} == {
        (l, f"mlp.{p}_proj.weight") for l in (0, 2) for p in ("gate", "up")
    }


def test_state_dicts_notes():
    torch.manual_seed(0)
    sa = {
        "model.layers.0.mlp.down_proj.weight": torch.randn(4, 6),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4),
        "model.layers.1.input_layernorm.weight": torch.ones(4),
        "model.embed_tokens.weight": torch.randn(10, 4),
    }
    sb = {k: v.clone() for k, v in sa.items()}
    sb["model.layers.0.mlp.up_proj.weight"] = torch.randn(6, 5)
    sb["model.layers.1.input_layernorm.weight"] = torch.full((4,), 2.0)
    sb["model.layers.1.mlp.down_proj.bias"] = torch.zeros(4)
    sb["model.embed_tokens.weight"] += 1
    rep = diff_state_dicts(sa, sb, "base", "new")
    assert [(t.layer, t.tensor) for t in rep.tensors] == [(1, "input_layernorm.weight")]
    t = rep.tensors[0]
    assert t.relative_change == pytest.approx(1.0) and t.cosine == pytest.approx(1.0) and t.effective_rank is None
    assert rep.notes == [
        "1 layer tensors identical",
        "1 tensor only in new, e.g. model.layers.1.mlp.down_proj.bias",
        "1 tensors with different shapes not compared, e.g. model.layers.0.mlp.up_proj.weight (6, 4) vs (6, 5)",
        "1 tensors outside the decoder layers not compared, e.g. model.embed_tokens.weight",
    ]
    assert isinstance(rep, DiffReport) and rep.top_layers == [1]


# --------------------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path, checkpoints):
    root, _, _ = checkpoints
    good = saved(random_patch(), tmp_path / "p.safetensors")
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(InputError) as e:
        diff_paths(good, missing)
    assert one_line(e) == f"{missing}: not found"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError) as e:
        diff_paths(str(empty), good)
    assert one_line(e) == f"{empty}: not a patch, run folder or checkpoint folder"

    for a, b in ((good, str(root / "base")), (str(root / "base"), good)):
        with pytest.raises(InputError) as e:
            diff_paths(a, b)
        assert one_line(e) == "cannot compare a patch with a checkpoint"

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x13\x37 this is not a safetensors file at all" * 3)
    with pytest.raises(PatchError) as e:
        diff_paths(good, str(garbage))
    assert one_line(e).startswith(f"{garbage}: not a readable safetensors file")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((root / "base" / "config.json").read_text())
    with pytest.raises(InputError) as e:
        diff_paths(str(root / "base"), str(broken))
    assert one_line(e) == f"{broken}: checkpoint folder has no .safetensors weights (only safetensors are read)"
    (broken / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(InputError) as e:
        diff_paths(str(broken), str(root / "base"))
    assert one_line(e).startswith(f"{broken / 'model.safetensors'}: not a readable safetensors file")
