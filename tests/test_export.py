"""PEFT export: `PeftModel.from_pretrained(base, DIR)` loads the adapter; at full rank it is the
in-process patch (matrices exactly; the vector through its least-squares fold)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from transmute_cli.cli import app
from transmute_cli.engine.loop import EngineConfig, compute_patch
from transmute_cli.artifacts.lora import lora_pair
from transmute_cli.model.families import family_for
from transmute_cli.engine.hooks import ThoughtHooks

from tiny import tiny_model, tiny_tokenizer

peft = pytest.importorskip("peft")

WORDS = ["dog", "cat", "sun", "moon", "tree", "lamp", "fish", "bird"]


def test_lora_pair_is_the_truncated_svd():
    torch.manual_seed(0)
    delta = torch.randn(12, 3) @ torch.randn(3, 8)  # rank 3
    a, b, e = lora_pair(delta, 3)
    assert torch.allclose(b @ a, delta, atol=1e-5) and e == pytest.approx(1.0)
    a, b, e = lora_pair(delta, 1)
    assert 0 < e < 1 and a.shape == (1, 8) and b.shape == (12, 1)
    a, b, _ = lora_pair(delta, 20)  # more rank than the matrix has: its own rank
    assert a.shape == (3, 8) and torch.allclose(b @ a, delta, atol=1e-5)
    a, b, e = lora_pair(delta)  # no rank: exact
    assert a.shape == (3, 8) and torch.allclose(b @ a, delta, atol=1e-5) and e == pytest.approx(1.0)


def test_lora_pair_of_factors_is_exact_or_the_truncated_svd():
    """A factored update is its own pair (no SVD) at its rank; below it, the same best rank-r
    update as an SVD of the dense matrix (through QR of the factors)."""
    from transmute_cli.engine.lowrank import LowRank

    g = torch.Generator().manual_seed(3)
    lr = LowRank(torch.randn(20, 6, generator=g), torch.randn(6, 14, generator=g))
    a, b, e = lora_pair(lr)
    assert a is not None and torch.equal(b @ a, lr.left @ lr.right) and e == 1.0
    u, s, vh = torch.linalg.svd(lr.dense().double(), full_matrices=False)
    for rank in (1, 4):
        a, b, e = lora_pair(lr, rank)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert a.shape == (rank, 14) and torch.allclose((b @ a).double(), best, atol=1e-5 * float(s[0]))
        assert e == pytest.approx(float((s[:rank] ** 2).sum() / (s ** 2).sum()), rel=1e-6)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    model = tiny_model("llama")
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    ex = "\n".join(f"  - [{w}, {w[::-1]}]" for w in WORDS)
    (root / "r.yaml").write_text(f"model: {root / 'model'}\ninstruction: |\n  Reverse the word:\n  abc -> cba\n"
                                 f"examples:\n{ex}\neval:\n  - [pot, top]\n  - [bus, sub]\nrho: 0.1\nsolver: joint\n"
                                 "max_new_tokens: 4\n")
    res = CliRunner().invoke(app, ["compute", str(root / "r.yaml"), "-o", str(root / "run"), "--device", "cpu", "-q",
                                   "--no-checkpoint"])
    assert res.exit_code == 0, res.output
    return root


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


# default: each module at its factors' rank, the vector as lora_bias (Llama): the adapter is the patch
@pytest.mark.parametrize("rank", [None, 2])
def test_apply_format_peft_loads_with_peft(run, rank):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = run / f"adapter-{rank}"
    res = CliRunner().invoke(app, ["apply", str(run / "run"), "--format", "peft", *(["--rank", str(rank)] if rank else []),
                                   "-o", str(out), "--device", "cpu", "--json", "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)["adapter"]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert doc["rank"] == rank and len(doc["energy"]) == 3 * 3  # 3 layers × gate, up, down
    assert doc["vector"] == "bias"  # Llama: the vector is added at down_proj's own output
    assert "Warning" not in res.stderr, res.stderr  # -q: nothing at all from peft or transformers
    # what a user keeps: the base as given (not a machine-local cache path), a card that says what it is
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(run / "model") and config["lora_bias"] is True
    card = (out / "README.md").read_text()
    assert "More Information Needed" not in card and "Reverse the word" in card
    assert ("exact ranks" in card and "lora_bias" in card) if rank is None else f"rank {rank}" in card
    assert "cannot `merge_and_unload()`" in card  # Llama: the vector is a lora_bias at either rank
    side = json.loads((out / "transmute.json").read_text())
    assert side["base_model"] == str(run / "model") and side["adapter"]["rank"] == rank and "max_new_tokens" in side["recipe"]
    if rank is None:
        # 8 examples of ~6 tokens: factors of rank ~50, one pair per module at exactly that rank
        assert doc["exact"] is True and doc["mean_energy"] == pytest.approx(1.0, abs=1e-12)
        assert config["rank_pattern"] and set(config["rank_pattern"].values()) == {e["rank"] for e in doc["energy"]}
        assert doc["top1_agreement_vs_in_process"] == 1.0 and doc["mean_kl_vs_in_process"] < 1e-6
    else:
        assert doc["mean_energy"] < 1.0 and doc["exact"] is False
        assert all(e["rank"] == rank for e in doc["energy"])
    assert "accuracy" in doc and "accuracy_in_process" in doc
    # reloaded with plain peft (no transmute code), on the patch texts: the adapter moves the
    # model toward the in-process patch — all the way but the vector fold at full rank
    from transmute_cli.artifacts.patch import load_patch

    base = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    tok = tiny_tokenizer()
    ids = torch.tensor([tok("".join(f"{w} -> {w[::-1]}\n" for w in WORDS[:4]))["input_ids"]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        with ThoughtHooks(base, family_for(base)) as hooks:
            hooks.set_patch(load_patch(run / "run" / "patch.safetensors"))
            ref = base(input_ids=ids).logits
        got = PeftModel.from_pretrained(base, str(out))(input_ids=ids).logits
    if rank is None:  # exact: the patch itself, to float32 rounding
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
    else:  # measured KL to the patch: rank 2 0.033, the base model 0.046
        assert _kl(ref, got) < _kl(ref, plain), (_kl(ref, got), _kl(ref, plain))


def test_full_rank_matrix_only_adapter_is_exact(tmp_path):
    from peft import PeftModel

    from transmute_cli.artifacts.lora import export_peft

    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    texts = [f"{w} -> {w[::-1]}\n" for w in WORDS]
    patch = compute_patch(model, tok, "Reverse:\nabc -> cba\n", texts,
                          EngineConfig(components=("matrix",), solver="joint", fidelity=False)).patch
    fam = family_for(model)
    export_peft(model, fam, patch, 64, tmp_path / "a", "tiny", None)
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    with torch.no_grad(), ThoughtHooks(model, fam) as hooks:
        hooks.set_patch(patch)
        ref = model(input_ids=ids).logits
    with torch.no_grad():
        got = PeftModel.from_pretrained(model, str(tmp_path / "a"))(input_ids=ids).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_factored_patch_exports_its_own_factors(tmp_path, family):
    """Few tokens (T <= d/2): the patch is stored as factors of rank T and the default adapter is
    made of them, one module at rank T each: on Llama (vector as lora_bias) the adapter is the
    in-process patch to float32 rounding; on Gemma 3 the vector is folded (approximate) and the
    matrices alone are exact."""
    from peft import PeftModel

    from transmute_cli.artifacts.checkpoint import token_batches
    from transmute_cli.artifacts.lora import export_peft
    from transmute_cli.engine.lowrank import LowRank
    from transmute_cli.model.loading import Loaded
    from transmute_cli.artifacts.patch import ThoughtPatch
    from transmute_cli.artifacts.merge import fold_statistics

    model, tok = tiny_model(family), tiny_tokenizer()
    fam = family_for(model)
    texts = ["a -> b\n", "c -> d\n"]
    patch = compute_patch(model, tok, "Reverse:\nxy -> yx\n", texts, EngineConfig(fidelity=False)).patch
    assert all(isinstance(m, LowRank) for m in (*patch.matrices.values(), *patch.downs.values()))
    t = patch.matrices[0].rank
    assert t == sum(len(tok(x, add_special_tokens=False)["input_ids"]) for x in texts)  # a direction per token
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    for name, p in (("full", patch), ("matrices", ThoughtPatch(patch.n_layers, patch.d_model, patch.matrices, {},
                                                             downs=patch.downs))):
        stats = None
        if p.vectors and family == "gemma3":
            loaded = Loaded(model, tok, fam, None, "x", "float32")
            stats = fold_statistics(model, fam, p, token_batches(loaded, texts))
        info = export_peft(model, fam, p, None, tmp_path / name, "tiny", stats)
        assert {e["rank"] for e in info["energy"]} <= {t, t + 1} and info["mean_energy"] == 1.0
        with torch.no_grad(), ThoughtHooks(model, fam) as hooks:
            hooks.set_patch(p)
            ref = model(input_ids=ids).logits
        with torch.no_grad():
            peft_model = PeftModel.from_pretrained(model, str(tmp_path / name))
            got = peft_model(input_ids=ids).logits
            peft_model.unload()
        exact = info["exact"]
        assert exact == (family == "llama" or name == "matrices")
        if exact:
            assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


@pytest.mark.parametrize("shape, true_rank", [((40, 16), 16), ((16, 40), 16), ((30, 20), 5), ((20, 30), 5)])
def test_lora_pair_matches_the_svd_for_tall_wide_and_low_rank(shape, true_rank):
    """The Gram route gives the same best rank-r update and energy as torch's SVD."""
    torch.manual_seed(1)
    out, inn = shape
    delta = torch.randn(out, true_rank) @ torch.randn(true_rank, inn) * torch.logspace(0, -2, inn)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    for rank in (1, 3, true_rank, 64):
        a, b, e = lora_pair(delta, rank)
        r = min(rank, true_rank)
        best = (u[:, :r] * s[:r]) @ vh[:r]
        assert torch.allclose((b @ a).double(), best, atol=1e-5 * float(s[0])), rank
        assert e == pytest.approx(float((s[:r] ** 2).sum() / (s ** 2).sum()), abs=1e-9)
        assert a.shape == (r, inn) and b.shape == (out, r)
