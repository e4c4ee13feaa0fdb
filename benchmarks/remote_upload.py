"""Checkpoints to object storage (issue 15): what training waits for, and upload throughput.

    python -m benchmarks.remote_upload [--rounds 3] [--megabytes 200] [--dir DIR]

A ~200 MB state (the ``save`` section's :class:`~.save_cost.Blob`: float32 parameters as 300
tensors, plain SGD) goes to moto's S3 server, run as a separate process on 127.0.0.1 (its own
interpreter: the server's work does not share this process's GIL). The baseline is a plain
``s3fs`` ``put_file`` of a local file of the same size as the checkpoint (written beforehand):
what any upload of these bytes costs on this server. Interleaved rounds; each figure as the
median and as the minimum of the rounds (the best a shared, noisy machine allowed):

* ``NNHandler.save("s3://…")``: state collected, written with its CRC-32 straight into a
  multipart upload whose parts go up while the rest is written — its throughput (checkpoint
  bytes per second) against the plain put (goal: >= 0.8x), and the CPU time of this process
  (the writer and the upload threads; moto's server is another process) against the put's;
* ``AutoSaveCallback(save_path="s3://…", async_save=True).save_now``: what the training thread
  is blocked for (the snapshot into host memory; the write and the upload run in the writer
  thread and are waited for outside the timing) against the plain put (goal: <= 0.10x), beside
  the floor of any snapshot: a bare ``torch._foreach_copy_`` of the same tensors into
  preallocated buffers.

Objects and files are removed between actions, outside the timing.
"""

from __future__ import annotations

import argparse
import gc
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nnhandler import AutoSaveCallback, NNHandler

from ._common import Row, machine_line, print_rows
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
        self.tensors = [p.detach() for p in self.handler.module.parameters()]
        self.copies = [torch.empty_like(t) for t in self.tensors]
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

    def copy_floor(self) -> None:
        torch._foreach_copy_(self.copies, self.tensors)

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


@dataclass(frozen=True)
class Samples:
    """Wall-clock and process CPU seconds of each call of one action."""

    wall: list[float]
    cpu: list[float]


def interleaved_samples(actions: dict[str, Callable[[], object]], rounds: int, warmup: int,
                        between: Callable[[], object]) -> dict[str, Samples]:
    """Like :func:`~._common.interleaved_medians` (rotating order per round, ``between``
    outside the timing), keeping every sample, with the CPU time of the whole process (its
    threads too)."""
    names = list(actions)
    for _ in range(warmup):
        for name in names:
            actions[name]()
            between()
    samples = {name: Samples([], []) for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            cpu, wall = time.process_time(), time.perf_counter()
            actions[name]()
            samples[name].wall.append(time.perf_counter() - wall)
            samples[name].cpu.append(time.process_time() - cpu)
            between()
    return samples


def run(rounds: int = 3, megabytes: float = 200, directory: Path | None = None) -> list[Row]:
    """Section ``remote`` (module docstring)."""
    with bench_directory(directory) as where, s3_server():
        case = RemoteCase(megabytes, where)
        try:
            actions: dict[str, Callable[[], object]] = {
                "put": case.plain_put, "save": case.nnhandler_save, "async": case.async_block,
                "copy_": case.copy_floor}
            # the first snapshots touch fresh staging memory (slow on virtual machines)
            samples = interleaved_samples(actions, rounds, WARMUP, case.settle)
        finally:
            case.close()
    label = f"{case.size / 1e6:.0f} MB to S3 (moto, local)"
    mb = case.size / 1e6
    median = {name: statistics.median(found.wall) for name, found in samples.items()}
    best = {name: min(found.wall) for name, found in samples.items()}
    cpu = {name: statistics.median(found.cpu) for name, found in samples.items()}
    put = "s3fs put_file"
    return [
        Row("remote", f"{label}: save throughput (median)", put, mb / median["put"],
            mb / median["save"], unit="MB/s", target=0.8, direction="min"),
        Row("remote", f"{label}: save throughput (min-of-{rounds})", put, mb / best["put"],
            mb / best["save"], unit="MB/s", target=0.8, direction="min"),
        Row("remote", f"{label}: save CPU time of this process", put, cpu["put"],
            cpu["save"]),
        Row("remote", f"{label}: training blocked by an async save (median)", put,
            median["put"], median["async"], target=0.10),
        Row("remote", f"{label}: training blocked by an async save (min-of-{rounds})", put,
            best["put"], best["async"], target=0.10),
        Row("remote", f"{label}: bare copy_ of the tensors (floor, min-of-{rounds})", put,
            best["put"], best["copy_"]),
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
