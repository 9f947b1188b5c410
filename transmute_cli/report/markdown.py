"""report.md and the PEFT adapter's model card."""

from __future__ import annotations




from transmute_cli.report.text import (
    fixed, template_label, accuracy_title, passed_cell, rule_rows, rule_ratio, locality_markdown, timings_line,
    left_out_lines, adapter_rank,
)


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
        f"| unpatched, no prompt | {fixed(f['base_top1_agreement'])} | {fixed(f['base_mean_kl'])} |",
        f"| patched, no prompt | {fixed(f['top1_agreement'])} | {fixed(f['mean_kl'])} |",
        *([f"| preservation texts ({f['preserve_tokens']} tokens): patched vs original | "
           f"{fixed(f['preserve_top1_agreement'])} | {fixed(f['preserve_mean_kl'])} |"] if f.get("preserve_tokens") else []),
        "",
        "| layer | tokens | matrix fit residual | vector/joint residual | |δ| | |A| |",
        "|---|---|---|---|---|---|",
    ]
    for l in f["layers"]:
        lines.append(f"| {l['layer']} | {l['tokens']} | {fixed(l['matrix_residual'])} | {fixed(l['vector_residual'])} | "
                     f"{fixed(l['vector_norm'], 2)} | {fixed(l['matrix_norm'], 2)} |")
    h = f.get("heldout")
    if h:
        lines += ["", f"## Fidelity on the {h['queries']} held-out eval queries (against the prompted model)", "",
                  f"| | greedy answers identical | first {h.get('first_tokens', 16)} answer tokens identical | "
                  "mean KL on the prompted answer (nats/token) |", "|---|---|---|---|",
                  f"| unpatched, no prompt | {fixed(h['base_answer_agreement'])} | {fixed(h.get('base_first_tokens_agreement'))} "
                  f"| {fixed(h['base_mean_kl'])} |",
                  f"| patched, no prompt | {fixed(h['answer_agreement'])} | {fixed(h.get('first_tokens_agreement'))} "
                  f"| {fixed(h['mean_kl'])} |"]
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
                          f"same greedy answer {fixed(h['answer_agreement'])}, KL {fixed(h['mean_kl'])} nats/token "
                          f"(unpatched: {fixed(h['base_answer_agreement'])}, {fixed(h['base_mean_kl'])}); the held-out "
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
            ratio = rule_ratio(cells)
            rates = " | ".join(passed_cell(cells[c]) if c in cells else "–" for c in ("base", "prompt", "patched"))
            lines.append(f"| {name} | `{spec}` | {rates} | {'–' if ratio is None else f'{ratio:.2f}'} |")
    lines += samples_markdown(r.get("samples"))
    if r.get("checkpoint") and "skipped" in r["checkpoint"]:
        lines += ["", f"Checkpoint not written: {r['checkpoint']['skipped']}."]
    elif r.get("checkpoint"):
        c = r["checkpoint"]
        lines += ["", "## Saved checkpoint vs in-process patch", "",
                  f"- weights saved in {c.get('dtype', 'float32')}; thought vectors stored as: {c['vector_fold']} "
                  f"({'exact' if c['exact'] else 'approximate'})",
                  f"- top-1 agreement {fixed(c['top1_agreement_vs_in_process'])}, mean KL {fixed(c['mean_kl_vs_in_process'], 5)} "
                  f"over {c['positions']} positions"]
        if "answer_agreement_vs_in_process" in c:
            lines.append(f"- greedy answers identical on {fixed(c['answer_agreement_vs_in_process'])} of the eval queries; "
                         f"checkpoint accuracy {fixed(c['accuracy'])}")
    if r.get("gguf"):
        g = r["gguf"]
        v = g.get("llama_cpp") or {}
        lines += ["", "## GGUF for llama.cpp", "", f"- `{g['path']}`, {g['bytes'] / 1e6:.1f} MB, {g['format']}"
                  + (f", patched tensors {g['qtype']}" if g["format"] == "gguf" else "")]
        if v.get("ran"):
            lines.append(f"- in llama.cpp: accuracy {fixed(v['accuracy'])}; same answers as the patch in process "
                         f"{fixed(v['answer_agreement_vs_transformers'])} (its accuracy {fixed(g.get('accuracy_in_process'))})"
                         + (f", as the checkpoint {fixed(v['answer_agreement_vs_checkpoint'])} (its accuracy "
                            f"{fixed(g.get('accuracy_checkpoint'))})" if "answer_agreement_vs_checkpoint" in v else ""))
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
    load_base = (f'from transmute_cli.model.sources import resolve  # {base!r}: a transmute {base_kind}, converted once\n'
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
        f"| captured energy, ‖ΔW_r‖²/‖ΔW‖² | mean {fixed(a['mean_energy'])}, lowest {fixed(min(energies, default=1.0))} |",
        f"| against the in-process patch | top-1 agreement {fixed(a['top1_agreement_vs_in_process'])}, mean KL "
        f"{fixed(a['mean_kl_vs_in_process'], 5)} over {a['positions']} positions of the patch texts |",
    ]
    if "accuracy" in a:
        lines.append(f"| eval accuracy (held-out pairs, exact match) | adapter {fixed(a['accuracy'])}, in-process patch "
                     f"{fixed(a['accuracy_in_process'])} |")
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
