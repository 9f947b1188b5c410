"""The ``transmute`` command line: a thin Typer layer over ``pipeline``.

Exit codes: 0 ok, 1 gate failed (``eval --min-accuracy``), 2 bad usage or bad input, 3 runtime
or internal error, 130 interrupted (``errors``).  Errors are one line on stderr (``error: FILE: FIELD: what is wrong``), never a traceback; set
TRANSMUTE_DEBUG=1 to see one for internal errors.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from transmute_cli.errors import GATE_EXIT, INTERRUPT_EXIT, RUNTIME_EXIT, InputError, TransmuteError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Turn a prompt into weights: compute, apply, evaluate and compare thought patches.  Exit codes: 0 ok, "
         "1 gate failed (eval --min-accuracy), 2 bad usage or input, 3 runtime error, 130 interrupted.",
)

SYSTEM_MODEL = "smollm2-135m-instruct"  # compute --system without --model: the embedded chat model
DeviceOpt = typer.Option("auto", "--device", metavar="auto|cpu|cuda", help="where the model runs")
DtypeOpt = typer.Option("float32", "--dtype", metavar="float32|bfloat16|float16", help="dtype the model is loaded in")
SaveDtypeOpt = typer.Option("auto", "--save-dtype", metavar="auto|float32|bfloat16|float16",
                            help="dtype of the checkpoint's weights (auto: the model's own, bfloat16 for GGUF models)")
JsonOpt = typer.Option(False, "--json", help="print the result as one JSON document on stdout")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress on stderr")
FamilyOpt = typer.Option(None, "--family", help="treat an unlisted architecture like this family (llama, gemma3, ...)")
TrustOpt = typer.Option(False, "--trust-remote-code", help="allow a model's own Python code (off by default)")
StopOpt = typer.Option(False, "--stop-at-newline", help="the checkpoint's generation_config ends generation at any "
                       "newline token, as the task's answers end (off: the base model's, so plain generate writes "
                       "paragraphs and lists)")


def _print_version(value: bool) -> None:
    if value:
        from transmute_cli import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="print the version and exit"),
) -> None:
    """Options before the command."""


def _errors(fn):
    """Errors become one line on stderr and an exit code, inside the app, so that both the
    console script and Typer's test runner see the same behaviour."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _silence_libraries()
        try:
            return fn(*args, **kwargs)
        except TransmuteError as e:
            sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
            raise typer.Exit(e.exit_code) from None
        except BrokenPipeError:  # the reader left (`transmute ... | head`): not an error of ours
            _stdout_gone()
            raise typer.Exit(0) from None
        except KeyboardInterrupt:
            sys.stderr.write("error: interrupted; no partial output was left behind\n")
            raise typer.Exit(INTERRUPT_EXIT) from None
        except (typer.Exit, SystemExit):
            raise
        except Exception as e:
            if os.environ.get("TRANSMUTE_DEBUG"):
                raise
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            sys.stderr.write(f"error: internal error: {msg} (set TRANSMUTE_DEBUG=1 for a traceback)\n")
            raise typer.Exit(RUNTIME_EXIT) from None

    return wrapper


def _silence_libraries() -> None:
    """transformers' own progress bars and warnings would break the one-line-error contract and
    duplicate our progress on stderr."""
    import warnings

    # bars that libraries draw with tqdm itself (transformers' GGUF dequantizing): read by tqdm
    # when it is imported, so set before transformers is
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices


def _emit_json(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


@app.command()
@_errors
def compute(
    recipe: Optional[Path] = typer.Argument(None, help="recipe YAML file (or --system)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="run folder (default runs/<name>)"),
    system: Optional[str] = typer.Option(None, "--system", help="a system prompt alone, no recipe file: the "
                                         "recipe `chat: true` + this instruction, fitted on the shipped user messages"),
    model: Optional[str] = typer.Option(None, "--model", help=f"with --system: the chat model (default "
                                        f"{SYSTEM_MODEL})"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    no_checkpoint: bool = typer.Option(False, "--no-checkpoint", help="write the patch and report only"),
    save_dtype: str = SaveDtypeOpt,
    no_eval: bool = typer.Option(False, "--no-eval", help="skip the accuracy report"),
    no_fidelity: bool = typer.Option(False, "--no-fidelity", help="skip the in-sample fidelity pass (KL on the "
                                     "patch examples themselves); held-out fidelity and locality stay"),
    diagnostics: bool = typer.Option(False, "--diagnostics", help="per-layer matrix fit residual even past d/2 "
                                     "tokens, where it costs more than the solve (d²·f + d³ per layer)"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="auto|balanced|sequential, or a JSON file of module -> device ('cpu', 'disk', GPU index): spread a large model (accelerate)"),
    family: Optional[str] = FamilyOpt,
    trust_remote_code: bool = TrustOpt,
    stop_at_newline: bool = StopOpt,
    gguf: bool = typer.Option(False, "--gguf", help="also write model.gguf: the model's own GGUF with the patch "
                              "baked in (Q8_0 patched tensors), checked in llama.cpp (a GGUF alias or .gguf model)"),
) -> None:
    """Compute a thought patch from a recipe; write patch, checkpoint and report."""
    from transmute_cli import pipeline
    from transmute_cli.report import terminal as report

    r = _compute_recipe(recipe, system, model)
    with report.ProgressView(quiet=quiet) as view:
        doc = pipeline.compute(
            r, output, device=device, dtype=dtype, overwrite=overwrite, checkpoint=not no_checkpoint,
            evaluate_patch=not no_eval, progress=view, log=view.log, family=family,
            trust_remote_code=trust_remote_code, device_map=device_map, save_dtype=save_dtype,
            diagnostics=diagnostics, stop_at_newline=stop_at_newline, fidelity=not no_fidelity, gguf=gguf,
        )
    if doc.get("rank"):  # a non-zero torchrun rank: rank 0 reports and writes
        return
    if as_json:
        _emit_json(doc)
        report.show_warnings(doc)  # on stderr: the JSON on stdout stays one document
    else:
        report.show_compute(doc)


def _compute_recipe(path: Optional[Path], system: Optional[str], model: Optional[str]):
    """The recipe file, or the recipe ``--system`` stands for (named after the prompt's first words)."""
    from transmute_cli.recipe.schema import load_recipe, parse_recipe, recipe_yaml, sanitize_name

    if path is not None and system is not None:
        raise InputError("give a recipe file or --system, not both (a recipe's system prompt is its instruction)",
                         field="--system")
    if path is None and system is None:
        raise InputError("missing: a recipe file, or --system \"...\" for a system prompt alone", field="RECIPE")
    if system is None:
        if model is not None:
            raise InputError("only with --system (a recipe names its model in its model key)", field="--model")
        return load_recipe(path)
    text = recipe_yaml({"model": model or SYSTEM_MODEL, "chat": True, "instruction": system})
    slug = re.sub(r"[^a-z0-9]+", "-", " ".join(system.split()[:5]).lower()).strip("-")
    name = sanitize_name(slug) if slug else "system-prompt"
    return parse_recipe(text, source="--system", default_name=name)


def _parse_patch_spec(spec: str) -> tuple[str, float]:
    path, sep, scale = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            return path, float(scale)
        except ValueError:
            raise InputError(f"scale {scale!r} is not a number (use PATH:SCALE)", field="--patch") from None
    return spec, 1.0


@app.command()
@_errors
def apply(
    patch: Optional[str] = typer.Argument(None, help="patch file or run folder"),
    patches: list[str] = typer.Option([], "-p", "--patch", metavar="PATH[:SCALE]", help="PATH[:SCALE], repeatable: patch arithmetic"),
    output: Path = typer.Option(..., "-o", "--output", help="checkpoint (or adapter) folder to write"),
    fmt: str = typer.Option("checkpoint", "--format", metavar="checkpoint|peft|gguf|gguf-lora",
                            help="checkpoint (merged HF folder), peft (LoRA adapter), gguf (the model's own GGUF "
                                 "with the patch baked in, one file for llama.cpp/Ollama) or gguf-lora (a llama.cpp "
                                 "LoRA adapter)"),
    gguf_type: str = typer.Option("q8_0", "--gguf-type", metavar="q8_0|f16|f32",
                                  help="--format gguf: the type of the patched tensors (the others stay as they are)"),
    rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank for --format peft (default: each module's "
                                       "exact rank, the adapter is the patch; smaller truncates by SVD)"),
    model: Optional[str] = typer.Option(None, "--model", help="base model (default: the one recorded in the patch)"),
    scale: float = typer.Option(1.0, "--scale", help="scale of the positional patch"),
    force: bool = typer.Option(False, "--force", help="apply even if the base model's fingerprint differs"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    save_dtype: str = SaveDtypeOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    family: Optional[str] = FamilyOpt,
    trust_remote_code: bool = TrustOpt,
    stop_at_newline: bool = StopOpt,
) -> None:
    """Write a patched checkpoint (plain transformers folder) from one or more patches."""
    from transmute_cli import pipeline
    from transmute_cli.report import terminal as report

    specs = ([(patch, scale)] if patch else []) + [_parse_patch_spec(p) for p in patches]
    if not specs:
        raise InputError("give a patch (PATCH argument or -p PATH[:SCALE])", field="PATCH")
    specs = [(_patch_file(p), s) for p, s in specs]
    with report.ProgressView(quiet=quiet) as view:
        doc = pipeline.apply(specs, output, model=model, force=force, overwrite=overwrite, device=device, dtype=dtype,
                             log=view.log, family=family, trust_remote_code=trust_remote_code, fmt=fmt, rank=rank,
                             save_dtype=save_dtype, stop_at_newline=stop_at_newline, gguf_type=gguf_type)
    if as_json:
        _emit_json({k: v for k, v in doc.items()})
    elif "adapter" in doc:
        report.show_adapter(doc["adapter"])
    elif "gguf" in doc:
        report.show_gguf(doc["gguf"])
    else:
        c = doc["checkpoint"]
        report.out.print(f"wrote {c['path']} ({c['dtype']}): vectors stored as {c['vector_fold']}; vs in-process top-1 "
                         f"{c['top1_agreement_vs_in_process']:.3f}, KL {c['mean_kl_vs_in_process']:.5f}")


def _patch_file(p: str) -> str:
    path = Path(p)
    if path.is_dir() and (path / "patch.safetensors").is_file():
        return str(path / "patch.safetensors")
    return p


@app.command("eval")
@_errors
def eval_cmd(
    target: str = typer.Argument(..., help="run folder, patch file or patched checkpoint"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="recipe with eval pairs (default: the one recorded)"),
    templates: Optional[Path] = typer.Option(None, "--templates", help="file of alternative query templates"),
    samples: Optional[Path] = typer.Option(None, "--samples", help="write every query's answers per template and "
                                           "condition to this JSON Lines file (input, reference, answers, correct)"),
    min_accuracy: Optional[float] = typer.Option(None, "--min-accuracy", help="exit 1 if patched accuracy on the recipe's template is below (3: an error)"),
    scale: float = typer.Option(1.0, "--scale", help="scale the patch (patches and run folders)"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    family: Optional[str] = FamilyOpt,
    trust_remote_code: bool = TrustOpt,
) -> None:
    """Accuracy table: no prompt, prompt in context, patched — per template."""
    from transmute_cli import pipeline
    from transmute_cli.report import terminal as report

    if min_accuracy is not None and not (0.0 <= min_accuracy <= 1.0):
        raise InputError(f"must be between 0 and 1, got {min_accuracy}", field="--min-accuracy")
    if samples is not None and samples.is_dir():  # checked before the work
        raise InputError("is a folder; give a file to write the samples to", source=str(samples), field="--samples")
    with report.ProgressView(quiet=quiet) as view:
        doc = pipeline.eval_target(
            target, recipe_path=str(recipe) if recipe else None, templates_path=str(templates) if templates else None,
            device=device, dtype=dtype, scale=scale, log=view.log,
            progress=lambda t, c: view.log(f"eval {t!r}: {c}"), family=family, trust_remote_code=trust_remote_code,
        )
    gate = None
    if min_accuracy is not None:
        if not doc["results"]:
            raise InputError("the recipe has no eval pairs with answers to score (only eval_inputs)",
                             field="--min-accuracy")
        own = doc["results"][0]["template"]
        patched = next(r for r in doc["results"] if r["template"] == own and r["condition"] == "patched")
        gate = {"min_accuracy": min_accuracy, "accuracy": patched["accuracy"], "passed": patched["accuracy"] >= min_accuracy}
        doc["gate"] = gate
    if samples is not None:
        from transmute_cli.artifacts.outputs import write_text_atomic

        write_text_atomic(samples, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in doc["samples"]))
    if as_json:
        _emit_json({k: v for k, v in doc.items() if k not in ("answers", "samples")})
    else:
        if doc["results"]:
            report.out.print(report.accuracy_table(doc["results"], title=f"{doc['recipe']}: accuracy on {doc['n']} held-out "
                             "pairs" + (" (the answer contains the reference)" if doc["chat"] else ""),
                                                   rerendered=doc["prompt_rerendered"]))
        if doc.get("format"):
            report.out.print(report.format_table(doc["format"]))
        if doc.get("rules"):
            report.out.print(report.rules_table(doc["rules"]))
        m = doc.get("many_shot_prompt")
        if m and m["n"]:
            report.out.print(f"the prompt the patch distils (instruction + {m['demonstrations']} demonstrations from "
                             f"the examples), on {doc['results'][0]['template']!r}: {m['accuracy']:.3f} "
                             f"({m['correct']}/{m['n']})")
        if doc.get("locality"):
            report.out.print(report.locality_table(doc["locality"]))
    report.show_warnings(doc)
    if gate and not gate["passed"]:
        report.err.print(f"gate failed: patched accuracy {gate['accuracy']:.3f} < --min-accuracy {min_accuracy}", markup=False)
        raise typer.Exit(GATE_EXIT)


@app.command()
@_errors
def diff(
    a: str = typer.Argument(..., help="patch, run folder or checkpoint"),
    b: str = typer.Argument(..., help="patch, run folder or checkpoint"),
    as_json: bool = JsonOpt,
) -> None:
    """Compare two patches or two checkpoints layer by layer."""
    from transmute_cli.report import terminal as report
    from transmute_cli.artifacts.diff import diff_paths

    d = diff_paths(a, b).to_json()
    if as_json:
        _emit_json(d)
    else:
        report.show_diff(d)


@app.command()
@_errors
def version() -> None:
    """Print the version."""
    _print_version(True)


def _stdout_gone() -> None:
    """Point stdout at /dev/null so that Python's flush at exit does not raise a second time."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main() -> None:
    """Console entry point."""
    try:
        app()
    except SystemExit as exc:
        # click turns a closed stdout while printing help into exit 1 and wraps stdout; the reader
        # left on purpose (`transmute --help | head -3`), which is no failure
        # (click, or the copy typer vendors: matched by name)
        if exc.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            raise SystemExit(0) from None
        raise
