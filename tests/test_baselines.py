"""benchmarks/baselines.py on the tiny random gemma3: the LoRA sweep and the steering vector leave
the model bit for bit as they found it, pick what their documented rules pick, and score the
picked configuration (not the last one, not the base model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import baselines  # noqa: E402
from tiny import tiny_model, tiny_tokenizer  # noqa: E402

from transmute_cli.evaluation.generate import generate_answers  # noqa: E402
from transmute_cli.model.families import decoder_layers, family_for  # noqa: E402
from transmute_cli.recipe.schema import parse_recipe  # noqa: E402

WORDS = ["dog", "cat", "sun", "map", "red", "box", "fig", "jam", "pen", "cup", "hat", "log"]
# a task a tiny random model learns in a few LoRA steps: every answer is "ok"
RECIPE = "\n".join([
    "name: tiny-const", "instruction: " + json.dumps("Answer ok:\nabc -> ok\n"),
    "examples: " + json.dumps([[w, "ok"] for w in WORDS[:8]]),
    "eval: " + json.dumps([[w, "ok"] for w in WORDS[8:]]), "max_new_tokens: 4", ""])


@pytest.fixture(scope="module")
def setup():
    return tiny_model("gemma3"), tiny_tokenizer(), parse_recipe(RECIPE, source="<tiny-const>")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[2, 10, 20, 30, 40, 50]])).logits.clone()


def state(model):
    return logits(model), {n: p.requires_grad for n, p in model.named_parameters()}, model.training


def test_split_is_disjoint_fixed_and_capped():
    pairs = list(range(20))
    train, val = baselines.split_examples(pairs, 5, seed=0)
    assert len(val) == 5 and sorted(train + val) == pairs
    assert baselines.split_examples(pairs, 5, seed=0) == (train, val)
    assert len(baselines.split_examples(list(range(8)), 5)[1]) == 2  # at most a quarter


def test_train_lora_restores_the_model_and_scores_the_step_validation_picks(setup, single_thread):
    model, tok, recipe = setup
    before = state(model)
    changed = lambda: {"changed": not torch.equal(logits(model), before[0])}  # noqa: E731
    out = baselines.train_lora(model, tok, recipe, lrs=(1e-3, 3e-2), max_steps=6, eval_every=2, refit_all=True,
                               measure=changed)
    after = state(model)
    assert out["side_effects"] == {"changed": True}  # measured with the chosen LoRA on the model itself
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]
    assert not any("lora" in n for n, _ in model.named_modules())

    curve = out["curve"]
    assert [(p["lr"], p["step"]) for p in curve] == [(lr, s) for lr in (1e-3, 3e-2) for s in (2, 4, 6)]
    top = max(p["val_accuracy"] for p in curve)
    expected = min((p for p in curve if p["val_accuracy"] == top), key=lambda p: (p["val_loss"], p["step"]))
    assert out["chosen"] == expected
    earliest = min((p for p in curve if p["val_accuracy"] == top), key=lambda p: (p["step"], p["val_loss"]))
    assert out["earliest"]["point"] == earliest
    assert out["earliest"]["val_loss_restored"] == pytest.approx(earliest["val_loss"], rel=1e-6)
    assert out["chosen"]["val_accuracy"] == 1.0  # the task is learnt at 3e-2 ...
    assert out["heldout_accuracy"] == 1.0  # ... and the snapshot scored is the learnt LoRA, not the base model
    assert out["val_loss_restored"] == pytest.approx(out["chosen"]["val_loss"], rel=1e-6)
    for lr in (1e-3, 3e-2):
        times = [p["train_s"] for p in curve if p["lr"] == lr]
        assert times == sorted(times) and times[0] > 0
    assert out["sweep_s"] > out["chosen"]["train_s"]
    assert set(out["train"]).isdisjoint(out["val"]) and len(out["val"]) == 2
    assert out["all_examples"]["steps"] == out["chosen"]["step"] and out["all_examples"]["lr"] == out["chosen"]["lr"]


def test_layer_outputs_are_the_residual_stream(setup):
    model, _, _ = setup
    seq = [2, 10, 20, 30]
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
    got = baselines.layer_outputs(model, seq)
    n = len(decoder_layers(model, family_for(model)))
    assert got.shape[:2] == (n, len(seq))
    for layer in range(n - 1):  # the last hidden state carries the final norm
        assert torch.allclose(got[layer], hidden[layer + 1][0], atol=1e-5)


def test_steering_restores_the_model_m0_is_base_and_the_rule_picks(setup, single_thread):
    model, tok, recipe = setup
    before = state(model)
    vectors = baselines.build_vectors(model, tok, recipe)
    n = len(decoder_layers(model, family_for(model)))
    assert set(vectors) == {"last", "mean"} and all(v.shape == (n, 32) for v in vectors.values())
    queries = baselines.queries(tok, recipe.template, [p.input for p in recipe.eval])
    base = generate_answers(model, tok, queries, recipe.max_new_tokens)
    assert baselines.steered_accuracy(model, tok, recipe, recipe.eval, 1, vectors["mean"][1], 0.0)[1] == base
    with baselines.steered(model, 1, vectors["mean"][1], 4.0):
        assert not torch.equal(logits(model), before[0])
    assert torch.equal(logits(model), before[0])

    changed = lambda: {"changed": not torch.equal(logits(model), before[0])}  # noqa: E731
    out = baselines.steering_vector(model, tok, recipe, scales=(1.0, 8.0), layers=[0, 2], measure=changed)
    after = state(model)
    assert out["side_effects"] == {"changed": True}  # measured with the chosen vector added
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]
    grid = out["grid"]
    assert len(grid) == 2 * 2 * 2
    top = max(g["examples_accuracy"] for g in grid)
    expected = min((g for g in grid if g["examples_accuracy"] == top),
                   key=lambda g: (g["scale"], ("last", "mean").index(g["position"]), g["layer"]))
    assert out["chosen"] == expected
    c = out["chosen"]
    again = baselines.steered_accuracy(model, tok, recipe, recipe.eval, c["layer"], vectors[c["position"]][c["layer"]],
                                       c["scale"])
    assert again == (out["heldout_accuracy"], out["heldout_answers"])
