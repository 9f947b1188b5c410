"""Plain-text pieces every rendering shares: numbers, template and condition names, rule and timing
lines, the locality title."""

from __future__ import annotations


import math


from transmute_cli.evaluation.generate import CHAT_TEMPLATE


def fixed(x, d: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{d}f}" if math.isfinite(x) else str(x)
    return str(x)


def general(x) -> str:
    """A magnitude in 4 significant figures (norms span 1e-6 to 1e4: fixed decimals waste width)."""
    return f"{x:.4g}" if isinstance(x, float) and math.isfinite(x) else fixed(x)


def template_label(template: str) -> str:
    """A template as results name it: quoted, so its spaces and newlines show; a chat recipe's
    ``evaluate.CHAT_TEMPLATE`` as it is."""
    return template if template == CHAT_TEMPLATE else repr(template)


CONDITION_NAMES = {"base": "no prompt", "prompt": "prompt in context", "patched": "patched (no prompt)"}


def accuracy_title(report: dict) -> str:
    chat = report.get("settings", {}).get("chat")
    what = "the answer contains the reference" if chat else "exact match, answer cut at newline"
    return f"Accuracy on the held-out pairs (greedy, {what})"


def passed_cell(e: dict) -> str:
    """A format or rule result as "rate (passed/n)"."""
    return f"{e['rate']:.3f} ({e['passed']}/{e['n']})"


def rule_rows(rules: list[dict]) -> list[tuple[str, str, dict[str, dict]]]:
    """(rule, spec, {condition: result}) on the recipe's own template (the first listed)."""
    rows = []
    for rule in rules:
        own = rule["results"][0]["template"] if rule["results"] else None
        rows.append((rule["name"], rule["spec"], {e["condition"]: e for e in rule["results"] if e["template"] == own}))
    return rows


def rule_ratio(cells: dict[str, dict]) -> float | None:
    if "patched" not in cells or "prompt" not in cells or not cells["prompt"]["rate"]:
        return None
    return cells["patched"]["rate"] / cells["prompt"]["rate"]


LOCALITY_TITLE = ("Locality: a text that is not the task's ({tokens} tokens of {text}), against the prompted model"
                  " (the instruction in front)")


def locality_markdown(loc: dict) -> list[str]:
    return ["", "## " + LOCALITY_TITLE.format(tokens=loc["tokens"], text=f"`{loc['text']}`"), "",
            "| | top-1 agreement | mean KL (nats) | perplexity |", "|---|---|---|---|",
            f"| prompted (reference) | | | {fixed(loc['perplexity_prompted'], 2)} |",
            f"| no prompt, unpatched | {fixed(loc['base_top1_agreement'])} | {fixed(loc['base_mean_kl'])} | "
            f"{fixed(loc['perplexity_base'], 2)} |",
            f"| no prompt, patched | {fixed(loc['top1_agreement'])} | {fixed(loc['mean_kl'])} | "
            f"{fixed(loc['perplexity_patched'], 2)} |"]


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


def adapter_rank(a: dict) -> str:
    """'exact ranks (up to 84)' for the default adapter, 'rank 8' for a truncated one."""
    return f"exact ranks (up to {a['max_rank']})" if a["rank"] is None else f"rank {a['rank']}"
