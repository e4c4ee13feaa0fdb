"""A real S3 server for the object-storage tests: moto's standalone server on 127.0.0.1.

The way s3fs's own suite runs: ``moto.server.ThreadedMotoServer`` on a free port for the whole
session, ``AWS_ENDPOINT_URL`` and dummy credentials in the environment (so that ``s3://`` URLs
work without ``storage_options``, as for a user with a configured environment; subprocesses
inherit them), and a fresh bucket per test. Nothing of nnhandler is mocked: the requests go
through s3fs, aiobotocore and HTTP to the server.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

__all__ = ["S3_ENVIRONMENT", "s3_bucket", "s3_endpoint", "s3_filesystem", "silent_endpoint"]

S3_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of moto's S3 server, set as ``AWS_ENDPOINT_URL`` for the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**S3_ENVIRONMENT, "AWS_ENDPOINT_URL": endpoint}.items():
            patch.setenv(name, value)
        try:
            yield endpoint
        finally:
            server.stop()


def s3_filesystem() -> Any:
    """A fresh (uncached) s3fs filesystem on the session's server, for looking behind
    nnhandler's back."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[str]:
    """A new, empty bucket on the session's server (its name; removed afterwards)."""
    name = f"nnh-{secrets.token_hex(6)}"
    fs = s3_filesystem()
    fs.mkdir(name)
    try:
        yield name
    finally:
        fs.rm(name, recursive=True)


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a TCP server that accepts connections and never answers
    (an S3 endpoint that stopped responding). Its thread ends with the fixture."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(connection)  # read nothing, answer nothing

    thread = threading.Thread(target=accept, name="silent-endpoint", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in held:
            connection.close()
        listener.close()


def environment_for(endpoint: str) -> dict[str, str]:
    """The environment of a subprocess that uses ``endpoint``."""
    return {**os.environ, **S3_ENVIRONMENT, "AWS_ENDPOINT_URL": endpoint}
