"""End to end on the real Gemma 3 270M (the embedded default model, from its PyPI package).

The GGUF is converted once into the cache ($TRANSMUTE_CACHE, default ~/.cache/transmute) and
the model is loaded once for this module.  Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transmute_cli import pipeline
from transmute_cli.engine.exact import exact_token_patch
from transmute_cli.evaluation.generate import evaluate, generate_answers
from transmute_cli.recipe.datafiles import render
from transmute_cli.recipe.schema import load_recipe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gemma():
    torch.manual_seed(0)
    return pipeline.load_model("gemma-3-270m", device="cpu")


@pytest.fixture(scope="module")
def enfr():
    return load_recipe(ROOT / "recipes" / "translate-en-fr.yaml")


def test_exact_token_patch_on_real_gemma(gemma, enfr):
    texts = pipeline.patch_texts(enfr)[:4]
    res = exact_token_patch(gemma.model, gemma.tokenizer, enfr.instruction, texts)
    with torch.no_grad():
        ctx = gemma.model(input_ids=res.ctx_ids).logits[:, res.prefix_len:][res.xmask]
        with res.hooks:
            patched = gemma.model(input_ids=res.nctx_ids).logits[:, res.pre_len:][res.xmask]
    # Gemma's residual stream reaches norms in the thousands: compare relative to the states
    rel = [e / s for e, s in zip(res.layer_errors, res.layer_scales)]
    assert max(rel) < 1e-5, rel
    assert (patched - ctx).abs().max().item() < 1e-2
    assert torch.equal(patched.argmax(-1), ctx.argmax(-1))


def test_joint_patch_reaches_prompted_accuracy_on_held_out_words(gemma, enfr):
    assert len(enfr.examples) <= 20
    res = pipeline.fit(enfr, gemma)  # the defaults, broad texts' moments included
    assert res.fidelity.mean_kl < 0.1 * res.fidelity.base_mean_kl
    results = evaluate(gemma.model, gemma.tokenizer, enfr.instruction, enfr.eval, [enfr.template], res.patch,
                       max_new_tokens=enfr.max_new_tokens)
    acc = {r.condition: r.accuracy for r in results}
    assert acc["base"] < 0.1
    assert acc["prompt"] >= 0.8
    assert acc["patched"] >= 0.9 * acc["prompt"], acc
    # the patched model stops: no answer runs on past the word
    patched = next(r for r in results if r.condition == "patched")
    assert sum(len(a.split()) <= 2 for a in patched.answers) >= 0.9 * len(patched.answers)


def test_defaults_reach_the_prompt_on_a_recipe_with_no_optional_keys(gemma, tmp_path):
    """What a user writes first: model, instruction, template, examples, eval — nothing else.
    The task (English -> Spanish, examples/tasks/en-es.yaml) is in the report half of the task
    suite, which the defaults were not tuned on."""
    import yaml

    from transmute_cli import defaults
    from transmute_cli.recipe.schema import parse_recipe

    src = yaml.safe_load((ROOT / "examples" / "tasks" / "en-es.yaml").read_text())
    text = yaml.safe_dump({"model": "gemma-3-270m", "instruction": src["instruction"], "template": src["template"],
                           "examples": src["examples"], "eval": src["eval"]}, allow_unicode=True)
    recipe = parse_recipe(text, source="user.yaml", default_name="user")
    assert (recipe.solver, recipe.rho, recipe.batches, recipe.components) == (
        defaults.SOLVER, defaults.RHO, defaults.BATCHES, defaults.COMPONENTS)
    report = pipeline.compute(recipe, tmp_path / "run", checkpoint=False, loaded=gemma)
    acc = {r["condition"]: r["accuracy"] for r in report["eval"]["results"]}
    assert acc["prompt"] >= 0.5 and acc["base"] < 0.2, acc
    assert acc["patched"] >= 0.9 * acc["prompt"], acc
    held = report["fidelity"]["heldout"]
    # measured (results/suite.json): 0.84 of the answers identical to the prompted ones, KL 0.18 vs 4.7
    # unpatched; patched 0.79 vs prompt 0.82
    assert held["answer_agreement"] >= 0.7 and held["mean_kl"] < 0.1 * held["base_mean_kl"], held
    # and as local as the prompt on text that is not the task's (the locality report)
    loc = report["locality"]
    assert loc["text"] == pipeline.LOCALITY_TEXT and loc["tokens"] > 100
    assert loc["perplexity_patched"] <= 1.25 * loc["perplexity_prompted"], loc


def test_checkpoint_round_trip_with_plain_transformers(gemma, enfr, tmp_path):
    from transformers import AutoModelForCausalLM

    report = pipeline.compute(enfr, tmp_path / "run", loaded=gemma)
    ck = report["checkpoint"]
    assert ck["vector_fold"] == "least-squares" and not ck["exact"]
    patched = next(r for r in report["eval"]["results"] if r["condition"] == "patched")
    # the fold is an approximation: measured, and it must stay close
    assert ck["answer_agreement_vs_in_process"] >= 0.85
    assert ck["accuracy"] >= patched["accuracy"] - 0.1
    # saved in Gemma 3's own bf16 (half the bytes of float32) and measured as saved: the same
    # figure comes back from the folder in that dtype
    assert ck["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint", dtype=torch.bfloat16).eval()
    pre = [gemma.tokenizer.bos_token_id]
    ids = lambda s: list(gemma.tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompts = [pre + ids(render(enfr.template, p.input)) for p in enfr.eval]
    answers = generate_answers(reloaded, gemma.tokenizer, prompts, enfr.max_new_tokens)
    acc = sum(a == p.output for a, p in zip(answers, enfr.eval)) / len(enfr.eval)
    assert acc == pytest.approx(ck["accuracy"])
    side = json.loads((tmp_path / "run" / "checkpoint" / "transmute.json").read_text())
    assert side["base_fingerprint"] == gemma.fingerprint
    # the cached base model was restored after the merge
    from transmute_cli.model import loading as models

    assert models.fingerprint(gemma.model) == gemma.fingerprint
    # the same patch as a PEFT adapter of the alias: the standard loader finds its base (the
    # folder the alias was converted into) and answers as the adapter measured in transmute
    from peft import AutoPeftModelForCausalLM

    doc = pipeline.apply([(str(tmp_path / "run" / "patch.safetensors"), 1.0)], tmp_path / "adapter", fmt="peft",
                         device="cpu")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == gemma.source.path
    assert json.loads((tmp_path / "adapter" / "transmute.json").read_text())["base_model"] == "gemma-3-270m"
    assert "AutoPeftModelForCausalLM.from_pretrained" in (tmp_path / "adapter" / "README.md").read_text()
    auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    answers = generate_answers(auto, gemma.tokenizer, [pre + ids(render(enfr.template, p.input)) for p in enfr.eval],
                               enfr.max_new_tokens)
    assert sum(a == p.output for a, p in zip(answers, enfr.eval)) / len(enfr.eval) == pytest.approx(
        doc["adapter"]["accuracy"])


def test_defaults_keep_another_prompted_task_and_prose_as_the_prompt_does(gemma, enfr):
    """Locality by default: the en->fr patch fitted on its examples alone (broad: off) turns
    prompted antonyms into translations and multiplies the perplexity of prose; with the defaults
    (the broad texts' moments) antonyms stay near what the en->fr instruction in context leaves
    of them and the locality text stays near the prompted model — and the task is kept.  The
    preservation recipe (examples/preserve.txt on top) still translates."""
    from transmute_cli.engine.hooks import ThoughtHooks

    ant = load_recipe(ROOT / "recipes" / "antonyms.yaml")
    keep = load_recipe(ROOT / "recipes" / "translate-en-fr-preserve.yaml")
    assert keep.examples == enfr.examples and keep.preserve

    def prompted_antonyms(patch, instruction=ant.instruction):
        with ThoughtHooks(gemma.model, gemma.fam) as hooks:
            if patch is not None:
                hooks.set_patch(patch)
            else:
                hooks.enabled = False
            return evaluate(gemma.model, gemma.tokenizer, instruction, ant.eval, [ant.template], None,
                            conditions=("prompt",), max_new_tokens=8)[0].accuracy

    def own(r, patch):
        return evaluate(gemma.model, gemma.tokenizer, r.instruction, r.eval, [r.template], patch,
                        conditions=("patched",), max_new_tokens=8)[0].accuracy

    reference = prompted_antonyms(None, enfr.instruction.rstrip("\n") + "\n\n" + ant.instruction)
    off = pipeline.fit(enfr.model_copy(update={"broad": "off"}), gemma, fidelity=False).patch
    default = pipeline.fit(enfr, gemma, fidelity=False).patch
    assert prompted_antonyms(off) < reference - 0.4  # the side effect is real without the broad texts
    assert prompted_antonyms(default) >= reference - 0.1
    ref = pipeline.locality_reference(enfr, gemma)
    loc_off = pipeline.locality_json(ref, gemma.model, gemma.fam, off)
    loc = pipeline.locality_json(ref, gemma.model, gemma.fam, default)
    assert loc_off["perplexity_patched"] > 3 * loc_off["perplexity_prompted"]
    assert loc["perplexity_patched"] <= 1.15 * loc["perplexity_prompted"]
    assert loc["mean_kl"] < 0.1 * loc_off["mean_kl"]
    assert own(enfr, default) >= 0.85
    assert own(keep, pipeline.fit(keep, gemma, fidelity=False).patch) >= 0.8
