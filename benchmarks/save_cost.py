"""Save cost: a durable synchronous save, and what an asynchronous one blocks training for.

    python -m benchmarks.save_cost [--rounds 7] [--sizes 10,200] [--counts 300,5000] [--dir DIR]

For each state — ~10 MB and ~200 MB of float32 parameters, as a few hundred large tensors and
as 5,000 small ones (a model whose parameters are exactly these tensors, plain SGD so the
optimizer holds no tensors) — interleaved rounds time, medians reported:

* section ``save``: ``NNHandler.save`` — collecting the state, pickling, a CRC-32 of every
  byte, temp file, fsync, rename, directory fsync: what every synchronous auto-save does —
  against ``torch.save({"model": ..., "optimizer": ...})`` of the same state dicts (collected
  inside the timing too) into a file, flush, fsync; and its throughput (file bytes per second)
  against a raw ``write`` + fsync of the same tensor bytes prepared beforehand as one buffer.
  One more row isolates the fixed cost of durability on a 4 KB file: temp file, fsync, rename,
  directory fsync against write + fsync. Beside each ``NNHandler.save`` row, the same save with
  the torch.save writer (``NNHANDLER_WRITER=torch``, the fallback where the fast writer's
  self-check fails) against the same baseline.
* section ``async``: what ``AutoSaveCallback(async_save=True).save_now`` costs the training
  thread (state collection, snapshot into the reused staging buffers; the background write is
  waited for outside the timing) against the same ``torch.save`` + fsync; and a bare
  ``torch._foreach_copy_`` of the tensors into preallocated buffers, the floor of any snapshot;
  and what it blocks for with the torch.save writer (a second async callback, whose snapshots
  hold real tensors instead of the fast writer's placeholders).

Every file goes to a fresh name; files are removed and the page cache is synced outside the
timing. Files are written under ``--dir`` (default: a temp directory in the current one, so that
the disk is the one the checkpoints of a run in this directory would go to).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from nnhandler import AutoSaveCallback, NNHandler
from nnhandler.checkpoint.io import WRITER_ENV
from nnhandler.checkpoint.writer import atomic_write

from ._common import Row, fsynced, interleaved_medians, machine_line, print_rows

__all__ = ["LARGE_COUNT", "SIZES", "SMALL_COUNT", "Blob", "bench_directory", "run_async",
           "run_save"]

LARGE_COUNT = 300
SMALL_COUNT = 5000
SIZES = (10, 200)
#: rounds run before the timed ones: the first touch of fresh memory (the staging arena, the
#: page cache of new files) is slow, on virtual machines very much so
WARMUP = 3
_FIXED_COST_BYTES = 4096


class Blob(nn.Module):
    """A model whose parameters are ``count`` float32 vectors totalling ``megabytes`` MiB."""

    def __init__(self, megabytes: float = 10, count: int = LARGE_COUNT) -> None:
        super().__init__()
        numel = max(1, int(megabytes * (1 << 20)) // 4 // count)
        self.tensors = nn.ParameterList(nn.Parameter(torch.randn(numel)) for _ in range(count))


@contextmanager
def torch_save_writer() -> Iterator[None]:
    """``NNHANDLER_WRITER=torch`` for the duration (the writer is chosen per save)."""
    previous = os.environ.get(WRITER_ENV)
    os.environ[WRITER_ENV] = "torch"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[WRITER_ENV]
        else:
            os.environ[WRITER_ENV] = previous


@contextmanager
def bench_directory(directory: Path | None) -> Iterator[Path]:
    """``directory`` (created), or a temp directory in the current one, removed afterwards."""
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="nnhandler-bench-", dir=Path.cwd()) as made:
        yield Path(made)


class Case:
    """One state (size, tensor count) and its contenders; files go to ``directory``."""

    def __init__(self, megabytes: float, count: int, directory: Path,
                 torch_writer_callback: bool = False) -> None:
        torch.manual_seed(0)
        self.label = f"{megabytes:g} MB x {count} tensors"
        self.directory = directory
        self.handler = NNHandler(Blob, device="cpu", megabytes=megabytes, count=count,
                                 logger_mode="file", log_file=directory / "bench.log",
                                 use_distributed=False)
        self.handler.set_optimizer(torch.optim.SGD, lr=0.1)
        self.callback = AutoSaveCallback(None, directory / "async", name="async_{epoch}",
                                         async_save=True)
        self.handler.add_callback(self.callback)
        #: an async callback of its own for the torch.save writer (a staging plan is made for
        #: one kind of writer); only where the async section times it
        self.torch_callback: AutoSaveCallback | None = None
        if torch_writer_callback:
            self.torch_callback = AutoSaveCallback(None, directory / "async_torch",
                                                   name="async_torch_{epoch}", async_save=True)
            self.handler.add_callback(self.torch_callback)
        self.tensors = [p.detach() for p in self.handler.module.parameters()]
        self.raw = b"".join(t.numpy().tobytes() for t in self.tensors)
        self.copies = [torch.empty_like(t) for t in self.tensors]
        self.counter = 0
        self.file_size = 0

    def fresh(self, stem: str) -> Path:
        self.counter += 1
        return self.directory / f"{stem}_{self.counter}.bin"

    def torch_save(self) -> None:
        optimizer = self.handler.optimizer
        assert optimizer is not None
        fsynced(self.fresh("torch"), lambda file: torch.save(
            {"model": self.handler.module.state_dict(), "optimizer": optimizer.state_dict()},
            file))

    def nnhandler_save(self) -> None:
        path = self.handler.save(self.fresh("ours"))
        self.file_size = path.stat().st_size

    def nnhandler_save_torch_writer(self) -> None:
        with torch_save_writer():
            self.handler.save(self.fresh("ours_torch"))

    def raw_write(self) -> None:
        fsynced(self.fresh("raw"), lambda file: file.write(self.raw))

    def async_block(self) -> None:
        self.counter += 1
        self.callback.save_now(self.handler, self.counter, {})

    def async_block_torch_writer(self) -> None:
        assert self.torch_callback is not None
        self.counter += 1
        with torch_save_writer():
            self.torch_callback.save_now(self.handler, self.counter, {})

    def copy_floor(self) -> None:
        torch._foreach_copy_(self.copies, self.tensors)

    def settle(self) -> None:
        """Outside the timing: wait for the background write, remove every file (each was
        fsynced by its writer: nothing of it is left for the next one to flush)."""
        self.callback.flush(self.handler)
        if self.torch_callback is not None:
            self.torch_callback.flush(self.handler)
        for path in [*self.directory.glob("*.bin"), *(self.directory / "async").glob("*"),
                     *(self.directory / "async_torch").glob("*")]:
            path.unlink()


def _states(sizes: Sequence[float], counts: Sequence[int], directory: Path,
            torch_writer_callback: bool = False) -> Iterator[Case]:
    for megabytes in sizes:
        for count in counts:
            case_directory = directory / f"{megabytes:g}x{count}"
            case_directory.mkdir(parents=True, exist_ok=True)
            yield Case(megabytes, count, case_directory, torch_writer_callback)
            shutil.rmtree(case_directory, ignore_errors=True)


def _fixed_cost(rounds: int, directory: Path) -> Row:
    payload = os.urandom(_FIXED_COST_BYTES)
    counter = iter(range(1 << 30))

    def durable() -> None:
        atomic_write(directory / f"durable_{next(counter)}.bin",
                     lambda file: file.write(payload))

    def plain() -> None:
        fsynced(directory / f"plain_{next(counter)}.bin", lambda file: file.write(payload))

    def remove() -> None:
        for path in directory.glob("*.bin"):
            path.unlink()

    medians = interleaved_medians({"plain": plain, "durable": durable}, 3 * rounds,
                                  between=remove)
    return Row("save", "fixed cost of durability (temp file, rename, dir fsync), 4 KB file",
               "write + fsync", medians["plain"] * 1e3, medians["durable"] * 1e3, unit="ms")


def run_save(rounds: int = 7, sizes: Sequence[float] = SIZES,
             counts: Sequence[int] = (LARGE_COUNT, SMALL_COUNT),
             directory: Path | None = None) -> list[Row]:
    """Section ``save``: durable ``NNHandler.save`` against ``torch.save`` + fsync, and its
    throughput against a raw write + fsync."""
    rows = []
    with bench_directory(directory) as where:
        for case in _states(sizes, counts, where):
            medians = interleaved_medians({
                "torch.save": case.torch_save,
                "nnhandler": case.nnhandler_save,
                "torch writer": case.nnhandler_save_torch_writer,
                "raw": case.raw_write,
            }, rounds, warmup=WARMUP, between=case.settle)
            rows.append(Row("save", f"{case.label}: durable NNHandler.save",
                            "torch.save + fsync", medians["torch.save"], medians["nnhandler"],
                            target=1.0))
            rows.append(Row("save", f"{case.label}: the same, torch.save writer",
                            "torch.save + fsync", medians["torch.save"],
                            medians["torch writer"]))
            ours_throughput = case.file_size / medians["nnhandler"] / 1e6
            raw_throughput = len(case.raw) / medians["raw"] / 1e6
            rows.append(Row("save", f"{case.label}: throughput", "raw write + fsync",
                            raw_throughput, ours_throughput, unit="MB/s", target=0.8,
                            direction="min"))
        rows.append(_fixed_cost(rounds, where))
    return rows


def run_async(rounds: int = 7, sizes: Sequence[float] = SIZES,
              counts: Sequence[int] = (LARGE_COUNT, SMALL_COUNT),
              directory: Path | None = None) -> list[Row]:
    """Section ``async``: what an asynchronous auto-save blocks the training thread for,
    against ``torch.save`` + fsync (and the floor: a bare copy of the tensors)."""
    rows = []
    with bench_directory(directory) as where:
        for case in _states(sizes, counts, where, torch_writer_callback=True):
            actions: dict[str, Callable[[], object]] = {
                "torch.save": case.torch_save,
                "async": case.async_block,
                "async torch writer": case.async_block_torch_writer,
                "copy_": case.copy_floor,
            }
            medians = interleaved_medians(actions, rounds, warmup=WARMUP, between=case.settle)
            rows.append(Row("async", f"{case.label}: training blocked by an async save",
                            "torch.save + fsync", medians["torch.save"], medians["async"],
                            target=0.10, stretch=0.06))
            rows.append(Row("async", f"{case.label}: the same, torch.save writer",
                            "torch.save + fsync", medians["torch.save"],
                            medians["async torch writer"]))
            rows.append(Row("async", f"{case.label}: bare copy_ of the tensors (floor)",
                            "torch.save + fsync", medians["torch.save"], medians["copy_"]))
            case.settle()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="megabytes, comma-separated")
    parser.add_argument("--counts", default=f"{LARGE_COUNT},{SMALL_COUNT}",
                        help="tensor counts, comma-separated")
    parser.add_argument("--dir", type=Path, default=None, help="where files go (a temp dir)")
    args = parser.parse_args()
    sizes = [float(size) for size in args.sizes.split(",")]
    counts = [int(count) for count in args.counts.split(",")]
    print(machine_line())
    print_rows(run_save(args.rounds, sizes, counts, args.dir))
    print_rows(run_async(args.rounds, sizes, counts, args.dir))


if __name__ == "__main__":
    main()
