"""Transmute against fair baselines on the held-out task suite (issue 12), in one run.

    python benchmarks/bench_baselines.py [--tasks a,b,...] [--json results/baselines.json]
        [--md results/baselines.md] [--tiny] [--max-steps 60] [--eval-every 5] [--demonstrations N]
        [--no-refit] [--model gemma-3-270m] [--device auto]

Per task (examples/tasks/<task>.yaml), one model load for the whole run, methods in sequence on
the same loaded model (each leaves it as it found it):
  transmute            pipeline.compute(recipe, checkpoint=False): the product's path; its report
                       gives base / prompt / patched held-out accuracy and compute_s
  transmute many-shot  the same recipe with ``demonstrations: N`` (default 19; only when the recipe
                       schema has that key; N is capped at examples - 1)
  LoRA (tuned)         baselines.train_lora: lr in 1e-4, 3e-4, 1e-3 on a 15/5 split of the examples,
                       chosen by validation (best accuracy, then lowest loss); held-out accuracy
                       at the chosen (lr, step) only.  Beside it "LoRA earliest": the earliest step
                       with the best validation accuracy (early stopping; the cheapest point
                       validation cannot tell from the best), and the variant retrained on all
                       examples for the chosen steps at the chosen lr (--no-refit: not)
  steering vector      baselines.steering_vector: mean activation difference, (position, layer, m)
                       chosen on the examples
Side effects (unless --no-side-effects; issue 23's fair locality table): with each method on the
model (the transmute patch in hooks, the chosen LoRA attached, the chosen steering vector added),
antonyms / country-capital / plural prompted without the task's instruction against the prompted
reference (the instruction in front of their prompt), and examples/neutral.txt's perplexity and
KL against the model with the instruction in front (examples/locality.py's measures).
Times: transmute compute_s (one cold call, as a user runs it) against LoRA training time to the
chosen step (evaluation excluded; the whole sweep is reported too) and steering build + choose.
Default tasks: the report and tune tasks whose prompt accuracy is >= 0.3 in results/suite.md.
staff-city is left out by default: its eval pairs ARE its examples (new knowledge, see
examples/tasks/README.md), so nothing there is held out -- LoRA trains on 9 of the 12 facts it is
then scored on. Given with --tasks it runs, is marked † and is left out of the summary.
Table: stdout and --md (the exact command at its top); every number: --json; progress: stderr.
--tiny: tests/tiny.py's random gemma3 (saved, then loaded like any local model) and bench_suite's
built-in tiny recipe; a smoke run of seconds, numbers meaningless; writes files only when asked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import baselines  # noqa: E402
import locality  # noqa: E402  (examples/locality.py: the other prompted tasks and the neutral text)
import overrides  # noqa: E402  (examples/overrides.py: --set KEY=VALUE on every recipe)
from bench_engine import ROOT, log, machine_info  # noqa: E402

from transmute_cli.model import loading as models

from transmute_cli import pipeline  # noqa: E402
from transmute_cli.recipe import schema as recipe_mod  # noqa: E402
from transmute_cli.artifacts.patch import load_patch  # noqa: E402

TASKS = ROOT / "examples" / "tasks"
# prompt accuracy >= 0.3 in results/suite.md (masculine-feminine: 0.18, staff-city: not held out)
DEFAULT_TASKS = ("city-country", "comparative", "country-language", "element-symbol", "en-de-nouns", "en-es",
                 "landmark-country", "past-tense")
NOT_HELD_OUT = ("staff-city",)
MANY_SHOT = 19
PROMPT_CEILING = 0.95  # many-shot vs the 5-shot prompt is compared where the prompt is below this


# --------------------------------------------------------------------------- setup


def load(args, tmp: Path) -> models.Loaded:
    """The model, once: the alias (or path) given, or the tiny random gemma3 saved to ``tmp``."""
    if not args.tiny:
        return models.load_model(args.model, device=args.device)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_model, tiny_tokenizer

    folder = tmp / "tiny-gemma3"
    tiny_model("gemma3").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return models.load_model(str(folder), device=args.device)


def task_recipes(args) -> list[recipe_mod.Recipe]:
    if args.tiny:
        from bench_suite import TINY_RECIPE

        return [recipe_mod.parse_recipe(TINY_RECIPE, source="<tiny recipe>", default_name="tiny-reverse")]
    names = args.tasks.split(",") if args.tasks else list(DEFAULT_TASKS)
    missing = [n for n in names if not (TASKS / f"{n}.yaml").is_file()]
    if missing:
        raise SystemExit(f"no such task in {TASKS}: {', '.join(missing)}")
    sets = overrides.parse(args.set)
    return [recipe_mod.load_recipe(TASKS / f"{n}.yaml").model_copy(update=sets) for n in names]


def many_shot(recipe: recipe_mod.Recipe, n: int) -> recipe_mod.Recipe | None:
    """The recipe with ``demonstrations: n`` (capped at examples - 1), or None for n = 0 (the
    settings variant as examples/task_suite.py makes its own: ``model_copy``)."""
    if n <= 0:
        return None
    return recipe.model_copy(update={"demonstrations": min(n, len(recipe.examples) - 1)})


# --------------------------------------------------------------------------- side effects


def side_effect_references(loaded, recipe) -> dict:
    """What the prompt in context does elsewhere (issue 23's tables, examples/locality.py): the
    other prompted tasks (antonyms, country-capital, plural) with the recipe's instruction in front
    of their own prompt (the reference) and alone (base); examples/neutral.txt after the
    instruction (the reference) and after nothing."""
    return {"others": locality.other_references(loaded, recipe), "neutral": locality.neutral_reference(loaded, recipe)}


def side_effects(loaded, refs: dict, patch=None) -> dict:
    """The same tasks and text on the model as it is now (a LoRA attached, a steering vector
    hooked in) or with ``patch`` in hooks, without the recipe's instruction: accuracies, points
    against the reference, and the neutral text's perplexity and KL to the prompted model."""
    others = locality.other_tasks(loaded, refs["others"], patch)
    neutral = pipeline.locality_json(refs["neutral"], loaded.model, loaded.fam, patch)
    return {"others": others, "points": {k: 100 * (v - refs["others"][k]["reference"]) for k, v in others.items()},
            "neutral": neutral,
            "ppl_ratio": neutral and neutral["perplexity_patched"] / neutral["perplexity_prompted"]}


# --------------------------------------------------------------------------- one task


def run_transmute(recipe, loaded, out: Path) -> dict:
    """pipeline.compute without a checkpoint; the report, its accuracies by condition at the top."""
    report = pipeline.compute(recipe, out=out, loaded=loaded, checkpoint=False, log=lambda m: log(f"transmute: {m}"))
    acc = {r["condition"]: r["accuracy"] for r in report["eval"]["results"]}
    shot = report["eval"].get("many_shot_prompt")  # with demonstrations: the many-shot prompt itself
    return {"patched": acc["patched"], "prompt": acc["prompt"], "base": acc["base"],
            "many_shot_prompt": shot and shot["accuracy"],
            "compute_s": report["timings"]["compute_s"], "eval_s": report["timings"].get("eval_s"), "report": report}


def run_task(recipe, loaded, args, tmp: Path) -> dict:
    model, tok = loaded.model, loaded.tokenizer
    row: dict = {"task": recipe.name, "examples": len(recipe.examples), "eval": len(recipe.eval),
                 "held_out": recipe.name not in NOT_HELD_OUT}
    refs, measure = None, None
    if not args.no_side_effects:
        log(f"{recipe.name}: side-effect references (other prompted tasks, neutral text)")
        refs = side_effect_references(loaded, recipe)
        row["side_effect_reference"] = {"others": refs["others"], "neutral": refs["neutral"] and {
            "text": refs["neutral"].name, "tokens": len(refs["neutral"].text)}}
        measure = lambda: side_effects(loaded, refs)  # noqa: E731  (whatever is on the model now)
    log(f"{recipe.name}: transmute (defaults)")
    row["transmute"] = run_transmute(recipe, loaded, tmp / recipe.name)
    if refs is not None:
        row["transmute"]["side_effects"] = side_effects(loaded, refs, load_patch(tmp / recipe.name / "patch.safetensors"))
    row["base"], row["prompt"] = row["transmute"]["base"], row["transmute"]["prompt"]
    variant = many_shot(recipe, MANY_SHOT if args.demonstrations is None else args.demonstrations)
    row["many_shot"] = None
    if variant is not None:
        log(f"{recipe.name}: transmute many-shot (demonstrations: {variant.demonstrations})")
        row["many_shot"] = run_transmute(variant, loaded, tmp / f"{recipe.name}-many-shot")
        row["many_shot"]["demonstrations"] = variant.demonstrations
    log(f"{recipe.name}: LoRA sweep")
    row["lora"] = baselines.train_lora(model, tok, recipe, max_steps=args.max_steps, eval_every=args.eval_every,
                                       refit_all=not args.no_refit, measure=measure, log=log)
    log(f"{recipe.name}: steering vector")
    row["steering"] = baselines.steering_vector(model, tok, recipe, measure=measure, log=log)
    st = row["steering"]
    row["steering"]["total_s"] = st["build_s"] + st["choose_s"]
    row["ratio_lora_transmute"] = row["lora"]["chosen"]["train_s"] / row["transmute"]["compute_s"]
    row["ratio_lora_earliest_transmute"] = row["lora"]["earliest"]["point"]["train_s"] / row["transmute"]["compute_s"]
    log(f"{recipe.name}: base {row['base']:.2f} prompt {row['prompt']:.2f} transmute {row['transmute']['patched']:.2f} "
        f"LoRA {row['lora']['heldout_accuracy']:.2f} steering {st['heldout_accuracy']:.2f}")
    return row


# --------------------------------------------------------------------------- summary and table


def summarise(rows: list[dict]) -> dict:
    """Over held-out tasks only: transmute >= tuned LoRA, the median time ratio, and many-shot
    transmute against the 5-shot prompt where the prompt is below PROMPT_CEILING."""
    rs = [r for r in rows if r["held_out"]]
    ge = [r["task"] for r in rs if r["transmute"]["patched"] >= r["lora"]["heldout_accuracy"]]
    ms = [r for r in rs if r["many_shot"] is not None]
    ge_ms = [r["task"] for r in ms if r["many_shot"]["patched"] >= r["lora"]["heldout_accuracy"]]
    low = [r for r in ms if r["prompt"] < PROMPT_CEILING]
    ratios = [r["ratio_lora_transmute"] for r in rs]
    early = [r["ratio_lora_earliest_transmute"] for r in rs]
    return {
        "tasks": len(rs), "transmute_ge_lora": ge, "many_shot_ge_lora": ge_ms, "many_shot_tasks": len(ms),
        "median_ratio_lora_transmute": statistics.median(ratios) if ratios else None,
        "ratios_lora_transmute": ratios,
        "transmute_ge_lora_earliest": [r["task"] for r in rs
                                       if r["transmute"]["patched"] >= r["lora"]["earliest"]["heldout_accuracy"]],
        "median_ratio_lora_earliest_transmute": statistics.median(early) if early else None,
        "ratios_lora_earliest_transmute": early,
        "transmute_ge_steering": [r["task"] for r in rs
                                  if r["transmute"]["patched"] >= r["steering"]["heldout_accuracy"]],
        "side_effects": _side_summary(rs),
        "prompt_ceiling": PROMPT_CEILING,
        "many_shot_vs_prompt": [{"task": r["task"], "prompt": r["prompt"], "many_shot": r["many_shot"]["patched"],
                                 "many_shot_prompt": r["many_shot"]["many_shot_prompt"],
                                 "transmute": r["transmute"]["patched"]} for r in low],
        "many_shot_gt_prompt": [r["task"] for r in low if r["many_shot"]["patched"] > r["prompt"]],
        "mean": {k: statistics.mean(v) if v else None for k, v in {
            "base": [r["base"] for r in rs], "prompt": [r["prompt"] for r in rs],
            "transmute": [r["transmute"]["patched"] for r in rs],
            "many_shot": [r["many_shot"]["patched"] for r in ms],
            "many_shot_prompt": [r["many_shot"]["many_shot_prompt"] for r in ms
                                 if r["many_shot"]["many_shot_prompt"] is not None],
            "lora": [r["lora"]["heldout_accuracy"] for r in rs],
            "lora_earliest": [r["lora"]["earliest"]["heldout_accuracy"] for r in rs],
            "lora_all_examples": [r["lora"]["all_examples"]["heldout_accuracy"] for r in rs if "all_examples" in r["lora"]],
            "steering": [r["steering"]["heldout_accuracy"] for r in rs]}.items()},
    }


def _side_summary(rows: list[dict]) -> dict:
    """Per method over the tasks measured: how many keep every other task within 5 points of the
    reference, the median worst drop, the median neutral perplexity ratio."""
    out = {}
    for key, label in (("transmute", "transmute"), ("lora", "LoRA tuned"), ("steering", "steering vector")):
        se = [r[key]["side_effects"] for r in rows if r[key].get("side_effects")]
        if not se:
            continue
        worst = [min(x["points"].values()) for x in se if x["points"]]
        ppl = [x["ppl_ratio"] for x in se if x["ppl_ratio"] is not None]
        out[label] = {"tasks": len(se), "within_5_points": sum(w >= -5 for w in worst),
                      "median_worst_points": statistics.median(worst) if worst else None,
                      "median_ppl_ratio": statistics.median(ppl) if ppl else None}
    return out


def _f(x, fmt=".2f") -> str:
    return "–" if x is None else format(x, fmt)


def markdown(doc: dict) -> str:
    rows, s = doc["rows"], doc["summary"]
    lines = [f"Command: `{doc['command']}`", "",
             f"Model `{doc['model']}` on {doc['machine']['device']} ({doc['machine']['device_name']}, "
             f"{doc['machine']['torch_threads']} threads), {doc['machine']['date']}. Held-out accuracy (greedy, exact "
             "match, queries without the instruction except the prompt column); times in seconds.", "",
             "| task | base | prompt | transmute | many-shot prompt | many-shot | LoRA tuned (lr, step) | LoRA earliest (lr, step) | "
             "LoRA all examples | steering (pos, layer, m) | transmute s | many-shot s | LoRA s to step | "
             "LoRA ÷ transmute | LoRA s to earliest | earliest ÷ transmute | LoRA sweep s | steering s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, m, lo, st = r["transmute"], r["many_shot"], r["lora"], r["steering"]
        c, e, sc = lo["chosen"], lo["earliest"], st["chosen"]
        allx = lo.get("all_examples")
        lines.append(
            f"| {r['task']}{'' if r['held_out'] else ' †'} | {_f(r['base'])} | {_f(r['prompt'])} | {_f(t['patched'])} | "
            f"{_f(m and m['many_shot_prompt'])} | {_f(m and m['patched'])} | {_f(lo['heldout_accuracy'])} ({c['lr']:g}, {c['step']}) | "
            f"{_f(e['heldout_accuracy'])} ({e['point']['lr']:g}, {e['point']['step']}) | "
            f"{_f(allx and allx['heldout_accuracy'])} | {_f(st['heldout_accuracy'])} ({sc['position']}, {sc['layer']}, "
            f"{sc['scale']:g}) | {_f(t['compute_s'], '.1f')} | {_f(m and m['compute_s'], '.1f')} | "
            f"{_f(c['train_s'], '.1f')} | {_f(r['ratio_lora_transmute'])} | {_f(e['point']['train_s'], '.1f')} | "
            f"{_f(r['ratio_lora_earliest_transmute'])} | {_f(lo['sweep_s'], '.0f')} | "
            f"{_f(st['total_s'], '.0f')} |")
    lines += side_effects_markdown(rows)
    mean = s["mean"]
    lines += ["", f"Summary over the {s['tasks']} held-out tasks"
              + (" († not held out: left out)" if any(not r["held_out"] for r in rows) else "") + ":", "",
              f"* mean held-out accuracy: base {_f(mean['base'])}, prompt {_f(mean['prompt'])}, transmute "
              f"{_f(mean['transmute'])}, many-shot prompt "
              f"{_f(mean['many_shot_prompt'])}, many-shot transmute {_f(mean['many_shot'])}, LoRA tuned {_f(mean['lora'])}, LoRA earliest "
              f"{_f(mean['lora_earliest'])}, LoRA all "
              f"examples {_f(mean['lora_all_examples'])}, steering {_f(mean['steering'])}",
              f"* transmute ≥ tuned LoRA on {len(s['transmute_ge_lora'])}/{s['tasks']} tasks"
              + (f" ({', '.join(s['transmute_ge_lora'])})" if s["transmute_ge_lora"] else "")
              + (f"; many-shot ≥ tuned LoRA on {len(s['many_shot_ge_lora'])}/{s['many_shot_tasks']}"
                 if s["many_shot_tasks"] else ""),
              f"* transmute ≥ LoRA earliest on {len(s['transmute_ge_lora_earliest'])}/{s['tasks']} tasks",
              *[f"* side effects, {k}: other tasks all within 5 points of the prompted reference on {v['within_5_points']}/"
                f"{v['tasks']} tasks, median worst drop {_f(v['median_worst_points'], '+.0f')} points, neutral "
                f"perplexity ÷ reference median {_f(v['median_ppl_ratio'])}" for k, v in s.get("side_effects", {}).items()],
              f"* transmute ≥ steering vector on {len(s['transmute_ge_steering'])}/{s['tasks']} tasks",
              f"* median LoRA time to the chosen step ÷ transmute compute: {_f(s['median_ratio_lora_transmute'])} "
              f"(per task: {', '.join(_f(x) for x in s['ratios_lora_transmute'])}); to the earliest best step: "
              f"{_f(s['median_ratio_lora_earliest_transmute'])} "
              f"(per task: {', '.join(_f(x) for x in s['ratios_lora_earliest_transmute'])})"]
    if s["many_shot_tasks"]:
        per = "; ".join(f"{x['task']} {x['prompt']:.2f} → {x['many_shot']:.2f} (many-shot prompt "
                        f"{_f(x['many_shot_prompt'])})" for x in s["many_shot_vs_prompt"])
        lines.append(f"* many-shot transmute vs the 5-shot prompt where the prompt < {s['prompt_ceiling']}: better on "
                     f"{len(s['many_shot_gt_prompt'])}/{len(s['many_shot_vs_prompt'])} ({per or 'none'})")
    else:
        lines.append("* many-shot: not run (--demonstrations 0)")
    return "\n".join(lines) + "\n"


def side_effects_markdown(rows: list[dict]) -> list[str]:
    """Each method's side effects beside its own held-out accuracy, against the prompted reference."""
    rows = [r for r in rows if r.get("side_effect_reference")]
    if not rows:
        return []
    names = list(rows[0]["side_effect_reference"]["others"])
    lines = ["", "Side effects, against the prompted reference (the task's instruction in front of the other task's "
             "prompt; examples/neutral.txt after the instruction), each method queried without the instruction:", "",
             f"| task | method | own held-out | other tasks, points vs reference ({' / '.join(names)}) | "
             "neutral ppl ÷ reference | KL(prompted ‖ method) (‖ unpatched) |", "|---|---|---|---|---|---|"]
    for r in rows:
        ref = r["side_effect_reference"]["others"]
        lines.append(f"| {r['task']} | prompt in context (reference) | {_f(r['prompt'])} | "
                     + " / ".join(f"{ref[k]['reference']:.2f}" for k in names) + " (accuracies) | 1.00 | 0 |")
        for label, m, own in (("transmute", r["transmute"], r["transmute"]["patched"]),
                              ("LoRA tuned", r["lora"], r["lora"]["heldout_accuracy"]),
                              ("steering vector", r["steering"], r["steering"]["heldout_accuracy"])):
            se = m.get("side_effects")
            if se is None:
                continue
            n = se["neutral"] or {}
            lines.append(f"| {r['task']} | {label} | {_f(own)} | " + " / ".join(f"{se['points'][k]:+.0f}" for k in names)
                         + f" | {_f(se['ppl_ratio'])} | {_f(n.get('mean_kl'), '.3f')} ({_f(n.get('base_mean_kl'), '.3f')}) |")
    return lines


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", help=f"comma-separated task names (default: {','.join(DEFAULT_TASKS)})")
    ap.add_argument("--json", type=Path, help="every number (default results/baselines.json; --tiny: none)")
    ap.add_argument("--md", type=Path, help="the table (default results/baselines.md; --tiny: none)")
    ap.add_argument("--tiny", action="store_true", help="tiny random gemma3 and a built-in tiny recipe (smoke run)")
    ap.add_argument("--max-steps", type=int, help=f"LoRA steps per learning rate ({baselines.MAX_STEPS}; --tiny 10)")
    ap.add_argument("--eval-every", type=int, default=baselines.EVAL_EVERY, help="LoRA validation every k steps")
    ap.add_argument("--demonstrations", type=int, help=f"many-shot variant's N (default {MANY_SHOT}; 0: none)")
    ap.add_argument("--no-refit", action="store_true", help="skip the LoRA retrained on all examples")
    ap.add_argument("--no-side-effects", action="store_true",
                    help="skip the other prompted tasks and the neutral text under each method")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--device", default="auto")
    overrides.add_argument(ap)
    args = ap.parse_args(argv)
    if args.max_steps is None:
        args.max_steps = 10 if args.tiny else baselines.MAX_STEPS
    if not args.tiny:
        args.json = args.json or ROOT / "results" / "baselines.json"
        args.md = args.md or ROOT / "results" / "baselines.md"
    command = "python benchmarks/bench_baselines.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-baselines-") as tmpd:
        tmp = Path(tmpd)
        recipes = task_recipes(args)
        loaded = load(args, tmp)
        info = machine_info(loaded.model)
        log(f"{'tiny gemma3' if args.tiny else args.model} on {info['device']}; tasks: "
            + ", ".join(r.name for r in recipes))
        rows = [run_task(r, loaded, args, tmp) for r in recipes]
    doc = {"command": command.strip(), "model": "tiny-gemma3" if args.tiny else args.model, "machine": info,
           "settings": {"lora_lrs": list(baselines.LORA_LRS), "lora_rank": baselines.LORA_RANK,
                        "lora_alpha": baselines.LORA_ALPHA, "lora_targets": list(baselines.LORA_TARGETS),
                        "max_steps": args.max_steps, "eval_every": args.eval_every, "n_val": baselines.N_VAL,
                        "steer_scales": list(baselines.STEER_SCALES), "steer_positions": list(baselines.STEER_POSITIONS),
                        "many_shot": args.demonstrations if args.demonstrations is not None else MANY_SHOT,
                        "demonstrations_key": "demonstrations" in recipe_mod.Recipe.model_fields},
           "rows": rows, "summary": summarise(rows), "total_s": time.perf_counter() - t0}
    md = markdown(doc)
    print(md)
    for path, text in ((args.json, json.dumps(doc, indent=2) + "\n"), (args.md, md)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
