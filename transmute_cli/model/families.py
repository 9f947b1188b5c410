"""Per-family knowledge in one table: where the MLP of a decoder layer reads and writes.

Every supported family has pre-norm decoder layers of the form

    u  = h + attention part                 (the residual after attention)
    n  = mlp_norm(u)                        (the MLP input)
    h' = u + mlp_out( MLP(n) )              (mlp_out: the module whose output joins the residual)

so the engine only needs module *names*: the norm whose input is ``u`` and output is ``n``,
the MLP input projections (gate/up, or a single fc1), the down projection, and the module
whose output is added to the residual stream.  Hooks go on those modules (``nn.Linear`` and
norms), never on whole decoder blocks, because their inputs and outputs have the same shape in
every family and every transformers version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from transmute_cli.errors import ModelError


@dataclass(frozen=True)
class Family:
    name: str
    layers: str = "model.layers"  # the ModuleList of decoder layers, from the CausalLM root
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    mlp_norm: str = "post_attention_layernorm"  # input u, output n (relative to a layer)
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # read n
    mlp_down: str = "mlp.down_proj"
    mlp_out: str = "mlp.down_proj"  # its output is added to the residual stream
    # config flag that gives the MLP projections a bias in a *standard* checkpoint, so a
    # thought vector can be saved exactly as ``down_proj.bias`` (None: it must be folded).
    bias_flag: str | None = None
    # how mlp_out maps the down projection's output m to what joins the residual:
    # None: identity (Llama: mlp_out is down_proj itself); "gemma": (1 + w) ⊙ m / rms(m)
    out_norm: str | None = None


_LLAMA = Family("llama", bias_flag="mlp_bias")
_GEMMA = Family(
    "gemma3", mlp_norm="pre_feedforward_layernorm", mlp_out="post_feedforward_layernorm", out_norm="gemma"
)

# model_type -> family.  Qwen2/3 and Mistral have Llama's layer layout but no mlp_bias switch.
FAMILIES: dict[str, Family] = {
    "gemma3_text": _GEMMA,
    "gemma3": Family(
        "gemma3",
        layers="model.language_model.layers",
        final_norm="model.language_model.norm",
        mlp_norm="pre_feedforward_layernorm",
        mlp_out="post_feedforward_layernorm",
        out_norm="gemma",
    ),
    "gemma2": Family(
        "gemma2", mlp_norm="pre_feedforward_layernorm", mlp_out="post_feedforward_layernorm", out_norm="gemma"
    ),
    "llama": _LLAMA,
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "mistral": Family("mistral"),
}

# names accepted by --family / the recipe's `family:` key to treat another model_type like one of these
FAMILY_NAMES: dict[str, Family] = {f.name: f for f in FAMILIES.values() if f.name != "gemma3"} | {"gemma3": _GEMMA}


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    mod = root
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


def family_for(model: nn.Module, override: str | Family | None = None) -> Family:
    """The family of ``model``, checked against the modules it really has.  ``override``: a family
    name (``--family``), or the Family already resolved for this model (``Loaded.fam``: a command
    resolves it once when it loads the model and passes it on), returned as it is."""
    if isinstance(override, Family):
        return override
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    if override is not None:
        if override not in FAMILY_NAMES:
            raise ModelError(
                f"unknown family '{override}' (known: {', '.join(sorted(FAMILY_NAMES))})", field="family"
            )
        fam = FAMILY_NAMES[override]
    elif model_type in FAMILIES:
        fam = FAMILIES[model_type]
    else:
        raise ModelError(
            f"model type '{model_type}' is not supported (supported: {', '.join(sorted(FAMILIES))}); "
            "if its decoder layers are laid out like one of these, pass --family NAME "
            f"(or `family:` in the recipe) with NAME one of {', '.join(sorted(FAMILY_NAMES))}"
        )
    _check(model, fam, model_type)
    return fam


def _check(model: nn.Module, fam: Family, model_type: str) -> None:
    missing: list[str] = []
    for path in (fam.layers, fam.final_norm, fam.lm_head):
        try:
            get_module(model, path)
        except AttributeError:
            missing.append(path)
    if not missing:
        layer = decoder_layers(model, fam)[0]
        for path in (fam.mlp_norm, *fam.mlp_in, fam.mlp_down, fam.mlp_out):
            try:
                get_module(layer, path)
            except AttributeError:
                missing.append(f"{fam.layers}.0.{path}")
    if missing:
        raise ModelError(
            f"model type '{model_type}' does not have the modules of family '{fam.name}': "
            f"missing {', '.join(missing)}; pass --family NAME with a family whose layout matches "
            f"(known: {', '.join(sorted(FAMILY_NAMES))})"
        )
    for path in fam.mlp_in:
        if not isinstance(get_module(decoder_layers(model, fam)[0], path), nn.Linear):
            raise ModelError(f"family '{fam.name}': {path} is not an nn.Linear in model type '{model_type}'")


def decoder_layers(model: nn.Module, fam: Family) -> nn.ModuleList:
    return get_module(model, fam.layers)  # type: ignore[return-value]


def base_model(model: nn.Module, fam: Family) -> nn.Module:
    """The module that owns the decoder layers (runs embeddings, masks, rotary, layers, final norm)."""
    return get_module(model, fam.layers.rsplit(".", 1)[0])


def resolve_layers(spec: str | tuple[int, ...] | list[int], n_layers: int) -> list[int]:
    if spec == "all" or spec is None:
        return list(range(n_layers))
    bad = [i for i in spec if not (0 <= int(i) < n_layers)]
    if bad:
        raise ModelError(
            f"layer index {bad[0]} is out of range: the model has {n_layers} layers (0..{n_layers - 1})",
            field="layers",
        )
    return sorted(set(int(i) for i in spec))


def text_config(model: nn.Module):
    """The language model's own config: ``config.get_text_config()`` where the model is a
    composite (Gemma 3 of 4B and up loads as ``Gemma3ForConditionalGeneration``, whose config
    holds ``sliding_window``, the context length and the sizes in ``text_config``), else the
    config itself; ``None`` for a module without one."""
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    return get(decoder=True) if callable(get) else cfg


def model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the embeddings' device (the first layer of a device map), not meta."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def weight_of(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """A module's parameter even when accelerate has offloaded it to disk (the parameter is then
    a meta tensor and the real values live in the module's hook's ``weights_map``)."""
    p = getattr(module, name)
    if p is not None and p.device.type == "meta":
        wm = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if wm is not None:
            return wm[name]
    return p


def post_norm(layer: nn.Module, fam: Family) -> tuple[torch.Tensor, float] | None:
    """Gemma's post-MLP norm ``y = s ⊙ m / rms(m)``: its scale ``s = 1 + w`` [d] (float64) and eps;
    None where what joins the residual is the down projection's output itself."""
    if fam.out_norm != "gemma":
        return None
    norm = get_module(layer, fam.mlp_out)
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    return 1.0 + weight_of(norm).detach().double(), eps


def select(t: torch.Tensor, start: int, mask: torch.Tensor) -> torch.Tensor:
    """``t[:, start:][mask]`` with the mask moved to ``t``'s device (layers may sit on
    different devices under a device map): the tokens of x, ``[tokens, ...]``."""
    return t[:, start:][mask.to(t.device)]
