"""Atomic file output: a crash never leaves a half-written file under the final name.

Every file the library writes (data sets, checkpoints, metrics, figures) goes through
:func:`atomic_write` or one of its wrappers: write to a temporary file in the same
directory, flush and fsync it, then ``os.replace`` it onto the final name (atomic on
POSIX and Windows), and fsync the directory so the rename itself survives a power cut.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["atomic_write", "atomic_write_json", "atomic_save_npy", "fsync_dir"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched
    (an existing file there keeps its old content).
    """
    if "r" in mode or "a" in mode:
        raise ValueError(f"atomic_write supports write modes only, got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as UTF-8 JSON atomically."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=indent, sort_keys=False)
        fh.write("\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save a NumPy array as ``.npy`` atomically (loadable with ``mmap_mode='r'``)."""
    with atomic_write(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
