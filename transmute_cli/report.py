"""Rendering for people: rich tables and progress (stderr), plain lines when not on a TTY.

Only this module and ``cli.py`` import rich.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .engine import Progress as EngineProgress
from .evaluate import CHAT_TEMPLATE

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


def _f(x, d: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{d}f}" if math.isfinite(x) else str(x)
    return str(x)


def _g(x) -> str:
    """A magnitude in 4 significant figures (norms span 1e-6 to 1e4: fixed decimals waste width)."""
    return f"{x:.4g}" if isinstance(x, float) and math.isfinite(x) else _f(x)


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


def template_label(template: str) -> str:
    """A template as results name it: quoted, so its spaces and newlines show; a chat recipe's
    ``evaluate.CHAT_TEMPLATE`` as it is."""
    return template if template == CHAT_TEMPLATE else repr(template)


CONDITION_NAMES = {"base": "no prompt", "prompt": "prompt in context", "patched": "patched (no prompt)"}


def accuracy_title(report: dict) -> str:
    chat = report.get("settings", {}).get("chat")
    what = "the answer contains the reference" if chat else "exact match, answer cut at newline"
    return f"Accuracy on the held-out pairs (greedy, {what})"


def format_table(fmt: dict) -> Table:
    """Share of held-out answers passing the recipe's answer_format, per condition."""
    t = Table(title=f"Answers passing answer_format: {fmt['spec']}", title_justify="left")
    t.add_column("template")
    conds = [c for c in ("base", "prompt", "patched") if any(r["condition"] == c for r in fmt["results"])]
    for c in conds:
        t.add_column(CONDITION_NAMES[c], justify="right")
    for tpl in dict.fromkeys(r["template"] for r in fmt["results"]):
        cells = {r["condition"]: r for r in fmt["results"] if r["template"] == tpl}
        t.add_row(template_label(tpl), *[_passed(cells[c]) if c in cells else "" for c in conds])
    return t


def _passed(e: dict) -> str:
    """A format or rule result as "rate (passed/n)"."""
    return f"{e['rate']:.3f} ({e['passed']}/{e['n']})"


def rule_rows(rules: list[dict]) -> list[tuple[str, str, dict[str, dict]]]:
    """(rule, spec, {condition: result}) on the recipe's own template (the first listed)."""
    rows = []
    for rule in rules:
        own = rule["results"][0]["template"] if rule["results"] else None
        rows.append((rule["name"], rule["spec"], {e["condition"]: e for e in rule["results"] if e["template"] == own}))
    return rows


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
        ratio = _rule_ratio(cells)
        t.add_row(name, *[_passed(cells[c]) if c in cells else "" for c in conds], "" if ratio is None else f"{ratio:.2f}")
    return t


def _rule_ratio(cells: dict[str, dict]) -> float | None:
    if "patched" not in cells or "prompt" not in cells or not cells["prompt"]["rate"]:
        return None
    return cells["patched"]["rate"] / cells["prompt"]["rate"]


def _two_columns(title: str, columns: tuple[str, str]) -> Table:
    """A table of rows labelled on the left with two right-aligned figures."""
    t = Table(title=title, title_justify="left")
    t.add_column("")
    for c in columns:
        t.add_column(c, justify="right")
    return t


LOCALITY_TITLE = ("Locality: a text that is not the task's ({tokens} tokens of {text}), against the prompted model"
                  " (the instruction in front)")


def locality_table(loc: dict) -> Table:
    """The patched model without the prompt and the model without it, each against the prompted
    one on the shipped locality text: a patch as local as the prompt has KL near 0."""
    t = Table(title=LOCALITY_TITLE.format(tokens=loc["tokens"], text=loc["text"]), title_justify="left")
    for c, justify in (("", "left"), ("top-1 agreement", "right"), ("mean KL (nats)", "right"),
                       ("perplexity", "right")):
        t.add_column(c, justify=justify)
    t.add_row("prompted (reference)", "", "", _f(loc["perplexity_prompted"], 2))
    t.add_row("no prompt, unpatched", _f(loc["base_top1_agreement"]), _f(loc["base_mean_kl"]),
              _f(loc["perplexity_base"], 2))
    t.add_row("no prompt, patched", _f(loc["top1_agreement"]), _f(loc["mean_kl"]), _f(loc["perplexity_patched"], 2))
    return t


def locality_markdown(loc: dict) -> list[str]:
    return ["", "## " + LOCALITY_TITLE.format(tokens=loc["tokens"], text=f"`{loc['text']}`"), "",
            "| | top-1 agreement | mean KL (nats) | perplexity |", "|---|---|---|---|",
            f"| prompted (reference) | | | {_f(loc['perplexity_prompted'], 2)} |",
            f"| no prompt, unpatched | {_f(loc['base_top1_agreement'])} | {_f(loc['base_mean_kl'])} | "
            f"{_f(loc['perplexity_base'], 2)} |",
            f"| no prompt, patched | {_f(loc['top1_agreement'])} | {_f(loc['mean_kl'])} | "
            f"{_f(loc['perplexity_patched'], 2)} |"]


_STEPS = (("load_s", "load"), ("label_s", "labels"), ("compute_s", "compute"), ("eval_s", "eval"),
          ("locality_s", "locality"), ("checkpoint_s", "checkpoint"), ("gguf_s", "gguf"))


def timings_line(t: dict) -> str:
    """'in 27.7 s: load 5.3, compute 4.7 (in-sample fidelity 0.9), eval 11.7, ...': where the
    command's time went (``report.json`` timings), the in-sample fidelity pass named because
    ``--no-fidelity`` skips it."""
    parts = []
    for key, name in _STEPS:
        if t.get(key) is not None:
            part = f"{name} {t[key]:.1f}"
            if key == "compute_s" and t.get("engine_fidelity_s"):
                part += f" (in-sample fidelity {t['engine_fidelity_s']:.1f})"
            parts.append(part)
    total = f"in {t['total_s']:.1f} s" if t.get("total_s") is not None else "(s)"
    return f"{total}: {', '.join(parts)}"


def show_warnings(doc: dict) -> None:
    """``warnings`` (``pipeline.prompt_warnings``) on stderr, where a script's log keeps them."""
    for w in doc.get("warnings") or []:
        err.print(f"warning: {w}", markup=False, highlight=False)


def left_out_lines(report: dict) -> list[str]:
    """What labelling and the chat preservation answers kept and left out, in words."""
    lines = []
    if report.get("labels"):
        kept = sum(l["kept"] for l in report["labels"])
        gone = report.get("labels_left_out") or {}
        why = [f"{n} {what}" for what, n in (("empty", gone.get("empty", 0)),
                                               ("cut at the larger cap", gone.get("cut", 0))) if n]
        opened = report.get("labels_open") or 0
        lines.append(f"{kept} inputs labelled by the prompted model's greedy answers"
                     + (f" ({opened} of them open: cut at the larger cap, fitted up to their last token with no "
                        "end of turn)" if opened else "")
                     + (f" ({len(report['labels']) - kept} left out: {', '.join(why)})" if why else ""))
    if report.get("preserve_left_out"):
        lines.append(f"{report['preserve_left_out']} preservation messages left out: the model's own answer was "
                     "cut at the larger cap")
    return lines


def show_compute(report: dict) -> None:
    f = report["fidelity"]
    if f["top1_agreement"] is None:
        out.print("fidelity on the patch examples, in-sample: skipped (--no-fidelity)")
    else:
        t = _two_columns("Fidelity on the patch examples, in-sample (vs the original model with the prompt)",
                         ("top-1 agreement", "mean KL (nats)"))
        t.add_row("no prompt, unpatched", _f(f["base_top1_agreement"]), _f(f["base_mean_kl"]))
        t.add_row("no prompt, patched", _f(f["top1_agreement"]), _f(f["mean_kl"]))
        if f.get("preserve_tokens"):
            t.add_row(f"preservation texts, patched vs original ({f['preserve_tokens']} tokens)",
                      _f(f["preserve_top1_agreement"]), _f(f["preserve_mean_kl"]))
        out.print(t)
    h = f.get("heldout")
    if h:
        first = f"same first {h.get('first_tokens', 16)} tokens"
        ht = Table(title=f"Fidelity on the {h['queries']} held-out eval queries (vs the prompted model)",
                   title_justify="left")
        for c, justify in (("", "left"), ("same greedy answer", "right"), (first, "right"),
                           ("KL on its answer (nats/token)", "right")):
            ht.add_column(c, justify=justify)
        ht.add_row("no prompt, unpatched", _f(h["base_answer_agreement"]), _f(h.get("base_first_tokens_agreement")),
                   _f(h["base_mean_kl"]))
        ht.add_row("no prompt, patched", _f(h["answer_agreement"]), _f(h.get("first_tokens_agreement")), _f(h["mean_kl"]))
        out.print(ht)
    if report.get("locality"):
        out.print(locality_table(report["locality"]))
    lt = Table(title="Per layer", title_justify="left")
    for c in ("layer", "tokens", "matrix fit residual", "vector/joint residual", "|δ|", "|A|"):
        lt.add_column(c, justify="right")
    for l in f["layers"]:
        lt.add_row(str(l["layer"]), str(l["tokens"]), _f(l["matrix_residual"]), _f(l["vector_residual"]),
                   _f(l["vector_norm"], 2), _f(l["matrix_norm"], 2))
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
                line += (f"; patched vs it on the held-out queries: same answer {_f(h['answer_agreement'])}, KL "
                         f"{_f(h['mean_kl'])} (unpatched {_f(h['base_answer_agreement'])}, {_f(h['base_mean_kl'])})")
            out.print(line)
    for line in left_out_lines(report):
        out.print(line + "; see report.json")
    show_warnings(report)
    c = report.get("checkpoint")
    if c and "skipped" in c:
        out.print(f"checkpoint: not written ({c['skipped']})")
    elif c:
        line = (f"checkpoint ({c.get('dtype', 'float32')}): vectors stored as {c['vector_fold']} ({'exact' if c['exact'] else 'approximate'}); "
                f"vs in-process: top-1 {_f(c['top1_agreement_vs_in_process'])}, KL {_f(c['mean_kl_vs_in_process'], 5)}")
        if "answer_agreement_vs_in_process" in c:
            line += f", same answers {_f(c['answer_agreement_vs_in_process'])}, accuracy {_f(c['accuracy'])}"
        out.print(line)
    if report.get("gguf"):
        show_gguf(report["gguf"])
    out.print(f"wrote {report['output']} {timings_line(report['timings'])}")


def show_diff(d: dict) -> None:
    t = Table(title=f"diff ({d['kind']}): A = {d['a']}   B = {d['b']}", title_justify="left")
    for c in ("layer", "tensor", "|A|", "|B|", "|A−B|", "cosine", "rel. change", "eff. rank"):
        t.add_column(c, justify="right")
    for r in d["tensors"]:
        t.add_row(str(r["layer"]), r["tensor"], _g(r["norm_a"]), _g(r["norm_b"]), _g(r["diff_norm"]), _f(r["cosine"]),
                  _g(r["relative_change"]), _f(r["effective_rank"], 1))
    out.print(t)
    if d.get("top_layers"):
        out.print("layers that changed most: " + ", ".join(map(str, d["top_layers"])))
    if d.get("overlap"):
        nums = {k: v for k, v in d["overlap"].items() if isinstance(v, (int, float)) or v is None}
        out.print("overlap: " + ", ".join(f"{k} {_f(v)}" for k, v in nums.items()))
    for n in d.get("notes", []):
        out.print(f"note: {n}")


def adapter_rank(a: dict) -> str:
    """'exact ranks (up to 84)' for the default adapter, 'rank 8' for a truncated one."""
    return f"exact ranks (up to {a['max_rank']})" if a["rank"] is None else f"rank {a['rank']}"


def show_gguf(g: dict) -> None:
    """The GGUF written and what llama.cpp made of it."""
    what = (f"{len(g['replaced'])} tensors replaced ({g['qtype']})" if g["format"] == "gguf"
            else f"LoRA adapter, {g['modules']} modules, ranks up to {g['max_rank']}")
    line = f"wrote {g['path']} ({g['bytes'] / 1e6:.1f} MB): {what}"
    v = g.get("llama_cpp")
    if v and v.get("ran"):
        line += (f"; in llama.cpp: same answers as the patch {_f(v['answer_agreement_vs_transformers'])}, accuracy "
                 f"{_f(v['accuracy'])} (in process {_f(g.get('accuracy_in_process'))})")
        if "answer_agreement_vs_checkpoint" in v:
            line += (f"; same answers as the checkpoint {_f(v['answer_agreement_vs_checkpoint'])} "
                     f"(its accuracy {_f(g.get('accuracy_checkpoint'))})")
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
        t.add_row(str(layer), *[_f(row.get(m)) for m in modules])
    out.print(t)
    line = (f"wrote {a['path']}: mean energy {_f(a['mean_energy'])}, vectors as {a['vector']}; vs in-process patch top-1 "
            f"{_f(a['top1_agreement_vs_in_process'])}, KL {_f(a['mean_kl_vs_in_process'], 5)}")
    if "accuracy" in a:
        line += f"; eval accuracy adapter {_f(a['accuracy'])} vs in-process {_f(a['accuracy_in_process'])}"
    out.print(line)


# --------------------------------------------------------------------------- report.md


SAMPLE_ROWS = 40  # report.md shows this many queries' answers; report.json holds them all


def _cell(text) -> str:
    return "—" if text is None else "`" + str(text).replace("|", "\\|").replace("`", "'").replace("\n", " ⏎ ") + "`"


def samples_markdown(samples: list[dict] | None) -> list[str]:
    if not samples:
        return []
    own = samples[0]["template"]
    rows = [e for e in samples if e["template"] == own]
    conds = [c for c in ("base", "prompt", "patched", "many_shot_prompt") if c in rows[0]]
    lines = ["", f"## Answers on the held-out queries ({min(len(rows), SAMPLE_ROWS)} of {len(rows)}; all in "
             "report.json `samples`)", "", "| input | reference | " + " | ".join(conds) + " |",
             "|---" * (2 + len(conds)) + "|"]
    for e in rows[:SAMPLE_ROWS]:
        ok = e.get("correct") or {}
        lines.append(f"| {_cell(e['input'])} | {_cell(e['reference'])} | "
                     + " | ".join(_cell(e[c]) + (" ✓" if ok.get(c) else "") for c in conds) + " |")
    return lines


def report_markdown(r: dict) -> str:
    f = r["fidelity"]
    lines = [
        f"# transmute report: {r['recipe']['name']}",
        "",
        *[f"**Warning:** {w}" + "\n" for w in r.get("warnings") or []],
        f"- model: `{r['model']['spec']}` ({r['model']['model_type']}, {r['model']['n_layers']} layers, "
        f"fingerprint {r['model']['fingerprint']}, {r['model']['device']}, {r['model']['dtype']})",
        f"- recipe sha256: `{r['recipe']['sha256']}`",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in r["settings"].items() if k != "templates"),
        f"- examples: {r['examples']} ({r['patch_texts']} patch texts: every example in every patch template; "
        f"{f['tokens']} token positions in the recipe's own template)",
        *([f"- a system prompt alone: user messages from {r['recipe']['pool']}"] if r["recipe"].get("pool") else []),
        *[f"- {line}; the labels are in report.json" for line in left_out_lines(r)],
        f"- time {timings_line(r['timings'])} (seconds)",
        "",
        "## Fidelity on the patch examples (patched, no prompt  vs  original, with prompt)",
        "",
        "In-sample, on the examples in the recipe's own template: the solve was fitted to these tokens; see the "
        "held-out and locality sections below for text it never saw.",
        "",
        "| | top-1 agreement | mean KL (nats) |",
        "|---|---|---|",
        f"| unpatched, no prompt | {_f(f['base_top1_agreement'])} | {_f(f['base_mean_kl'])} |",
        f"| patched, no prompt | {_f(f['top1_agreement'])} | {_f(f['mean_kl'])} |",
        *([f"| preservation texts ({f['preserve_tokens']} tokens): patched vs original | "
           f"{_f(f['preserve_top1_agreement'])} | {_f(f['preserve_mean_kl'])} |"] if f.get("preserve_tokens") else []),
        "",
        "| layer | tokens | matrix fit residual | vector/joint residual | |δ| | |A| |",
        "|---|---|---|---|---|---|",
    ]
    for l in f["layers"]:
        lines.append(f"| {l['layer']} | {l['tokens']} | {_f(l['matrix_residual'])} | {_f(l['vector_residual'])} | "
                     f"{_f(l['vector_norm'], 2)} | {_f(l['matrix_norm'], 2)} |")
    h = f.get("heldout")
    if h:
        lines += ["", f"## Fidelity on the {h['queries']} held-out eval queries (against the prompted model)", "",
                  f"| | greedy answers identical | first {h.get('first_tokens', 16)} answer tokens identical | "
                  "mean KL on the prompted answer (nats/token) |", "|---|---|---|---|",
                  f"| unpatched, no prompt | {_f(h['base_answer_agreement'])} | {_f(h.get('base_first_tokens_agreement'))} "
                  f"| {_f(h['base_mean_kl'])} |",
                  f"| patched, no prompt | {_f(h['answer_agreement'])} | {_f(h.get('first_tokens_agreement'))} "
                  f"| {_f(h['mean_kl'])} |"]
    if r.get("locality"):
        lines += locality_markdown(r["locality"])
    if r.get("eval") and r["eval"]["results"]:
        lines += ["", f"## {accuracy_title(r)}", "",
                  "| template | condition | accuracy | correct / n |", "|---|---|---|---|"]
        for e in r["eval"]["results"]:
            lines.append(f"| `{template_label(e['template'])}` | {e['condition']} | {e['accuracy']:.3f} | "
                         f"{e['correct']}/{e['n']} |")
        m = r["eval"].get("many_shot_prompt")
        if m:
            lines.append(f"| `{r['eval']['results'][0]['template']!r}` | prompt + {m['demonstrations']} demonstrations "
                         f"(what the patch distils) | {m['accuracy']:.3f} | {m['correct']}/{m['n']} |")
            h = m.get("heldout")
            if h:
                lines += ["", f"Patched against the many-shot prompt it distils, on the {h['queries']} held-out queries: "
                          f"same greedy answer {_f(h['answer_agreement'])}, KL {_f(h['mean_kl'])} nats/token "
                          f"(unpatched: {_f(h['base_answer_agreement'])}, {_f(h['base_mean_kl'])}); the held-out "
                          "fidelity section measures it against the instruction as written."]
    fmt = (r.get("eval") or {}).get("format")
    if fmt:
        lines += ["", f"## Held-out answers passing answer_format: {fmt['spec']}", "",
                  "| template | condition | passed | n |", "|---|---|---|---|"]
        for e in fmt["results"]:
            lines.append(f"| `{template_label(e['template'])}` | {e['condition']} | {e['rate']:.3f} | "
                         f"{e['passed']}/{e['n']} |")
    rules = (r.get("eval") or {}).get("rules")
    if rules:
        lines += ["", "## Rules, each scored on its own (held-out answers)", "",
                  "| rule | check | no prompt | prompt | patched | patched ÷ prompt |", "|---|---|---|---|---|---|"]
        for name, spec, cells in rule_rows(rules):
            ratio = _rule_ratio(cells)
            rates = " | ".join(_passed(cells[c]) if c in cells else "–" for c in ("base", "prompt", "patched"))
            lines.append(f"| {name} | `{spec}` | {rates} | {'–' if ratio is None else f'{ratio:.2f}'} |")
    lines += samples_markdown(r.get("samples"))
    if r.get("checkpoint") and "skipped" in r["checkpoint"]:
        lines += ["", f"Checkpoint not written: {r['checkpoint']['skipped']}."]
    elif r.get("checkpoint"):
        c = r["checkpoint"]
        lines += ["", "## Saved checkpoint vs in-process patch", "",
                  f"- weights saved in {c.get('dtype', 'float32')}; thought vectors stored as: {c['vector_fold']} "
                  f"({'exact' if c['exact'] else 'approximate'})",
                  f"- top-1 agreement {_f(c['top1_agreement_vs_in_process'])}, mean KL {_f(c['mean_kl_vs_in_process'], 5)} "
                  f"over {c['positions']} positions"]
        if "answer_agreement_vs_in_process" in c:
            lines.append(f"- greedy answers identical on {_f(c['answer_agreement_vs_in_process'])} of the eval queries; "
                         f"checkpoint accuracy {_f(c['accuracy'])}")
    if r.get("gguf"):
        g = r["gguf"]
        v = g.get("llama_cpp") or {}
        lines += ["", "## GGUF for llama.cpp", "", f"- `{g['path']}`, {g['bytes'] / 1e6:.1f} MB, {g['format']}"
                  + (f", patched tensors {g['qtype']}" if g["format"] == "gguf" else "")]
        if v.get("ran"):
            lines.append(f"- in llama.cpp: accuracy {_f(v['accuracy'])}; same answers as the patch in process "
                         f"{_f(v['answer_agreement_vs_transformers'])} (its accuracy {_f(g.get('accuracy_in_process'))})"
                         + (f", as the checkpoint {_f(v['answer_agreement_vs_checkpoint'])} (its accuracy "
                            f"{_f(g.get('accuracy_checkpoint'))})" if "answer_agreement_vs_checkpoint" in v else ""))
        elif v:
            lines.append(f"- not checked in llama.cpp: {v['why']}")
    return "\n".join(lines) + "\n"


_VECTOR_KIND = {"bias": "`lora_bias` of the down projection (exact)",
                "least-squares": "folded into the down projection's update by least squares (approximate)",
                "none": "none"}


def _pair_kind(a: dict) -> str:
    if a["rank"] is None:
        return "each module at its update's own rank: the exact factors the patch was computed as"
    return f"rank {a['rank']}, truncated SVD of each update"


def adapter_card(a: dict, *, base: str, base_kind: str, fingerprint: str, instruction: str | None,
                 template: str | None, version: str, base_path: str | None = None) -> str:
    """README.md of a PEFT adapter folder: what it is, what was measured, how to load its base
    (``base_path``: its ``base_model_name_or_path``, when that is not ``base``)."""
    energies = [e["energy"] for e in a["energy"]]
    local = base_kind in ("alias", "gguf")
    load_base = (f'from transmute_cli.models import resolve  # {base!r}: a transmute {base_kind}, converted once\n'
                 f'base = AutoModelForCausalLM.from_pretrained(resolve({base!r}).path)'
                 if local else f"base = AutoModelForCausalLM.from_pretrained({base!r})")
    lines = [
        "# A transmute thought patch as a PEFT LoRA adapter",
        "",
        f"This adapter makes `{base}` answer, without a prompt, as it answers with the prompt below in its "
        f"context. transmute {version} computed the thought patch (layer-wise ridge solves) and wrote each "
        f"layer's weight update as a LoRA pair ({_pair_kind(a)}; `lora_alpha` = r, scale 1).",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` (weights fingerprint `{fingerprint}`) |",
        f"| rank | {adapter_rank(a)} on {a['modules']} modules |",
        f"| thought vectors | {_VECTOR_KIND[a['vector']]} |",
        f"| captured energy, ‖ΔW_r‖²/‖ΔW‖² | mean {_f(a['mean_energy'])}, lowest {_f(min(energies, default=1.0))} |",
        f"| against the in-process patch | top-1 agreement {_f(a['top1_agreement_vs_in_process'])}, mean KL "
        f"{_f(a['mean_kl_vs_in_process'], 5)} over {a['positions']} positions of the patch texts |",
    ]
    if "accuracy" in a:
        lines.append(f"| eval accuracy (held-out pairs, exact match) | adapter {_f(a['accuracy'])}, in-process patch "
                     f"{_f(a['accuracy_in_process'])} |")
    lines += ["", "## Load", "", "```python", "from peft import AutoPeftModelForCausalLM",
              'model = AutoPeftModelForCausalLM.from_pretrained("THIS_FOLDER")', "```", ""]
    if local and base_path:
        lines += [f"`base_model_name_or_path` is `{base_path}`: the folder transmute converted `{base}` into on the "
                  "machine that wrote this adapter. On another machine (transmute installed), load the base by its "
                  "name and the adapter on it:", ""]
    else:
        lines += ["or, with the base model in hand:", ""]
    lines += ["```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM", load_base,
              'model = PeftModel.from_pretrained(base, "THIS_FOLDER")', "```", "",
              "Answers end at the first newline: pass `stop_strings=[\"\\n\"]` (with `tokenizer=`) to `generate`, "
              "or cut the text there.", ""]
    if a.get("vector") == "bias":
        lines += ["The thought vectors are `lora_bias` terms on layers without a bias of their own, so peft "
                  "cannot `merge_and_unload()` this adapter; `transmute apply --format checkpoint` writes the "
                  "merged model.", ""]
    if instruction is not None:
        fence = "````" if "```" in instruction else "```"
        lines += ["## The prompt it replaces", "", fence, instruction.rstrip("\n"), fence, "",
                  f"Query template: `{template}`.", ""]
    lines += ["`transmute.json` beside this file records the recipe, the patches and every figure above."]
    return "\n".join(lines) + "\n"
