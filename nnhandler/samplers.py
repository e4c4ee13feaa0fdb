"""The training samplers and batch helpers: shuffling that depends only on the run's seed and
the absolute epoch (so a resumed run sees the same batches), epochs that start mid-way (an
emergency checkpoint's continuation), and validation shards that count every sample once."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

__all__ = ["EpochDistributedSampler", "EpochShuffleSampler", "ShardSampler", "batches_from",
           "loader_batch_size", "loader_length"]


class _StartsMidEpoch:
    """A training sampler whose current epoch can start ``index`` positions in
    (:meth:`start_at`), so that continuing an interrupted epoch never loads the samples it
    already trained on; ``set_epoch`` starts the next epoch from its beginning again."""

    _start = 0

    def start_at(self, index: int) -> None:
        self._start = index

    def _from_start(self, indices: Iterator[int]) -> Iterator[int]:
        return itertools.islice(indices, self._start, None) if self._start else indices


class EpochShuffleSampler(_StartsMidEpoch, Sampler[int]):
    """A permutation that depends only on ``seed`` and the epoch set with :meth:`set_epoch`.

    Re-creating the loader after a resume therefore yields the same batches as the
    uninterrupted run (the same rule as ``DistributedSampler``: seed + epoch).
    """

    def __init__(self, length: int, seed: int, shuffle: bool) -> None:
        self.length, self.seed, self.shuffle, self.epoch = length, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._start = epoch, 0

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return self._from_start(iter(range(self.length)))
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return self._from_start(iter(torch.randperm(self.length, generator=generator).tolist()))

    def __len__(self) -> int:
        return max(0, self.length - self._start)


class EpochDistributedSampler(_StartsMidEpoch, DistributedSampler[Any]):
    """``DistributedSampler`` (seed + epoch, padded equal shards) whose epoch can start
    mid-way (:meth:`start_at`)."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._start = 0

    def __iter__(self) -> Iterator[Any]:
        return self._from_start(super().__iter__())

    def __len__(self) -> int:
        return max(0, super().__len__() - self._start)


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``n`` takes indices ``r, r+n, …`` with no padding, so validation averages
    count every sample exactly once across ranks."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def batches_from(loader: DataLoader[Any], start: int) -> Iterator[Any]:
    """The loader's batches from batch ``start`` on. The sampler starts ``start`` batches in,
    so skipped samples are never loaded; and the random number the DataLoader draws for its
    worker seeds is given back, so the random streams continue exactly as they were saved in
    the middle of the epoch (the uninterrupted run drew it before the epoch's first batch)."""
    if start == 0:
        return iter(loader)
    start_at = getattr(loader.sampler, "start_at", None)
    if start_at is None:
        raise TypeError(f"cannot continue an epoch at batch {start}: the training loader's "
                        f"sampler {type(loader.sampler).__qualname__} cannot start mid-epoch")
    start_at(start * loader_batch_size(loader))
    random_state = torch.get_rng_state()
    iterator = iter(loader)
    torch.set_rng_state(random_state)
    return iterator


def loader_batch_size(loader: DataLoader[Any]) -> int:
    if loader.batch_size is None:
        raise TypeError("the training loader has no batch_size (a batch_sampler)")
    return loader.batch_size


def loader_length(loader: DataLoader[Any]) -> int | None:
    """``len(loader)``, or ``None`` for an iterable dataset without a length."""
    try:
        return len(loader)
    except TypeError:  # an IterableDataset without __len__
        return None
