"""Forward hooks on norms and ``nn.Linear`` modules, installed as context managers.

Everything that touches a model at run time lives here; the maths lives in ``solve.py``.
Hooks are always removed in ``finally`` blocks, so an exception never leaves a model patched.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from transmute_cli.errors import EngineError
from transmute_cli.model.families import Family, base_model, decoder_layers, get_module
from transmute_cli.engine.lowrank import apply


class _HookSet:
    """Hooks registered on entry and all removed on exit (also on an exception)."""

    _handles: list[Any]

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class ThoughtHooks(_HookSet):
    """Applies a thought patch in-process, without touching any weight.

    For a layer with input-space thought matrix ``A`` [d, d] and thought vector ``δ`` [d]:

    * the MLP norm's output ``n`` becomes ``n + A n``, so every MLP input projection W computes
      ``W (I + A) n = (W + W A) n`` — exactly the merged weight ``W + Δ`` with ``Δ = W A``
      (a factored A is applied through its factors, T·2d per token instead of d²);
    * ``δ`` is added to the output of the module whose output joins the residual stream.

    ``enabled`` switches the whole patch off (the engine's contextual passes need the
    unpatched model) without removing the hooks.
    """

    def __init__(self, model: nn.Module, fam: Family):
        self.model, self.fam = model, fam
        self.layers = decoder_layers(model, fam)
        self.matrices: dict[int, torch.Tensor] = {}
        self.vectors: dict[int, torch.Tensor] = {}
        self.downs: dict[int, torch.Tensor] = {}
        self.scale = 1.0
        self.enabled = True
        self._handles: list[Any] = []

    def set(
        self,
        layer: int,
        matrix: torch.Tensor | None = None,
        vector: torch.Tensor | None = None,
        down: torch.Tensor | None = None,
    ) -> None:
        ref = get_module(self.layers[layer], self.fam.mlp_norm)
        p = next(ref.parameters(), None)
        # a disk-offloaded layer has meta parameters: keep its patch on the CPU; hooks move
        # tensors to the activations' device (a no-op when they already match)
        device = p.device if p is not None and p.device.type != "meta" else torch.device("cpu")
        if matrix is not None:
            self.matrices[layer] = matrix.to(device=device, dtype=torch.float32)
        if vector is not None:
            self.vectors[layer] = vector.to(device=device, dtype=torch.float32)
        if down is not None:
            self.downs[layer] = down.to(device=device, dtype=torch.float32)

    def set_patch(self, patch) -> None:
        """Install every layer of a ``ThoughtPatch``."""
        for l in patch.layers:
            self.set(l, patch.matrices.get(l), patch.vectors.get(l), patch.downs.get(l))

    def clear(self, layer: int) -> None:
        self.matrices.pop(layer, None)
        self.vectors.pop(layer, None)
        self.downs.pop(layer, None)

    def _norm_hook(self, layer: int):
        def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor | None:
            a = self.matrices.get(layer)
            if not self.enabled or a is None:
                return None
            # n: [..., d];  n + n Aᵀ computed in float32 whatever the model dtype
            return (out.float() + self.scale * apply(a.to(out.device), out.float())).to(out.dtype)

        return hook

    def _out_hook(self, layer: int):
        def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor | None:
            v = self.vectors.get(layer)
            if not self.enabled or v is None:
                return None
            return (out.float() + self.scale * v.to(out.device)).to(out.dtype)

        return hook

    def _down_hook(self, layer: int):
        def hook(_mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
            dm = self.downs.get(layer)
            if not self.enabled or dm is None:
                return None
            # (W_down + D) a = W_down a + D a ;  a: [..., f], D: [d, f]
            return (out.float() + self.scale * apply(dm.to(out.device), inp[0].float())).to(out.dtype)

        return hook

    def __enter__(self) -> "ThoughtHooks":
        for i, layer in enumerate(self.layers):
            self._handles.append(get_module(layer, self.fam.mlp_norm).register_forward_hook(self._norm_hook(i)))
            # registered before the vector hook: on Llama mlp_down *is* mlp_out, both add
            self._handles.append(get_module(layer, self.fam.mlp_down).register_forward_hook(self._down_hook(i)))
            self._handles.append(get_module(layer, self.fam.mlp_out).register_forward_hook(self._out_hook(i)))
        return self


class TokenPatchHooks(_HookSet):
    """The exact, token-dependent patch (ground truth): per position t of a fixed batch,

    * every MLP input projection W gets the rank-one update ``W dz_t n_tᵀ / |n_t|²`` applied to
      its *live* input (so a replay whose input drifted from ``n_t`` would show it);
    * ``delta_t = u^C_t − u_t`` is added where the MLP output joins the residual stream.

    Tensors are ``[batch, seq, d]``; positions with ``|n_t| = 0`` get no matrix update.
    """

    def __init__(self, model: nn.Module, fam: Family):
        self.model, self.fam = model, fam
        self.layers = decoder_layers(model, fam)
        self.dz: dict[int, torch.Tensor] = {}
        self.n: dict[int, torch.Tensor] = {}
        self.delta: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def set(self, layer: int, n: torch.Tensor, dz: torch.Tensor, delta: torch.Tensor) -> None:
        self.n[layer], self.dz[layer], self.delta[layer] = n, dz, delta

    def _in_hook(self, layer: int, weight: torch.Tensor):
        def hook(_mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
            if layer not in self.n:
                return None
            x, n, dz = inp[0], self.n[layer], self.dz[layer]
            sq = (n * n).sum(-1, keepdim=True)
            coef = torch.where(sq > 0, (n * x).sum(-1, keepdim=True) / sq.clamp_min(1e-30), torch.zeros_like(sq))
            return out + coef * (dz.to(weight.dtype) @ weight.T)  # (W dz)(nᵀ x)/|n|²

        return hook

    def _out_hook(self, layer: int):
        def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor | None:
            if layer not in self.delta:
                return None
            return out + self.delta[layer].to(out.dtype)

        return hook

    def __enter__(self) -> "TokenPatchHooks":
        for i, layer in enumerate(self.layers):
            for path in self.fam.mlp_in:
                lin = get_module(layer, path)
                self._handles.append(lin.register_forward_hook(self._in_hook(i, lin.weight)))
            self._handles.append(get_module(layer, self.fam.mlp_out).register_forward_hook(self._out_hook(i)))
        return self


@contextlib.contextmanager
def capture(layer: nn.Module, fam: Family) -> Iterator[dict[str, torch.Tensor]]:
    """Record ``u`` (MLP-norm input), ``n`` (its output), ``y`` (what joins the residual) and
    ``a``/``m`` (the down projection's input and output).

    The norm hook is *prepended* so it sees the norm's raw output before a thought patch
    transforms it.
    """
    store: dict[str, torch.Tensor] = {}

    def norm_hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        store["u"], store["n"] = inp[0].detach(), out.detach()

    def out_hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        store["y"] = out.detach()

    def down_hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        store["a"], store["m"] = inp[0].detach(), out.detach()

    handles = [
        get_module(layer, fam.mlp_norm).register_forward_hook(norm_hook, prepend=True),
        get_module(layer, fam.mlp_down).register_forward_hook(down_hook, prepend=True),
        get_module(layer, fam.mlp_out).register_forward_hook(out_hook),
    ]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class LayerCall:
    """Replays one decoder layer on new hidden states with the arguments the model gave it."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.args, self.kwargs = args, kwargs

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = layer(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


_NONE = object()


def forward_parameters(model: nn.Module) -> set[str]:
    """The keyword names ``model.forward`` takes (a PeftModel's: its base model's, it passes them on)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(inner.forward).parameters)


def cache_kwargs(model: nn.Module, cache: DynamicCache) -> dict[str, Any]:
    """The keyword arguments that hand ``cache`` to ``model.forward``: ``cache`` since
    transformers 5.x renamed it, ``past_key_values`` before."""
    return {"cache" if "cache" in forward_parameters(model) else "past_key_values": cache, "use_cache": True}


# The cache layer classes whose internals ``PrefixCache.update`` saves and restores (``vars``):
# they keep ``keys``/``values`` and counters as plain attributes and return the concatenation
# from ``update`` (transformers 5.25).  Another class may write in place, which the restore would
# not undo: refused at the first fill instead of a silently wrong patch.
KNOWN_CACHE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


def check_cache_layers(cache: DynamicCache) -> None:
    """Fail loudly when a cache layer is of a class ``PrefixCache`` was not written for."""
    for layer in cache.layers:
        name = type(layer).__name__
        if name not in KNOWN_CACHE_LAYERS or not all(torch.is_tensor(vars(layer).get(k)) for k in ("keys", "values")):
            import transformers

            raise EngineError(f"transformers {transformers.__version__} gives the model a cache layer of class {name}, "
                              f"whose internals transmute's prefix cache does not know (it knows "
                              f"{', '.join(KNOWN_CACHE_LAYERS)}); install the transformers version pyproject.toml "
                              "names")


class PrefixCache(DynamicCache):
    """The keys and values of one shared prefix (``pre + I``), computed once by :meth:`fill`
    with the model as it is (the engine fills it unpatched).  Afterwards it is read-only: every
    attention call attends to the prefix and to its own tokens, for any number of rows, and stores
    nothing — so one prefill serves every micro-batch and every replay of every layer, and the
    contextual pass costs the examples' tokens instead of (instruction + example) × examples."""

    def __init__(self, model: nn.Module):
        super().__init__(config=model.config)
        self.frozen = False

    def fill(self, model: nn.Module, fam: Family, prefix_ids: torch.Tensor) -> "PrefixCache":
        """Run the decoder once on ``prefix_ids`` [1, P] and keep every layer's keys and values."""
        with torch.no_grad():
            base = base_model(model, fam)
            base(input_ids=prefix_ids, **cache_kwargs(base, self))
        check_cache_layers(self)
        self.frozen = True
        return self

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.frozen:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        kept = dict(vars(layer))  # the prefix's tensors and counters, put back after the call
        rows = key_states.shape[0]
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)
        try:
            return layer.update(key_states, value_states, *args, **kwargs)
        finally:
            vars(layer).clear()
            vars(layer).update(kept)


def record_layer_inputs(model: nn.Module, fam: Family, input_ids: torch.Tensor,
                        prefix: "PrefixCache | None" = None) -> tuple[torch.Tensor, list[LayerCall]]:
    """The embeddings entering layer 0 and, per layer, the extra arguments the model passes it
    (attention masks, rotary embeddings, positions) for inputs shaped like ``input_ids``.
    With ``prefix``, the inputs continue that prefix: positions start after it, and every replay
    of a layer attends to its keys and values as well as to the inputs' own.

    Layer 0 runs for real so we learn whether layers return a tensor or a tuple in this
    transformers version; layers ≥ 1 are replaced by an identity of the same return type, so the
    recording costs the embeddings, the mask construction and one layer — not a forward pass.
    """
    layers = decoder_layers(model, fam)
    records: list[tuple[tuple[Any, ...], dict[str, Any]]] = [((), {})] * len(layers)
    first: dict[str, Any] = {}

    def pre0(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        first["h"] = args[0] if args else kwargs["hidden_states"]
        records[0] = (tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"})

    def post0(_m: nn.Module, _a: Any, _k: Any, out: Any) -> None:
        first["tuple"] = isinstance(out, tuple)

    def identity(i: int):
        def fwd(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            records[i] = (args, kwargs)
            return (hidden_states,) if first.get("tuple") else hidden_states

        return fwd

    handles = [
        layers[0].register_forward_pre_hook(pre0, with_kwargs=True),
        layers[0].register_forward_hook(post0, with_kwargs=True),
    ]
    # an instance attribute shadows the class method; one may be there already (accelerate's
    # device-moving wrapper on a device map): keep it and put it back afterwards
    saved = [vars(layers[i]).get("forward", _NONE) for i in range(len(layers))]
    for i in range(1, len(layers)):
        layers[i].forward = identity(i)
    try:
        with torch.no_grad():
            base = base_model(model, fam)
            base(input_ids=input_ids, **({"use_cache": False} if prefix is None else cache_kwargs(base, prefix)))
    finally:
        for h in handles:
            h.remove()
        for i in range(1, len(layers)):
            if saved[i] is _NONE:
                del layers[i].forward
            else:
                layers[i].forward = saved[i]
    return first["h"], [LayerCall(a, k) for a, k in records]
