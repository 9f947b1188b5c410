"""A patch written where small models run: GGUF files that llama.cpp (and Ollama, LM Studio,
llama-cpp-python) loads, from the very GGUF the model came from.

* ``write_patched_gguf``: the source file with the tensors the patch changes replaced by
  ``W + ΔW`` — every other tensor and every metadata key (tokenizer, chat template) copied byte
  for byte, plus ``transmute.*`` keys saying what was baked.  ``W`` is the source tensor
  dequantized by ``gguf`` (ggml's own Python package), the same numbers transformers loaded, so
  ``ΔW`` applies to what the patch was computed on; the sum is written in ``qtype`` (Q8_0 by
  default: the source's 4–6-bit types would round the update away, float16 doubles the size).
* ``write_lora_gguf``: the patch's exact factors as a llama.cpp LoRA adapter (the layout
  llama.cpp's ``convert_lora_to_gguf.py`` writes: ``general.type = adapter``, tensors
  ``blk.N.ffn_gate.weight.lora_a`` [r, in] and ``.lora_b`` [out, r]) for ``llama-cli --lora`` or
  llama-cpp-python's ``lora_path``, on the unchanged base file.  llama.cpp scales every pair by
  ``alpha / r``; each module here has its own r, so ``alpha`` is 1 and ``B`` carries ``r``.

Both take the weight updates of ``export.deltas`` (the thought vector folded into the down
projection by least squares: llama.cpp's LoRA has no bias, and Gemma's vector has no slot).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from transmute_cli.errors import InputError, ModelError
from transmute_cli.engine.lowrank import LowRank, dense

# the MLP projections' names in transformers (families' mlp paths end in them) and in GGUF
GGUF_MLP = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
QTYPES = ("q8_0", "f16", "f32")


def tensor_name(module: str) -> str:
    """``model.layers.3.mlp.gate_proj`` -> ``blk.3.ffn_gate.weight``."""
    m = re.search(r"\.(\d+)\.(?:\w+\.)*(\w+)$", module)
    if not m or m.group(2) not in GGUF_MLP:
        raise ModelError(f"no GGUF tensor for {module} (transmute writes the MLP projections: "
                         f"{', '.join(GGUF_MLP)})")
    return f"blk.{m.group(1)}.{GGUF_MLP[m.group(2)]}.weight"


def check_qtype(value: str) -> None:
    if value not in QTYPES:
        raise InputError(f"must be one of {', '.join(QTYPES)}, got {value!r}", field="--gguf-type")


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - a foreign or truncated file fails deep in the reader
        raise ModelError(f"{path}: not a readable GGUF file ({' '.join(str(e).split())[:160]})") from None


def _writer(reader, out: Path):
    from gguf import GGUFWriter, Keys

    arch = reader.fields[Keys.General.ARCHITECTURE].contents()
    return GGUFWriter(str(out), arch=arch, endianess=reader.endianess)


def _copy_metadata(reader, writer, extra: dict[str, str], skip: Iterable[str] = ()) -> None:
    """Every key of the source (as gguf's own gguf_new_metadata.py copies them), then ``extra``."""
    from gguf import GGUFValueType, Keys

    skip = set(skip)
    for field in reader.fields.values():
        if field.name == Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name in skip \
                or field.name in extra:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for key, value in extra.items():
        writer.add_key_value(key, value, GGUFValueType.STRING)


def _encode(weight: np.ndarray, qtype: str) -> tuple[np.ndarray, object]:
    """A float32 [out, in] weight as the bytes (or floats) of ``qtype`` and its ggml type."""
    from gguf import GGMLQuantizationType, quants

    if qtype == "f32":
        return weight.astype(np.float32), GGMLQuantizationType.F32
    if qtype == "f16":
        return weight.astype(np.float16), GGMLQuantizationType.F16
    return quants.quantize(weight.astype(np.float32), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0


def dequantized(tensor) -> np.ndarray:
    """A GGUF tensor as float32 [out, in] (numpy's order: ggml's shape reversed)."""
    from gguf import quants

    return np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def write_patched_gguf(src: Path, out: Path, updates: Iterable[tuple[str, torch.Tensor | LowRank]], *,
                       qtype: str = "q8_0", metadata: dict[str, str] | None = None) -> dict:
    """The source GGUF with each updated MLP weight replaced by ``W + ΔW`` in ``qtype``; returns
    what was replaced (tensor, source type, written type) and the sizes."""
    check_qtype(qtype)
    reader = _reader(src)
    by_name = {t.name: t for t in reader.tensors}
    new: dict[str, tuple[np.ndarray, object]] = {}
    replaced = []
    for module, delta in updates:
        name = tensor_name(module)
        if name not in by_name:
            raise ModelError(f"{src}: has no tensor {name} for {module}")
        t = by_name[name]
        w = dequantized(t)
        d = dense(delta).detach().float().cpu().numpy() if isinstance(delta, LowRank) else \
            delta.detach().float().cpu().numpy()
        if d.shape != w.shape:
            raise ModelError(f"{src}: {name} is {tuple(w.shape)}, the patch's update {tuple(d.shape)}: not the "
                             "model the patch was computed on")
        new[name] = _encode(w + d, qtype)
        replaced.append({"tensor": name, "from": t.tensor_type.name, "to": new[name][1].name})
    writer = _writer(reader, out)
    _copy_metadata(reader, writer, metadata or {})
    for t in reader.tensors:
        data, ttype = new.get(t.name, (t.data, t.tensor_type))
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, ttype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(new[t.name][0] if t.name in new else t.data, tensor_endianess=reader.endianess)
    writer.close()
    return {"replaced": replaced, "qtype": qtype, "bytes": out.stat().st_size, "source_bytes": src.stat().st_size}


def write_lora_gguf(src: Path, out: Path, pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]], *,
                    metadata: dict[str, str] | None = None) -> dict:
    """A llama.cpp LoRA adapter: per module its exact pair (``lora_A`` [r, in], ``lora_B``
    [out, r], ``export.lora_pair``), ``B`` scaled by r so that llama.cpp's ``alpha / r`` is 1."""
    from gguf import GGUFValueType, Keys

    reader = _reader(src)
    arch = reader.fields[Keys.General.ARCHITECTURE].contents()
    names = {t.name for t in reader.tensors}
    tensors = []
    for module, a, b in pairs:
        name = tensor_name(module)
        if name not in names:
            raise ModelError(f"{src}: has no tensor {name} for {module}")
        r = a.shape[0]
        tensors.append((f"{name}.lora_a", a.detach().float().cpu().numpy()))
        tensors.append((f"{name}.lora_b", (b.detach().float().cpu() * r).numpy()))
    from gguf import GGUFWriter

    writer = GGUFWriter(str(out), arch=arch, endianess=reader.endianess)
    writer.add_key_value(Keys.General.TYPE, "adapter", GGUFValueType.STRING)
    writer.add_key_value(Keys.Adapter.TYPE, "lora", GGUFValueType.STRING)
    writer.add_key_value(Keys.Adapter.LORA_ALPHA, 1.0, GGUFValueType.FLOAT32)
    for key, value in (metadata or {}).items():
        writer.add_key_value(key, value, GGUFValueType.STRING)
    for name, data in tensors:
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"modules": len(tensors) // 2, "max_rank": max((d.shape[0] for n, d in tensors if n.endswith("lora_a")),
                                                            default=0), "bytes": out.stat().st_size}
