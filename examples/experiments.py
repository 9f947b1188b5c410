"""Reproduce the paper's experiment table on Gemma 3 270M, plus the knobs and beyond-the-paper
measurements.  Every number in docs/results.md's "Results" tables comes from this script.

    python examples/experiments.py table        # every recipe: no prompt / prompt / patched / vector only, all templates
    python examples/experiments.py rho          # ρ sweep (en->fr and dictionary k=8), table + PNG
    python examples/experiments.py examples     # number of examples 1, 5, 10, 20, 40 (en->fr), table + PNG
    python examples/experiments.py components   # vector vs matrix vs both, independent vs joint, table + PNG
    python examples/experiments.py augment      # template augmentation vs template-shift drop (dictionaries)
    python examples/experiments.py side-effects # translation patch vs prompted antonyms; perplexity of a neutral text
    python examples/experiments.py compose      # patch arithmetic: en->fr + uppercase summed (with/without preservation)
    python examples/experiments.py preserve     # preservation texts vs side effects, by weight
    python examples/experiments.py all

Results go to results/<experiment>.json, .md and .png.  Needs matplotlib for the plots
(`pip install -e ".[experiments]"`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transmute_cli import pipeline  # noqa: E402
from transmute_cli.evaluation.heldout import answer_agreement, answer_kl, prompted_reference  # noqa: E402
from transmute_cli.evaluation.generate import evaluate  # noqa: E402
from transmute_cli.engine.hooks import ThoughtHooks  # noqa: E402
from transmute_cli.recipe.datafiles import load_templates, load_texts  # noqa: E402
from transmute_cli.recipe.schema import load_recipe  # noqa: E402

import overrides  # noqa: E402  (examples/overrides.py)

OUT = ROOT / "results"
PRESERVE_FILE = ROOT / "examples" / "preserve.txt"  # preservation texts (experiments preserve, compose)
CAPABILITIES = ["translate-en-fr", "antonyms", "country-capital", "plural", "uppercase", "addition"]
KNOWLEDGE = ["dictionary-k8", "dictionary-k16", "dictionary-k32"]
TEMPLATES = {"addition": "templates-addition.txt", **{k: "templates-dictionary.txt" for k in KNOWLEDGE}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


SETS: dict = {}  # --set KEY=VALUE on every recipe (examples/overrides.py)


def recipe(name: str, **over):
    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    return r.model_copy(update={**SETS, **over})


def alt_templates(name: str) -> list[str]:
    """The first three alternative templates of the task family's file (CPU time: each template
    costs four greedy evaluations per recipe)."""
    return load_templates(ROOT / "examples" / TEMPLATES.get(name, "templates-words.txt"))[:3]


def patch_for(m, r, **over):
    t0 = time.perf_counter()
    res = pipeline.fit(r, m, **over)
    return res, time.perf_counter() - t0


def accuracy(m, r, templates, patch=None, conditions=("patched",)):
    # answers here are at most a few tokens; 8 new tokens is enough to see one and its newline
    res = evaluate(m.model, m.tokenizer, r.instruction, r.eval, templates, patch, conditions=conditions,
                   max_new_tokens=min(r.max_new_tokens, 8))
    return {(x.template, x.condition): x.accuracy for x in res}


def save(name: str, data, md: str) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (OUT / f"{name}.md").write_text(md)
    print(md)


def plot(name: str, xs, series: dict[str, list[float]], xlabel: str, logx: bool = False, title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("exact-match accuracy (held out)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / f"{name}.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- experiments


def exp_table(m) -> None:
    rows = []
    for name in CAPABILITIES + KNOWLEDGE:
        r = recipe(name)
        alts = alt_templates(name)
        log(f"{name}: patches")
        full, t_full = patch_for(m, r)
        vec, _ = patch_for(m, r, components=("vector",), solver="independent")
        log(f"{name}: eval on {1 + len(alts)} templates")
        templates = [r.template] + alts
        base = accuracy(m, r, templates, None, ("base", "prompt"))
        pat = accuracy(m, r, templates, full.patch)
        vo = accuracy(m, r, templates, vec.patch)
        own = r.template
        def mean(d, c, alts=alts):
            return sum(d[(t, c)] for t in alts) / len(alts)

        row = {
            "recipe": name, "n_eval": len(r.eval), "compute_s": round(t_full, 1),
            "own": {"base": base[(own, "base")], "prompt": base[(own, "prompt")], "patched": pat[(own, "patched")],
                    "vector_only": vo[(own, "patched")]},
            "alt_mean": {"base": mean(base, "base"), "prompt": mean(base, "prompt"), "patched": mean(pat, "patched"),
                         "vector_only": mean(vo, "patched")},
            "per_template": {t: {"base": base[(t, "base")], "prompt": base[(t, "prompt")], "patched": pat[(t, "patched")],
                                 "vector_only": vo[(t, "patched")]} for t in templates},
        }
        rows.append(row)
        log(f"{name}: {row['own']}  alt {row['alt_mean']}")
    md = ["| recipe | n | no prompt | prompt | patched | patched ÷ prompt | vector only | alt templates: prompt | alt: patched | alt: vector only |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        o, a = x["own"], x["alt_mean"]
        ratio = o["patched"] / o["prompt"] if o["prompt"] else float("nan")
        md.append(f"| {x['recipe']} | {x['n_eval']} | {o['base']:.2f} | {o['prompt']:.2f} | {o['patched']:.2f} | {ratio:.2f} | "
                  f"{o['vector_only']:.2f} | {a['prompt']:.2f} | {a['patched']:.2f} | {a['vector_only']:.2f} |")
    save("table", rows, "\n".join(md) + "\n")


def exp_rho(m) -> None:
    rhos = [0.0, 1e-3, 1e-2, 0.03, 1e-1, 0.3, 1.0, 10.0]
    data = {}
    for name, solvers in (("translate-en-fr", ("joint",)), ("dictionary-k8", ("joint",))):
        r = recipe(name)
        alts = alt_templates(name)[:2]  # two alternative templates keep the sweep affordable on CPU
        for solver in solvers:
            own, alt = [], []
            for rho in rhos:
                log(f"rho {name} {solver} {rho}")
                res, _ = patch_for(m, r, rho=rho, solver=solver)
                acc = accuracy(m, r, [r.template] + alts, res.patch)
                own.append(acc[(r.template, "patched")])
                alt.append(sum(acc[(t, "patched")] for t in alts) / len(alts))
            data[f"{name} {solver}"] = {"own": own, "alt": alt}
    md = ["| recipe, solver, template | " + " | ".join(f"ρ={x:g}" for x in rhos) + " |", "|---" * (len(rhos) + 1) + "|"]
    for k, v in data.items():
        md.append(f"| {k}, own | " + " | ".join(f"{a:.2f}" for a in v["own"]) + " |")
        md.append(f"| {k}, alt mean | " + " | ".join(f"{a:.2f}" for a in v["alt"]) + " |")
    save("rho", {"rho": rhos, "results": data}, "\n".join(md) + "\n")
    plot("rho", rhos, {f"{k} ({w})": v[w] for k, v in data.items() for w in ("own", "alt")}, "ρ (relative ridge)", logx=True,
         title="ρ sweep")


def exp_examples(m) -> None:
    ns = [1, 5, 10, 20, 40]
    r0 = recipe("translate-en-fr")
    pool = list(r0.examples) + list(r0.eval[20:])  # 40 patch pairs; eval on the first 20 held-out pairs
    ev = r0.eval[:20]
    data = {}
    for solver in ("joint",):  # independent vs joint: see the components experiment
        accs = []
        for n in ns:
            r = r0.model_copy(update=dict(examples=tuple(pool[:n]), eval=tuple(ev)))
            log(f"examples {solver} {n}")
            res, _ = patch_for(m, r, solver=solver)
            accs.append(accuracy(m, r, [r.template], res.patch)[(r.template, "patched")])
        data[solver] = accs
    prompt = accuracy(m, r0.model_copy(update=dict(eval=tuple(ev))), [r0.template], None, ("prompt",))[(r0.template, "prompt")]
    md = ["| solver | " + " | ".join(f"n={n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
    md += [f"| {k} | " + " | ".join(f"{a:.2f}" for a in v) + " |" for k, v in data.items()]
    md.append(f"\nprompt in context on the same 20 held-out words: {prompt:.2f}")
    save("examples", {"n": ns, "results": data, "prompt": prompt, "eval_n": len(ev)}, "\n".join(md) + "\n")
    plot("examples", ns, {**data, "prompt in context": [prompt] * len(ns)}, "number of examples", title="en→fr: examples")


def exp_components(m) -> None:
    variants = [("vector", "independent"), ("matrix", "independent"), ("vector,matrix", "independent"),
                ("vector", "joint"), ("matrix", "joint"), ("vector,matrix", "joint")]
    data = {}
    for name in ("translate-en-fr", "dictionary-k8"):
        r = recipe(name)
        (prompted,) = evaluate(m.model, m.tokenizer, r.instruction, r.eval, [r.template], None, conditions=("prompt",),
                               max_new_tokens=min(r.max_new_tokens, 8))
        ref = prompted_reference(m.model, m.tokenizer, r.instruction, r.eval, r.template, prompted)
        accs = []
        for comps, solver in variants:
            log(f"components {name} {comps} {solver}")
            res, _ = patch_for(m, r, components=tuple(comps.split(",")), solver=solver)
            (pat,) = evaluate(m.model, m.tokenizer, r.instruction, r.eval, [r.template], res.patch,
                              conditions=("patched",), max_new_tokens=min(r.max_new_tokens, 8))
            accs.append({"components": comps, "solver": solver, "accuracy": pat.accuracy,
                         "kl": res.fidelity.mean_kl, "top1": res.fidelity.top1_agreement,
                         "heldout_answer_agreement": answer_agreement(pat.answers, ref),
                         "heldout_kl": answer_kl(m.model, ref, res.patch)})
        data[name] = accs
    md = ["| recipe | " + " | ".join(f"{c} ({s})" for c, s in variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for k, v in data.items():
        md.append(f"| {k} | " + " | ".join(f"{x['accuracy']:.2f}" for x in v) + " |")
    md.append("\nHeld-out fidelity (eval queries): same greedy answer as the prompted model / KL(prompted ‖ patched) "
              "on its answer, nats per token:")
    for k, v in data.items():
        md.append(f"- {k}: " + ", ".join(f"{x['components']}/{x['solver']} {x['heldout_answer_agreement']:.2f} / "
                                         f"{x['heldout_kl']:.3f}" for x in v))
    md.append("\nIn-sample KL (nats/position, on the patch examples the solve was fitted to) per variant:")
    for k, v in data.items():
        md.append(f"- {k}: " + ", ".join(f"{x['components']}/{x['solver']} {x['kl']:.3f}" for x in v))
    save("components", {"variants": variants, "results": data}, "\n".join(md) + "\n")
    plot("components", list(range(len(variants))), {k: [x["accuracy"] for x in v] for k, v in data.items()},
         "variant: " + ", ".join(f"{i}={c}/{s[0]}" for i, (c, s) in enumerate(variants)), title="components and solvers")


def exp_augment(m) -> None:
    """Patch with the recipe's template only, or with it plus two alternative templates; evaluate
    on the *other* alternative templates, never used for patching (the honest template shift)."""
    data = {}
    for name in ["dictionary-k8", "dictionary-k16", "translate-en-fr"]:
        r = recipe(name)
        alts = alt_templates(name)
        alts = load_templates(ROOT / "examples" / TEMPLATES.get(name, "templates-words.txt"))
        train_alts, held = alts[:2], alts[2:]
        row = {}
        for label, pts in (("single template", ()), ("augmented (+2 templates)", tuple(train_alts))):
            rr = r.model_copy(update=dict(patch_templates=pts))
            log(f"augment {name} {label}")
            res, _ = patch_for(m, rr)
            acc = accuracy(m, rr, [r.template] + held, res.patch)
            own = acc[(r.template, "patched")]
            shifted = sum(acc[(t, "patched")] for t in held) / len(held)
            row[label] = {"own": own, "held_out_templates": shifted, "drop_points": 100 * (own - shifted)}
        prompt = accuracy(m, r, [r.template] + held, None, ("prompt",))
        row["prompt"] = {"own": prompt[(r.template, "prompt")],
                         "held_out_templates": sum(prompt[(t, "prompt")] for t in held) / len(held)}
        row["held_out"] = held
        data[name] = row
    md = ["| recipe | prompt: own / held-out templates | single template: own / held-out / drop | augmented: own / held-out / drop |",
          "|---|---|---|---|"]
    for k, v in data.items():
        s, a, p = v["single template"], v["augmented (+2 templates)"], v["prompt"]
        md.append(f"| {k} | {p['own']:.2f} / {p['held_out_templates']:.2f} | {s['own']:.2f} / {s['held_out_templates']:.2f} / "
                  f"{s['drop_points']:.0f} pts | {a['own']:.2f} / {a['held_out_templates']:.2f} / {a['drop_points']:.0f} pts |")
    save("augment", data, "\n".join(md) + "\n")


def perplexity(m, text: str, patch=None) -> float:
    ids = m.tokenizer(text, return_tensors="pt")["input_ids"][:, :512].to(next(m.model.parameters()).device)
    with torch.no_grad(), ThoughtHooks(m.model, m.fam) as hooks:
        if patch is not None:
            hooks.set_patch(patch)
        else:
            hooks.enabled = False
        loss = m.model(input_ids=ids, labels=ids).loss.item()
    return math.exp(loss)


def exp_side_effects(m) -> None:
    data = {}
    # with the joint solver "matrix" is the input-side A and the down-projection D: no thought vector
    for label, over in (("vector+matrix", {}), ("matrices only (A, D)", {"components": ("matrix",)})):
        data[label] = _side_effects(m, **over)
    md = ["| prompted task | accuracy before | with the en→fr patch (vector+matrices) | with the en→fr patch (matrices A, D only) |",
          "|---|---|---|---|"]
    for k in ("antonyms", "country-capital", "plural"):
        a, b = data["vector+matrix"][k], data["matrices only (A, D)"][k]
        md.append(f"| {k} | {a['prompted_before']:.2f} | {a['prompted_with_translation_patch']:.2f} ({a['change_points']:+.0f} pts) | "
                  f"{b['prompted_with_translation_patch']:.2f} ({b['change_points']:+.0f} pts) |")
    for label, v in data.items():
        md.append(f"\nperplexity of examples/neutral.txt, {label}: {v['perplexity']['before']:.2f} before, "
                  f"{v['perplexity']['with_translation_patch']:.2f} with the en→fr patch "
                  f"(its own accuracy: {v['own_accuracy']:.2f})")
    save("side_effects", data, "\n".join(md) + "\n")


def _side_effects(m, tr=None, **over) -> dict:
    tr = tr or recipe("translate-en-fr")
    res, _ = patch_for(m, tr, **over)
    data = {"own_accuracy": accuracy(m, tr, [tr.template], res.patch)[(tr.template, "patched")]}
    for other in ("antonyms", "country-capital", "plural"):
        r = recipe(other)
        before = accuracy(m, r, [r.template], None, ("prompt",))[(r.template, "prompt")]
        with ThoughtHooks(m.model, m.fam) as hooks:  # the patch stays on; the other task is prompted
            hooks.set_patch(res.patch)
            after = evaluate(m.model, m.tokenizer, r.instruction, r.eval, [r.template], None, conditions=("prompt",),
                             max_new_tokens=r.max_new_tokens)[0].accuracy
        data[other] = {"prompted_before": before, "prompted_with_translation_patch": after,
                       "change_points": 100 * (after - before)}
        log(f"side effects {other}: {data[other]}")
    text = (ROOT / "examples" / "neutral.txt").read_text()
    data["perplexity"] = {"before": perplexity(m, text), "with_translation_patch": perplexity(m, text, res.patch)}
    return data


def exp_compose(m) -> None:
    """Patch arithmetic: an en->fr patch and an uppercase patch queried with its own template,
    summed (`apply -p a:1 -p b:1`); each task evaluated with the composed patch.  Twice: patches
    fitted on their task alone, and with examples/preserve.txt as preservation texts (weight 1, ρ 1
    as in recipes/translate-en-fr-preserve.yaml),
    which asks each patch to leave other inputs alone — and so to stay out of the other's way."""
    from transmute_cli.artifacts.diff import diff_patches
    from transmute_cli.artifacts.patch import combine

    up = recipe("uppercase")
    # the second task gets its own cue, "=>", in its demonstrations and its template
    tasks = [recipe("translate-en-fr"), up.model_copy(update=dict(instruction=up.instruction.replace(" -> ", " => "),
                                                             template="{input} => {output}"))]
    keep = tuple(load_texts(PRESERVE_FILE))
    data = {}
    for label, over in (("alone", {}), ("preserve", {"preserve": keep, "preserve_weight": 1.0, "rho": 1.0})):
        rs = [r.model_copy(update=over) for r in tasks]
        patches = [patch_for(m, r)[0].patch for r in rs]
        both = combine([(p, 1.0) for p in patches])
        rows = {}
        for r, p in zip(rs, patches):
            alone = accuracy(m, r, [r.template], p)[(r.template, "patched")]
            composed = accuracy(m, r, [r.template], both)[(r.template, "patched")]
            prompt = accuracy(m, r, [r.template], None, ("prompt",))[(r.template, "prompt")]
            rows[r.name] = {"template": r.template, "prompt": prompt, "alone": alone, "composed": composed}
            log(f"compose ({label}) {r.name}: {rows[r.name]}")
        rows["overlap"] = diff_patches(patches[0], patches[1], "en-fr", "uppercase").to_json().get("overlap")
        data[label] = rows
    md = ["| task (template) | prompt | patch alone | both summed | with preservation texts: alone | both summed |",
          "|---|---|---|---|---|---|"]
    for k, v in data["alone"].items():
        if k != "overlap":
            w = data["preserve"][k]
            md.append(f"| {k} (`{v['template']}`) | {v['prompt']:.2f} | {v['alone']:.2f} | {v['composed']:.2f} | "
                      f"{w['alone']:.2f} | {w['composed']:.2f} |")
    for label in data:
        ov = data[label]["overlap"] or {}
        md.append(f"\noverlap (transmute diff), {label}: cosine of all tensors {ov.get('cosine_all', float('nan')):.3f}, "
                  f"matrix subspace overlap {ov.get('matrix_subspace_overlap', float('nan')):.3f}")
    save("compose", data, "\n".join(md) + "\n")


def exp_preserve(m, weights=(0.1, 0.3, 1.0), rhos=(0.3, 1.0)) -> None:
    """Preservation texts (examples/preserve.txt: other prompted tasks and prose) against the side
    effects of the en->fr patch, at several weights (recipe's ρ), then at weight 1 with larger ρ;
    the side effects are measured on prompted tasks and a neutral text that are *not* among the
    preservation texts."""
    texts = tuple(load_texts(PRESERVE_FILE))
    tr = recipe("translate-en-fr")
    data = {"none": _side_effects(m, tr)}
    log(f"preserve none: {data['none']}")
    runs = [(str(w), w, {}) for w in weights] + [(f"1.0, rho={r:g}", 1.0, {"rho": r}) for r in rhos]
    for key, w, over in runs:
        data[key] = _side_effects(m, tr.model_copy(update=dict(preserve=texts, preserve_weight=w, **over)))
        log(f"preserve {key}: {data[key]}")
    tasks = ("antonyms", "country-capital", "plural")
    md = [f"| preservation weight (ρ = {tr.rho:g} unless stated) | en→fr patched (own) | "
          + " | ".join(f"prompted {t}" for t in tasks)
          + " | perplexity of neutral.txt |", "|---|---|" + "---|" * len(tasks) + "---|"]
    before = data["none"]
    md.append("| no patch | – | " + " | ".join(f"{before[t]['prompted_before']:.2f}" for t in tasks)
              + f" | {before['perplexity']['before']:.2f} |")
    for k, v in data.items():
        md.append(f"| {'no preservation' if k == 'none' else k} | {v['own_accuracy']:.2f} | "
                  + " | ".join(f"{v[t]['prompted_with_translation_patch']:.2f} ({v[t]['change_points']:+.0f})" for t in tasks)
                  + f" | {v['perplexity']['with_translation_patch']:.2f} |")
    save("preserve", data, "\n".join(md) + "\n")


EXPERIMENTS = {"table": exp_table, "rho": exp_rho, "examples": exp_examples, "components": exp_components,
               "augment": exp_augment, "side-effects": exp_side_effects, "compose": exp_compose,
               "preserve": exp_preserve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    ap.add_argument("--device", default="auto")
    overrides.add_argument(ap)
    args = ap.parse_args()
    SETS.update(overrides.parse(args.set))
    torch.manual_seed(0)
    m = pipeline.load_model("gemma-3-270m", device=args.device)
    for name in EXPERIMENTS if args.experiment == "all" else [args.experiment]:
        t0 = time.perf_counter()
        EXPERIMENTS[name](m)
        log(f"{name} done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
