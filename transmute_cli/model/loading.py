"""Loading a resolved model: device and dtype, device maps, the family check, the weights'
fingerprint (Loaded, load_model)."""

from __future__ import annotations


import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transmute_cli.errors import ModelError
from transmute_cli.model.families import Family, family_for
from transmute_cli.model.sources import (
    DTYPES, cache_dir, ModelSource, Log, quiet, resolve, ensure_folder, short_error, native_dtype,
)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("CUDA was requested but no GPU is available", field="--device")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelError(f"unknown device {device!r} (auto, cpu, cuda)", field="--device")
    return torch.device(device)


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(value: str) -> str | dict:
    """``--device-map``: one of accelerate's strategies, or a JSON file mapping module names to
    devices (``{"model.layers.5": "disk", "lm_head": 0, ...}``)."""
    if value in DEVICE_MAP_STRATEGIES:
        return value
    path = Path(value)
    if not path.is_file():
        raise ModelError(f"must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON file of module -> device, "
                         f"got {value!r} (no such file)", field="--device-map")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"not valid JSON ({short_error(e)})", source=value, field="--device-map") from None
    if not isinstance(data, dict) or not data or not all(
            isinstance(k, str) and (isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)))
            for k, v in data.items()):
        raise ModelError("must be a JSON object of module name -> device (\"cpu\", \"disk\", a GPU index)",
                         source=value, field="--device-map")
    return data


def _offload_folder() -> str:
    """Where a device map's disk-offloaded weights go: a folder of this process, removed at exit."""
    import atexit

    folder = tempfile.mkdtemp(prefix="offload-", dir=ensure_folder(cache_dir()))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def load(spec: str, *, device: str = "auto", dtype: str = "float32", trust_remote_code: bool = False,
         device_map: str | dict | None = None, offload_folder: str | None = None, log: Log = quiet):
    """(model, tokenizer, source) with the model in eval mode on the chosen device.

    ``device_map`` ("auto" or an accelerate map) spreads layers over GPUs, CPU and disk for
    models larger than one device; the engine then follows each layer to its device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r} ({', '.join(DTYPES)})", field="--dtype")
    src = resolve(spec, log)
    dev = pick_device(device) if device_map is None else None
    if isinstance(device_map, str):
        device_map = parse_device_map(device_map)
    if device_map is not None and offload_folder is None:
        offload_folder = _offload_folder()
    extra = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
    try:
        tok = AutoTokenizer.from_pretrained(src.path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            src.path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True, **extra
        )
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"{spec}: cannot load the model ({short_error(e)})") from None
    if dev is not None:
        model.to(dev)
    model.eval()
    return model, tok, src


def _parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``named_parameters()`` (same names, same sharing rule) with the values of parameters that a
    device map offloaded to disk read from accelerate's weights map instead of the meta tensors."""
    from transmute_cli.model.families import weight_of

    seen: set[int] = set()
    out = []
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            out.append((f"{mname}.{pname}" if mname else pname, weight_of(mod, pname)))
    return out


def fingerprint(model: nn.Module) -> str:
    """A short id of the base weights that survives dtype changes (float32 vs bfloat16 loads).

    Hashes the architecture, every parameter's name and shape, and a strided sample of its
    values rounded to bfloat16 — cheap (no pass over all weights) yet different for any real
    change of model.  Patched layers are excluded by the caller when it fingerprints a
    checkpoint's base.
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        h.update(f"{k}={getattr(cfg, k, None)};".encode())
    with torch.no_grad():
        for name, p in sorted(_parameters(model), key=lambda kv: kv[0]):
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step][:4096].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()
            h.update(f"{name}:{tuple(p.shape)}:".encode())
            h.update(sample)
    return h.hexdigest()[:16]


@dataclass
class Loaded:
    """A loaded model with what every command needs beside it."""

    model: torch.nn.Module
    tokenizer: object
    fam: Family
    source: ModelSource
    fingerprint: str
    dtype: str
    native_dtype: str = "float32"  # what a checkpoint is saved in by default (``native_dtype``)


def load_model(spec: str, *, device: str = "auto", dtype: str = "float32", family: str | None = None,
               trust_remote_code: bool = False, device_map: str | None = None, log: Log = quiet) -> Loaded:
    """``log``: progress of a first-use GGUF conversion (``resolve``)."""
    model, tok, src = load(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map,
                           log=log)
    fam = family_for(model, family)
    return Loaded(model, tok, fam, src, fingerprint(model), dtype, native_dtype(src))
