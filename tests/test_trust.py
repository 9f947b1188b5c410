"""Issue 25: defects found in review, each with a check that fails without its fix."""

from __future__ import annotations

import pytest
import torch

from transmute_cli.engine.lowrank import LowRank, apply, stored
from transmute_cli.engine.stats import DownStats, LayerStats
from transmute_cli.engine.solve import ridge_intercept_solve


def _ill_rows(t: int, d: int, seed: int = 0) -> torch.Tensor:
    """Token rows like a model's: a few outlier dimensions ~1000× the rest, and near-repeats."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(t, d, generator=g, dtype=torch.float64)
    n[:, :3] *= 1000.0
    n[t // 2 :] = n[: t - t // 2] + 1e-4 * torch.randn(t - t // 2, d, generator=g, dtype=torch.float64)
    return n


def _rel(stored_m, exact_m, x: torch.Tensor) -> float:
    got = apply(stored_m, x.float()).double()
    want = apply(exact_m, x)
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("rho", [0.0, 0.03])
def test_stored_matrix_factors_keep_float32_precision(rho):
    """A's factors from ill-conditioned rows, stored as the patch keeps them (float32), give
    ``A n`` as precisely as the dense float32 matrix does, on the rows themselves and on fresh
    ones (the raw factors in float32: 4e-5 at ρ = 0.03, 3e5 at ρ = 0 on these rows)."""
    d, t = 64, 20
    n = _ill_rows(t, d)
    st = LayerStats(d)
    dz = 0.1 * torch.randn(t, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    st.add(n, n + dz, torch.zeros(t, d), torch.zeros(t, d))
    a = st.solve_matrix(rho)
    assert isinstance(a, LowRank)
    s = stored(a)
    assert isinstance(s, LowRank) and s.left.dtype == torch.float32
    assert torch.allclose(s.right.double() @ s.right.double().T, torch.eye(s.rank, dtype=torch.float64), atol=1e-6)
    fresh = _ill_rows(8, d, seed=2)
    for x in (n, fresh):
        assert _rel(s, a, x) <= 2 * _rel(a.dense().float(), a, x) + 1e-6
    if rho > 0:
        assert _rel(s, a, n) < 1e-6


def test_stored_down_factors_keep_float32_precision():
    f, d, t = 96, 32, 24
    a = _ill_rows(t, f)
    e = torch.randn(t, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    st = DownStats(f, d)
    st.add(a, e)
    dmat, _vec, _rel_res = ridge_intercept_solve(st, 0.0, intercept=True, consume=False)
    assert isinstance(dmat, LowRank)
    assert _rel(stored(dmat), dmat, a) <= 2 * _rel(dmat.dense().float(), dmat, a) + 1e-6


# --------------------------------------------------------------------------- 3: composite configs


def _composite(model):
    """``model`` behind a config like ``Gemma3ForConditionalGeneration``'s: no top-level
    ``sliding_window`` nor context length, both in ``text_config``."""
    from torch import nn
    from transformers import Gemma3Config

    class Composite(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model
            self.config = Gemma3Config(text_config=model.config.to_dict())
            self.generation_config = model.generation_config

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                    logits_to_keep=0):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep)

    return Composite()


def test_a_composite_config_gives_its_text_models_window_and_context():
    from tiny import tiny_model, tiny_tokenizer

    from transmute_cli.evaluation.generate import greedy_rows
    from transmute_cli.model.families import text_config
    from transmute_cli.model.tokens import context_length

    model, tok = tiny_model("gemma3").eval(), tiny_tokenizer()
    wrapped = _composite(model)
    assert getattr(wrapped.config, "sliding_window", None) is None  # what the code used to read
    assert text_config(wrapped).sliding_window == 16 and context_length(wrapped) == 256
    # the shared-prefix guard: prefix + row + answer past the window (16) runs whole rows, so the
    # prompt condition gives what generate gives on the whole text
    prefix = tok("ab cd ef\n")["input_ids"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in ["x ->", "yz ->", "q"]]
    shapes: list[tuple] = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                             with_kwargs=True)
    try:
        got = greedy_rows(wrapped, tok, rows, 8, prefix=prefix)
    finally:
        handle.remove()
    assert shapes[0] != (1, len(prefix))  # no shared prefix past the window
    assert got == greedy_rows(model, tok, [prefix + r for r in rows], 8)


# --------------------------------------------------------------------------- 7: atomic_dir


def _folder(path, text):
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


@pytest.mark.parametrize("swap", [True, False])
def test_replacing_an_output_keeps_one_or_the_other(tmp_path, monkeypatch, swap):
    from transmute_cli.artifacts import outputs

    out = _folder(tmp_path / "run", "old")
    if not swap:  # a system without renameat2: two renames
        monkeypatch.setattr(outputs, "exchange", lambda a, b: False)
    with outputs.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "f.txt").write_text("new")
    assert (out / "f.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_previous_output_left_aside_by_a_killed_run_is_put_back(tmp_path):
    """The state a process killed between the two renames leaves: no output, the previous one in
    ``.run.old-*/x``.  The next run that checks or writes the output puts it back first."""
    from transmute_cli.artifacts.outputs import atomic_dir, check_target
    from transmute_cli.errors import InputError

    aside = tmp_path / ".run.old-abc123"
    aside.mkdir()
    _folder(aside / "x", "old")
    out = tmp_path / "run"
    with pytest.raises(InputError, match="already exists"):
        check_target(out, overwrite=False)  # the old output is back, and protected
    assert (out / "f.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    aside.mkdir()
    _folder(aside / "x", "older")  # a stale copy beside an output that is there: removed, output kept
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "f.txt").write_text("new")
    assert (out / "f.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_exchange_swaps_two_folders(tmp_path):
    from transmute_cli.artifacts.outputs import exchange

    a, b = _folder(tmp_path / "a", "A"), _folder(tmp_path / "b", "B")
    if not exchange(a, b):
        pytest.skip("no renameat2 here")
    assert (a / "f.txt").read_text() == "B" and (b / "f.txt").read_text() == "A"


# --------------------------------------------------------------------------- 8: cache layers


def test_an_unknown_cache_layer_class_is_refused_at_the_first_fill(monkeypatch):
    from tiny import tiny_model, tiny_tokenizer

    from transmute_cli.errors import EngineError
    from transmute_cli.model.families import family_for
    from transmute_cli.engine.hooks import PrefixCache, check_cache_layers

    model, tok = tiny_model("llama").eval(), tiny_tokenizer()
    ids = torch.tensor([tok("ab cd")["input_ids"]])
    cache = PrefixCache(model).fill(model, family_for(model), ids)  # the classes of this transformers: known
    assert cache.frozen

    class InPlaceLayer:  # a future layer that writes into preallocated buffers
        def __init__(self):
            self.buffer = torch.zeros(1)

    cache.layers[0] = InPlaceLayer()
    with pytest.raises(EngineError, match="InPlaceLayer"):
        check_cache_layers(cache)


def test_transformers_is_bounded_to_the_tested_release():
    import tomllib
    from pathlib import Path

    import transformers
    from packaging.requirements import Requirement

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "transformers"]
    assert any(s.operator == "<" for s in req.specifier)  # an upper bound
    assert transformers.__version__ in req.specifier


# --------------------------------------------------------------------------- 12: exit codes


@pytest.mark.parametrize("raised, code, line", [
    ("engine", 3, "error: non-finite activations at layer 2"),
    ("internal", 3, "error: internal error: RuntimeError: boom (set TRANSMUTE_DEBUG=1 for a traceback)"),
    ("input", 2, "error: r.yaml: rho: bad"),
    ("interrupt", 130, "error: interrupted; no partial output was left behind"),
])
def test_each_failure_has_its_own_exit_code(tmp_path, monkeypatch, raised, code, line):
    """1 is the gate's alone (test_cli.test_eval_min_accuracy_gate), so CI tells a regression
    from a crash: a runtime or internal error exits 3, bad input 2, an interrupt 130."""
    from typer.testing import CliRunner

    from transmute_cli import pipeline
    from transmute_cli.cli import app
    from transmute_cli.errors import EngineError, InputError

    def fail(*_a, **_k):
        raise {"engine": EngineError("non-finite activations at layer 2"), "internal": RuntimeError("boom"),
               "input": InputError("bad", source="r.yaml", field="rho"), "interrupt": KeyboardInterrupt()}[raised]

    monkeypatch.setattr(pipeline, "compute", fail)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("instruction: x\nexamples: [[a, b]]\n")
    res = CliRunner().invoke(app, ["compute", str(recipe), "-o", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == code
    assert [l for l in res.stderr.split("\n") if l] == [line]


# --------------------------------------------------------------------------- 14: conversion progress


def test_a_long_step_says_it_is_still_going():
    import time

    from transmute_cli.model.sources import _ticking

    lines: list[str] = []
    with _ticking(lines.append, "dequantizing", every=0.05):
        time.sleep(0.23)
    assert lines[0] == "dequantizing ..." and lines[-1].startswith("dequantizing: done in ")
    assert len([l for l in lines if l.endswith(" s") and "done" not in l]) >= 3


def test_the_first_use_of_a_gguf_says_what_it_does(tmp_path, monkeypatch):
    from transmute_cli.errors import ModelError
    from transmute_cli.model.loading import resolve

    monkeypatch.setenv("TRANSMUTE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    lines: list[str] = []
    with pytest.raises(ModelError, match="not a readable GGUF model"):
        resolve(str(bad), lines.append)
    assert lines[0].startswith("first use of m.gguf: converting it once to a float32 folder")
    assert lines[1] == "reading and dequantizing the GGUF ..."
