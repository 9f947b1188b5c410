"""The product's operations over the engine, without any printing.  The CLI is a thin layer over
these; they report progress through callbacks and return plain dicts that become ``report.json``
and ``--json`` output.

- ``prepare``: a recipe to a fit (texts, the prompted model's labels, preservation and broad texts, the fit)
- ``results``: the figures a run reports, as plain dicts
- ``cmd_compute``, ``cmd_apply``, ``cmd_eval``: one module per command

The names callers use are re-exported here (``from transmute_cli import pipeline``)."""

from transmute_cli.evaluation.generate import evaluate
from transmute_cli.model.loading import Loaded, load_model
from transmute_cli.recipe.schema import eval_queries
from transmute_cli.pipeline.prepare import (
    patch_texts, broad_texts, broad_moments, chat_of, CONTINUE_FACTOR, whole_answers, preserve_texts,
    format_instruction, patch_contexts, many_shot_prompt, label_inputs, answer_turns, engine_config, fit, with_source,
)
from transmute_cli.pipeline.results import (
    many_shot_result, many_shot_json, LOCALITY_TEXT, LOCALITY_TOKENS, LocalityReference, locality_reference,
    locality_json, results_json, heldout_json, labelled_results, eval_json, format_json, prompt_warnings, samples_json,
    fidelity_json, patch_metadata, model_json, settings_json,
)
from transmute_cli.pipeline.cmd_compute import compute
from transmute_cli.pipeline.cmd_apply import apply, export_gguf, peft_base
from transmute_cli.pipeline.cmd_eval import eval_gguf, resolve_target, eval_target

__all__ = [
    'evaluate', 'Loaded', 'load_model', 'eval_queries', 'patch_texts', 'broad_texts',
    'broad_moments', 'chat_of', 'CONTINUE_FACTOR', 'whole_answers', 'preserve_texts', 'format_instruction',
    'patch_contexts', 'many_shot_prompt', 'label_inputs', 'answer_turns', 'engine_config', 'fit', 'with_source',
    'many_shot_result', 'many_shot_json', 'LOCALITY_TEXT', 'LOCALITY_TOKENS', 'LocalityReference',
    'locality_reference', 'locality_json', 'results_json', 'heldout_json', 'labelled_results', 'eval_json',
    'format_json', 'prompt_warnings', 'samples_json', 'fidelity_json', 'patch_metadata', 'model_json',
    'settings_json', 'compute', 'apply', 'export_gguf', 'peft_base', 'eval_gguf', 'resolve_target',
    'eval_target',
]
