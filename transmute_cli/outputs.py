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


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
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
