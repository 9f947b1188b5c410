"""The instruction's cost paid once (prefix keys and values cached), many-shot patches (each
example under the instruction plus other examples as demonstrations), and label-free recipes
(inputs labelled by the prompted model)."""

from __future__ import annotations

import math

import pytest

from transmute_cli.recipe.datafiles import Pair, render
from transmute_cli.engine.loop import EngineConfig, compute_patch
from transmute_cli.errors import InputError
from transmute_cli.evaluation.generate import evaluate
from transmute_cli.model.families import decoder_layers, family_for, get_module
from transmute_cli.engine.lowrank import dense
from transmute_cli.model.loading import Loaded
from transmute_cli.pipeline import format_instruction, label_inputs, many_shot_prompt, patch_contexts, patch_texts
from transmute_cli.recipe.schema import parse_recipe
from transmute_cli.model.tokens import encode, micro_batches

from tiny import tiny_model, tiny_tokenizer

FAMILIES = ["gemma3", "llama", "qwen2", "qwen3", "mistral", "llama_bias"]
# longer than the tiny Gemma 3's sliding window (16 tokens): the cached prefix must respect it
INSTRUCTION = "Reverse each word:\nabc -> cba\nxyz -> zyx\nlog -> gol\n"
TEXTS = ["dog -> god\n", "cat -> tac\n", "sun -> nus\n", "hello -> olleh\n", "ab -> ba\n"]
PRESERVE = ["Plain prose here.\n"]


def _max_rel(a, b) -> float:
    """Largest entry-wise difference of two patches, relative to each tensor's largest entry."""
    worst = 0.0
    for store in ("matrices", "vectors", "downs"):
        x, y = getattr(a, store), getattr(b, store)
        assert x.keys() == y.keys()
        for l in x:
            dx, dy = dense(x[l]), dense(y[l])
            worst = max(worst, float((dx - dy).abs().max() / dy.abs().max()))
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_prefix_gives_the_patch_of_rerunning_it(family, single_thread):
    """Same maths three ways: prefix keys/values cached (default), the prefix rerun with every
    micro-batch at every layer, and the whole model rerun per layer (naive) — to float32 rounding,
    with preservation texts and with micro-batches smaller than the batch."""
    model, tok = tiny_model(family), tiny_tokenizer()
    patches = [compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(micro_batch=2, **kw), preserve=PRESERVE).patch
               for kw in (dict(), dict(prefix_cache=False), dict(propagation="naive"))]
    assert _max_rel(patches[0], patches[1]) < 1e-4
    assert _max_rel(patches[0], patches[2]) < 1e-4


def _mlp_rows(model, tok, texts, contexts, cfg) -> int:
    """Token positions the MLP of the last layer saw during one compute (both passes, fidelity off)."""
    fam = family_for(model)
    mlp = get_module(decoder_layers(model, fam)[-1], fam.mlp_norm)
    seen = []
    handle = mlp.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[0] * inp[0].shape[1]))
    try:
        compute_patch(model, tok, INSTRUCTION, texts, cfg, contexts=contexts)
    finally:
        handle.remove()
    return sum(seen)


def test_the_instruction_runs_once_per_layer_not_once_per_example(single_thread):
    """Counted, not timed: with the cache the contextual pass at a layer runs the prefix once
    (the prefill) plus each example's own tokens; without it, prefix + example per row."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    enc = encode(tok, INSTRUCTION, TEXTS)
    P, width = enc.prefix_len, max(map(len, enc.texts))
    B, p = len(TEXTS), len(enc.pre)
    cfg = dict(fidelity=False, micro_batch=len(TEXTS))
    # the non-contextual pass: for the statistics, for the joint solve, and its rerun after the patch
    nctx = 3 * B * (p + width)
    cached = _mlp_rows(model, tok, TEXTS, None, EngineConfig(**cfg))
    rerun = _mlp_rows(model, tok, TEXTS, None, EngineConfig(prefix_cache=False, **cfg))
    assert cached == P + B * width + nctx
    assert rerun == B * (P + width) + nctx
    # many-shot: one prefill per distinct instruction
    contexts = [INSTRUCTION, INSTRUCTION + "ab -> ba\n"] * 2 + [INSTRUCTION]
    encm = encode(tok, INSTRUCTION, TEXTS, contexts=contexts)
    shots = _mlp_rows(model, tok, TEXTS, contexts, EngineConfig(**cfg))
    widths = [max(len(encm.texts[i]) for i in range(B) if contexts[i] == c) for c in dict.fromkeys(contexts)]
    counts = [contexts.count(c) for c in dict.fromkeys(contexts)]
    prefills = sum(len(encm.pre) + len(c) for c in encm.contexts)
    assert shots == prefills + sum(n * w for n, w in zip(counts, widths)) + 3 * sum(n * (p + w) for n, w in zip(counts, widths))


@pytest.mark.parametrize("cache", [True, False])
def test_end_to_end_fidelity_is_the_full_prompted_run(cache):
    """The cache is the engine's business: the reported end-to-end fidelity is KL(prompted ‖
    patched) and top-1 agreement at every position of x, the prompted model run on the whole
    ``pre + I + x`` by a plain forward, the patched one on ``pre + x`` (recomputed here, each
    text on its own, and compared with what the engine reports, with and without the cache)."""
    import torch

    from transmute_cli.engine.fidelity import compare_logits
    from transmute_cli.engine.hooks import ThoughtHooks
    from transmute_cli.model.tokens import special_prefix, token_ids

    model, tok = tiny_model("gemma3").eval(), tiny_tokenizer()
    res = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(prefix_cache=cache))
    pre, instr = special_prefix(tok), token_ids(tok, INSTRUCTION)
    kl = agree = n = 0.0
    fam = family_for(model)
    for text in TEXTS:
        x = token_ids(tok, text)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([pre + instr + x])).logits[0, -len(x):]
            with ThoughtHooks(model, fam) as hooks:
                hooks.set_patch(res.patch)
                got = model(input_ids=torch.tensor([pre + x])).logits[0, -len(x):]
        k, a = compare_logits(ref.float(), got.float())
        kl, agree, n = kl + k, agree + a, n + len(x)
    assert res.fidelity.tokens == n
    assert math.isclose(res.fidelity.mean_kl, kl / n, rel_tol=1e-4, abs_tol=1e-7)
    assert math.isclose(res.fidelity.top1_agreement, agree / n, abs_tol=1e-9)
    assert res.fidelity.mean_kl > 1e-4  # a tiny random patch is not perfect: the check has something to compare


# --------------------------------------------------------------------------- contexts


def test_micro_batches_never_mix_instructions():
    tok = tiny_tokenizer()
    contexts = ["A:\n", "B longer:\n", "A:\n", "B longer:\n", "A:\n"]
    enc = encode(tok, "A:\n", TEXTS, contexts=contexts)
    mbs = micro_batches(enc, [4, 3, 2, 1, 0], 2, 0, "cpu")
    assert [mb.index for mb in mbs] == [[4, 2], [0], [3, 1]]  # grouped, order kept within a group
    for mb in mbs:
        instr = enc.instruction_ids(mb.context)
        assert mb.start == len(enc.pre) + len(instr)
        for row in mb.ctx_ids.tolist():
            assert tuple(row[len(enc.pre) : mb.start]) == instr
    with pytest.raises(ValueError):
        encode(tok, "A:\n", TEXTS, contexts=contexts[:2])


@pytest.mark.parametrize("cache", [True, False])
def test_one_context_for_every_text_is_the_plain_patch(cache):
    model, tok = tiny_model("gemma3"), tiny_tokenizer()
    cfg = EngineConfig(prefix_cache=cache)
    plain = compute_patch(model, tok, INSTRUCTION, TEXTS, cfg).patch
    same = compute_patch(model, tok, INSTRUCTION, TEXTS, cfg, contexts=[INSTRUCTION] * len(TEXTS)).patch
    assert _max_rel(plain, same) == 0.0


def test_contexts_patch_each_text_under_its_own_instruction(single_thread):
    """Two texts under two different instructions = the ground truth from the naive loop, and not
    the patch of either instruction alone."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    contexts = [INSTRUCTION, "Say it backwards:\n"] * 2 + [INSTRUCTION]
    got = compute_patch(model, tok, INSTRUCTION, TEXTS, contexts=contexts).patch
    naive = compute_patch(model, tok, INSTRUCTION, TEXTS, EngineConfig(propagation="naive"), contexts=contexts).patch
    one = compute_patch(model, tok, INSTRUCTION, TEXTS).patch
    assert _max_rel(got, naive) < 1e-4
    assert _max_rel(got, one) > 1e-2


# --------------------------------------------------------------------------- many-shot recipes

MANY = """\
instruction: |
  Reverse each word.
  abc -> cba
template: "{input} -> {output}"
patch_templates: ["{input} = {output}"]
examples: [[dog, god], [cat, tac], [sun, nus], [map, pam], [red, der], [box, xob], [fig, gif]]
"""


@pytest.mark.parametrize("k", [1, 3, 5, 6])
def test_many_shot_contexts_never_show_an_example_its_own_answer(k):
    recipe = parse_recipe(MANY + f"demonstrations: {k}\n")
    n = len(recipe.examples)
    texts, contexts = patch_texts(recipe), patch_contexts(recipe)
    assert len(contexts) == len(texts) == 2 * n
    assert len(set(contexts)) == 2 * math.ceil(n / (n - k))  # one prompt per fold and template
    for t, template in enumerate(recipe.all_templates()):
        for i, p in enumerate(recipe.examples):
            ctx = contexts[t * n + i]
            head = format_instruction(recipe, template)  # its own demonstrations in the text's template too
            assert ctx.startswith(head) and (t > 0) == (head != recipe.instruction)
            shown = ctx[len(head):].splitlines(keepends=True)
            assert len(shown) == k
            assert render(template, p.input, p.output) + "\n" not in shown  # never its own answer
            assert all(s in [render(template, q.input, q.output) + "\n" for q in recipe.examples] for s in shown)
    assert patch_contexts(recipe) == contexts  # the seed fixes them
    other = parse_recipe(MANY + f"demonstrations: {k}\nseed: 3\n")
    assert k == n - 1 or patch_contexts(other) != contexts
    assert many_shot_prompt(recipe) == contexts[0]
    # without demonstrations: the instruction as written, and rewritten for the patch template
    plain = parse_recipe(MANY)
    assert many_shot_prompt(plain) is None
    assert patch_contexts(plain) == [plain.instruction] * n + ["Reverse each word.\nabc = cba\n"] * n


def test_many_shot_qa_prompts_keep_their_blank_lines():
    recipe = parse_recipe('instruction: "Answer.\\n\\nQ: a\\nA: b\\n\\n"\ntemplate: "Q: {input}\\nA: {output}"\n'
                          "examples: [[c, d], [e, f], [g, h]]\ndemonstrations: 2\n")
    for p, ctx in zip(recipe.examples, patch_contexts(recipe)):
        assert ctx.startswith("Answer.\n\nQ: a\nA: b\n\n") and ctx.endswith("\n\n")
        shown = ctx.removeprefix("Answer.\n\nQ: a\nA: b\n\n").removesuffix("\n\n").split("\n\n")
        assert len(shown) == 2 and f"Q: {p.input}\nA: {p.output}" not in shown
        assert set(shown) <= {"Q: c\nA: d", "Q: e\nA: f", "Q: g\nA: h"}


# --------------------------------------------------------------------------- label-free recipes


def _loaded(model, tok) -> Loaded:
    fam = family_for(model)
    return Loaded(model=model, tokenizer=tok, source=None, fam=fam, fingerprint="x", dtype="float32")


def test_inputs_are_labelled_with_the_prompted_models_greedy_answers():
    model, tok = tiny_model("gemma3", seed=1), tiny_tokenizer()
    recipe = parse_recipe(f"instruction: {INSTRUCTION!r}\nexamples: [[dog, god]]\ninputs: [cat, sun, hello]\n"
                          "max_new_tokens: 4\n".replace("'", '"'))
    labelled, labels = label_inputs(recipe, _loaded(model, tok))
    pairs = [Pair(i, "") for i in recipe.inputs]
    (want,) = evaluate(model, tok, INSTRUCTION, pairs, [recipe.template], conditions=("prompt",), max_new_tokens=4)
    (longer,) = evaluate(model, tok, INSTRUCTION, pairs, [recipe.template], conditions=("prompt",), max_new_tokens=16)
    # an answer cut at 4 tokens is the one generated at 16
    assert [l["output"] for l in labels] == [b if c else a for a, b, c in zip(want.answers, longer.answers, want.cut)]
    assert [l["cut"] for l in labels] == [c and lc for c, lc in zip(want.cut, longer.cut)]
    kept = [Pair(l["input"], l["output"]) for l in labels if l["kept"]]
    assert all(l["kept"] == (bool(l["output"]) and not l["cut"]) for l in labels)
    assert labelled.examples == (Pair("dog", "god"), *kept) and labelled.inputs == ()
    assert parse_recipe(labelled.self_contained_text).examples == labelled.examples


def test_inputs_whose_answer_is_empty_are_left_out_or_refused(monkeypatch):
    from transmute_cli.pipeline import prepare
    from transmute_cli.evaluation.generate import Result

    def fake(model, tok, instruction, pairs, templates, **kw):
        return [Result(templates[0], "prompt", 0, len(pairs), ["", "B"][: len(pairs)], [[], [5]][: len(pairs)],
                       cut=[False] * len(pairs))]

    monkeypatch.setattr(prepare, "evaluate", fake)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    recipe = parse_recipe("instruction: x\ninputs: [a, b]\n")
    labelled, labels = label_inputs(recipe, _loaded(model, tok))
    assert labelled.examples == (Pair("b", "B"),)
    assert [l["kept"] for l in labels] == [False, True]
    with pytest.raises(InputError, match="inputs: the prompted model answered none of the 1 inputs"):
        label_inputs(parse_recipe("instruction: x\ninputs: [a]\n", source="r.yaml"), _loaded(model, tok))
    with pytest.raises(InputError, match="batches: must be at most 1: 1 of the inputs got an empty or cut answer"):
        label_inputs(parse_recipe("instruction: x\ninputs: [a, b]\nbatches: 2\n", source="r.yaml"), _loaded(model, tok))


@pytest.mark.parametrize("still_cut", [False, True])
def test_a_label_cut_at_max_new_tokens_is_continued_or_left_out(monkeypatch, still_cut):
    """An answer that reaches max_new_tokens before its stop token is no label: it is generated
    again at 4× the cap, and left out (and counted) if it is still cut there."""
    from transmute_cli.pipeline import prepare
    from transmute_cli.evaluation.generate import Result

    calls = []

    def fake(model, tok, instruction, pairs, templates, *, max_new_tokens, **kw):
        calls.append((tuple(p.input for p in pairs), max_new_tokens))
        if max_new_tokens == 4:
            return [Result(templates[0], "prompt", 0, 2, ["a b c d", "B"], [[5] * 4, [6]], cut=[True, False])]
        return [Result(templates[0], "prompt", 0, 1, ["a b c d e f"], [[5] * 6], cut=[still_cut])]

    monkeypatch.setattr(prepare, "evaluate", fake)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    recipe = parse_recipe("instruction: x\ninputs: [a, b]\nmax_new_tokens: 4\n")
    labelled, labels = label_inputs(recipe, _loaded(model, tok))
    assert calls == [(("a", "b"), 4), (("a",), 16)]
    assert [(l["kept"], l["cut"]) for l in labels] == [(not still_cut, still_cut), (True, False)]
    want = () if still_cut else (Pair("a", "a b c d e f"),)
    assert labelled.examples == (*want, Pair("b", "B"))


def test_evaluate_flags_answers_cut_at_max_new_tokens():
    model, tok = tiny_model("llama").eval(), tiny_tokenizer()
    pairs = [Pair(w, "") for w in ("cat", "sun", "hello")]
    (short,) = evaluate(model, tok, INSTRUCTION, pairs, ["{input} -> {output}"], conditions=("base",), max_new_tokens=3)
    (long,) = evaluate(model, tok, INSTRUCTION, pairs, ["{input} -> {output}"], conditions=("base",), max_new_tokens=40)
    for ids, long_ids, cut in zip(short.answer_ids, long.answer_ids, short.cut):
        assert cut == (len(long_ids) > 3)  # cut exactly where the whole answer is longer than the cap
    assert not any(long.cut) or all(len(i) == 40 for i, c in zip(long.answer_ids, long.cut) if c)


def test_an_engine_error_on_a_labelled_input_names_the_input():
    from transmute_cli.pipeline import with_source
    from transmute_cli.recipe.schema import with_labels

    r = parse_recipe("instruction: x\nexamples: [[a, b]]\ninputs: [c, d, e]\npatch_templates: ['{input} = {output}']\n",
                     source="r.yaml")
    labels = [{"input": "c", "output": "", "kept": False}, {"input": "d", "output": "D", "kept": True},
              {"input": "e", "output": "E", "kept": True}]
    labelled = with_labels(r.model_copy(update={"inputs": ("d", "e")}), ["D", "E"])
    said = [str(with_source(InputError("too long", field=f"examples[{i}]"), labelled, labels)) for i in range(6)]
    assert said == ["r.yaml: examples[0]: too long", "r.yaml: inputs[1]: too long", "r.yaml: inputs[2]: too long",
                    "r.yaml: examples[0]: too long (under patch_templates[0])",
                    "r.yaml: inputs[1]: too long (under patch_templates[0])",
                    "r.yaml: inputs[2]: too long (under patch_templates[0])"]
