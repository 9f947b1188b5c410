"""Preservation texts: tokens whose target is the original model enter the same least-squares
fits, weighted.  Ground truth first (layer 0 against the closed form from captured activations),
then the propagation (incremental == naive), then the behaviour (the weight trades the task's
fidelity for leaving the preservation texts alone)."""

from __future__ import annotations

import pytest
import torch

from transmute_cli.engine.loop import EngineConfig, compute_patch
from transmute_cli.model.tokens import encode
from transmute_cli.model.families import decoder_layers, family_for
from transmute_cli.engine.hooks import capture

from tiny import assert_same_patch, tiny_model, tiny_tokenizer

INSTRUCTION = "Translate to pig latin:\ncat -> atcay\nhat -> athay\n"
TEXTS = ["dog -> ogday\n", "moon -> oonmay\n", "sun -> unsay\n", "a -> aay\n", "tree -> eetray\n"]
PRESERVE = ["Uppercase:\nab -> AB\ncd -> CD\n", "the quick brown fox jumps over the lazy dog\n", "one two three four\n"]


def _mlp_inputs(model, ids: list[int], start: int) -> torch.Tensor:
    """Layer 0's MLP input (the output of its pre-MLP norm) at positions start.. of one sequence."""
    fam = family_for(model)
    with torch.no_grad(), capture(decoder_layers(model, fam)[0], fam) as c:
        model(input_ids=torch.tensor([ids]))
    return c["n"][0, start:].double()


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_layer0_with_preservation_matches_the_weighted_closed_form(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    rho, w = 0.2, 3.0
    cfg = EngineConfig(rho=rho, components=("matrix",), layers=[0], preserve_weight=w, fidelity=False)
    got = compute_patch(model, tok, INSTRUCTION, TEXTS, cfg, preserve=PRESERVE).patch.matrices[0].double()

    enc = encode(tok, INSTRUCTION, TEXTS, PRESERVE)
    pre, instr = list(enc.pre), list(enc.instruction)
    n = torch.cat([_mlp_inputs(model, pre + list(x), len(pre)) for x in enc.texts])
    n_ctx = torch.cat([_mlp_inputs(model, pre + instr + list(x), len(pre) + len(instr)) for x in enc.texts])
    z = torch.cat([_mlp_inputs(model, pre + list(t), len(pre)) for t in enc.preserve])
    # preservation tokens: the target is the original model, i.e. dz = 0 at layer 0 (nothing before it is patched)
    nn = n.T @ n + w * z.T @ z
    d = nn.shape[0]
    want = (n_ctx - n).T @ n @ torch.linalg.inv(nn + rho * torch.trace(nn) / d * torch.eye(d, dtype=nn.dtype))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (got - want).abs().max()
    # and the preservation texts did change the solution
    plain = compute_patch(model, tok, INSTRUCTION, TEXTS, cfg).patch.matrices[0].double()
    assert (plain - got).norm() > 1e-3 * plain.norm()


@pytest.mark.parametrize("solver", ["independent", "joint"])
def test_preservation_incremental_equals_naive(solver):
    model, tok = tiny_model("gemma3"), tiny_tokenizer()
    base = dict(rho=0.05, batches=2, solver=solver, micro_batch=2, fidelity=False, preserve_weight=0.5)
    inc = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(**base), preserve=PRESERVE).patch
    nai = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(propagation="naive", **base), preserve=PRESERVE).patch
    assert_same_patch(inc, nai)


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_weight_trades_task_fidelity_for_leaving_the_preservation_texts_alone(family):
    model, tok = tiny_model(family), tiny_tokenizer()

    def run(w):
        f = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(rho=0.1, solver="joint", preserve_weight=w),
                          preserve=PRESERVE).fidelity
        return f.mean_kl, f.preserve_mean_kl, f.preserve_tokens

    (task_lo, pres_lo, tokens), (task_hi, pres_hi, _) = run(1e-6), run(30.0)
    assert tokens == sum(len(t) for t in encode(tok, "x", [], PRESERVE).preserve)
    assert pres_lo > 0  # a patch fitted on the task alone does disturb the other texts
    assert pres_hi < 0.2 * pres_lo
    assert task_hi > task_lo  # what it costs


def test_preserve_weight_is_validated():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(Exception, match="preserve_weight"):
            compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(preserve_weight=bad), preserve=PRESERVE)
    with pytest.raises(Exception, match=r"preserve\[1\]"):
        compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(), preserve=["ok\n", ""])
