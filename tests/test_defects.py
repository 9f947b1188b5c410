"""Regression tests for defects found by reading and running the code (each failed before its fix):
the Gemma 3 vector fold's normaliser, the modes of written files, accelerate's forward wrappers
kept by the layer recording, recipes with relative *_file paths through apply and eval, a disk
device map through the CLI, and held-out fidelity in report.json."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
import yaml
from typer.testing import CliRunner

from transmute_cli.cli import app
from transmute_cli.engine.loop import EngineConfig, compute_patch
from transmute_cli.artifacts.patch import ThoughtPatch
from transmute_cli.evaluation.generate import evaluate
from transmute_cli.evaluation.heldout import heldout_fidelity
from transmute_cli.model.families import decoder_layers, family_for, get_module
from transmute_cli.engine.hooks import ThoughtHooks, record_layer_inputs
from transmute_cli.artifacts.merge import fold_statistics
from transmute_cli.recipe.datafiles import Pair

from tiny import tiny_model, tiny_tokenizer

INSTRUCTION = "Reverse the word:\nabc -> cba\nhat -> tah\n"
WORDS = ("dog", "cat", "sun", "pen", "map", "cup")
TEXTS = [f"{w} -> {w[::-1]}\n" for w in WORDS]
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("single_thread")


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return res


def test_gemma_fold_normalises_the_down_output_with_its_down_matrix():
    """The Gemma 3 post-MLP norm divides by rms((W_down + D) a) in process and in the checkpoint;
    the fold statistics must use that, not rms(W_down a)."""
    model, tok = tiny_model("gemma3"), tiny_tokenizer()
    fam = family_for(model)
    patch = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(rho=0.1, solver="joint", fidelity=False)).patch
    assert patch.downs and patch.vectors
    ids = torch.tensor([tok("dog -> god\n")["input_ids"]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    got = fold_statistics(model, fam, patch, [(ids, mask)])
    # ground truth: what the post-MLP norm really receives with the patch in place
    layers = decoder_layers(model, fam)
    seen: dict[int, dict] = {}
    handles = []
    for l in got:
        def pre_down(_m, args, l=l):
            seen.setdefault(l, {})["a"] = args[0].detach()

        def pre_norm(_m, args, l=l):
            seen.setdefault(l, {})["m"] = args[0].detach()

        handles.append(get_module(layers[l], fam.mlp_down).register_forward_pre_hook(pre_down))
        handles.append(get_module(layers[l], fam.mlp_out).register_forward_pre_hook(pre_norm))
    try:
        with torch.no_grad(), ThoughtHooks(model, fam) as hooks:
            hooks.set_patch(patch)
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    for l, st in got.items():
        a, m = seen[l]["a"][0].double(), seen[l]["m"][0].double()
        eps = float(get_module(layers[l], fam.mlp_out).eps)
        at = a / torch.sqrt(m.pow(2).mean(-1, keepdim=True) + eps)
        # the fold direction g = (Σ ããᵀ + λI)⁻¹ Σ ã, λ = 1e-3 of the mean eigenvalue (closed form, f×f)
        aa = at.T @ at
        lam = 1e-3 * torch.trace(aa) / aa.shape[0]
        want = torch.linalg.solve(aa + lam * torch.eye(aa.shape[0], dtype=aa.dtype), at.sum(0))
        assert torch.allclose(st["g"], want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), l


def test_written_files_get_the_umask_mode(tmp_path):
    """Files passed through the atomic folder (safetensors writes 0600) are readable by others
    under the usual umask 022, like any file the user writes."""
    from transmute_cli.artifacts.outputs import atomic_dir

    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out", overwrite=False) as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp / "a.safetensors"))
            (tmp / "sub").mkdir()
            (tmp / "sub" / "b.txt").write_text("b")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "a.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "sub" / "b.txt").stat().st_mode) == 0o644


def test_layer_recording_keeps_an_existing_forward_wrapper():
    """accelerate wraps a layer's forward as an instance attribute (to move inputs between
    devices); the recording must put it back, not delete it."""
    model = tiny_model("llama")
    fam = family_for(model)
    layers = decoder_layers(model, fam)
    calls = []
    original = layers[1].forward

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layers[1].forward = wrapper
    record_layer_inputs(model, fam, torch.tensor([[2, 5, 6, 7]]))
    assert vars(layers[1]).get("forward") is wrapper
    assert "forward" not in vars(layers[2])  # none was there: none is left behind
    with torch.no_grad():
        model(input_ids=torch.tensor([[2, 5, 6, 7]]))
    assert calls


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma-defects")
    tiny_model("gemma3").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_apply_and_eval_a_run_whose_recipe_names_relative_files(gemma_folder, tmp_path, monkeypatch):
    """The patch records the recipe with its files written in: apply (which folds Gemma's thought
    vectors with the recipe's texts) and eval work from any folder."""
    rdir = tmp_path / "recipes"
    (rdir / "data").mkdir(parents=True)
    (rdir / "data" / "ex.tsv").write_text("".join(f"{w}\t{w[::-1]}\n" for w in WORDS))
    (rdir / "data" / "ev.tsv").write_text("top\tpot\nbag\tgab\n")
    (rdir / "data" / "keep.txt").write_text("plain prose stays as it was.\n")
    recipe = rdir / "rel.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(gemma_folder), "instruction": INSTRUCTION, "examples_file": "data/ex.tsv",
        "eval_file": "data/ev.tsv", "preserve_file": "data/keep.txt", "max_new_tokens": 4}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = tmp_path / "run"
    invoke("compute", recipe, "-o", run, "--device", "cpu", "--quiet", "--no-checkpoint")
    invoke("apply", run, "-o", tmp_path / "ck", "--device", "cpu", "--quiet")
    assert (tmp_path / "ck" / "model.safetensors").is_file()
    res = invoke("eval", run, "--device", "cpu", "--json")
    assert json.loads(res.stdout)["n"] == 2
    res = invoke("eval", tmp_path / "ck", "--device", "cpu", "--json")  # the checkpoint's sidecar recipe too
    assert json.loads(res.stdout)["n"] == 2


def test_compute_with_a_disk_device_map_through_the_cli(gemma_folder, tmp_path):
    """--device-map as a JSON file with layers on disk: the patch equals the in-memory one; the
    checkpoint (which needs every weight in memory) is skipped and the report says so."""
    dmap = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps(dmap))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(gemma_folder), "instruction": INSTRUCTION,
                                      "examples": [[w, w[::-1]] for w in WORDS], "eval": [["top", "pot"]],
                                      "max_new_tokens": 4}))
    invoke("compute", recipe, "-o", tmp_path / "mem", "--device", "cpu", "--quiet", "--no-checkpoint")
    res = invoke("compute", recipe, "-o", tmp_path / "off", "--device-map", tmp_path / "map.json", "--json")
    doc = json.loads(res.stdout)
    assert doc["checkpoint"] == {"skipped": "layers offloaded to disk by the device map"}
    a = json.loads((tmp_path / "mem" / "report.json").read_text())
    assert doc["model"]["fingerprint"] == a["model"]["fingerprint"]  # read from the offloaded weights
    from transmute_cli.artifacts.patch import load_patch

    pa, pb = load_patch(tmp_path / "mem" / "patch.safetensors"), load_patch(tmp_path / "off" / "patch.safetensors")
    for l in pa.matrices:
        assert torch.allclose(pa.matrices[l], pb.matrices[l], rtol=1e-4, atol=1e-5)
    bad = runner.invoke(app, ["compute", str(recipe), "-o", str(tmp_path / "x"), "--device-map", "nowhere.json"])
    assert bad.exit_code == 2 and "--device-map" in bad.stderr and "Traceback" not in bad.stderr


def test_heldout_fidelity_of_an_empty_patch_is_the_unpatched_model():
    """Agreement and KL of a patch that changes nothing equal those of the unpatched model, and
    the KL covers exactly the prompted answers' tokens (stop token included)."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    pairs = [Pair(w, w[::-1]) for w in ("top", "bag", "rim", "pot")]
    empty = ThoughtPatch(model.config.num_hidden_layers, model.config.hidden_size)
    res = {r.condition: r for r in evaluate(model, tok, INSTRUCTION, pairs, ["{input} -> {output}"], empty,
                                            max_new_tokens=4)}
    h = heldout_fidelity(model, tok, INSTRUCTION, pairs, "{input} -> {output}", empty, res["prompt"], res["patched"],
                         res["base"])
    assert h.positions == sum(len(a) for a in res["prompt"].answer_ids) > 0
    assert h.answer_agreement == h.base_answer_agreement
    assert h.mean_kl == pytest.approx(h.base_mean_kl, rel=1e-6) and h.mean_kl > 0
    # and a real patch moves the patched model towards the prompted one
    patch = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(rho=0.01, solver="joint", fidelity=False)).patch
    res = {r.condition: r for r in evaluate(model, tok, INSTRUCTION, pairs, ["{input} -> {output}"], patch,
                                            max_new_tokens=4)}
    h2 = heldout_fidelity(model, tok, INSTRUCTION, pairs, "{input} -> {output}", patch, res["prompt"], res["patched"],
                          res["base"])
    assert h2.mean_kl < h2.base_mean_kl


def test_report_json_has_heldout_fidelity(gemma_folder, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(gemma_folder), "instruction": INSTRUCTION,
                                      "examples": [[w, w[::-1]] for w in WORDS],
                                      "eval": [["top", "pot"], ["bag", "gab"]], "max_new_tokens": 4}))
    invoke("compute", recipe, "-o", tmp_path / "run", "--device", "cpu", "--quiet", "--no-checkpoint")
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    h = rep["fidelity"]["heldout"]
    # what the report says is what heldout_fidelity gives on the saved patch, recomputed here
    from transmute_cli.model.loading import load_model
    from transmute_cli.artifacts.patch import load_patch

    loaded = load_model(str(gemma_folder), device="cpu")
    patch = load_patch(tmp_path / "run" / "patch.safetensors")
    pairs = [Pair("top", "pot"), Pair("bag", "gab")]
    res = {r.condition: r for r in evaluate(loaded.model, loaded.tokenizer, INSTRUCTION, pairs, ["{input} -> {output}"],
                                            patch, max_new_tokens=4)}
    want = heldout_fidelity(loaded.model, loaded.tokenizer, INSTRUCTION, pairs, "{input} -> {output}", patch,
                            res["prompt"], res["patched"], res["base"])
    assert h["queries"] == 2 and h["positions"] == want.positions == sum(len(a) for a in res["prompt"].answer_ids)
    assert h["answer_agreement"] == want.answer_agreement and h["base_answer_agreement"] == want.base_answer_agreement
    assert h["mean_kl"] == pytest.approx(want.mean_kl, rel=1e-4) and h["base_mean_kl"] == pytest.approx(
        want.base_mean_kl, rel=1e-4)
    assert h["base_mean_kl"] > 0
    assert "held-out eval queries" in (tmp_path / "run" / "report.md").read_text()
    # no eval pairs: no held-out figure (and no error)
    recipe.write_text(yaml.safe_dump({"model": str(gemma_folder), "instruction": INSTRUCTION,
                                      "examples": [[w, w[::-1]] for w in WORDS]}))
    invoke("compute", recipe, "-o", tmp_path / "run2", "--device", "cpu", "--quiet", "--no-checkpoint")
    assert json.loads((tmp_path / "run2" / "report.json").read_text())["fidelity"]["heldout"] is None
