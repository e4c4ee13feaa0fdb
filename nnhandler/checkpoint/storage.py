"""The storage seam: where a checkpoint lives, a local path or an fsspec URL.

:func:`location_of` maps what a user passed (a path, a ``str``, an ``s3://``, ``gs://``,
``memory://`` … URL) to a :class:`~pathlib.Path` or a :class:`URL`; :func:`store_for` maps a
location plus ``storage_options`` to a :class:`Store`, the few operations the checkpoint code
needs of a storage:

* ``publish(target, write)``: make a complete object visible under ``target`` at once
  (``write(destination)`` writes the file with its CRC-32 computed as it is written, to a
  local path or into a stream: :data:`~.writer.Destination`);
* ``fetch(target)``: a complete local copy to read and verify (the reader's input);
* ``read_tail``, ``size``, ``exists``, ``entries`` (list a folder), ``remove``,
  ``put_bytes`` / ``get_bytes`` (small objects: the retention index).

:data:`LOCAL_STORE` *is* today's code path: ``publish`` calls ``write(target)`` directly
(temp file beside it, fsync, rename, directory fsync), ``fetch`` yields the path itself. No
fsspec is imported for a local path. ``file://`` URLs are local paths. Every other URL goes to
:class:`~.remote.FsspecStore` (``pip install nnhandler[remote]``), whose operations have a
timeout and bounded retries.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

from ..errors import ConfigurationError
from .writer import Destination

__all__ = [
    "LOCAL_STORE",
    "PROCESS_STARTED",
    "URL",
    "Entry",
    "LocalStore",
    "Store",
    "is_url",
    "location_of",
    "same_location",
    "store_for",
]

#: ``scheme://`` (two letters at least: ``C:\\`` is a Windows drive, not a URL)
_URL_PATTERN: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")
REMOTE_EXTRA: Final = "remote"
#: when this process (first imported nnhandler and so) could first have begun an upload: an
#: incomplete multipart upload begun earlier is no upload of this process
PROCESS_STARTED: Final = datetime.now(timezone.utc)


class URL(str):
    """A checkpoint location in an fsspec filesystem, e.g. ``s3://bucket/run/ep010.pth``.

    A ``str`` (so it passes wherever a path string does and prints as itself) with the few
    path operations the checkpoint code uses; ``/`` joins with ``/``. Never a local path:
    ``pathlib.Path`` would fold ``s3://`` into ``s3:/``.
    """

    __slots__ = ()

    def __new__(cls, value: str) -> URL:
        if not _URL_PATTERN.match(value):
            raise ConfigurationError(f"{value!r} is not a URL (scheme://…)")
        scheme, rest = value.split("://", 1)
        rest = rest.rstrip("/")
        if not rest:
            raise ConfigurationError(f"URL {value!r} names no bucket or path")
        return super().__new__(cls, f"{scheme.lower()}://{rest}")

    @property
    def protocol(self) -> str:
        """``"s3"`` for ``s3://…``."""
        return self.split("://", 1)[0]

    @property
    def key(self) -> str:
        """The part after ``scheme://`` (what fsspec's methods take)."""
        return self.split("://", 1)[1]

    @property
    def name(self) -> str:
        return self.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        dot = name.rfind(".")
        return name[dot:] if 0 < dot < len(name) - 1 else ""

    @property
    def parent(self) -> URL:
        key = self.key
        if "/" not in key:
            return self
        return URL(f"{self.protocol}://{key.rsplit('/', 1)[0]}")

    def __truediv__(self, name: str) -> URL:
        if not name or "/" in name or name in (".", ".."):
            raise ConfigurationError(f"{name!r} is not a plain name inside {str(self)!r}")
        return URL(f"{self}/{name}")

    def __repr__(self) -> str:
        return f"URL({str(self)!r})"


def is_url(value: object) -> bool:
    """Whether ``value`` is a URL string (``scheme://…``) rather than a local path."""
    return isinstance(value, str) and _URL_PATTERN.match(value) is not None


def location_of(value: str | os.PathLike[str]) -> Path | URL:
    """Where ``value`` points: a :class:`~pathlib.Path` for a local path or a ``file://``
    URL, else a :class:`URL`."""
    if isinstance(value, URL):
        return value
    if is_url(value):
        assert isinstance(value, str)
        if value.lower().startswith("file://"):
            return Path(unquote(value[len("file://"):]))
        return URL(value)
    return Path(value)


def same_location(first: Path | URL, second: Path | URL) -> bool:
    """Whether two locations are one: resolved paths, or equal URLs."""
    if isinstance(first, URL) or isinstance(second, URL):
        return str(first) == str(second)
    return first.resolve() == second.resolve()


@dataclass(frozen=True)
class Entry:
    """One entry of a folder: its location, whether it is a folder, and its size in bytes."""

    location: Path | URL
    is_dir: bool
    size: int


class Store(ABC):
    """The operations the checkpoint code needs of a storage (see the module docstring)."""

    #: whether objects are published by rename in one filesystem (local) or uploaded whole
    local: bool

    @abstractmethod
    def publish(self, target: Any, write: Callable[[Destination], int]) -> int:
        """Make the file that ``write(destination)`` writes (to a local path, or into a stream
        that uploads it) visible as ``target``, complete or not at all; returns its size."""

    @abstractmethod
    def fetch(self, target: Any) -> Any:
        """A context manager yielding a complete local copy of ``target`` (a ``Path``)."""

    @abstractmethod
    def read_tail(self, target: Any, length: int) -> tuple[int, bytes]:
        """``(size of target, its last min(length, size) bytes)``."""

    @abstractmethod
    def exists(self, target: Any) -> bool: ...

    @abstractmethod
    def is_dir(self, target: Any) -> bool: ...

    @abstractmethod
    def entries(self, directory: Any) -> list[Entry]:
        """The entries directly inside ``directory`` (``[]`` when it does not exist)."""

    @abstractmethod
    def remove(self, target: Any) -> None:
        """Remove ``target`` (an object, or a folder with everything in it); no error when it
        is already gone."""

    @abstractmethod
    def put_bytes(self, target: Any, data: bytes) -> None:
        """Publish a small object whole (the retention index)."""

    @abstractmethod
    def get_bytes(self, target: Any) -> bytes | None:
        """A small object's content (``None`` when it does not exist)."""


class LocalStore(Store):
    """The local filesystem: exactly the code path of local checkpoints."""

    local = True

    def publish(self, target: Path, write: Callable[[Destination], int]) -> int:
        return write(target)

    @contextmanager
    def fetch(self, target: Path) -> Iterator[Path]:
        yield target

    def read_tail(self, target: Path, length: int) -> tuple[int, bytes]:
        with open(target, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            file.seek(max(0, size - length))
            return size, file.read()

    def exists(self, target: Path) -> bool:
        return target.exists()

    def is_dir(self, target: Path) -> bool:
        return target.is_dir()

    def entries(self, directory: Path) -> list[Entry]:
        if not directory.is_dir():
            return []
        found = []
        for entry in os.scandir(directory):
            is_dir = entry.is_dir(follow_symlinks=False)
            found.append(Entry(Path(entry.path), is_dir,
                               0 if is_dir else entry.stat(follow_symlinks=False).st_size))
        return found

    def remove(self, target: Path) -> None:
        from .writer import remove_checkpoint_path

        remove_checkpoint_path(target)

    def put_bytes(self, target: Path, data: bytes) -> None:
        from .writer import atomic_write

        atomic_write(target, lambda file: file.write(data))

    def get_bytes(self, target: Path) -> bytes | None:
        try:
            return target.read_bytes()
        except FileNotFoundError:
            return None


LOCAL_STORE: Final = LocalStore()


def store_for(location: Path | URL,
              storage_options: Mapping[str, Any] | None = None) -> Store:
    """The :class:`Store` of ``location``: :data:`LOCAL_STORE` for a path (``storage_options``
    must then be empty), an :class:`~.remote.FsspecStore` for a URL (needs
    ``nnhandler[remote]``)."""
    if not isinstance(location, URL):
        if storage_options:
            raise ConfigurationError(
                f"storage_options={dict(storage_options)!r} were given for the local path "
                f"{str(location)!r}; they apply to URLs (s3://…, gs://…) only")
        return LOCAL_STORE
    from .remote import FsspecStore

    return FsspecStore.for_url(location, storage_options)
