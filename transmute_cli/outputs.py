"""Outputs are built in a temporary folder on the same filesystem and renamed into place at
the end: an interrupt or a crash leaves no partial output and the previous one intact."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError


def check_target(out: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Fail *before* any work when the output exists and may not be replaced."""
    if out.exists() and not overwrite:
        raise InputError(f"already exists; pass {flag} to replace it", source=str(out))
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a folder", source=str(out))


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def _umask_modes(root: Path) -> None:
    """Give every folder and file under ``root`` (itself included) the mode a plain ``mkdir`` or
    ``open`` would: ``mkdtemp`` makes 0700 and safetensors writes 0600, which would keep a
    checkpoint from the other users of a shared machine."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _umask_modes(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")  # move the previous output aside, then swap in the new one
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "x", out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
