"""Greedy answers: transmute's decoder (finished rows leave the batch and the KV cache) gives the
token ids of ``transformers.generate(do_sample=False)`` stopped at the newline, row for row."""

from __future__ import annotations

import pytest
import torch

from transmute_cli.evaluation.generate import generate_answers, greedy_rows, reference_rows
from transmute_cli.model.families import family_for
from transmute_cli.engine.hooks import ThoughtHooks
from transmute_cli.artifacts.patch import ThoughtPatch

from tiny import tiny_model, tiny_tokenizer


def _prompts(tok, n=12):
    torch.manual_seed(0)
    texts = ["dog ->", "a much longer query with several words ->", "x", "7 + 8 =", "cat:", "Q: sun\nA:"]
    out = [tok(t)["input_ids"] for t in texts]
    out += [[tok.bos_token_id or 1] + torch.randint(4, len(tok), (int(k),)).tolist() for k in torch.randint(1, 20, (n,))]
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "mistral"])
@pytest.mark.parametrize("patched", [False, True])
def test_decoder_gives_generates_ids(family, patched):
    model, tok = tiny_model(family).eval(), tiny_tokenizer()
    with torch.no_grad():  # make the newline and EOS likely enough that rows end at different steps
        for token in (tok("\n", add_special_tokens=False)["input_ids"][-1], tok.eos_token_id):
            model.lm_head.weight[token] *= 3.0
    prompts = _prompts(tok)
    plain = greedy_rows(model, tok, prompts, 12)
    with ThoughtHooks(model, family_for(model)) as hooks:
        if patched:  # a patch that moves every layer: the hooks run inside the cached decode too
            n, d = model.config.num_hidden_layers, model.config.hidden_size
            g = torch.Generator().manual_seed(1)
            hooks.set_patch(ThoughtPatch(n_layers=n, d_model=d,
                                         vectors={l: 0.1 * torch.randn(d, generator=g) for l in range(n)},
                                         matrices={l: 0.02 * torch.randn(d, d, generator=g) for l in range(n)}))
        want = reference_rows(model, tok, prompts, 12)
        got = greedy_rows(model, tok, prompts, 12)
    assert got == want
    assert (got != plain) == patched  # the patch changes answers
    assert len({len(r) for r in got}) > 2  # rows really left the batch at different steps
    # and the text answers: cut at the newline, one per prompt, batches of any size alike
    assert generate_answers(model, tok, prompts, 12, batch_size=5) == generate_answers(model, tok, prompts, 12)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "mistral"])
def test_a_shared_prefix_gives_the_ids_of_whole_rows(family):
    """The prompt condition's instruction, run once and its cache copied to every row, gives the
    ids of whole rows; where a sliding window (tiny gemma3: 16) cannot hold prefix + row + answer,
    whole rows are what runs."""
    model, tok = tiny_model(family).eval(), tiny_tokenizer()
    with torch.no_grad():
        for token in (tok("\n", add_special_tokens=False)["input_ids"][-1], tok.eos_token_id):
            model.lm_head.weight[token] *= 3.0
    prefix = tok("ab\n")["input_ids"]
    suffixes = [tok(t, add_special_tokens=False)["input_ids"] for t in ["x ->", "yz ->", "q", "a b ->", "7 =", "c"]]
    shapes: list[tuple] = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                             with_kwargs=True)
    try:
        for n in (6, 12):
            want = greedy_rows(model, tok, [prefix + s for s in suffixes], n)
            shapes.clear()
            assert greedy_rows(model, tok, suffixes, n, prefix=prefix) == want
            shared = shapes[0] == (1, len(prefix))
            assert shared == (family != "gemma3" or len(prefix) + 6 + n <= model.config.sliding_window), shapes[:2]
    finally:
        handle.remove()
