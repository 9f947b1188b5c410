"""The held-out task suite (examples/tasks/): how close the patched model, queried without the
prompt, comes to the prompted one — on tasks the defaults were not tuned on.

    python examples/task_suite.py                       # the report split, defaults -> results/suite.{json,md}
    python examples/task_suite.py --split tune --sweep  # the sweep the defaults were chosen from -> results/sweep.{json,md}

Every task is a recipe with only ``instruction``, ``template``, ``examples`` and ``eval``: what a
user writes first. Per task: accuracy with no prompt, with the prompt, patched (no prompt),
patched ÷ prompt, and held-out fidelity (share of greedy answers identical to the prompted
model's, KL(prompted ‖ patched) on the prompted answer). One model load for the whole run; the
no-prompt and prompt conditions do not depend on the patch settings and are run once per task.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transmute_cli.evaluation.heldout import answer_agreement, answer_kl, prompted_reference  # noqa: E402

from transmute_cli.evaluation.generate import evaluate  # noqa: E402
from transmute_cli.pipeline import fit  # noqa: E402
from transmute_cli.model.loading import load_model  # noqa: E402
from transmute_cli.recipe.schema import load_recipe  # noqa: E402

import overrides  # noqa: E402  (examples/overrides.py)

TASKS = ROOT / "examples" / "tasks"
# the settings compared on the tune split, each spelled out in full (not relative to the defaults,
# which were chosen from this sweep)
SWEEP = [
    *({"solver": "joint", "rho": rho} for rho in (0.01, 0.03, 0.1, 0.3, 1.0)),
    *({"solver": "independent", "rho": rho} for rho in (0.01, 0.1)),
    # batches (step η = 1/batches unless given), η and components at the chosen ρ
    {"solver": "joint", "rho": 0.03, "batches": 2},
    {"solver": "joint", "rho": 0.03, "batches": 4},
    {"solver": "joint", "rho": 0.03, "batches": 2, "eta": 1.0},
    {"solver": "joint", "rho": 0.03, "eta": 0.7},
    {"solver": "joint", "rho": 0.03, "components": ("matrix",)},
    {"solver": "joint", "rho": 0.03, "components": ("vector",)},
]
FLOOR = 0.3  # the target (patched >= 0.9 x prompted) applies where the prompt reaches this


def split_of(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# split:"):
            return line.split(":", 1)[1].strip()
    return "report"


def style_of(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# style:"):
            return line.split(":", 1)[1].strip()
    return "?"


def label(over: dict) -> str:
    if not over:
        return "defaults"
    return ", ".join(f"{k}={'+'.join(v) if isinstance(v, tuple) else v}" for k, v in over.items())


def run(args) -> dict:
    files = sorted(p for p in TASKS.glob("*.yaml") if args.split == "all" or split_of(p) == args.split)
    if args.tasks:
        files = [p for p in files if p.stem in args.tasks]
    loaded = load_model(args.model, device=args.device)
    configs = SWEEP if args.sweep else [{}]
    rows = []
    sets = overrides.parse(args.set)
    for path in files:
        recipe = load_recipe(path).model_copy(update=sets)
        t0 = time.perf_counter()
        fixed = {r.condition: r for r in evaluate(loaded.model, loaded.tokenizer, recipe.instruction, recipe.eval,
                                                  [recipe.template], None, conditions=("base", "prompt"),
                                                  max_new_tokens=recipe.max_new_tokens)}
        ref = prompted_reference(loaded.model, loaded.tokenizer, recipe.instruction, recipe.eval, recipe.template,
                                 fixed["prompt"])
        base_kl = answer_kl(loaded.model, ref)
        t_fixed = time.perf_counter() - t0
        for over in configs:
            r = recipe.model_copy(update=over)
            t1 = time.perf_counter()
            res = fit(r, loaded, fidelity=False)
            t_compute = time.perf_counter() - t1
            (patched,) = evaluate(loaded.model, loaded.tokenizer, r.instruction, r.eval, [r.template], res.patch,
                                  conditions=("patched",), max_new_tokens=r.max_new_tokens)
            agree, kl = answer_agreement(patched.answers, ref), answer_kl(loaded.model, ref, res.patch)
            prompt = fixed["prompt"].accuracy
            row = {
                "task": path.stem, "style": style_of(path), "split": split_of(path), "settings": label(over),
                "examples": len(r.examples), "eval": len(r.eval),
                "no_prompt": fixed["base"].accuracy, "prompt": prompt, "patched": patched.accuracy,
                "ratio": patched.accuracy / prompt if prompt > 0 else None,
                "answer_agreement": agree, "mean_kl": kl,
                "base_answer_agreement": answer_agreement(fixed["base"].answers, ref), "base_mean_kl": base_kl,
                "compute_s": t_compute, "eval_no_prompt_and_prompt_s": t_fixed,
                # every held-out query's answers, to see where a task misses
                "answers": [{"input": p.input, "gold": p.output, "no_prompt": a, "prompt": b, "patched": c}
                            for p, a, b, c in zip(r.eval, fixed["base"].answers, fixed["prompt"].answers,
                                                  patched.answers)],
            }
            rows.append(row)
            print(f"{row['task']:20s} {row['settings']:28s} none {row['no_prompt']:.2f} prompt {prompt:.2f} "
                  f"patched {row['patched']:.2f} agree {agree:.2f} KL {kl:.3f} "
                  f"({t_compute:.1f} s)", file=sys.stderr, flush=True)
    return {"model": args.model, "split": args.split, "floor": FLOOR, "rows": rows, "summary": summarise(rows)}


def summarise(rows: list[dict]) -> list[dict]:
    """Per settings and split (the tune half chose the defaults; the report half checks them)."""
    out = []
    for s, split in dict.fromkeys((r["settings"], r["split"]) for r in rows):
        rs = [r for r in rows if r["settings"] == s and r["split"] == split]
        scored = [r for r in rs if r["prompt"] >= FLOOR]
        ratios = [r["ratio"] for r in scored]
        out.append({
            "settings": s, "split": split, "tasks": len(rs), "tasks_prompt_at_least_floor": len(scored),
            "mean_ratio": statistics.mean(ratios) if ratios else None,
            "min_ratio": min(ratios) if ratios else None,
            "tasks_meeting_0.9": sum(x >= 0.9 for x in ratios),
            "mean_patched": statistics.mean(r["patched"] for r in rs),
            "mean_prompt": statistics.mean(r["prompt"] for r in rs),
            "mean_answer_agreement": statistics.mean(r["answer_agreement"] for r in rs),
            "mean_kl": statistics.mean(r["mean_kl"] for r in rs),
        })
    return out


def markdown(doc: dict, command: str) -> str:
    f = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [f"Command: `{command}` (model `{doc['model']}`, split `{doc['split']}`)", "",
             "| task | split | style | settings | no prompt | prompt | patched | patched ÷ prompt | same answer as prompt | KL (nats/token) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['task']} | {r['split']} | {r['style']} | {r['settings']} | {f(r['no_prompt'])} | {f(r['prompt'])} | "
                     f"{f(r['patched'])} | {f(r['ratio'])} | {f(r['answer_agreement'])} | {r['mean_kl']:.3f} |")
    lines += ["", f"Summary (ratios over tasks whose prompt scores ≥ {doc['floor']}):", "",
              "| settings | split | tasks | mean patched ÷ prompt | min | tasks ≥ 0.9 | mean patched | mean prompt | same answer | KL |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in doc["summary"]:
        lines.append(f"| {s['settings']} | {s['split']} | {s['tasks_prompt_at_least_floor']}/{s['tasks']} | {f(s['mean_ratio'])} | "
                     f"{f(s['min_ratio'])} | {s['tasks_meeting_0.9']} | {f(s['mean_patched'])} | {f(s['mean_prompt'])} | "
                     f"{f(s['mean_answer_agreement'])} | {s['mean_kl']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=("tune", "report", "all"), default="report")
    ap.add_argument("--sweep", action="store_true", help="compare the SWEEP settings, not just the defaults")
    ap.add_argument("--tasks", nargs="*", help="only these task names")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="results/<out>.json and .md (default: suite, or sweep with --sweep)")
    overrides.add_argument(ap)
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md beside a results JSON (no model run)")
    args = ap.parse_args()
    if args.render:
        path = Path(args.render)
        doc = json.loads(path.read_text())
        doc["summary"] = summarise(doc["rows"])
        path.write_text(json.dumps(doc, indent=2) + "\n")
        path.with_suffix(".md").write_text(markdown(doc, doc["command"]))
        return
    doc = run(args)
    name = args.out or ("sweep" if args.sweep else "suite")
    res = ROOT / "results"
    res.mkdir(exist_ok=True)
    command = "python examples/task_suite.py " + " ".join(sys.argv[1:])
    doc["command"] = command.strip()
    (res / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = markdown(doc, doc["command"])
    (res / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
