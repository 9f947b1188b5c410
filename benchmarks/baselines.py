"""What a careful user would do instead of transmute (issue 12): a tuned LoRA and a steering vector.

Functions only; progress goes through a ``log`` callback, nothing is printed.  Both baselines see
the same data transmute sees -- the recipe's ``examples`` (gold pairs) and its ``instruction`` --
and are scored like transmute's patched condition: greedy, exact match, queries WITHOUT the
instruction (``pre + render(template, input)``), on the recipe's ``eval`` pairs.  Each function
leaves the model exactly as it found it (tested: bit-identical logits, same ``requires_grad``).

``train_lora`` -- peft LoRA r=8, alpha=16, dropout 0 on gate/up/down_proj.  The examples are split
  15 train / 5 validation (``split_examples``, fixed seed).  Inputs are the template rendered
  without the instruction, loss on the answer tokens and the end-of-answer newline only
  (``lora_batch``).  AdamW (torch defaults besides lr), full batch, a fresh LoRA per learning rate
  (``torch.manual_seed(seed)`` before each, so every rate starts from the same LoRA), validation
  greedy accuracy (budget: ``answer_budget``) and loss every ``eval_every`` steps.  The chosen (lr, step) is the best validation
  accuracy; ties go to the lowest validation loss (the usual early-stopping criterion: with 5
  validation pairs accuracy ties are the rule), then the earliest step.  The LoRA weights are
  snapshotted whenever a point becomes the best, and only that snapshot is scored on ``eval``
  (no peeking; the same for the ``earliest`` pick).  Times: training to the chosen step excludes every evaluation; evaluation and
  the whole sweep are reported beside it.
  MAX_STEPS = 60, EVAL_EVERY = 5, measured on gemma-3-270m, past-tense (CPU, one run): validation
  accuracy reached 5/5 at step 5 (lr 3e-4, 1e-3) and 15 (1e-4) and stayed there; the validation
  loss bottomed at step 5 (1e-3) and 20 (3e-4, 0.0021) then rose, while at 1e-4 it still crept
  down to 0.0019 at step 60 -- 60 steps is 3x the step where every rate has reached its best
  validation accuracy, so a longer budget could only move the loss tie-break.  That tie-break
  picked (1e-4, step 60) there, 0.97 held-out, for a loss difference of 2e-4 nats; hence the
  second pick, ``earliest`` (see ``_key_earliest``), reported beside it.  The issue's own
  measurement: 3e-4, 15/5, 0.98 held-out on past-tense after 10 steps; 3e-3 overfits (so it is
  not in the grid).  About 0.9 s per full-batch step there on 2 CPU threads.

``steering_vector`` -- the mean activation difference (ActAdd / CAA family): per decoder layer l,
  ``v_l = mean over tokens of h_l(instruction + x) - h_l(x)`` at the positions of the example text
  x (``h_l`` the decoder layer's output, the residual stream; x tokenized alone so its positions
  align in both runs, as transmute's own passes do).  Two standard position choices, both
  built from the same forwards and both in the grid: ``last`` -- only the last query token (the
  position that predicts the answer; CAA's "answer position", the in-context/task-vector choice)
  and ``mean`` -- every token of ``template(input, output) + "\\n"`` (query, answer, newline: the
  positions transmute's thought vector is the mean over).  At inference ``m * v_l`` is added to
  layer l's output at every position (prompt and generated tokens) by a forward hook, removed in
  ``finally``.  (position, l, m) is chosen by greedy accuracy on the recipe's examples against
  their gold outputs; ties go to the smaller m, then ``last`` before ``mean``, then the lower layer.
  The grid's m runs from 0.25: on past-tense the best m per layer was 0.5 or 1 (``last``) and 2
  (``mean``), 0.5 being the smallest tried; 4 and 8 almost never helped (the vectors' norms grow
  from ~40 at layer 0 to ~13,000 at layer 17, as the residual stream does).  The choice is made
  with a greedy budget of the longest gold answer + 2 tokens (``answer_budget``), the held-out
  score with the recipe's.  A steering vector does not teach where an answer stops: on
  past-tense most steered answers ran on after a right first word ("caught caught caught ...");
  ``heldout_prefix_accuracy`` (answers that start with the gold output) shows that part.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from bench_engine import sync
from transmute_cli.recipe.datafiles import render
from transmute_cli.evaluation.generate import correct_answers, generate_answers
from transmute_cli.model.families import base_model, decoder_layers, family_for, model_device
from transmute_cli.model.tokens import special_prefix, token_ids

Log = Callable[[str], None]
Measure = Callable[[], dict]  # run with a baseline on the model: what it does elsewhere (JSON-able)

LORA_LRS = (1e-4, 3e-4, 1e-3)
LORA_RANK, LORA_ALPHA = 8, 16
LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")
MAX_STEPS, EVAL_EVERY, N_VAL = 60, 5, 5
STEER_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
STEER_POSITIONS = ("last", "mean")


def _quiet(_msg: str) -> None:
    pass


# --------------------------------------------------------------------------- shared


def queries(tok, template: str, inputs: Sequence[str]) -> list[list[int]]:
    """Token ids of each query without the instruction: the special prefix, then the template's
    text up to the answer (what transmute's patched and base conditions are asked)."""
    pre = special_prefix(tok)
    return [pre + token_ids(tok, render(template, x)) for x in inputs]


def accuracy(model, tok, template: str, pairs, max_new_tokens: int) -> tuple[float, list[str]]:
    """(greedy exact-match accuracy on ``pairs`` without the instruction, the answers)."""
    got = generate_answers(model, tok, queries(tok, template, [p.input for p in pairs]), max_new_tokens)
    return correct_answers(got, pairs) / max(len(pairs), 1), got


def answer_split(tok, template: str, x: str, answer: str) -> tuple[list[int], int]:
    """Token ids of ``template(x, answer) + "\n"`` (no special prefix) and where the answer starts
    in them: the first token that differs from the query's (``template(x)``) own ids."""
    q, full = token_ids(tok, render(template, x)), token_ids(tok, render(template, x, answer) + "\n")
    return full, next((i for i, (u, v) in enumerate(zip(q, full)) if u != v), min(len(q), len(full)))


def answer_budget(tok, template: str, pairs, cap: int, slack: int = 2) -> int:
    """A greedy budget for choosing on ``pairs``: the most tokens a gold answer and its newline
    take (as ``lora_batch`` tokenizes them) plus ``slack``, at most ``cap``.  An answer cut there
    that ran on would be wrong at any budget (exact match), so accuracy is unchanged but for an
    answer reached by a path ``slack`` tokens longer than the gold one; it saves most of a
    selection's time, where bad settings never emit the newline.  Held-out scores use ``cap``."""
    longest = 0
    for p in pairs:
        full, k = answer_split(tok, template, p.input, p.output)
        longest = max(longest, len(full) - k)
    return min(cap, longest + slack)


def split_examples(pairs: Sequence, n_val: int = N_VAL, seed: int = 0) -> tuple[list, list]:
    """(train, validation): a fixed-seed shuffle of ``pairs``, the first ``n_val`` for validation
    (at most a quarter of the pairs, at least one)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, min(n_val, len(pairs) // 4))
    return [pairs[i] for i in order[n_val:]], [pairs[i] for i in order[:n_val]]


# --------------------------------------------------------------------------- LoRA


def lora_batch(tok, template: str, inputs: Sequence[str], answers: Sequence[str], device):
    """Right-padded full batch of query + ' ' + answer + newline (no instruction); labels only on
    the answer and its newline: from the first token where the full text's tokens leave the
    query's.  Returns (input_ids, attention_mask, labels)."""
    pre = special_prefix(tok)
    rows = []
    for x, a in zip(inputs, answers):
        text, k = answer_split(tok, template, x, a)
        full, k = pre + text, len(pre) + k
        rows.append((full, [-100] * k + full[k:]))
    width, pad = max(len(f) for f, _ in rows), tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.tensor([f + [pad] * (width - len(f)) for f, _ in rows], device=device)
    labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in rows], device=device)
    mask = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f, _ in rows], device=device)
    return input_ids, mask, labels


@contextlib.contextmanager
def lora_attached(model, seed: int = 0, rank: int = LORA_RANK, alpha: int = LORA_ALPHA):
    """A fresh peft LoRA on ``model`` (initialised after ``torch.manual_seed(seed)``); on exit the
    LoRA layers are unloaded and ``requires_grad`` and train/eval mode are put back, so the
    model is the base model again, bit for bit."""
    from peft import LoraConfig, get_peft_model

    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    training = model.training
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                          target_modules=list(LORA_TARGETS)))
    pm.eval()  # dropout is 0 anyway; eval mode keeps every other module as the evaluation sees it
    try:
        yield pm
    finally:
        pm.unload()
        for attr in ("peft_config", "_hf_peft_config_loaded"):  # what peft may leave on the base model
            if attr in vars(model):
                delattr(model, attr)
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, True))
        model.train(training)


def trainable(pm) -> dict[str, torch.Tensor]:
    return {n: p for n, p in pm.named_parameters() if p.requires_grad}


def batch_loss(pm, batch) -> torch.Tensor:
    return pm(input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss


def _train_step(pm, opt, batch) -> float:
    loss = batch_loss(pm, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _key_chosen(p: dict) -> tuple:
    """The selection rule: higher validation accuracy, then lower validation loss, then earlier step."""
    return (-p["val_accuracy"], p["val_loss"], p["step"])


def _key_earliest(p: dict) -> tuple:
    """The second rule, reported beside it: higher validation accuracy, then the earliest step
    (then lower validation loss).  With 5 validation pairs the loss tie-break can pick a far later
    step for a negligible loss difference; this one is the cheapest point validation cannot tell
    apart, i.e. LoRA's time with early stopping at the first best accuracy."""
    return (-p["val_accuracy"], p["step"], p["val_loss"])


RULES = {"chosen": _key_chosen, "earliest": _key_earliest}


def pick(curve: Sequence[dict], rule: str = "chosen") -> dict:
    """The curve point ``RULES[rule]`` picks (the first one among exact equals)."""
    return min(curve, key=RULES[rule])


def _lora_run(model, tok, recipe, lr: float, train_batch, val_batch, val, max_steps: int, eval_every: int,
              seed: int, best: dict, log: Log) -> tuple[list[dict], list[float], dict]:
    """One learning rate: (curve, every step's training time, {rule: snapshot} for each rule whose
    best point (``best``, over the sweep so far, updated in place) is now one of this rate's)."""
    curve, step_s, snapshots = [], [], {}
    with lora_attached(model, seed) as pm:
        params = trainable(pm)
        opt = torch.optim.AdamW(list(params.values()), lr=lr)
        for step in range(1, max_steps + 1):
            sync(model)
            t0 = time.perf_counter()
            train_loss = _train_step(pm, opt, train_batch)
            sync(model)
            step_s.append(time.perf_counter() - t0)
            if step % eval_every and step != max_steps:
                continue
            t1 = time.perf_counter()
            with torch.no_grad():
                val_loss = batch_loss(pm, val_batch).item()
            val_acc, _ = accuracy(pm, tok, recipe.template, val,
                                  answer_budget(tok, recipe.template, val, recipe.max_new_tokens))
            sync(model)
            point = {"lr": lr, "step": step, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc,
                     "train_s": sum(step_s), "eval_s": time.perf_counter() - t1}
            curve.append(point)
            log(f"LoRA lr {lr:g} step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                f"val accuracy {val_acc:.2f}, train {point['train_s']:.1f} s")
            for rule, key in RULES.items():
                if rule not in best or key(point) < key(best[rule]):
                    best[rule], snapshots[rule] = point, {n: p.detach().clone() for n, p in params.items()}
    return curve, step_s, snapshots


def _score_snapshot(model, tok, recipe, snapshot: dict, val_batch, measure: Measure | None = None) -> dict:
    """Held-out accuracy of the LoRA with the snapshot's weights, and its validation loss again
    (it must equal the curve's: the snapshot is the chosen step's weights); ``measure()`` (run
    with the LoRA on the model) as ``side_effects``."""
    with lora_attached(model) as pm:
        params = trainable(pm)
        with torch.no_grad():
            for n, v in snapshot.items():
                params[n].copy_(v)
            val_loss = batch_loss(pm, val_batch).item()
        t0 = time.perf_counter()
        acc, answers = accuracy(pm, tok, recipe.template, recipe.eval, recipe.max_new_tokens)
        sync(model)
        out = {"heldout_accuracy": acc, "heldout_answers": answers, "val_loss_restored": val_loss,
               "heldout_eval_s": time.perf_counter() - t0}
        if measure is not None:
            out["side_effects"] = measure()
    return out


def _refit_all(model, tok, recipe, lr: float, steps: int, seed: int) -> dict:
    """The variant trained on every example (no validation) for the chosen steps at the chosen lr."""
    dev = model_device(model)
    batch = lora_batch(tok, recipe.template, [p.input for p in recipe.examples],
                       [p.output for p in recipe.examples], dev)
    train_s = 0.0
    with lora_attached(model, seed) as pm:
        opt = torch.optim.AdamW(list(trainable(pm).values()), lr=lr)
        for _ in range(steps):
            sync(model)
            t0 = time.perf_counter()
            _train_step(pm, opt, batch)
            sync(model)
            train_s += time.perf_counter() - t0
        acc, answers = accuracy(pm, tok, recipe.template, recipe.eval, recipe.max_new_tokens)
    return {"lr": lr, "steps": steps, "examples": len(recipe.examples), "train_s": train_s,
            "heldout_accuracy": acc, "heldout_answers": answers}


def train_lora(model, tok, recipe, *, lrs: Sequence[float] = LORA_LRS, max_steps: int = MAX_STEPS,
               eval_every: int = EVAL_EVERY, n_val: int = N_VAL, seed: int = 0, refit_all: bool = False,
               measure: Measure | None = None, log: Log = _quiet) -> dict:
    """The LoRA baseline tuned on a validation split of ``recipe.examples`` (see the module doc).

    Returns a JSON-able dict: ``chosen`` (the curve point the selection rule picks: lr, step, val
    accuracy/loss, ``train_s`` = measured training time to that step, ``train_s_median`` = step x
    the median step time of its rate, robust to a busy machine), ``heldout_accuracy`` and
    ``heldout_answers`` on ``recipe.eval`` at that point only, ``val_loss_restored`` (the snapshot
    re-scored: equals the point's), ``heldout_eval_s``; ``earliest``: the same for the earliest
    point with the best validation accuracy (``point`` and its scores); ``curve`` (every point of
    every rate), ``step_s`` (every step's time, per rate), ``train``/``val`` inputs, ``eval_s``
    (all validation), ``sweep_s`` (the whole call) and, with ``refit_all``, ``all_examples`` (the
    variant trained on every example for the chosen steps at the chosen lr).  ``measure``: called
    with the chosen LoRA on the model (peft injects it into ``model``'s own modules), its result
    as ``side_effects`` (bench_baselines: other prompted tasks and a neutral text)."""
    t_start = time.perf_counter()
    dev = model_device(model)
    train, val = split_examples(list(recipe.examples), n_val, seed)
    batch = lambda ps: lora_batch(tok, recipe.template, [p.input for p in ps], [p.output for p in ps], dev)  # noqa: E731
    train_batch, val_batch = batch(train), batch(val)
    curve, step_s, best, snapshots = [], {}, {}, {}
    for lr in lrs:
        points, times, snaps = _lora_run(model, tok, recipe, lr, train_batch, val_batch, val, max_steps, eval_every,
                                         seed, best, log)
        for point in points:
            point["train_s_median"] = point["step"] * statistics.median(times)
        curve, step_s[f"{lr:g}"] = curve + points, times
        snapshots.update(snaps)
    chosen, earliest = best["chosen"], best["earliest"]
    log(f"LoRA chosen: lr {chosen['lr']:g}, step {chosen['step']} (val accuracy {chosen['val_accuracy']:.2f}, "
        f"val loss {chosen['val_loss']:.4f}); earliest best: lr {earliest['lr']:g}, step {earliest['step']}; "
        f"scoring on {len(recipe.eval)} held-out pairs")
    out = {"rank": LORA_RANK, "alpha": LORA_ALPHA, "targets": list(LORA_TARGETS), "lrs": list(lrs),
           "max_steps": max_steps, "eval_every": eval_every, "seed": seed,
           "train": [p.input for p in train], "val": [p.input for p in val],
           "chosen": chosen, "curve": curve, "step_s": step_s, "eval_s": sum(p["eval_s"] for p in curve)}
    out.update(_score_snapshot(model, tok, recipe, snapshots["chosen"], val_batch, measure))
    same = earliest is chosen
    scores = {k: out[k] for k in ("heldout_accuracy", "heldout_answers", "val_loss_restored", "heldout_eval_s")}
    out["earliest"] = {"point": earliest, "same_as_chosen": same,
                       **(scores if same else _score_snapshot(model, tok, recipe, snapshots["earliest"], val_batch))}
    if refit_all:
        log(f"LoRA on all {len(recipe.examples)} examples: lr {chosen['lr']:g}, {chosen['step']} steps")
        out["all_examples"] = _refit_all(model, tok, recipe, chosen["lr"], chosen["step"], seed)
    out["sweep_s"] = time.perf_counter() - t_start
    return out


# --------------------------------------------------------------------------- steering vector


def _output_tensor(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def layer_outputs(model, seq: Sequence[int]) -> torch.Tensor:
    """[n_layers, len(seq), d]: every decoder layer's output (the residual stream) on one sequence."""
    fam = family_for(model)
    layers, got = decoder_layers(model, fam), []
    hooks = [layer.register_forward_hook(lambda _m, _i, o: got.append(_output_tensor(o)[0].float()))
             for layer in layers]
    try:
        base_model(model, fam)(input_ids=torch.tensor([list(seq)], device=model_device(model)))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(got)


def build_vectors(model, tok, recipe) -> dict[str, torch.Tensor]:
    """{position choice: [n_layers, d] vectors} from the recipe's examples: the contextual run on
    pre + instruction + x, the plain one on pre + x (x = template(input, output) + newline,
    tokenized alone).  ``last``: mean over examples at x's last query token; ``mean``: mean over
    every token of every x."""
    pre, instr = special_prefix(tok), token_ids(tok, recipe.instruction)
    last, every, tokens = 0.0, 0.0, 0
    for p in recipe.examples:
        x, k = answer_split(tok, recipe.template, p.input, p.output)
        diff = layer_outputs(model, pre + instr + x)[:, -len(x):] - layer_outputs(model, pre + x)[:, -len(x):]
        last, every, tokens = last + diff[:, k - 1], every + diff.sum(1), tokens + len(x)
    return {"last": last / len(recipe.examples), "mean": every / tokens}


@contextlib.contextmanager
def steered(model, layer: int, vector: torch.Tensor, scale: float):
    """Adds ``scale * vector`` to decoder layer ``layer``'s output at every position while inside."""
    add = (scale * vector).to(model_device(model))

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (output[0] + add.to(output[0].dtype),) + tuple(output[1:])
        return output + add.to(output.dtype)

    handle = decoder_layers(model, family_for(model))[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def steered_accuracy(model, tok, recipe, pairs, layer: int, vector: torch.Tensor, scale: float,
                     max_new_tokens: int | None = None):
    """(accuracy, answers) on ``pairs`` without the instruction, with the steering vector added
    (greedy budget: ``recipe.max_new_tokens`` unless given)."""
    with steered(model, layer, vector, scale):
        return accuracy(model, tok, recipe.template, pairs, max_new_tokens or recipe.max_new_tokens)


def _steer_key(point: dict) -> tuple:
    """Selection rule: higher accuracy on the examples, then smaller m, ``last`` first, lower layer."""
    return (-point["examples_accuracy"], point["scale"], STEER_POSITIONS.index(point["position"]), point["layer"])


def steering_vector(model, tok, recipe, *, scales: Sequence[float] = STEER_SCALES,
                    layers: Sequence[int] | None = None, positions: Sequence[str] = STEER_POSITIONS,
                    measure: Measure | None = None, log: Log = _quiet) -> dict:
    """The steering-vector baseline (see the module doc): build, choose (position, layer, m) on the
    recipe's examples, score the choice on ``recipe.eval``.

    Returns a JSON-able dict: ``chosen`` (position, layer, scale, examples_accuracy),
    ``heldout_accuracy`` and answers, ``heldout_prefix_accuracy`` (answers that start with the
    gold output: lenient, for information), ``grid`` (every point), ``examples_base_accuracy`` (no
    steering; ``selection_max_new_tokens`` the budget of the choice),
    ``vector_norms`` per position and layer, and the times ``build_s``, ``choose_s``
    (= the grid), ``heldout_eval_s``; ``side_effects``: ``measure()`` run with the chosen vector
    added (when given)."""
    n_layers = len(decoder_layers(model, family_for(model)))
    layers = list(range(n_layers)) if layers is None else list(layers)
    t0 = time.perf_counter()
    vectors = build_vectors(model, tok, recipe)
    sync(model)
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    budget = answer_budget(tok, recipe.template, recipe.examples, recipe.max_new_tokens)
    base_acc, _ = accuracy(model, tok, recipe.template, recipe.examples, budget)
    grid = []
    for pos in positions:
        for layer in layers:
            for m in scales:
                acc, _ = steered_accuracy(model, tok, recipe, recipe.examples, layer, vectors[pos][layer], m, budget)
                grid.append({"position": pos, "layer": layer, "scale": m, "examples_accuracy": acc})
            log(f"steering {pos} layer {layer}: examples accuracy "
                + ", ".join(f"m={g['scale']:g} {g['examples_accuracy']:.2f}" for g in grid[-len(scales):]))
    sync(model)
    choose_s = time.perf_counter() - t1
    best = min(grid, key=_steer_key)
    t2 = time.perf_counter()
    acc, answers = steered_accuracy(model, tok, recipe, recipe.eval, best["layer"],
                                    vectors[best["position"]][best["layer"]], best["scale"])
    sync(model)
    log(f"steering chosen: {best['position']} layer {best['layer']} m {best['scale']:g} "
        f"(examples {best['examples_accuracy']:.2f}); held-out {acc:.2f}")
    prefix = sum(a.startswith(p.output.strip()) for a, p in zip(answers, recipe.eval)) / max(len(answers), 1)
    heldout_eval_s = time.perf_counter() - t2
    side = None
    if measure is not None:
        with steered(model, best["layer"], vectors[best["position"]][best["layer"]], best["scale"]):
            side = measure()
    return {"chosen": dict(best), "heldout_accuracy": acc, "heldout_prefix_accuracy": prefix,
            "heldout_answers": answers, "grid": grid,
            "examples_base_accuracy": base_acc, "selection_max_new_tokens": budget, "scales": list(scales),
            "layers": layers, "positions": list(positions),
            "vector_norms": {pos: vectors[pos].norm(dim=-1).tolist() for pos in positions},
            "build_s": build_s, "choose_s": choose_s, "heldout_eval_s": heldout_eval_s,
            **({"side_effects": side} if measure is not None else {})}
