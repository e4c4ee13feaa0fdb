"""The progress bar hands batches to rich in bunches but never loses one, and every benchmark
section runs end to end (one round; the figures themselves are not judged here)."""

from __future__ import annotations

import math

import pytest

from benchmarks import load_cost, loop_overhead
from nnhandler.logging import TrainingProgress


@pytest.mark.parametrize("batches", [1, 7, 1000])
def test_every_batch_reaches_the_bar_by_the_end_of_the_epoch(batches: int) -> None:
    with TrainingProgress(True, start_epoch=0, end_epoch=2) as bar:
        for epoch in (1, 2):
            bar.start_epoch(epoch, batches)
            for _ in range(batches):
                bar.advance_batch()
            bar.end_epoch("")
            assert bar._progress is not None and bar._batches is not None
            task = next(t for t in bar._progress.tasks if t.id == bar._batches)
            assert task.completed == batches
        assert bar._epochs is not None
        epochs = next(t for t in bar._progress.tasks if t.id == bar._epochs)
        assert epochs.completed == 2


def test_a_disabled_bar_does_nothing() -> None:
    with TrainingProgress(False, start_epoch=0, end_epoch=1) as bar:
        bar.start_epoch(1, 3)
        bar.advance_batch()
        bar.end_epoch("")
        assert bar._progress is None


@pytest.mark.slow
@pytest.mark.parametrize("section", [loop_overhead, load_cost], ids=["loop", "load"])
def test_benchmark_section_runs(section: object) -> None:
    rows = section.run(rounds=1)  # type: ignore[attr-defined]
    assert rows
    for row in rows:
        assert row.baseline_value > 0 and row.ours_value > 0
        assert math.isfinite(row.ratio)
        assert row.verdict == "" or row.verdict.startswith(("met", "MISSED"))
