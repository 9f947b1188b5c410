"""Rendering for people: rich tables and progress (stderr), plain lines when not on a TTY.

Only this module and ``cli.py`` import rich (report.md: ``markdown.py``).
"""

from __future__ import annotations


import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from transmute_cli.engine.loop import Progress as EngineProgress
from transmute_cli.report.text import (
    fixed, general, template_label, CONDITION_NAMES, accuracy_title, passed_cell, rule_rows, rule_ratio, LOCALITY_TITLE,
    timings_line, left_out_lines, adapter_rank,
)

# Not on a terminal (a pipe, a CI log) there is no width to fit: rich's default of 80 columns would
# wrap template names and cut numbers ("1113.3…"), so tables get room instead.
_WIDE = 200
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else _WIDE)
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else _WIDE)


class ProgressView:
    """Engine progress callback: a rich bar on a TTY; otherwise plain lines, one per stage and
    per layer (at most one every ``LOG_EVERY_S`` seconds), each with the time elapsed since start."""

    LOG_EVERY_S = 2.0

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._bar: Progress | None = None
        self._task = None
        self._last = ""
        self._t0 = self._printed = time.perf_counter()

    def __enter__(self) -> "ProgressView":
        if self.tty and not self.quiet:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TimeElapsedColumn(), console=err, transient=True)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def log(self, msg: str) -> None:
        if not self.quiet:
            err.print(f"[dim]transmute:[/dim] {msg}" if self.tty else f"transmute: {msg}", markup=self.tty)

    def __call__(self, p: EngineProgress) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            total = p.batches * p.layers
            desc = f"batch {p.batch + 1}/{p.batches} layer {p.layer + 1}/{p.layers}" if p.stage == "layer" else p.stage
            if self._task is None:
                self._task = self._bar.add_task(desc, total=total)
            done = p.batch * p.layers + (p.layer if p.stage == "layer" else 0)
            if p.stage == "fidelity":
                done = total
            self._bar.update(self._task, completed=done, description=desc)
            return
        line = f"batch {p.batch + 1}/{p.batches}: {p.stage}"
        now = time.perf_counter()
        if p.stage == "layer":
            line += f" {p.layer + 1}/{p.layers}"
            # every layer when layers are slow, else first, last and one every LOG_EVERY_S seconds
            if p.layer not in (0, p.layers - 1) and now - self._printed < self.LOG_EVERY_S:
                return
        if line != self._last:
            err.print(f"transmute: {line} (elapsed {now - self._t0:.1f} s)", markup=False)
            self._last, self._printed = line, now


def accuracy_table(results: list[dict], title: str = "Accuracy (greedy, exact match, answer cut at newline)",
                   rerendered: Sequence[str] = ()) -> Table:
    """``rerendered``: templates whose prompt condition had the demonstrations rewritten in them."""
    t = Table(title=title, title_justify="left",
              caption="* the prompt's demonstrations rewritten in this row's template" if rerendered else None,
              caption_justify="left")
    t.add_column("template")
    conds = [c for c in ("base", "prompt", "patched") if any(r["condition"] == c for r in results)]
    for c in conds:
        t.add_column(CONDITION_NAMES[c], justify="right")
    templates = list(dict.fromkeys(r["template"] for r in results))
    for tpl in templates:
        row = [template_label(tpl)]
        for c in conds:
            r = next((r for r in results if r["template"] == tpl and r["condition"] == c), None)
            mark = " *" if c == "prompt" and tpl in rerendered else ""
            row.append("" if r is None else f"{r['accuracy']:.3f} ({r['correct']}/{r['n']}){mark}")
        t.add_row(*row)
    return t


def format_table(fmt: dict) -> Table:
    """Share of held-out answers passing the recipe's answer_format, per condition."""
    t = Table(title=f"Answers passing answer_format: {fmt['spec']}", title_justify="left")
    t.add_column("template")
    conds = [c for c in ("base", "prompt", "patched") if any(r["condition"] == c for r in fmt["results"])]
    for c in conds:
        t.add_column(CONDITION_NAMES[c], justify="right")
    for tpl in dict.fromkeys(r["template"] for r in fmt["results"]):
        cells = {r["condition"]: r for r in fmt["results"] if r["template"] == tpl}
        t.add_row(template_label(tpl), *[passed_cell(cells[c]) if c in cells else "" for c in conds])
    return t


def rules_table(rules: list[dict]) -> Table:
    """Each rule's share of held-out answers that pass it, per condition, and patched ÷ prompt."""
    t = Table(title="Rules, each scored on its own (held-out answers)", title_justify="left")
    rows = rule_rows(rules)
    conds = [c for c in ("base", "prompt", "patched") if any(c in cells for _, _, cells in rows)]
    t.add_column("rule")
    for c in conds:
        t.add_column(CONDITION_NAMES[c], justify="right")
    t.add_column("patched ÷ prompt", justify="right")
    for name, _, cells in rows:
        ratio = rule_ratio(cells)
        t.add_row(name, *[passed_cell(cells[c]) if c in cells else "" for c in conds], "" if ratio is None else f"{ratio:.2f}")
    return t


def _two_columns(title: str, columns: tuple[str, str]) -> Table:
    """A table of rows labelled on the left with two right-aligned figures."""
    t = Table(title=title, title_justify="left")
    t.add_column("")
    for c in columns:
        t.add_column(c, justify="right")
    return t


def locality_table(loc: dict) -> Table:
    """The patched model without the prompt and the model without it, each against the prompted
    one on the shipped locality text: a patch as local as the prompt has KL near 0."""
    t = Table(title=LOCALITY_TITLE.format(tokens=loc["tokens"], text=loc["text"]), title_justify="left")
    for c, justify in (("", "left"), ("top-1 agreement", "right"), ("mean KL (nats)", "right"),
                       ("perplexity", "right")):
        t.add_column(c, justify=justify)
    t.add_row("prompted (reference)", "", "", fixed(loc["perplexity_prompted"], 2))
    t.add_row("no prompt, unpatched", fixed(loc["base_top1_agreement"]), fixed(loc["base_mean_kl"]),
              fixed(loc["perplexity_base"], 2))
    t.add_row("no prompt, patched", fixed(loc["top1_agreement"]), fixed(loc["mean_kl"]), fixed(loc["perplexity_patched"], 2))
    return t


def show_warnings(doc: dict) -> None:
    """``warnings`` (``pipeline.prompt_warnings``) on stderr, where a script's log keeps them."""
    for w in doc.get("warnings") or []:
        err.print(f"warning: {w}", markup=False, highlight=False)


def show_compute(report: dict) -> None:
    f = report["fidelity"]
    if f["top1_agreement"] is None:
        out.print("fidelity on the patch examples, in-sample: skipped (--no-fidelity)")
    else:
        t = _two_columns("Fidelity on the patch examples, in-sample (vs the original model with the prompt)",
                         ("top-1 agreement", "mean KL (nats)"))
        t.add_row("no prompt, unpatched", fixed(f["base_top1_agreement"]), fixed(f["base_mean_kl"]))
        t.add_row("no prompt, patched", fixed(f["top1_agreement"]), fixed(f["mean_kl"]))
        if f.get("preserve_tokens"):
            t.add_row(f"preservation texts, patched vs original ({f['preserve_tokens']} tokens)",
                      fixed(f["preserve_top1_agreement"]), fixed(f["preserve_mean_kl"]))
        out.print(t)
    h = f.get("heldout")
    if h:
        first = f"same first {h.get('first_tokens', 16)} tokens"
        ht = Table(title=f"Fidelity on the {h['queries']} held-out eval queries (vs the prompted model)",
                   title_justify="left")
        for c, justify in (("", "left"), ("same greedy answer", "right"), (first, "right"),
                           ("KL on its answer (nats/token)", "right")):
            ht.add_column(c, justify=justify)
        ht.add_row("no prompt, unpatched", fixed(h["base_answer_agreement"]), fixed(h.get("base_first_tokens_agreement")),
                   fixed(h["base_mean_kl"]))
        ht.add_row("no prompt, patched", fixed(h["answer_agreement"]), fixed(h.get("first_tokens_agreement")), fixed(h["mean_kl"]))
        out.print(ht)
    if report.get("locality"):
        out.print(locality_table(report["locality"]))
    lt = Table(title="Per layer", title_justify="left")
    for c in ("layer", "tokens", "matrix fit residual", "vector/joint residual", "|δ|", "|A|"):
        lt.add_column(c, justify="right")
    for l in f["layers"]:
        lt.add_row(str(l["layer"]), str(l["tokens"]), fixed(l["matrix_residual"]), fixed(l["vector_residual"]),
                   fixed(l["vector_norm"], 2), fixed(l["matrix_norm"], 2))
    out.print(lt)
    if report.get("eval"):
        if report["eval"]["results"]:
            out.print(accuracy_table(report["eval"]["results"], title=accuracy_title(report)))
        if report["eval"].get("format"):
            out.print(format_table(report["eval"]["format"]))
        if report["eval"].get("rules"):
            out.print(rules_table(report["eval"]["rules"]))
        m = report["eval"].get("many_shot_prompt")
        if m:
            line = f"the prompt the patch distils (instruction + {m['demonstrations']} demonstrations from the examples):"
            if m.get("n"):
                line += f" {m['accuracy']:.3f} ({m['correct']}/{m['n']})"
            h = m.get("heldout")
            if h:
                line += (f"; patched vs it on the held-out queries: same answer {fixed(h['answer_agreement'])}, KL "
                         f"{fixed(h['mean_kl'])} (unpatched {fixed(h['base_answer_agreement'])}, {fixed(h['base_mean_kl'])})")
            out.print(line)
    for line in left_out_lines(report):
        out.print(line + "; see report.json")
    show_warnings(report)
    c = report.get("checkpoint")
    if c and "skipped" in c:
        out.print(f"checkpoint: not written ({c['skipped']})")
    elif c:
        line = (f"checkpoint ({c.get('dtype', 'float32')}): vectors stored as {c['vector_fold']} ({'exact' if c['exact'] else 'approximate'}); "
                f"vs in-process: top-1 {fixed(c['top1_agreement_vs_in_process'])}, KL {fixed(c['mean_kl_vs_in_process'], 5)}")
        if "answer_agreement_vs_in_process" in c:
            line += f", same answers {fixed(c['answer_agreement_vs_in_process'])}, accuracy {fixed(c['accuracy'])}"
        out.print(line)
    if report.get("gguf"):
        show_gguf(report["gguf"])
    out.print(f"wrote {report['output']} {timings_line(report['timings'])}")


def show_diff(d: dict) -> None:
    t = Table(title=f"diff ({d['kind']}): A = {d['a']}   B = {d['b']}", title_justify="left")
    for c in ("layer", "tensor", "|A|", "|B|", "|A−B|", "cosine", "rel. change", "eff. rank"):
        t.add_column(c, justify="right")
    for r in d["tensors"]:
        t.add_row(str(r["layer"]), r["tensor"], general(r["norm_a"]), general(r["norm_b"]), general(r["diff_norm"]), fixed(r["cosine"]),
                  general(r["relative_change"]), fixed(r["effective_rank"], 1))
    out.print(t)
    if d.get("top_layers"):
        out.print("layers that changed most: " + ", ".join(map(str, d["top_layers"])))
    if d.get("overlap"):
        nums = {k: v for k, v in d["overlap"].items() if isinstance(v, (int, float)) or v is None}
        out.print("overlap: " + ", ".join(f"{k} {fixed(v)}" for k, v in nums.items()))
    for n in d.get("notes", []):
        out.print(f"note: {n}")


def show_gguf(g: dict) -> None:
    """The GGUF written and what llama.cpp made of it."""
    what = (f"{len(g['replaced'])} tensors replaced ({g['qtype']})" if g["format"] == "gguf"
            else f"LoRA adapter, {g['modules']} modules, ranks up to {g['max_rank']}")
    line = f"wrote {g['path']} ({g['bytes'] / 1e6:.1f} MB): {what}"
    v = g.get("llama_cpp")
    if v and v.get("ran"):
        line += (f"; in llama.cpp: same answers as the patch {fixed(v['answer_agreement_vs_transformers'])}, accuracy "
                 f"{fixed(v['accuracy'])} (in process {fixed(g.get('accuracy_in_process'))})")
        if "answer_agreement_vs_checkpoint" in v:
            line += (f"; same answers as the checkpoint {fixed(v['answer_agreement_vs_checkpoint'])} "
                     f"(its accuracy {fixed(g.get('accuracy_checkpoint'))})")
    elif v:
        line += f"; not checked in llama.cpp: {v['why']}"
    out.print(line)


def show_adapter(a: dict) -> None:
    t = Table(title=f"PEFT LoRA adapter, {adapter_rank(a)}: captured energy |ΔW_r|²/|ΔW|²", title_justify="left")
    t.add_column("layer", justify="right")
    modules = list(dict.fromkeys(e["module"] for e in a["energy"]))
    for m in modules:
        t.add_column(m, justify="right")
    for layer in sorted({e["layer"] for e in a["energy"]}):
        row = {e["module"]: e["energy"] for e in a["energy"] if e["layer"] == layer}
        t.add_row(str(layer), *[fixed(row.get(m)) for m in modules])
    out.print(t)
    line = (f"wrote {a['path']}: mean energy {fixed(a['mean_energy'])}, vectors as {a['vector']}; vs in-process patch top-1 "
            f"{fixed(a['top1_agreement_vs_in_process'])}, KL {fixed(a['mean_kl_vs_in_process'], 5)}")
    if "accuracy" in a:
        line += f"; eval accuracy adapter {fixed(a['accuracy'])} vs in-process {fixed(a['accuracy_in_process'])}"
    out.print(line)
