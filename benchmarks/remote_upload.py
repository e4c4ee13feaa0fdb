"""Checkpoints to object storage (issue 15): what training waits for, and upload throughput.

    python -m benchmarks.remote_upload [--rounds 3] [--megabytes 200] [--dir DIR]

A ~200 MB state (the ``save`` section's :class:`~.save_cost.Blob`: float32 parameters as 300
tensors, plain SGD) goes to moto's S3 server, run as a separate process on 127.0.0.1 (its own
interpreter: the server's work does not share this process's GIL). The baseline is a plain
``s3fs`` ``put_file`` of a local file of the same size as the checkpoint (written beforehand):
what any upload of these bytes costs on this server. Interleaved rounds, medians:

* ``NNHandler.save("s3://…")``: state collected, written to the local staging file with its
  CRC-32, uploaded whole (multipart above 100 MiB) — its throughput (checkpoint bytes per
  second) against the plain put (goal: >= 0.8x);
* ``AutoSaveCallback(save_path="s3://…", async_save=True).save_now``: what the training thread
  is blocked for (the snapshot into host memory; the staging write and the upload run in the
  writer thread and are waited for outside the timing) against the plain put (goal: <= 0.10x).

Objects and files are removed between actions, outside the timing.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from nnhandler import AutoSaveCallback, NNHandler

from ._common import Row, interleaved_medians, machine_line, print_rows
from .save_cost import LARGE_COUNT, WARMUP, Blob, bench_directory

__all__ = ["run", "s3_server"]

#: test credentials of the local server, set for the section only
_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "benchmark", "AWS_SECRET_ACCESS_KEY": "benchmark",
                "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server in a child process on a free port of 127.0.0.1; ``AWS_ENDPOINT_URL``
    and test credentials set for the duration. Yields the endpoint."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    previous = {name: os.environ.get(name) for name in [*_ENVIRONMENT, "AWS_ENDPOINT_URL"]}
    os.environ.update({**_ENVIRONMENT, "AWS_ENDPOINT_URL": endpoint})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's server did not start on {endpoint}") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class RemoteCase:
    """The state, the bucket and the contenders."""

    def __init__(self, megabytes: float, directory: Path) -> None:
        import s3fs

        torch.manual_seed(0)
        self.fs: Any = s3fs.S3FileSystem(skip_instance_cache=True)
        self.bucket = f"bench-{secrets.token_hex(4)}"
        self.fs.mkdir(self.bucket)
        self.handler = NNHandler(Blob, device="cpu", megabytes=megabytes, count=LARGE_COUNT,
                                 logger_mode="file", log_file=directory / "bench.log",
                                 use_distributed=False)
        self.handler.set_optimizer(torch.optim.SGD, lr=0.1)
        self.callback = AutoSaveCallback(None, f"s3://{self.bucket}/async", name="a{epoch}",
                                         async_save=True)
        self.handler.add_callback(self.callback)
        self.counter = 0
        # the baseline's bytes: a local file as large as the checkpoint
        self.size = self.handler.checkpoints.save(directory / "size.pth", {}).size
        (directory / "size.pth").unlink()
        self.plain_file = directory / "plain.bin"
        with open(self.plain_file, "wb") as file:
            file.write(os.urandom(self.size))

    def plain_put(self) -> None:
        self.counter += 1
        self.fs.put_file(str(self.plain_file), f"{self.bucket}/plain/{self.counter}.bin")

    def nnhandler_save(self) -> None:
        self.counter += 1
        self.handler.save(f"s3://{self.bucket}/sync/s{self.counter}.pth")

    def async_block(self) -> None:
        self.counter += 1
        self.callback.save_now(self.handler, self.counter, {})

    def settle(self) -> None:
        """Outside the timing: the background upload finished, every object removed."""
        self.callback.flush(self.handler)
        self.fs.invalidate_cache()
        for path in self.fs.find(self.bucket):
            self.fs.rm_file(path)

    def close(self) -> None:
        self.settle()
        self.fs.rm(self.bucket, recursive=True)
        self.plain_file.unlink(missing_ok=True)


def run(rounds: int = 3, megabytes: float = 200, directory: Path | None = None) -> list[Row]:
    """Section ``remote`` (module docstring)."""
    with bench_directory(directory) as where, s3_server():
        case = RemoteCase(megabytes, where)
        try:
            actions: dict[str, Callable[[], object]] = {
                "put": case.plain_put, "save": case.nnhandler_save, "async": case.async_block}
            # the first snapshots touch fresh staging memory (slow on virtual machines)
            medians = interleaved_medians(actions, rounds, warmup=WARMUP, between=case.settle)
        finally:
            case.close()
    label = f"{case.size / 1e6:.0f} MB to S3 (moto, local)"
    mb = case.size / 1e6
    return [
        Row("remote", f"{label}: save throughput", "s3fs put_file", mb / medians["put"],
            mb / medians["save"], unit="MB/s", target=0.8, direction="min"),
        Row("remote", f"{label}: training blocked by an async save", "s3fs put_file",
            medians["put"], medians["async"], target=0.10),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--megabytes", type=float, default=200)
    parser.add_argument("--dir", type=Path, default=None, help="where files go (a temp dir)")
    args = parser.parse_args()
    print(machine_line())
    print_rows(run(args.rounds, args.megabytes, args.dir))


if __name__ == "__main__":
    main()
