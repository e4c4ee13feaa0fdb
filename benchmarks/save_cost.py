"""Cost of a durable checkpoint write, and what an asynchronous auto-save blocks training for.

    python benchmarks/save_cost.py [--rounds 5] [--sizes 10,200] [--dir DIR] [--threads N]

For ~10 MB and ~200 MB of float32 state, as a few hundred large tensors and as 5,000 small
ones, interleaved rounds time (medians printed):

* ``nnhandler``: ``write_checkpoint`` — pickling, CRC-32 of every byte, temp file, fsync,
  rename, directory fsync (what every synchronous auto-save does);
* ``torch.save``: ``torch.save`` into a file, flush, fsync (no rename, no checksum of ours);
* ``raw``: the tensors' bytes, prepared beforehand as one buffer, written with one ``write`` +
  fsync; ``raw/tensor``: one ``write`` per tensor + fsync;
* ``async block``: what ``AutoSaveCallback(async_save=True).save_now`` costs the training
  thread (state collection, snapshot into the reused staging buffers; the background write is
  waited for outside the timing); ``copy_``: a bare ``torch._foreach_copy_`` of the same
  tensors into preallocated buffers, the floor of any snapshot.

Every file goes to a fresh name (old files are removed outside the timing). The machine may be
shared: the figures are as noisy as it is; compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnhandler import AutoSaveCallback, NNHandler
from nnhandler.checkpoint.envelope import build_meta, write_checkpoint

SMALL_COUNT = 5000
LARGE_COUNT = 300


class Blob(nn.Module):
    """A model whose parameters are exactly the benchmark's tensors."""

    def __init__(self, megabytes: int = 10, count: int = LARGE_COUNT) -> None:
        super().__init__()
        numel = megabytes * (1 << 20) // 4 // count
        self.tensors = nn.ParameterList(nn.Parameter(torch.randn(numel)) for _ in range(count))


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def fsynced(path: Path, write: Callable[[Any], object]) -> None:
    with open(path, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


class Case:
    """One state (size, tensor count) and its contenders."""

    def __init__(self, megabytes: int, count: int, directory: Path) -> None:
        torch.manual_seed(0)
        self.label = f"{megabytes} MB x {count}"
        self.directory = directory
        self.handler = NNHandler(Blob, device="cpu", megabytes=megabytes, count=count,
                                 logger_mode="file", log_file=directory / "bench.log")
        self.handler.set_optimizer(torch.optim.SGD, lr=0.1)  # no optimizer state
        self.callback = AutoSaveCallback(None, directory / "async", name="async_{epoch}",
                                         async_save=True)
        self.handler.add_callback(self.callback)
        self.tensors = [p.detach() for p in self.handler.module.parameters()]
        self.state = {"model": self.handler.module.state_dict()}
        self.raw = b"".join(t.numpy().tobytes() for t in self.tensors)
        self.copies = [torch.empty_like(t) for t in self.tensors]
        self.meta = build_meta(epoch=1, step=1, logs={}, world_size=1)
        self.counter = 0
        self.sizes: dict[str, int] = {"raw": len(self.raw), "raw/tensor": len(self.raw)}

    def fresh(self, stem: str) -> Path:
        self.counter += 1
        return self.directory / f"{stem}_{self.counter}.bin"

    def contenders(self) -> dict[str, Callable[[], None]]:
        return {
            "nnhandler": self.nnhandler,
            "torch.save": lambda: fsynced(self.fresh("torch"),
                                          lambda f: torch.save(self.state, f)),
            "raw": lambda: fsynced(self.fresh("raw"), lambda f: f.write(self.raw)),
            "raw/tensor": lambda: fsynced(self.fresh("rawt"), self.write_each),
            "async block": self.async_block,
            "copy_": lambda: torch._foreach_copy_(self.copies, self.tensors),
        }

    def nnhandler(self) -> None:
        path = self.fresh("ours")
        self.sizes["nnhandler"] = write_checkpoint(path, self.state, self.meta)

    def write_each(self, file: Any) -> None:
        for tensor in self.tensors:
            file.write(memoryview(tensor.numpy()).cast("B"))

    def async_block(self) -> None:
        self.callback.save_now(self.handler, self.counter, {})
        self.counter += 1

    def settle(self) -> None:
        """Outside the timing: wait for the background write, remove every file."""
        self.callback.flush(self.handler)
        for path in [*self.directory.glob("*.bin"), *(self.directory / "async").glob("*")]:
            path.unlink()
        os.sync()


def run(sizes: list[int], rounds: int, directory: Path) -> list[tuple[str, dict[str, float],
                                                                       dict[str, int]]]:
    results = []
    for megabytes in sizes:
        for count in (LARGE_COUNT, SMALL_COUNT):
            case = Case(megabytes, count, directory)
            contenders = case.contenders()
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for action in contenders.values():  # warm-up: page cache, allocator, staging
                action()
                case.settle()
            for round_index in range(rounds):
                names = list(contenders)
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    times[name].append(timed(contenders[name]))
                    case.settle()
            results.append((case.label, {n: statistics.median(t) for n, t in times.items()},
                            dict(case.sizes)))
            case.callback.flush(case.handler)
    return results


def report(results: list[tuple[str, dict[str, float], dict[str, int]]], rounds: int) -> None:
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs; "
          f"torch {torch.__version__}; python {platform.python_version()}; "
          f"torch threads {torch.get_num_threads()}; {rounds} interleaved rounds, medians")
    print("(a shared machine makes these noisy: compare the ratios of one run)")
    header = (f"{'state':<16}{'nnhandler':>11}{'torch.save':>11}{'raw':>9}{'raw/tensor':>11}"
              f"{'ours/torch':>11}{'thru/raw':>9}{'thru/rawT':>10}{'async blk':>10}"
              f"{'blk/torch':>10}{'copy_':>8}")
    print(header)
    for label, median, sizes in results:
        ours, plain = median["nnhandler"], median["torch.save"]
        throughput = sizes["nnhandler"] / ours
        print(f"{label:<16}{ours * 1e3:>9.1f}ms{plain * 1e3:>9.1f}ms{median['raw'] * 1e3:>7.1f}ms"
              f"{median['raw/tensor'] * 1e3:>9.1f}ms{ours / plain:>10.2f}x"
              f"{throughput / (sizes['raw'] / median['raw']):>8.2f}x"
              f"{throughput / (sizes['raw/tensor'] / median['raw/tensor']):>9.2f}x"
              f"{median['async block'] * 1e3:>8.1f}ms{median['async block'] / plain:>9.3f}x"
              f"{median['copy_'] * 1e3:>6.1f}ms")
    print("ours/torch: durable nnhandler save time / torch.save+fsync time (target <= 1.0); "
          "thru/raw(T): nnhandler throughput / raw write throughput, one write (per tensor) "
          "(target >= 0.8); blk/torch: async blocking / torch.save+fsync (target <= 0.10)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="10,200", help="megabytes, comma-separated")
    parser.add_argument("--dir", type=Path, default=None, help="where files go (a temp dir)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        report(run(sizes, args.rounds, args.dir), args.rounds)
        return
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as directory:
        report(run(sizes, args.rounds, Path(directory)), args.rounds)


if __name__ == "__main__":
    main()
