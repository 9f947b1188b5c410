"""Does the patch behave like the prompt outside the examples? Own task, held-out query
templates, other prompted tasks and a neutral text, each against the *prompted* model.

    python examples/locality.py                              # the default recipes, before vs the defaults
    python examples/locality.py --recipes translate-en-fr --variants before,defaults,w1
    python examples/locality.py --out locality-sweep         # -> results/locality-sweep.{json,md}

Per recipe (one model load for the run; the prompted and no-prompt conditions are run once per
recipe, the patched ones once per variant):

- own: accuracy on the recipe's eval pairs in its template — prompt vs patched;
- templates: the held-out query templates of ``examples/templates-*.txt`` (none of them is a
  format the defaults patch in) — the prompt rewritten in that template (its demonstrations in it,
  as a user prompting that way writes it) vs patched;
- other tasks: antonyms, country-capital and plural (recipes/), each prompted with the recipe's
  instruction *in front* (the prompted reference: what the prompt in context does to a task
  prompted after it), without it (base), and prompted without it on the patched model;
- neutral text (examples/neutral.txt): perplexity with the instruction in front (reference),
  without it, and patched; KL(prompted ‖ patched) per position.

Variants are settings over the recipe: ``before`` = the defaults of the previous tree (no broad
texts), ``defaults`` = the recipe as it is, ``preserve`` = the shipped preservation texts
(examples/preserve.txt, ρ 1, as recipes/translate-en-fr-preserve.yaml) on top of ``before``,
``prompted`` = the broad texts through the loop toward the prompted model, ``augment`` = the
defaults with format augmentation, ``user-formats`` = the defaults with two of the held-out
templates as patch_templates, and sweep points (see VARIANTS).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transmute_cli import pipeline  # noqa: E402
from transmute_cli.recipe.datafiles import load_templates, load_texts, shipped_texts  # noqa: E402
from transmute_cli.evaluation.generate import evaluate  # noqa: E402
from transmute_cli.engine.hooks import ThoughtHooks  # noqa: E402
from transmute_cli.recipe.schema import load_recipe  # noqa: E402

OUT = ROOT / "results"
OTHERS = ("antonyms", "country-capital", "plural")
VARIANTS = {
    "before": {"augment": False, "broad": "off"},
    "defaults": {},
    "augment-only": {"broad": "off"},
    "augment": {"augment": True},
    # a user who queries in other formats lists them (they are then no longer held out)
    "user-formats": {"patch_templates": ("{input}: {output}", "{input} = {output}")},
    "preserve": {"augment": False, "broad": "off", "rho": 1.0,
                 "preserve": tuple(load_texts(ROOT / "examples" / "preserve.txt"))},
    # the broad texts through the loop: toward the prompted model, or the original one (exact, costly)
    "prompted": {"augment": False, "broad": "prompted"},
    "exact-original": {"augment": False, "broad": "off", "rho": 1.0, "preserve": shipped_texts("broad.txt")},
}
# format augmentation in many query formats (none of them a held-out template of either list):
# does a patch fitted on bare queries in eight separators act on a ninth it never saw?
MANY_FORMATS = ("{input} | {output}", "In: {input}\nOut: {output}", "{input} -- {output}", "{input} → {output}",
                "{input} >> {output}", "{input}; {output}", "Word: {input}\nAnswer: {output}", "{input} ~ {output}")
for _w in (3.0, 10.0, 30.0):
    VARIANTS[f"formats8-w{_w:g}"] = {"augment": False, "broad_weight": _w, "patch_templates": MANY_FORMATS}
# the cached second moments (broad: original) over weights and ρ, with and without augmentation
for _w in (0.1, 0.3, 1.0, 3.0, 10.0):
    for _rho in (0.03, 0.1, 0.3, 1.0):
        VARIANTS[f"orig-w{_w:g}-rho{_rho:g}"] = {"augment": False, "broad": "original", "broad_weight": _w, "rho": _rho}
        VARIANTS[f"aug-orig-w{_w:g}-rho{_rho:g}"] = {"broad": "original", "broad_weight": _w, "rho": _rho}
# AlphaEdit's null-space constraint on top of the defaults: the matrices may not act on the leading
# directions of the broad texts' inputs holding this share of their energy (EngineConfig.null_space)
for _e in (0.5, 0.9, 0.99):
    VARIANTS[f"null{_e:g}"] = {"_null_space": _e}
    VARIANTS[f"null{_e:g}-w0.3"] = {"_null_space": _e, "broad_weight": 0.3}
# recipes under recipes/ or examples/tasks/ or examples/trials/, by name
WHERE = [ROOT / "recipes", ROOT / "examples" / "tasks", ROOT / "examples" / "trials"]
DEFAULT_RECIPES = ("translate-en-fr", "en-es", "element-symbol", "nationality", "dictionary-k8", "roman")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def find(name: str):
    for d in WHERE:
        if (d / f"{name}.yaml").is_file():
            return load_recipe(d / f"{name}.yaml")
    raise SystemExit(f"no recipe {name} in {', '.join(str(d) for d in WHERE)}")


def held_templates(r) -> list[str]:
    name = "templates-dictionary.txt" if r.name.startswith("dictionary") else "templates-words.txt"
    return [t for t in load_templates(ROOT / "examples" / name) if t != r.template]


def joined(first: str, second: str) -> str:
    """``first`` kept in front of another task's prompt: a blank line between the two."""
    return first.rstrip("\n") + "\n\n" + second


def acc(m, instruction, pairs, templates, patch=None, conditions=("patched",), demos=None) -> dict:
    res = evaluate(m.model, m.tokenizer, instruction, pairs, templates, patch, conditions=conditions,
                   max_new_tokens=8, demonstrations=demos)
    return {(x.template, x.condition): x.accuracy for x in res}


def other_references(m, r) -> dict:
    """Each other task prompted alone (base) and with ``r``'s instruction in front (the reference)."""
    out = {}
    for name in OTHERS:
        if name == r.name:
            continue
        o = find(name)
        alone = acc(m, o.instruction, o.eval, [o.template], None, ("prompt",))[(o.template, "prompt")]
        front = acc(m, joined(r.instruction, o.instruction), o.eval, [o.template], None,
                    ("prompt",))[(o.template, "prompt")]
        out[name] = {"base": alone, "reference": front}
    return out


def other_tasks(m, names, patch=None) -> dict:
    """Each other task prompted without the recipe's instruction, on the model as it is now (a
    LoRA attached, a steering hook on) or with ``patch`` in hooks."""
    out = {}
    for name in names:
        o = find(name)
        with ThoughtHooks(m.model, m.fam) if patch is not None else contextlib.nullcontext() as hooks:
            if hooks is not None:
                hooks.set_patch(patch)
            out[name] = acc(m, o.instruction, o.eval, [o.template], None, ("prompt",))[(o.template, "prompt")]
    return out


def neutral_reference(m, r, neutral: str | None = None):
    """examples/neutral.txt (all of it) after ``pre + I`` and after ``pre`` (pipeline.locality_reference)."""
    neutral = neutral if neutral is not None else (ROOT / "examples" / "neutral.txt").read_text()
    return pipeline.locality_reference(r, m, text=("examples/neutral.txt", neutral), max_tokens=None)


def references(m, r, neutral: str) -> dict:
    """What does not depend on the patch: the prompt and no-prompt conditions."""
    temps = [r.template] + held_templates(r)
    a = acc(m, r.instruction, r.eval, temps, None, ("base", "prompt"), demos=r.template)
    ref = {"own": {"prompt": a[(r.template, "prompt")], "base": a[(r.template, "base")]},
           "templates": {t: a[(t, "prompt")] for t in temps[1:]}, "others": other_references(m, r)}
    ref["_neutral"] = neutral_reference(m, r, neutral)
    return ref


def measure(m, r, ref: dict, over: dict) -> dict:
    # keys starting with "_" are engine settings that are not recipe keys (EngineConfig)
    engine = {k[1:]: v for k, v in over.items() if k.startswith("_")}
    rr = r.model_copy(update={k: v for k, v in over.items() if not k.startswith("_")})
    t0 = time.perf_counter()
    res = pipeline.fit(rr, m, **engine)
    compute_s = time.perf_counter() - t0
    temps = [r.template] + held_templates(r)
    a = acc(m, r.instruction, r.eval, temps, res.patch)
    row = {"compute_s": compute_s, "engine_timings": res.timings, "own": a[(r.template, "patched")],
           "templates": {t: a[(t, "patched")] for t in temps[1:]}}
    row["others"] = other_tasks(m, ref["others"], res.patch)  # the patch on; the other task prompted
    row["neutral"] = pipeline.locality_json(ref["_neutral"], m.model, m.fam, res.patch)
    return row


def summary(r, ref: dict, row: dict) -> dict:
    """The issue's targets for one recipe and variant: own ≥ 0.9 × prompt (prompt ≥ 0.3); each
    other task within 5 points of the reference; perplexity ≤ 1.1 × the reference's; each held-out
    template ≥ 0.9 × the rewritten prompt (where it ≥ 0.3)."""
    own_ok = ref["own"]["prompt"] < 0.3 or row["own"] >= 0.9 * ref["own"]["prompt"]
    drops = {k: 100 * (row["others"][k] - v["reference"]) for k, v in ref["others"].items()}
    ppl_ratio = row["neutral"]["perplexity_patched"] / row["neutral"]["perplexity_prompted"]
    tmpl = {t: (row["templates"][t] / p if p else None) for t, p in ref["templates"].items() if p >= 0.3}
    return {"own_ok": own_ok, "others_points": drops, "others_ok": all(d >= -5 for d in drops.values()),
            "ppl_ratio": ppl_ratio, "ppl_ok": ppl_ratio <= 1.1, "template_ratios": tmpl,
            "templates_ok": all(v >= 0.9 for v in tmpl.values())}


def summary_markdown(data: dict) -> str:
    """One line per recipe and variant: the issue's four measures side by side (docs/results.md, "Locality and query formats")."""
    md = ["| recipe | variant | own: patched (prompt) | other tasks vs the reference, points (antonyms / "
          "country-capital / plural) | neutral ppl ÷ reference | KL(prompted ‖ patched) (‖ unpatched) | "
          "held-out templates: patched / rewritten prompt | compute s |", "|---|---|---|---|---|---|---|---|"]
    for name, d in data.items():
        ref = d["reference"]
        for v, row in d["variants"].items():
            s = row["summary"]
            pts = " / ".join(f"{s['others_points'][k]:+.0f}" for k in ref["others"])
            temps = [(row["templates"][t], p) for t, p in ref["templates"].items() if p >= 0.3]
            tm = (f"{sum(a for a, _ in temps) / len(temps):.2f} / {sum(p for _, p in temps) / len(temps):.2f}"
                  if temps else "–")
            n = row["neutral"]
            md.append(f"| {name} | {v} | {row['own']:.2f} ({ref['own']['prompt']:.2f}) | {pts} | "
                      f"{n['perplexity_patched'] / n['perplexity_prompted']:.2f} | {n['mean_kl']:.3f} "
                      f"({n['base_mean_kl']:.3f}) | {tm} | {row['compute_s']:.1f} |")
    return "\n".join(md) + "\n\nHeld-out templates: mean over the templates where the rewritten prompt scores >= 0.3.\n"


def aggregate_markdown(data: dict) -> str:
    """Per variant, over every recipe of the run: how many meet each target, and the spread."""
    import statistics

    variants = list(dict.fromkeys(v for d in data.values() for v in d["variants"]))
    md = ["| variant | recipes | own ≥ 0.9× prompt (prompt ≥ 0.3) | other tasks all within 5 points | worst other-task "
          "drop, median (max) | neutral ppl ≤ 1.1× | ppl ÷ reference, median (max) | held-out templates: mean "
          "patched / rewritten prompt |", "|---|---|---|---|---|---|---|---|"]
    for v in variants:
        rows = [(d["reference"], d["variants"][v]) for d in data.values() if v in d["variants"]]
        own = [r["summary"]["own_ok"] for ref, r in rows if ref["own"]["prompt"] >= 0.3]
        worst = [min(r["summary"]["others_points"].values()) for _, r in rows]
        ppl = [r["summary"]["ppl_ratio"] for _, r in rows]
        temps = [(r["templates"][t], p) for ref, r in rows for t, p in ref["templates"].items() if p >= 0.3]
        tm = f"{statistics.mean(a for a, _ in temps):.2f} / {statistics.mean(p for _, p in temps):.2f}" if temps else "–"
        md.append(f"| {v} | {len(rows)} | {sum(own)}/{len(own)} | {sum(r['summary']['others_ok'] for _, r in rows)}/{len(rows)} | "
                  f"{statistics.median(worst):+.0f} ({min(worst):+.0f}) | {sum(x <= 1.1 for x in ppl)}/{len(rows)} | "
                  f"{statistics.median(ppl):.2f} ({max(ppl):.2f}) | {tm} |")
    return "\n".join(md) + "\n"


def markdown(data: dict) -> str:
    md = ["| recipe | variant | compute s | own (prompt) | held-out templates: patched / rewritten prompt | "
          "other tasks: patched / with I in front (alone) | neutral ppl: patched / with I (alone) | KL(prompted‖patched) (‖unpatched) | targets met |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, d in data.items():
        ref = d["reference"]
        for v, row in d["variants"].items():
            s = row["summary"]
            t = " · ".join(f"{row['templates'][k]:.2f}/{p:.2f}" for k, p in ref["templates"].items())
            o = " · ".join(f"{k} {row['others'][k]:.2f}/{x['reference']:.2f} ({x['base']:.2f})" for k, x in ref["others"].items())
            n = row["neutral"]
            met = [k for k in ("own_ok", "templates_ok", "others_ok", "ppl_ok") if s[k]]
            md.append(f"| {name} | {v} | {row['compute_s']:.1f} | {row['own']:.2f} ({ref['own']['prompt']:.2f}) | {t} | {o} | "
                      f"{n['perplexity_patched']:.1f} / {n['perplexity_prompted']:.1f} ({n['perplexity_base']:.1f}) | "
                      f"{n['mean_kl']:.3f} ({n['base_mean_kl']:.3f}) | {len(met)}/4 {' '.join(k[:-3] for k in met)} |")
    temps = next(iter(data.values()))["reference"]["templates"] if data else {}
    md.append("\nHeld-out templates, in order: " + ", ".join(f"`{t!r}`" for t in temps))
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES))
    ap.add_argument("--variants", default="before,defaults")
    ap.add_argument("--out", default="locality")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md beside a results JSON (no model run)")
    args = ap.parse_args()
    if args.render:
        path = Path(args.render)
        data = json.loads(path.read_text())
        path.with_suffix(".md").write_text(markdown(data) + "\n" + summary_markdown(data) + "\n" + aggregate_markdown(data))
        return
    torch.manual_seed(0)
    m = pipeline.load_model("gemma-3-270m", device=args.device)
    neutral = (ROOT / "examples" / "neutral.txt").read_text()
    data = {}
    for name in args.recipes.split(","):
        r = find(name)
        log(f"{name}: references")
        ref = references(m, r, neutral)
        data[name] = {"reference": {k: v for k, v in ref.items() if not k.startswith("_")}, "variants": {}}
        for v in args.variants.split(","):
            log(f"{name}: {v}")
            row = measure(m, r, ref, VARIANTS[v])
            row["summary"] = summary(r, ref, row)
            data[name]["variants"][v] = row
            log(f"{name} {v}: {json.dumps(row['summary'])} own {row['own']:.2f} compute {row['compute_s']:.1f}s")
        OUT.mkdir(exist_ok=True)
        (OUT / f"{args.out}.json").write_text(json.dumps(data, indent=2) + "\n")
        (OUT / f"{args.out}.md").write_text(markdown(data) + "\n" + summary_markdown(data) + "\n" + aggregate_markdown(data))
    print(markdown(data) + "\n" + summary_markdown(data) + "\n" + aggregate_markdown(data))


if __name__ == "__main__":
    main()
