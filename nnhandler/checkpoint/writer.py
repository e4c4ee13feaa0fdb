"""Atomic, durable file writes: temp file in the same directory, flush, fsync, ``os.replace``."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final, TypeAlias

__all__ = [
    "TEMP_INFIX",
    "Destination",
    "atomic_write",
    "fsync_directory",
    "is_temp_file",
    "remove_checkpoint_path",
    "temp_path_for",
    "write_destination",
]

#: where a checkpoint file is written: a local path (written by :func:`atomic_write`), or an
#: open binary stream that publishes what it was given only once the writer has finished, such
#: as a streaming upload (:class:`~.multipart.MultipartUpload`); writers need only its ``write``
#: and ``tell``, and write it in one sequential pass
Destination: TypeAlias = Path | BinaryIO

#: Temp files are hidden and carry this infix, so nothing mistakes them for checkpoints.
TEMP_INFIX: Final = ".tmp-"


def temp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_INFIX}{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_file(path: Path) -> bool:
    """True for the hidden temp files :func:`atomic_write` writes (never a checkpoint)."""
    return path.name.startswith(".") and TEMP_INFIX in path.name


def remove_checkpoint_path(path: Path) -> None:
    """Remove a checkpoint: a file, or a sharded checkpoint's directory with its content.

    No checks: removals of recorded bookkeeping go through
    :class:`~nnhandler.checkpoint.removal.RemovalGuard`, which calls this only for entries it
    has confined to the callback's folder, name template and lineage.
    """
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) refuse fsync on a directory; the rename still holds
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], object], buffering: int = -1) -> int:
    """Write ``path`` through ``write(file)`` so that it is either complete or absent.

    The data goes to a temp file beside ``path``, is flushed and fsynced, and is renamed over
    ``path`` (replacing an existing file atomically); the directory is fsynced so the rename
    survives a power cut. On any failure the temp file is removed and the previous ``path``, if
    any, is untouched. Returns the number of bytes written. ``buffering`` is ``open``'s (the
    size of the file's write buffer; -1: Python's default).
    """
    temp = temp_path_for(path)
    try:
        with open(temp, "xb", buffering=buffering) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
            size = file.tell()
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return size


def write_destination(destination: Destination, write: Callable[[BinaryIO], object],
                      buffering: int = -1) -> int:
    """Write through ``write(file)`` to ``destination``: a path by :func:`atomic_write`
    (complete or absent), a stream by writing into it (its owner publishes or discards it).
    Returns the number of bytes written."""
    if isinstance(destination, Path):
        return atomic_write(destination, write, buffering)
    start = destination.tell()
    write(destination)
    return destination.tell() - start
