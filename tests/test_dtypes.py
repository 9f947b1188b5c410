"""Model dtypes: a bf16 model's patch is computed with float32/float64 differences and agrees
with the float32 model's; checkpoints are saved in the model's own dtype (float32 only when
asked), measured as saved, and load with plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from transmute_cli.cli import app
from transmute_cli.engine.loop import EngineConfig, compute_patch
from transmute_cli.engine.lowrank import dense
from transmute_cli.model.loading import ModelSource, native_dtype

from tiny import tiny_model, tiny_tokenizer

INSTRUCTION = "Reverse the word:\nabc -> cba\nhat -> tah\n"
WORDS = ["dog", "cat", "sun", "pen", "map", "cup"]
TEXTS = [f"{w} -> {w[::-1]}\n" for w in WORDS]


pytestmark = pytest.mark.usefixtures("single_thread")


def _rel(a, b) -> float:
    a, b = dense(a).double(), dense(b).double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_bf16_model_patch_agrees_with_the_float32_one(family):
    """Same weights (rounded to bf16 once) run in bf16 and in float32: the bf16 run's activations
    carry bf16 rounding, but every sum and difference is taken in float64 after the cast and the
    patch is float32, so the patches agree to a few percent (measured 0.8–4.8% per tensor; the
    layer outputs summed in bf16 before the difference gave up to 6%)."""
    tok = tiny_tokenizer()
    model = tiny_model(family)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # the float32 model holds exactly the bf16 weights
    cfg = EngineConfig(rho=0.1, fidelity=False)
    ref = compute_patch(model, tok, INSTRUCTION, TEXTS, cfg).patch
    got = compute_patch(model.to(torch.bfloat16), tok, INSTRUCTION, TEXTS, cfg).patch
    for store in ("matrices", "vectors", "downs"):
        a, b = getattr(got, store), getattr(ref, store)
        assert set(a) == set(b) and a
        for l in b:
            assert dense(a[l]).dtype == torch.float32  # patches are float32 whatever the model
            assert _rel(a[l], b[l]) < 0.1, (store, l, _rel(a[l], b[l]))


def test_statistics_take_differences_after_the_cast():
    """bf16 states: dz = n^C − n and delta = u^C − u in float64 from the bf16 values, exactly."""
    from transmute_cli.engine.stats import LayerStats

    g = torch.Generator().manual_seed(0)
    n = (100 + torch.randn(3, 8, generator=g)).to(torch.bfloat16)
    nc = (n.float() + 0.01 * torch.randn(3, 8, generator=g)).to(torch.bfloat16)
    st = LayerStats(8)
    st.add(n, nc, n, nc)
    _, dz = st.scaled_rows()
    assert dz.dtype == torch.float64 and torch.equal(dz, nc.double() - n.double())
    assert torch.equal(st.delta, (nc.double() - n.double()).sum(0))


def test_native_dtype(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert native_dtype(ModelSource("x", "folder", str(tmp_path))) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))  # transformers 4 name
    assert native_dtype(ModelSource("x", "folder", str(tmp_path))) == "float16"
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert native_dtype(ModelSource("x", "folder", str(tmp_path))) == "float32"
    (tmp_path / "transmute-source.json").write_text(json.dumps({"gguf": "m.gguf"}))  # a converted GGUF
    assert native_dtype(ModelSource("x", "alias", str(tmp_path))) == "bfloat16"


@pytest.mark.parametrize("flag, want", [([], "bfloat16"), (["--save-dtype", "float32"], "float32")])
def test_checkpoint_saved_in_the_models_own_dtype(tmp_path, flag, want):
    """A model whose config says bfloat16, loaded in float32 for the solve: the checkpoint is
    bfloat16 (half the bytes) unless float32 is asked for, and its figures are measured on the
    folder as saved, reloaded with plain transformers."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "model"
    model = tiny_model("llama")
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(folder), "instruction": INSTRUCTION,
                                      "examples": [[w, w[::-1]] for w in WORDS], "eval": [["top", "pot"], ["bag", "gab"]],
                                      "max_new_tokens": 4}))
    res = CliRunner().invoke(app, ["compute", str(recipe), "-o", str(tmp_path / "run"), "--device", "cpu", "--json",
                                   "-q", *flag])
    assert res.exit_code == 0, res.output
    c = json.loads(res.stdout)["checkpoint"]
    assert c["dtype"] == want and c["top1_agreement_vs_in_process"] > 0.9 and "accuracy" in c
    ck = tmp_path / "run" / "checkpoint"
    assert json.loads((ck / "config.json").read_text())["dtype"] == want
    plain = AutoModelForCausalLM.from_pretrained(ck)  # no transmute code, no dtype given
    assert {p.dtype for p in plain.parameters()} == {getattr(torch, want)}
    # bias fold (Llama's mlp_bias): the vector is in the checkpoint exactly, in either dtype
    assert c["vector_fold"] == "bias" and plain.config.mlp_bias is True


def test_bad_save_dtype_fails_before_any_work(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: nowhere\ninstruction: x\nexamples:\n  - [a, b]\n")
    res = CliRunner().invoke(app, ["compute", str(recipe), "-o", str(tmp_path / "run"), "--save-dtype", "fp8"])
    assert res.exit_code == 2
    assert res.stderr.strip() == "error: --save-dtype: must be auto or one of float32, bfloat16, float16, got 'fp8'"
