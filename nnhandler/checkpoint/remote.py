"""Checkpoints in object storage through fsspec (``s3://``, ``gs://``, ``memory://`` …).

Imported only for a URL (:func:`~.storage.store_for`); needs ``pip install nnhandler[remote]``
(fsspec, s3fs; ``gcsfs`` and the like for other stores).

Atomic publication without rename: on S3 (s3fs) a checkpoint is written, with its CRC-32
computed as it is written, straight into a multipart upload whose parts go up while the rest is
written (:mod:`.multipart`; one PUT for a checkpoint smaller than a part); the upload is
completed only once the writer has written the integrity record, and aborted on any error.
Other stores get a local staging file (``NNHANDLER_STAGING_DIR``, default a
``nnhandler-staging`` folder in the temp directory), uploaded in one ``put_file`` once
complete. Either way a partial object is never visible under the final name. Reading
downloads a complete copy to the staging folder, which the usual reader verifies.

Bounded failure: every operation has a deadline and bounded retries with exponential backoff
(:class:`RemoteSettings`: ``NNHANDLER_REMOTE_TIMEOUT``, seconds per attempt, default 60;
``NNHANDLER_REMOTE_RETRIES``, attempts after the first, default 3). A transfer's deadline grows
with its size (``timeout + size / 1 MB/s``). For ``s3://`` botocore's own connect/read timeouts
are set to the same value unless ``storage_options["config_kwargs"]`` sets them. Each attempt is
bounded by the deadline whatever the client does inside it (s3fs retries some errors itself), so
an endpoint that stops answering costs at most about ``(retries + 1) x (timeout + backoff)``.
A missing object, a refused permission or a bad argument is not retried.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, TypeVar, cast

from ..errors import ConfigurationError, RemoteStorageError
from .multipart import MultipartUpload, streams_uploads
from .storage import REMOTE_EXTRA, URL, Entry, Store
from .writer import Destination

__all__ = ["RETRIES_ENV", "STAGING_ENV", "TIMEOUT_ENV", "FsspecStore", "RemoteSettings",
           "staging_directory"]

TIMEOUT_ENV: Final = "NNHANDLER_REMOTE_TIMEOUT"
RETRIES_ENV: Final = "NNHANDLER_REMOTE_RETRIES"
STAGING_ENV: Final = "NNHANDLER_STAGING_DIR"
#: the slowest transfer rate a healthy store keeps up (bytes/s): a transfer's deadline
_MIN_RATE: Final = 1e6
_MAX_BACKOFF: Final = 8.0
#: errors that retrying cannot mend
_PERMANENT: Final = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError,
                     NotADirectoryError, ValueError, TypeError, NotImplementedError)

Result = TypeVar("Result")


@dataclass(frozen=True)
class RemoteSettings:
    """Deadline and retries of every remote operation."""

    #: seconds one attempt of a request may take (transfers: plus ``size / 1 MB/s``)
    timeout: float = 60.0
    #: attempts after the first one
    retries: int = 3
    #: seconds before the first retry; doubled per retry (capped at 8 s), with jitter
    backoff: float = 0.5

    def __post_init__(self) -> None:
        if not (self.timeout > 0 and self.timeout != float("inf")):
            raise ConfigurationError(f"remote timeout must be a positive number of seconds, "
                                     f"got {self.timeout!r}")
        if self.retries < 0:
            raise ConfigurationError(f"remote retries must be 0 or more, got {self.retries!r}")
        if self.backoff < 0:
            raise ConfigurationError(f"remote backoff must be >= 0 s, got {self.backoff!r}")

    @classmethod
    def from_environment(cls) -> RemoteSettings:
        """The settings ``NNHANDLER_REMOTE_TIMEOUT`` / ``NNHANDLER_REMOTE_RETRIES`` choose."""
        timeout = _number(TIMEOUT_ENV, float, cls.timeout)
        retries = _number(RETRIES_ENV, int, cls.retries)
        return cls(timeout=timeout, retries=retries)

    def transfer_deadline(self, size: int) -> float:
        return self.timeout + size / _MIN_RATE


def _number(variable: str, kind: type[float] | type[int], default: Any) -> Any:
    value = os.environ.get(variable, "")
    if value == "":
        return default
    try:
        return kind(value)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ConfigurationError(f"{variable}={value!r} is not {noun}") from None


def staging_directory() -> Path:
    """Where uploads are staged and downloads land (``NNHANDLER_STAGING_DIR``)."""
    configured = os.environ.get(STAGING_ENV, "")
    directory = (Path(configured) if configured
                 else Path(tempfile.gettempdir()) / "nnhandler-staging")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _staging_file(name: str) -> Path:
    from .writer import temp_path_for

    return temp_path_for(staging_directory() / name)


def _filesystem(url: URL, storage_options: Mapping[str, Any] | None) -> Any:
    try:
        import fsspec
    except ImportError as error:
        raise ConfigurationError(
            f"{str(url)!r}: checkpoints at URLs need fsspec, which is not installed: "
            f"pip install nnhandler[{REMOTE_EXTRA}]") from error
    options = dict(storage_options or {})
    if url.protocol in ("s3", "s3a"):
        settings = RemoteSettings.from_environment()
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", settings.timeout)
        config.setdefault("read_timeout", settings.timeout)
        config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        options["config_kwargs"] = config
        # fsspec caches filesystems by their arguments, not by the environment: an endpoint
        # taken from AWS_ENDPOINT_URL goes into the arguments, so that a process whose
        # environment names another endpoint later never writes through the old one
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client = dict(options.get("client_kwargs") or {})
        if endpoint and "endpoint_url" not in client and "endpoint_url" not in options:
            client["endpoint_url"] = endpoint
            options["client_kwargs"] = client
    try:
        return fsspec.filesystem(url.protocol, **options)
    except ImportError as error:
        raise ConfigurationError(
            f"{str(url)!r}: the fsspec filesystem for {url.protocol}:// needs "
            f"{error.name or 'a package'!r}, which is not installed (s3://: "
            f"pip install nnhandler[{REMOTE_EXTRA}]; gs://: pip install gcsfs)") from error
    except ValueError as error:
        raise ConfigurationError(f"{str(url)!r}: {error}") from error
    except TypeError as error:
        raise ConfigurationError(
            f"{str(url)!r}: storage_options {sorted(options)} do not fit fsspec's "
            f"{url.protocol}:// filesystem: {error}") from error


class FsspecStore(Store):
    """A :class:`~.storage.Store` over an fsspec filesystem (see the module docstring)."""

    local = False

    def __init__(self, fs: Any, settings: RemoteSettings | None = None) -> None:
        self.fs = fs
        self.settings = settings if settings is not None else RemoteSettings.from_environment()

    @classmethod
    def for_url(cls, url: URL, storage_options: Mapping[str, Any] | None = None,
                settings: RemoteSettings | None = None) -> FsspecStore:
        """The store of ``url``'s filesystem, built from ``storage_options`` (passed to
        ``fsspec.filesystem``; without them the store's standard configuration applies, e.g.
        ``AWS_ENDPOINT_URL`` and credentials from the environment)."""
        return cls(_filesystem(url, storage_options), settings)

    # -- bounded operations -------------------------------------------------------------------
    def call(self, what: str, target: URL, operation: Callable[[], Result],
             deadline: float | None = None, retries: int | None = None) -> Result:
        """``operation()`` under a deadline, retried with backoff on transient errors
        (``retries`` times, default the settings'); a :class:`~nnhandler.RemoteStorageError`
        naming ``what``, ``target`` and the last error when every attempt failed. A permanent
        error is raised as it is at once."""
        settings = self.settings
        seconds = settings.timeout if deadline is None else deadline
        attempts = (settings.retries if retries is None else retries) + 1
        started = time.monotonic()
        last: BaseException | None = None
        for attempt in range(attempts):
            if attempt:
                pause = min(settings.backoff * 2 ** (attempt - 1), _MAX_BACKOFF)
                time.sleep(pause * random.uniform(0.5, 1.0))
            try:
                return _within(seconds, operation, f"{what} {target}")
            except _PERMANENT:
                raise
            except Exception as error:  # transient until proven otherwise: retry
                last = error
        raise RemoteStorageError(
            f"{what} {str(target)!r} failed after {attempts} attempt(s) in "
            f"{time.monotonic() - started:.1f} s: {type(last).__name__}: {last}") from last

    # -- the Store operations -----------------------------------------------------------------
    def publish(self, target: URL, write: Callable[[Destination], int]) -> int:
        if streams_uploads(self.fs):  # S3: straight into a multipart upload, no staging file
            upload = MultipartUpload(self, target)
            try:
                size = write(cast(BinaryIO, upload))  # the writers use write and tell only
                upload.complete()
            except BaseException:
                upload.abort()
                raise
            return size
        staging = _staging_file(target.name)
        try:
            size = write(staging)
            self.call("upload to", target, lambda: self.fs.put_file(str(staging), target.key),
                      self.settings.transfer_deadline(size))
        finally:
            staging.unlink(missing_ok=True)
        return size

    @contextmanager
    def fetch(self, target: URL) -> Iterator[Path]:
        size = self.size(target)
        staging = _staging_file(target.name)
        try:
            self.call("download of", target, lambda: self.fs.get_file(target.key, str(staging)),
                      self.settings.transfer_deadline(size))
            yield staging
        finally:
            staging.unlink(missing_ok=True)

    def size(self, target: URL) -> int:
        info = self.call("size of", target, lambda: self.fs.info(target.key))
        return int(info["size"])

    def read_tail(self, target: URL, length: int) -> tuple[int, bytes]:
        size = self.size(target)
        start = max(0, size - length)
        data = self.call("read of", target,
                         lambda: self.fs.cat_file(target.key, start=start, end=size))
        return size, bytes(data)

    def exists(self, target: URL) -> bool:
        return bool(self.call("lookup of", target, lambda: self.fs.exists(target.key)))

    def is_dir(self, target: URL) -> bool:
        return bool(self.call("lookup of", target, lambda: self.fs.isdir(target.key)))

    def entries(self, directory: URL) -> list[Entry]:
        def listing() -> list[dict[str, Any]]:
            self.fs.invalidate_cache(directory.key)  # other processes write here too
            try:
                return list(self.fs.ls(directory.key, detail=True))
            except FileNotFoundError:
                return []

        own = self.fs._strip_protocol(directory.key).rstrip("/")
        found = []
        for info in self.call("listing of", directory, listing):
            name = str(info["name"]).rstrip("/")
            if name == own or not name:
                continue
            is_dir = info.get("type") == "directory"
            found.append(Entry(directory / name.rsplit("/", 1)[-1], is_dir,
                               int(info.get("size") or 0)))
        return found

    def remove(self, target: URL) -> None:
        def remove() -> None:
            with suppress(FileNotFoundError):
                self.fs.rm(target.key, recursive=True)

        self.call("removal of", target, remove)

    def put_bytes(self, target: URL, data: bytes) -> None:
        self.call("upload to", target, lambda: self.fs.pipe_file(target.key, data),
                  self.settings.transfer_deadline(len(data)))

    def get_bytes(self, target: URL) -> bytes | None:
        def get() -> bytes | None:
            try:
                return bytes(self.fs.cat_file(target.key))
            except FileNotFoundError:
                return None

        return self.call("read of", target, get)


def _within(seconds: float, operation: Callable[[], Result], what: str) -> Result:
    """``operation()``, or ``TimeoutError`` once ``seconds`` have passed without its answer.

    It runs in a daemon thread, which an answer that never comes leaves behind (blocked in
    the store's client until that client's own timeout ends it); the caller goes on."""
    outcome: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append((True, operation()))
        except BaseException as error:
            outcome.append((False, error))
        finally:
            done.set()

    threading.Thread(target=run, name="nnhandler-remote", daemon=True).start()
    if not done.wait(seconds):
        raise TimeoutError(f"{what}: no answer within {seconds:.1f} s")
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value  # type: ignore[no-any-return]
