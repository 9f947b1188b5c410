"""Many-shot distillation: how patched accuracy grows with the demonstrations the contextual pass
sees (recipe key ``demonstrations``), against the prompt as written and the many-shot prompt.

    python examples/many_shot.py [--shots 0,5,10,19] [--tasks a b ...] [--model gemma-3-270m]
        -> results/many_shot.{json,md,png}

Every task of the suite (examples/tasks/, 20 examples and 34-38 held-out pairs each) except
staff-city (its examples *are* its eval pairs: a demonstration would show a held-out answer).
Per task and N: ``transmute compute`` with the task's recipe plus ``demonstrations: N`` (the
product's own path, no checkpoint), giving held-out accuracy with no prompt, with the recipe's
prompt (its instruction, as the user wrote it), patched (no prompt), and with the many-shot prompt
the patch distils (the instruction + N of the examples).  N = 0 is the default patch.  One model
load; progress on stderr; the table on stdout and in the .md, every number in the .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import overrides  # noqa: E402  (examples/overrides.py)
from transmute_cli.pipeline import compute  # noqa: E402
from transmute_cli.model.loading import load_model  # noqa: E402
from transmute_cli.recipe.schema import load_recipe  # noqa: E402

TASKS = ROOT / "examples" / "tasks"
SKIP = {"staff-city"}
TARGET_BELOW = 0.95  # the target: many-shot beats the prompt where the prompt is below this


def run(args) -> dict:
    files = sorted(p for p in TASKS.glob("*.yaml") if p.stem not in SKIP and (not args.tasks or p.stem in args.tasks))
    loaded = load_model(args.model, device=args.device)
    shots = [int(v) for v in args.shots.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in files:
            for n in shots:
                recipe = load_recipe(path).model_copy(update={**overrides.parse(args.set), "demonstrations": n})
                rep = compute(recipe, Path(tmp) / f"{path.stem}-{n}", loaded=loaded, checkpoint=False)
                acc = {r["condition"]: r["accuracy"] for r in rep["eval"]["results"]}
                many = rep["eval"].get("many_shot_prompt")
                row = {"task": path.stem, "demonstrations": n, "examples": len(recipe.examples), "eval": len(recipe.eval),
                       "no_prompt": acc["base"], "prompt": acc["prompt"], "patched": acc["patched"],
                       "many_shot_prompt": many["accuracy"] if many else acc["prompt"],
                       "answer_agreement": rep["fidelity"]["heldout"]["answer_agreement"],
                       "mean_kl": rep["fidelity"]["heldout"]["mean_kl"], "compute_s": rep["timings"]["compute_s"]}
                rows.append(row)
                print(f"{path.stem:20s} N={n:2d} prompt {row['prompt']:.2f} many-shot prompt "
                      f"{row['many_shot_prompt']:.2f} patched {row['patched']:.2f} ({row['compute_s']:.1f} s)",
                      file=sys.stderr, flush=True)
    return {"model": args.model, "shots": shots, "rows": rows, "summary": summarise(rows, shots)}


def summarise(rows: list[dict], shots: list[int]) -> dict:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    at = {(r["task"], r["demonstrations"]): r for r in rows}
    best_n = max(shots)
    below = [t for t in tasks if at[(t, shots[0])]["prompt"] < TARGET_BELOW]
    per_n = [{"demonstrations": n,
              "mean_patched": statistics.mean(at[(t, n)]["patched"] for t in tasks),
              "mean_many_shot_prompt": statistics.mean(at[(t, n)]["many_shot_prompt"] for t in tasks),
              "mean_compute_s": statistics.mean(at[(t, n)]["compute_s"] for t in tasks),
              "tasks_patched_above_prompt": sum(at[(t, n)]["patched"] > at[(t, n)]["prompt"] for t in below)}
             for n in shots]
    return {"tasks": len(tasks), "mean_prompt": statistics.mean(at[(t, shots[0])]["prompt"] for t in tasks),
            "tasks_prompt_below_0.95": len(below), "largest_n": best_n,
            "tasks_largest_n_beats_prompt": sum(at[(t, best_n)]["patched"] > at[(t, best_n)]["prompt"] for t in below),
            "per_n": per_n}


def markdown(doc: dict) -> str:
    shots = doc["shots"]
    at = {(r["task"], r["demonstrations"]): r for r in doc["rows"]}
    tasks = list(dict.fromkeys(r["task"] for r in doc["rows"]))
    lines = [f"Command: `{doc['command']}` (model `{doc['model']}`; held-out accuracy, greedy, exact match)", "",
             "| task | no prompt | prompt (as written) | " + " | ".join(f"patched N={n}" for n in shots) + " | "
             + " | ".join(f"prompt + {n} demos" for n in shots if n) + " |",
             "|---|---|---|" + "---|" * (len(shots) + sum(1 for n in shots if n))]
    for t in tasks:
        r0 = at[(t, shots[0])]
        lines.append(f"| {t} | {r0['no_prompt']:.2f} | {r0['prompt']:.2f} | "
                     + " | ".join(f"{at[(t, n)]['patched']:.2f}" for n in shots) + " | "
                     + " | ".join(f"{at[(t, n)]['many_shot_prompt']:.2f}" for n in shots if n) + " |")
    s = doc["summary"]
    lines += ["", "| demonstrations N | mean patched | mean prompt + N demos | tasks (prompt < 0.95) where patched > prompt"
              " | mean compute s |", "|---|---|---|---|---|"]
    for p in s["per_n"]:
        lines.append(f"| {p['demonstrations']} | {p['mean_patched']:.3f} | {p['mean_many_shot_prompt']:.3f} | "
                     f"{p['tasks_patched_above_prompt']}/{s['tasks_prompt_below_0.95']} | {p['mean_compute_s']:.1f} |")
    lines += ["", f"Mean accuracy of the prompt as written: {s['mean_prompt']:.3f} over {s['tasks']} tasks. "
              f"N={s['largest_n']}: the patch beats the prompt on {s['tasks_largest_n_beats_prompt']} of the "
              f"{s['tasks_prompt_below_0.95']} tasks whose prompt scores below 0.95."]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = doc["shots"]
    tasks = list(dict.fromkeys(r["task"] for r in doc["rows"]))
    at = {(r["task"], r["demonstrations"]): r for r in doc["rows"]}
    cols = 4
    fig, axes = plt.subplots((len(tasks) + cols) // cols, cols, figsize=(13, 2.6 * ((len(tasks) + cols) // cols)),
                             sharex=True, sharey=True)
    axes = axes.ravel()
    for ax, t in zip(axes, tasks):
        ax.plot(shots, [at[(t, n)]["patched"] for n in shots], "o-", label="patched (no prompt)")
        ax.plot(shots, [at[(t, n)]["many_shot_prompt"] for n in shots], "s--", label="prompt + N demonstrations")
        ax.axhline(at[(t, shots[0])]["prompt"], color="gray", ls=":", label="prompt as written")
        ax.set_title(t, fontsize=9)
        ax.set_ylim(-0.05, 1.05)
    ax = axes[len(tasks)]
    for key, style, name in (("mean_patched", "o-", "patched (no prompt)"),
                             ("mean_many_shot_prompt", "s--", "prompt + N demonstrations")):
        ax.plot(shots, [p[key] for p in doc["summary"]["per_n"]], style, label=name)
    ax.axhline(doc["summary"]["mean_prompt"], color="gray", ls=":", label="prompt as written")
    ax.set_title("mean over tasks", fontsize=9, fontweight="bold")
    ax.legend(fontsize=7, loc="lower right")
    for ax in axes[len(tasks) + 1 :]:
        ax.axis("off")
    fig.supxlabel("demonstrations N from the examples (recipe key `demonstrations`)")
    fig.supylabel("held-out accuracy")
    fig.suptitle(f"Many-shot distillation, {doc['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", default="0,5,10,19")
    ap.add_argument("--tasks", nargs="*")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="many_shot", help="results/<out>.{json,md,png}")
    overrides.add_argument(ap)
    args = ap.parse_args()
    doc = run(args)
    doc["command"] = ("python examples/many_shot.py " + " ".join(sys.argv[1:])).strip()
    res = ROOT / "results"
    (res / f"{args.out}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = markdown(doc)
    (res / f"{args.out}.md").write_text(md)
    plot(doc, res / f"{args.out}.png")
    print(md)


if __name__ == "__main__":
    main()
