"""Peers: nnhandler beside Lightning, Accelerate, Ignite and torch DCP, on the same model, the
same data, in the same run.

    python -m benchmarks.peers [--rounds 5] [--train-rounds 3] [--epochs 3] [--megabytes 200]

The model is 16 linear layers (32 tensors, ~200 MB of float32) trained with plain SGD; every
contender (:mod:`benchmarks.peer_systems`) has its own copy with the same initial weights and
the same data. In interleaved rounds (medians), four measurements:

* **training blocked per save**: what one save costs the training thread (an asynchronous
  saver: until it hands the state to its writer), against ``torch.save`` + flush + fsync of the
  same state dicts;
* **a short training run** of ``--epochs`` epochs with the system's own checkpointing saving
  after every epoch, until its last checkpoint is written, against a hand-written loop that
  saves with ``torch.save`` + fsync (and, for scale, the same loop without saving);
* **resume**: the system's own call that brings a checkpoint back into the live model and
  optimizer, against ``torch.load`` + ``load_state_dict`` by hand (files in the page cache);
* **a flipped bit**: one bit flipped in the middle of a tensor's data in a fresh checkpoint of
  the system (``--flips`` times, a different tensor each time), loaded back: "detected" (an
  error that says so), "crashed (Type)" (another error), "loaded silently wrong".

Each row says whether the system fsyncs, as probed: the ``os.fsync`` / ``os.fdatasync`` calls
during one save and its background write (``torch.save`` and safetensors make no native fsync of
their own). A peer that is not installed is skipped with a line naming the extra that installs
it (``pip install 'nnhandler[bench]'``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import statistics
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ._common import Row, interleaved_medians, machine_line, print_rows, timed
from .bitflip import data_regions, flipped, outcome_of
from .peer_systems import (
    EXTRA,
    LAYERS,
    Accelerate,
    Contender,
    DistributedCheckpoint,
    HandWritten,
    Ignite,
    Lightning,
    NNHandlerContender,
    Workload,
    missing,
)
from .save_cost import bench_directory

__all__ = ["BATCH", "contenders", "run"]

BATCH = 16
#: rounds before the timed ones: the first touch of fresh memory and new files is slow
WARMUP = 2
#: the bits flipped, one per trial (cycled)
BITS = (6, 3, 1)
#: the loggers and warning sources of the peers, quieted for the section's output
_PEER_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                 "accelerate", "ignite")
_PEER_MODULES = ("lightning.pytorch", "accelerate", "ignite.engine")
_PEER_WARNINGS = (r"(lightning|lightning_fabric|pytorch_lightning|accelerate|ignite"
                  r"|torch\.distributed)")


@contextmanager
def quiet_peers() -> Iterator[None]:
    """The peers' info logging and warnings (GPU available: False, weights_only defaults, few
    dataloader workers ...) silenced; nnhandler's own warnings still show. The installed peers
    are imported first: Lightning sets its loggers' levels when it is imported."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=_PEER_WARNINGS)
        warnings.filterwarnings("ignore", message=r".*(weights_only|num_workers|LeafSpec|"
                                                  r"process group|ProcessGroup|torch\.jit)")
        for module in _PEER_MODULES:
            if not missing(module.partition(".")[0]):
                importlib.import_module(module)
        levels = {name: logging.getLogger(name).level for name in _PEER_LOGGERS}
        for name in _PEER_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


@contextmanager
def counting_fsyncs() -> Iterator[Counter[str]]:
    """Count the calls of ``os.fsync`` and ``os.fdatasync`` (still made) inside the block."""
    calls: Counter[str] = Counter()
    originals = {"fsync": os.fsync, "fdatasync": os.fdatasync}

    def counted(name: str) -> Callable[[Any], None]:
        def call(fd: Any) -> None:
            calls[name] += 1
            originals[name](fd)
        return call

    os.fsync, os.fdatasync = counted("fsync"), counted("fdatasync")
    try:
        yield calls
    finally:
        os.fsync, os.fdatasync = originals["fsync"], originals["fdatasync"]


def contenders(work: Workload, directory: Path) -> list[Contender]:
    """Every system that is installed here, the baseline first; one line for each skipped."""
    made: list[Contender] = [HandWritten(work, directory / "by_hand"),
                             NNHandlerContender(work, directory / "nnhandler_sync", False),
                             NNHandlerContender(work, directory / "nnhandler_async", True)]
    peers: list[tuple[str, str, Callable[[], list[Contender]]]] = [
        ("Lightning", "lightning", lambda: [
            Lightning(work, directory / "lightning", async_io=False),
            Lightning(work, directory / "lightning_async", async_io=True)]),
        ("Accelerate", "accelerate", lambda: [Accelerate(work, directory / "accelerate")]),
        ("Ignite", "ignite", lambda: [Ignite(work, directory / "ignite")]),
    ]
    for system, module, build in peers:
        if missing(module):
            print(f"  peers    {system} skipped: not installed ({EXTRA}, or pip install "
                  f"{'pytorch-ignite' if module == 'ignite' else module})", flush=True)
        else:
            made += build()
    if torch.distributed.is_available():
        made += [DistributedCheckpoint(work, directory / "dcp", async_save=False),
                 DistributedCheckpoint(work, directory / "dcp_async", async_save=True)]
    else:
        print("  peers    torch DCP skipped: this torch build has no torch.distributed",
              flush=True)
    return made


def _batches_per_epoch(work: Workload, epoch_seconds: float) -> int:
    """How many SGD steps of the model take ``epoch_seconds`` here (timed on a scratch copy)."""
    model = work.model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = work.dataset.tensors[0][:BATCH]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), x).backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    step()
    times = [timed(step) for _ in range(3)]
    return max(2, round(epoch_seconds / statistics.median(times)))


def _probe_fsyncs(every: list[Contender]) -> None:
    """One save of each (also a warm-up), its background write waited for, fsyncs counted."""
    for contender in every:
        with counting_fsyncs() as calls:
            contender.save(contender.fresh())
            contender.settle()
        contender.fsync_calls = sum(calls.values())
        contender.clear()


def _blocking_rows(every: list[Contender], rounds: int, case: str) -> list[Row]:
    def settle_all() -> None:
        for contender in every:
            contender.settle()
            contender.clear()

    medians = interleaved_medians(
        {contender.name: lambda c=contender: c.save(c.fresh()) for contender in every},
        rounds, warmup=WARMUP, between=settle_all)
    baseline = every[0]
    return [Row("peers", f"{c.name} [{c.fsync}]: training blocked per save, {case}",
                "torch.save + fsync", medians[baseline.name], medians[c.name])
            for c in every[1:]]


def _training_rows(every: list[Contender], rounds: int, epochs: int, case: str) -> list[Row]:
    samples: dict[str, list[float]] = {contender.name: [] for contender in every}
    for round_index in range(rounds):
        shift = round_index % len(every)
        for contender in every[shift:] + every[:shift]:
            contender.prepare_run(epochs)
            samples[contender.name].append(timed(lambda c=contender: c.train(epochs)))
            contender.clear()
    medians = {name: statistics.median(times) for name, times in samples.items()}
    baseline = every[0]
    return [Row("peers", f"{c.name}{'' if isinstance(c, HandWritten) else f' [{c.fsync}]'}: "
                f"train {epochs} epoch{'' if epochs == 1 else 's'}, {_saving(c)}, {case}",
                baseline.name, medians[baseline.name], medians[c.name])
            for c in every[1:]]


def _saving(contender: Contender) -> str:
    return ("no saving" if isinstance(contender, HandWritten) and not contender.saving
            else "a save per epoch")


def _by_system(every: list[Contender]) -> list[Contender]:
    """The first (synchronous) contender of each system."""
    seen: dict[str, Contender] = {}
    for contender in every:
        seen.setdefault(contender.system, contender)
    return list(seen.values())


def _load_rows(systems: list[Contender], rounds: int, case: str) -> list[Row]:
    actions: dict[str, Callable[[], object]] = {}
    labels: dict[str, str] = {}
    for contender in systems:
        checkpoint = contender.save(contender.fresh())
        contender.settle()
        for how, load in contender.loads().items():
            key = f"{contender.system}: {how}"
            labels[key] = f"{contender.system} [{contender.fsync}]: resume by {how}, {case}"
            actions[key] = lambda load=load, path=checkpoint: load(path)
    medians = interleaved_medians(actions, rounds, warmup=1)
    baseline, *others = actions
    for contender in systems:
        contender.clear()
    return [Row("peers", labels[key], "torch.load + load_state_dict", medians[baseline],
                medians[key]) for key in others]


def _flip_outcomes(contender: Contender, flips: int) -> list[str]:
    checkpoint = contender.save(contender.fresh())
    contender.settle()
    saved = {key: value.clone() for key, value in contender.model.state_dict().items()}
    regions = data_regions(checkpoint)[:flips]
    if len(regions) < flips:
        raise ValueError(f"{checkpoint}: {len(regions)} tensors, {flips} flips asked for")

    def intact() -> bool:
        state = contender.model.state_dict()
        return all(torch.equal(state[key], value) for key, value in saved.items())

    outcomes = []
    for index, region in enumerate(regions):
        with flipped(region, BITS[index % len(BITS)]), torch.no_grad():
            for parameter in contender.model.parameters():
                parameter.zero_()  # a load that leaves the model alone is not "intact"
            outcomes.append(outcome_of(lambda: contender.load(checkpoint), intact))
        contender.model.load_state_dict(saved)
    contender.clear()
    return outcomes


def _flip_rows(systems: list[Contender], flips: int) -> list[Row]:
    rows = []
    for contender in systems:
        outcomes = Counter(_flip_outcomes(contender, flips))
        summary = ", ".join(f"{outcome} {count}/{flips}"
                            for outcome, count in sorted(outcomes.items()))
        ours = isinstance(contender, NNHandlerContender)
        rows.append(Row("peers", f"{contender.system} [{contender.fsync}]: one bit flipped in "
                        f"a tensor's data: {summary}", f"{flips} flips", flips,
                        outcomes["detected"], unit="detected",
                        target=1.0 if ours else None, direction="min"))
    return rows


def run(rounds: int = 5, train_rounds: int = 3, epochs: int = 3, epoch_seconds: float = 1.0,
        load_rounds: int = 5, flips: int = 3, megabytes: float = 200,
        directory: Path | None = None) -> list[Row]:
    """The section ``peers`` (see the module's docstring); sizes and rounds as given."""
    if epochs < 1 or flips < 1:
        raise ValueError(f"epochs={epochs}, flips={flips}: each must be at least 1")
    threads = torch.get_num_threads()
    with bench_directory(directory) as root, quiet_peers():
        sizing = Workload.make(megabytes, 1, BATCH)
        work = Workload.make(megabytes, _batches_per_epoch(sizing, epoch_seconds), BATCH)
        del sizing
        every = contenders(work, root / "peers")
        plain = HandWritten(work, root / "peers" / "no_saving", saving=False)
        for contender in [*every, plain]:  # warm-up; Lightning and Ignite need a run to save
            contender.prepare_run(1)
            contender.train(1)
            contender.clear()
        _probe_fsyncs(every)
        state = f"{work.state_megabytes:.0f} MB x {2 * LAYERS} tensors"
        rows = _blocking_rows(every, rounds, state)
        rows += _training_rows([every[0], plain, *every[1:]], train_rounds, epochs,
                               f"{state} ({work.batches} steps an epoch, ~{epoch_seconds:g} s)")
        systems = _by_system(every)
        rows += _load_rows(systems, load_rounds, state)
        rows += _flip_rows(systems, flips)
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"a peer changed torch's threads from {threads} to "
                           f"{torch.get_num_threads()}: the timings are not comparable")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the save timing")
    parser.add_argument("--train-rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epoch-seconds", type=float, default=1.0)
    parser.add_argument("--load-rounds", type=int, default=5)
    parser.add_argument("--flips", type=int, default=3)
    parser.add_argument("--megabytes", type=float, default=200)
    parser.add_argument("--dir", type=Path, default=None, help="where files go (a temp dir)")
    args = parser.parse_args()
    print(machine_line())
    print_rows(run(args.rounds, args.train_rounds, args.epochs, args.epoch_seconds,
                   args.load_rounds, args.flips, args.megabytes, args.dir))


if __name__ == "__main__":
    main()
