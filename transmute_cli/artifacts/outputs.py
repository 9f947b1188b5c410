"""Outputs are built in a temporary folder on the same filesystem and renamed into place at
the end: an interrupt or a crash leaves no partial output and the previous one intact.

Replacing an existing output swaps the two folders in one step where the system can (Linux
``renameat2(RENAME_EXCHANGE)``); elsewhere the old one is moved aside first, and a process killed
between the two renames leaves it in ``.NAME.old-*/x``, which the next run that writes (or checks)
that output puts back before anything else."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from transmute_cli.errors import InputError


def check_target(out: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Fail *before* any work when the output exists and may not be replaced (after putting back
    a previous output an interrupted replacement left aside: ``recover``)."""
    recover(out)
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


def _aside(out: Path) -> list[Path]:
    """The folders a replacement of ``out`` moves the previous output into (``atomic_dir``)."""
    if not out.parent.is_dir():
        return []
    head = f".{out.name}.old-"
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(head) and p.is_dir())


def recover(out: Path) -> bool:
    """Put back the previous output that a replacement interrupted between its two renames left
    in ``.NAME.old-*/x`` (``out`` is then missing); remove such folders once ``out`` is there.
    Returns whether an output was put back."""
    restored = False
    for old in _aside(out):
        kept = old / "x"
        if not os.path.lexists(out) and os.path.lexists(kept):
            os.replace(kept, out)
            restored = True
        shutil.rmtree(old, ignore_errors=True)
    return restored


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with ``RENAME_EXCHANGE``);
    False where the system or filesystem cannot, so the caller renames in two steps."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _umask_modes(tmp)
        if out.exists() and exchange(tmp, out):
            pass  # tmp now holds the previous output, removed below
        elif out.exists():
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


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file by renaming a complete temporary one over it: never half a file, and an
    existing one is replaced only once the new one is whole."""
    path = Path(path)
    if path.is_dir():
        raise InputError("is a folder, not a file", source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_file_target(out: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """``check_target`` for an output that is one file (a GGUF)."""
    if out.is_dir():
        raise InputError("is a folder; give a file name (for instance model.gguf)", source=str(out))
    if out.exists() and not overwrite:
        raise InputError(f"already exists; pass {flag} to replace it", source=str(out))


@contextlib.contextmanager
def atomic_file(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary file beside ``out`` to write, renamed over ``out`` only once it is whole."""
    check_file_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
