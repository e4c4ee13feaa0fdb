"""Helpers for tests that write to fsspec's in-process ``memory://`` store."""

from __future__ import annotations

import fsspec

from nnhandler.checkpoint.storage import URL

__all__ = ["drop_memory_root", "memory_object_names"]


def memory_object_names(root: str) -> list[str]:
    """The names directly under the ``memory://`` URL ``root`` (none when it is absent)."""
    fs = fsspec.filesystem("memory")
    try:
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(URL(root).key, detail=False))
    except FileNotFoundError:
        return []


def drop_memory_root(root: str) -> None:
    """Remove everything under the ``memory://`` URL ``root``."""
    fs = fsspec.filesystem("memory")
    if fs.exists(URL(root).key):
        fs.rm(URL(root).key, recursive=True)
