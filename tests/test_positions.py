"""Token weights inside the example texts: which positions of x a fit counts, and how much.
Ground truth first (layer 0 against the weighted closed form from captured activations; weight 1
everywhere is no weights at all), then the propagation (incremental == naive), the checks, and the
chat parts (``chat.Positions``: the system turn's close, the user turns, the answer's first tokens)."""

from __future__ import annotations

import pytest
import torch

from test_chat import SYSTEM, chat_tokenizer
from test_preserve import INSTRUCTION, TEXTS
from tiny import assert_same_patch, tiny_model, tiny_tokenizer
from transmute_cli.engine.hooks import capture
from transmute_cli.engine.loop import EngineConfig, compute_patch
from transmute_cli.errors import InputError
from transmute_cli.model.families import decoder_layers, family_for
from transmute_cli.model.tokens import encode, micro_batches, token_ids
from transmute_cli.recipe.chat import Positions, chat_format
from transmute_cli.recipe.datafiles import Pair


def _captured(model, ids: list[int], start: int, key: str) -> torch.Tensor:
    fam = family_for(model)
    with torch.no_grad(), capture(decoder_layers(model, fam)[0], fam) as c:
        model(input_ids=torch.tensor([ids]))
    return c[key][0, start:].double()


def _weights(tok, texts, pattern=(0.0, 2.0, 0.5, 1.0)):
    """A weight per token, cycling through ``pattern`` (every text keeps a non-zero one)."""
    return [[pattern[t % len(pattern)] for t in range(len(token_ids(tok, x)))] for x in texts]


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_layer0_with_token_weights_matches_the_weighted_closed_form(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    rho = 0.2
    weights = _weights(tok, TEXTS)
    cfg = EngineConfig(rho=rho, components=("matrix", "vector"), solver="independent", layers=[0], fidelity=False,
                       micro_batch=2)
    res = compute_patch(model, tok, INSTRUCTION, TEXTS, cfg, weights=weights).patch
    got, got_vec = res.matrices[0].double(), res.vectors[0].double()

    enc = encode(tok, INSTRUCTION, TEXTS)
    pre, instr = list(enc.pre), list(enc.instruction)
    n = torch.cat([_captured(model, pre + list(x), len(pre), "n") for x in enc.texts])
    n_ctx = torch.cat([_captured(model, pre + instr + list(x), len(pre) + len(instr), "n") for x in enc.texts])
    w = torch.tensor([v for ws in weights for v in ws], dtype=torch.float64)
    keep = w > 0
    n, n_ctx, w = n[keep], n_ctx[keep], w[keep]
    nn = n.T @ (w[:, None] * n)
    d = nn.shape[0]
    rank = min(d, int(keep.sum()))
    want = (n_ctx - n).T @ (w[:, None] * n) @ torch.linalg.inv(nn + rho * torch.trace(nn) / rank * torch.eye(d, dtype=nn.dtype))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (got - want).abs().max()
    # the vector: the weighted mean of the gaps in u (the state the thought vector is added to)
    u = torch.cat([_captured(model, pre + list(x), len(pre), "u") for x in enc.texts])[keep]
    u_ctx = torch.cat([_captured(model, pre + instr + list(x), len(pre) + len(instr), "u") for x in enc.texts])[keep]
    want_vec = (w[:, None] * (u_ctx - u)).sum(0) / w.sum()
    assert torch.allclose(got_vec, want_vec, rtol=1e-4, atol=1e-6), (got_vec - want_vec).abs().max()
    # and the weights did change both
    plain = compute_patch(model, tok, INSTRUCTION, TEXTS, cfg).patch
    assert (plain.matrices[0].double() - got).norm() > 1e-3 * got.norm()
    assert (plain.vectors[0].double() - got_vec).norm() > 1e-3 * got_vec.norm()


@pytest.mark.parametrize("solver", ["independent", "joint"])
def test_weight_one_everywhere_is_no_weights(solver):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = EngineConfig(rho=0.1, solver=solver, batches=2, micro_batch=2, fidelity=False)
    plain = compute_patch(model, tok, INSTRUCTION, TEXTS, cfg).patch
    ones = compute_patch(model, tok, INSTRUCTION, TEXTS, cfg, weights=_weights(tok, TEXTS, (1.0,))).patch
    assert_same_patch(plain, ones, atol=1e-6, rtol=1e-5)


def test_a_uniform_weight_is_no_weights_too():
    """ρ is relative to the data's own scale, so weighting every token 3 changes nothing."""
    model, tok = tiny_model("gemma3"), tiny_tokenizer()
    cfg = EngineConfig(rho=0.1, solver="joint", micro_batch=2, fidelity=False)
    plain = compute_patch(model, tok, INSTRUCTION, TEXTS, cfg).patch
    threes = compute_patch(model, tok, INSTRUCTION, TEXTS, cfg, weights=_weights(tok, TEXTS, (3.0,))).patch
    assert_same_patch(plain, threes)


@pytest.mark.parametrize("solver", ["independent", "joint"])
def test_token_weights_incremental_equals_naive(solver):
    model, tok = tiny_model("gemma3"), tiny_tokenizer()
    base = dict(rho=0.05, batches=2, solver=solver, micro_batch=2, fidelity=False)
    weights = _weights(tok, TEXTS)
    inc = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(**base), weights=weights).patch
    nai = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(propagation="naive", **base), weights=weights).patch
    assert_same_patch(inc, nai)


def test_micro_batch_groups_cover_the_weighted_tokens_once():
    tok = tiny_tokenizer()
    weights = _weights(tok, TEXTS)
    (mb,) = micro_batches(encode(tok, INSTRUCTION, TEXTS, weights=weights), list(range(len(TEXTS))), 8, 0, "cpu")
    groups = list(mb.groups())
    assert sorted(w for _, w in groups) == [0.5, 1.0, 2.0]  # weight 0 is no group
    covered = sum(m.long() for m, _ in groups)
    assert covered.max() == 1 and int(covered.sum()) == sum(v > 0 for ws in weights for v in ws)


def test_bad_token_weights():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = EngineConfig(fidelity=False)
    w = _weights(tok, TEXTS, (1.0,))
    with pytest.raises(ValueError, match="token weight lists"):
        compute_patch(model, tok, INSTRUCTION, TEXTS, cfg, weights=w[:-1])
    with pytest.raises(ValueError, match="token weights for"):
        compute_patch(model, tok, INSTRUCTION, TEXTS, cfg, weights=[ws[:-1] for ws in w])
    for bad in (-1.0, float("nan"), 0.0):
        with pytest.raises(InputError, match="examples\\[0\\]"):
            compute_patch(model, tok, INSTRUCTION, TEXTS, cfg, weights=[[bad] * len(w[0]), *w[1:]])


def test_chat_positions_weigh_the_system_close_the_turns_and_the_answer_apart():
    tok = chat_tokenizer()
    f = chat_format(tok, SYSTEM)
    pairs = [Pair("And now?", "Oui oui.", history=("Hi!", "Salut!")), Pair("Q?", "R.")]
    texts = f.texts(pairs, answer=True, where="examples")
    pos = Positions(lead=0.0, turns=0.25, first=4.0, first_tokens=2)
    for p, x, w in zip(pairs, texts, f.token_weights(pairs, texts, pos)):
        ids = token_ids(tok, x)
        assert len(w) == len(ids)
        lead = len(token_ids(tok, "<|im_end|>\n<|im_start|>user\n"))
        query = f.turns(p.messages(False), generation_prompt=True)
        start = len(token_ids(tok, query))
        assert ids[:start] == token_ids(tok, query)
        assert w[:lead] == [0.0] * lead
        assert w[lead:start] == [0.25] * (start - lead)
        assert w[start:start + 2] == [4.0, 4.0]
        assert w[start + 2:] == [1.0] * (len(ids) - start - 2)
        assert tok.decode(ids[start:]).startswith(p.output[:2])  # the answer starts where weight 4 does
    assert Positions().uniform and Positions(first=3.0).uniform and not pos.uniform
    assert f.token_weights(pairs, texts, Positions()) == [[1.0] * len(token_ids(tok, x)) for x in texts]


# --------------------------------------------------------------------------- the recipe key


BASE = "model: m\ninstruction: Be brief.\nexamples:\n  - [Hi there, Bonjour.]\n  - [And you, Et toi.]\n"


def test_turns_weight_defaults_to_the_measured_setting_and_needs_chat():
    from transmute_cli import defaults
    from transmute_cli.errors import RecipeError
    from transmute_cli.recipe.schema import parse_recipe

    assert parse_recipe(BASE + "chat: true\n").turns_weight == defaults.TURNS_WEIGHT
    assert parse_recipe(BASE + "chat: true\nturns_weight: 3\n").turns_weight == 3.0
    with pytest.raises(RecipeError, match="r.yaml: turns_weight: .*needs chat: true"):
        parse_recipe(BASE + "turns_weight: 3\n", source="r.yaml")
    with pytest.raises(RecipeError, match="r.yaml: turns_weight: "):
        parse_recipe(BASE + "chat: true\nturns_weight: -1\n", source="r.yaml")


def test_the_fit_passes_a_chat_recipes_turns_weight_to_the_engine(monkeypatch):
    import types

    from transmute_cli.pipeline import prepare
    from transmute_cli.recipe.schema import parse_recipe

    tok = chat_tokenizer()
    f = chat_format(tok, SYSTEM)
    seen = {}
    monkeypatch.setattr(prepare, "compute_patch", lambda *a, **k: seen.update(k))
    monkeypatch.setattr(prepare, "broad_moments", lambda *a: None)
    loaded = types.SimpleNamespace(model=None, tokenizer=tok)
    for text, uniform in ((BASE + "chat: true\n", True), (BASE + "chat: true\nturns_weight: 3\n", False)):
        recipe = parse_recipe(text)
        prepare.fit(recipe, loaded, chat=f)
        if uniform:
            assert seen["weights"] is None
        else:
            texts = prepare.patch_texts(recipe, f)
            assert seen["weights"] == f.token_weights(recipe.examples, texts, Positions(turns=3.0))
            assert {v for w in seen["weights"] for v in w} == {1.0, 3.0}
