"""The CUDA path (skipped without a GPU; benchmarks/gpu_check.sh runs it on a lent one): the
exact token patch, the ridge patch, evaluation with the patch in hooks, a checkpoint and the CLI,
on the GPU, against the same computation on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from transmute_cli.cli import app
from transmute_cli.engine.loop import EngineConfig, compute_patch
from transmute_cli.evaluation.generate import evaluate
from transmute_cli.engine.exact import exact_token_patch
from transmute_cli.recipe.datafiles import Pair
from transmute_cli.engine.lowrank import dense

from tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

INSTRUCTION = "Reverse the word:\nabc -> cba\nhat -> tah\n"
WORDS = ["dog", "cat", "sun", "pen", "map", "cup"]
TEXTS = [f"{w} -> {w[::-1]}\n" for w in WORDS]


def _rel(a, b) -> float:
    a, b = dense(a).double().cpu(), dense(b).double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_exact_token_patch_on_cuda(family):
    model, tok = tiny_model(family).cuda(), tiny_tokenizer()
    res = exact_token_patch(model, tok, INSTRUCTION, TEXTS)
    assert max(e / s for e, s in zip(res.layer_errors, res.layer_scales)) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_patch_on_cuda_is_the_cpu_patch(family):
    tok = tiny_tokenizer()
    cfg = EngineConfig(solver="joint", fidelity=True)
    cpu = compute_patch(tiny_model(family), tok, INSTRUCTION, TEXTS, cfg)
    gpu = compute_patch(tiny_model(family).cuda(), tok, INSTRUCTION, TEXTS, cfg)
    for store in ("matrices", "vectors", "downs"):
        a, b = getattr(gpu.patch, store), getattr(cpu.patch, store)
        assert a.keys() == b.keys()
        for l in a:
            assert _rel(a[l], b[l]) < 1e-3, (store, l, _rel(a[l], b[l]))
    assert gpu.fidelity.mean_kl == pytest.approx(cpu.fidelity.mean_kl, rel=1e-2, abs=1e-5)
    pairs = [Pair(w, w[::-1]) for w in ("top", "bag", "rim")]
    on = {r.condition: r.answers for r in evaluate(tiny_model(family).cuda(), tok, INSTRUCTION, pairs,
                                                   ["{input} -> {output}"], gpu.patch, max_new_tokens=4)}
    off = {r.condition: r.answers for r in evaluate(tiny_model(family), tok, INSTRUCTION, pairs,
                                                    ["{input} -> {output}"], cpu.patch, max_new_tokens=4)}
    assert on == off


def test_bf16_patch_on_cuda_agrees_with_float32():
    tok = tiny_tokenizer()
    f32 = compute_patch(tiny_model("llama").cuda(), tok, INSTRUCTION, TEXTS, EngineConfig(fidelity=False)).patch
    bf = compute_patch(tiny_model("llama").to("cuda", torch.bfloat16), tok, INSTRUCTION, TEXTS,
                       EngineConfig(fidelity=False)).patch
    for l in f32.matrices:
        assert _rel(bf.matrices[l], f32.matrices[l]) < 0.1


def test_cli_compute_on_cuda(tmp_path, tiny_model_dir):
    folder = tiny_model_dir("llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {folder}\ninstruction: {json.dumps(INSTRUCTION)}\nexamples:\n"
                      + "".join(f"  - [{w}, {w[::-1]}]\n" for w in WORDS) + "eval:\n  - [top, pot]\n  - [bag, gab]\n"
                      "max_new_tokens: 4\n")
    res = CliRunner().invoke(app, ["compute", str(recipe), "-o", str(tmp_path / "run"), "--device", "cuda", "--json",
                                   "--quiet"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["model"]["device"].startswith("cuda")
    assert doc["checkpoint"]["top1_agreement_vs_in_process"] == 1.0
