"""The per-batch path of the loop does only what cannot wait: loss bookkeeping accumulates in
place on the device (no allocation, no host sync), and without AMP no autocast context is
entered per batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from nnh_testing import make_handler
from torch.profiler import ProfilerActivity, profile

from nnhandler.loop import _Totals


def aten_calls(action: Any) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        action()
    return [event.name for event in recorded.events() if event.name.startswith("aten::")]


def test_batch_bookkeeping_accumulates_in_place_without_allocating() -> None:
    totals = _Totals(["mae", "acc"], torch.device("cpu"))
    loss = torch.tensor(0.5)
    metrics = [torch.tensor(0.25), 0.75]  # a tensor metric and a float metric
    totals.add(loss, 4, metrics)  # warm-up
    before = totals.loss.data_ptr()
    calls = aten_calls(lambda: [totals.add(loss, 4, metrics) for _ in range(10)])
    allocating = {"aten::empty", "aten::empty_strided", "aten::to", "aten::_to_copy",
                  "aten::mul", "aten::item", "aten::_local_scalar_dense"}
    assert allocating.isdisjoint(calls), sorted(set(calls))
    assert calls.count("aten::add_") == 20  # loss and the tensor metric, per batch
    assert calls.count("aten::copy_") == 20  # each cast into the float64 scratch scalar
    assert totals.loss.data_ptr() == before
    packed = totals.packed().tolist()
    assert packed == [0.5 * 44, 44.0, 0.25 * 44, 0.75 * 44]


def test_training_without_amp_enters_no_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.autocast entered although use_amp=False")

    handler = make_handler()
    monkeypatch.setattr(torch, "autocast", refuse)
    handler.train(1, seed=0, progress_bar=False, use_amp=False)
    monkeypatch.undo()
    assert len(handler.train_losses) == 1
