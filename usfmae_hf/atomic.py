"""Atomic writes: outputs appear complete or not at all, and nothing is overwritten by accident."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from usfmae_hf.errors import OutputExistsError, UsfmaeError


def ensure_writable_output(path: str | os.PathLike, overwrite: bool) -> None:
    """Raise :class:`OutputExistsError` if ``path`` exists and ``overwrite`` is false, and
    :class:`UsfmaeError` if it cannot be written where it is named: a file stands where one of its
    folders should be, or the nearest existing folder is not writable. Callers run it before any slow work.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists (pass --overwrite to replace it)")
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsfmaeError(f"cannot write {path}: {folder} is a file, not a folder (choose another path)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsfmaeError(
            f"cannot write {path}: {folder} is not writable (check its permissions, or choose another path)"
        )


@contextlib.contextmanager
def atomic_directory(output: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``output`` that replaces ``output`` on success.

    The temporary directory lives in the same parent so the final ``rename`` is atomic on the same
    file system. On any exception it is removed and an existing ``output`` is left untouched.
    """
    output = Path(output)
    ensure_writable_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like a plain mkdir
    backup: Path | None = None
    try:
        yield staging
        if output.exists():
            # Move the old output aside first so that a crash between the two renames leaves
            # either the old or the new directory in place, never neither.
            backup = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
            backup.rmdir()
            output.rename(backup)
            staging.rename(output)
            _remove(backup)
        else:
            staging.rename(output)
    except BaseException:
        if backup is not None and backup.exists() and not output.exists():
            backup.rename(output)  # interrupted between the two renames: the old output goes back
        _remove(staging)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces ``path`` (``os.replace``) on success.

    For writers that want a file name (``torch.save``, ``pyarrow``); on any exception the temporary
    file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    ensure_writable_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
