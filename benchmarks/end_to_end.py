"""End to end: training with an auto-save every epoch against the same training without one.

    python -m benchmarks.end_to_end [--rounds 5] [--epochs 4] [--epoch-seconds 2.5] [--dir DIR]

Two states: a two-layer MLP whose parameters and Adam moments total ~200 MB (16.8 M
parameters), and a model of 1,250 small parameter tensors (625 residual ``Linear(40, 40)``
blocks: 5,000 state tensors with Adam, ~12 MB), the latter with torch threads 1 and 2. An epoch
is calibrated to take ``--epoch-seconds`` of training on this machine (the issue's "~200 MB saved
every ~2.5 s"). Three handlers train the same model from the same weights on the same data:
without auto-save, with ``auto_save(1, overwrite=True, async_save=True)`` and with the
synchronous auto-save. Each round trains ``--epochs`` more epochs with each of them in a rotating
order; the time per epoch is taken from the start of the first epoch to the start of the last
one (every epoch in between paid for its save, and its background write overlapped the next
epoch), so the final flush at the end of ``train`` is left out; the whole ``train`` call, flush
included, and the process's CPU time per epoch (every thread: what the save takes from the
machine, less sensitive to other load than the wall clock) are reported beside it. The training
time a save costs is the epoch time with saving less the epoch time without: async against sync.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from nnhandler import Callback, NNHandler

from ._common import Row, machine_line, print_rows
from .loop_overhead import ManyLayers
from .save_cost import bench_directory

__all__ = ["SHAPES", "Shape", "WideMLP", "run"]

WIDTH = 2048
HIDDEN = 4096
BATCH = 64


class WideMLP(nn.Module):
    """``width -> hidden -> width``: 2 * width * hidden parameters (16.8 M by default)."""

    def __init__(self, width: int = WIDTH, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.net(x)
        return output


@dataclass(frozen=True)
class Shape:
    """A state to train and save: the model class and its arguments, the input width, and
    the torch threads it runs with (``None``: as the process is set)."""

    label: str
    model: Callable[..., nn.Module]
    width: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None

    def build(self) -> nn.Module:
        return self.model(**self.kwargs)


SHAPES: tuple[Shape, ...] = (
    Shape("200 MB", WideMLP, WIDTH, {"width": WIDTH, "hidden": HIDDEN}),
    Shape("1,250 parameter tensors, torch threads 1", ManyLayers, 40, threads=1),
    Shape("1,250 parameter tensors, torch threads 2", ManyLayers, 40, threads=2),
)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the duration (``None``: unchanged)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cpu_seconds() -> float:
    """CPU time of this process so far (every thread, user and system)."""
    times = os.times()
    return times.user + times.system


class EpochClock(Callback):
    """When each epoch of the current ``train`` call began (wall clock and process CPU time)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.cpu: list[float] = []

    def on_epoch_begin(self, **kwargs: Any) -> None:
        self.starts.append(time.perf_counter())
        self.cpu.append(_cpu_seconds())


def _batches_per_epoch(shape: Shape, epoch_seconds: float) -> int:
    """How many Adam steps of the model take ``epoch_seconds`` here (timed on a scratch copy)."""
    torch.manual_seed(0)
    model = shape.build()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(BATCH, shape.width)

    def step() -> None:
        loss = nn.functional.mse_loss(model(x), x)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    step()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return max(2, round(epoch_seconds / statistics.median(times)))


class Contender:
    """One handler training the benchmark model; ``mode`` is "none", "async" or "sync"."""

    def __init__(self, mode: str, shape: Shape, batches: int, directory: Path) -> None:
        torch.manual_seed(0)
        self.handler = NNHandler(shape.model, device="cpu", logger_mode="file",
                                 log_file=directory / f"{mode}.log", use_distributed=False,
                                 model_kwargs=shape.kwargs)
        self.handler.set_optimizer(torch.optim.Adam, lr=1e-4)
        self.handler.set_loss_fn(nn.MSELoss)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batches * BATCH, shape.width, generator=generator)
        self.handler.set_train_loader(TensorDataset(x, x), batch_size=BATCH, shuffle=True)
        self.clock = EpochClock()
        self.handler.add_callback(self.clock)
        if mode != "none":
            self.handler.auto_save(1, directory / mode, name="e2e_ep{epoch:04d}",
                                   overwrite=True, async_save=mode == "async")

    @property
    def state_bytes(self) -> int:
        tensors: list[torch.Tensor] = [*self.handler.module.parameters()]
        optimizer = self.handler.optimizer
        assert optimizer is not None
        for state in optimizer.state.values():
            tensors += [value for value in state.values() if isinstance(value, torch.Tensor)]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    def train(self, epochs: int) -> tuple[float, float, float]:
        """Train ``epochs`` more epochs; (seconds per epoch between the first and the last
        epoch start, CPU seconds per epoch over the same span, seconds of the whole call)."""
        self.clock.starts.clear()
        self.clock.cpu.clear()
        started = time.perf_counter()
        self.handler.train(epochs, progress_bar=False)
        total = time.perf_counter() - started
        starts, cpu = self.clock.starts, self.clock.cpu
        spans = len(starts) - 1
        return (starts[-1] - starts[0]) / spans, (cpu[-1] - cpu[0]) / spans, total


def run(rounds: int = 5, epochs: int = 4, epoch_seconds: float = 2.5,
        directory: Path | None = None, shapes: tuple[Shape, ...] = SHAPES) -> list[Row]:
    if epochs < 2:
        raise ValueError(f"epochs={epochs}: at least 2 are needed to time an epoch")
    rows = []
    with bench_directory(directory) as root:
        for shape in shapes:
            with torch_threads(shape.threads):
                rows += _run_shape(shape, rounds, epochs, epoch_seconds, root / "e2e")
    return rows


def _run_shape(shape: Shape, rounds: int, epochs: int, epoch_seconds: float,
               where: Path) -> list[Row]:
    batches = _batches_per_epoch(shape, epoch_seconds)
    where.mkdir(exist_ok=True)
    contenders = {mode: Contender(mode, shape, batches, where)
                  for mode in ("none", "async", "sync")}
    for contender in contenders.values():  # warm-up: allocator, staging arena, page cache
        contender.train(2)
    per_epoch: dict[str, list[float]] = {mode: [] for mode in contenders}
    cpu_per_epoch: dict[str, list[float]] = {mode: [] for mode in contenders}
    whole: dict[str, list[float]] = {mode: [] for mode in contenders}
    names = list(contenders)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for mode in names[shift:] + names[:shift]:
            epoch_time, cpu_time, total = contenders[mode].train(epochs)
            per_epoch[mode].append(epoch_time)
            cpu_per_epoch[mode].append(cpu_time)
            whole[mode].append(total)
    megabytes = contenders["async"].state_bytes / 1e6
    del contenders
    shutil.rmtree(where, ignore_errors=True)
    epoch = statistics.median(per_epoch["none"])

    def medians(table: dict[str, list[float]], mode: str) -> float:
        return statistics.median(table[mode])

    def cost_per_save(mode: str) -> float:
        """Median over rounds of (epoch time with saving - epoch time without), paired by
        round (both ran in the same round, close in time)."""
        return statistics.median(with_save - without for with_save, without
                                 in zip(per_epoch[mode], per_epoch["none"], strict=True))

    case = f"{shape.label}: {megabytes:.0f} MB of state saved every epoch (~{epoch:.1f} s)"
    # a save that costs nothing measurable is floored at 0.1 ms, so the ratio stays finite
    sync_cost, async_cost = (max(cost_per_save(mode), 1e-4) for mode in ("sync", "async"))
    return [
        Row("e2e", f"{case}, async auto-save: time per epoch", "no auto-save",
            epoch, medians(per_epoch, "async"), target=1.03),
        Row("e2e", f"{case}, async: process CPU time per epoch", "no auto-save",
            medians(cpu_per_epoch, "none"), medians(cpu_per_epoch, "async")),
        Row("e2e", f"{case}, async: whole train({epochs}) incl. the final flush",
            "no auto-save", medians(whole, "none"), medians(whole, "async")),
        Row("e2e", f"{case}, sync auto-save: time per epoch", "no auto-save",
            epoch, medians(per_epoch, "sync")),
        Row("e2e", f"{case}, training time per save: async", "sync", sync_cost, async_cost,
            target=1.0),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--epoch-seconds", type=float, default=2.5)
    parser.add_argument("--dir", type=Path, default=None, help="where files go (a temp dir)")
    args = parser.parse_args()
    print(machine_line())
    print_rows(run(args.rounds, args.epochs, args.epoch_seconds, directory=args.dir))


if __name__ == "__main__":
    main()
