"""EarlyStopping: the decision rule (tables and properties), validation, real training, and a
resume that stops exactly where the uninterrupted run stops."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from nnh_testing import assert_same_tensors, attach_loaders, checkpoint_files, make_handler
from pydantic import ValidationError

from nnhandler import ConfigurationError, EarlyStopping, NNHandler, read_checkpoint

MISSING = None  # an epoch that did not validate: no val_loss in its logs


class StopSink:
    """The two things EarlyStopping uses of a handler, for driving the rule without training."""

    def __init__(self) -> None:
        self.stops = 0
        self.logger = logging.getLogger("test_early_stopping")

    def request_stop(self) -> None:
        self.stops += 1


def drive(callback: EarlyStopping, values: Sequence[float | None], first_epoch: int = 1,
          monitor: str = "val_loss") -> list[int]:
    """Feed one monitored value per epoch (``None``: not validated); the epochs that stop."""
    stopped = []
    for epoch, value in enumerate(values, start=first_epoch):
        logs: dict[str, Any] = {"epoch": epoch, "loss": 1.0}
        if value is not None:
            logs[monitor] = value
        sink = StopSink()
        callback.on_epoch_end(handler=sink, epoch=epoch, logs=logs)
        if sink.stops:
            stopped.append(epoch)
    return stopped


@pytest.mark.parametrize(
    ("values", "kwargs", "stops", "best"),
    [
        ([1.0, 0.9, 0.95, 0.96], {"patience": 2}, [4], 0.9),
        ([1.0, 0.9, 0.95, 0.8, 0.85], {"patience": 2}, [], 0.8),
        ([1.0, math.nan, math.nan], {"patience": 2}, [3], 1.0),
        ([math.nan, math.nan], {"patience": 2}, [2], math.inf),
        ([1.0, 0.95, 0.94], {"patience": 2, "min_delta": 0.1}, [3], 1.0),
        ([1.0, MISSING, 1.1, MISSING, MISSING, 1.2], {"patience": 2}, [6], 1.0),
        ([0.1, 0.5, 0.4], {"patience": 1, "mode": "max"}, [3], 0.5),
        ([1.0, 1.0], {"patience": 1}, [2], 1.0),
    ],
    ids=["plateau", "improves-again", "nan-is-no-improvement", "nan-never-best",
         "min-delta", "unvalidated-epochs-do-not-count", "mode-max", "equal-is-no-improvement"],
)
def test_decision_table(values: list[float | None], kwargs: dict[str, Any], stops: list[int],
                        best: float) -> None:
    callback = EarlyStopping(**kwargs)
    assert drive(callback, values) == stops
    assert callback.best == best
    assert callback.stopped_epoch == (stops[-1] if stops else None)


values_strategy = st.lists(
    st.one_of(st.none(), st.just(math.nan), st.floats(-10, 10, allow_nan=False)), max_size=30)


@given(values=values_strategy, split=st.integers(0, 30), patience=st.integers(1, 4),
       mode=st.sampled_from(["min", "max"]), min_delta=st.sampled_from([0.0, 0.5]))
def test_resuming_from_the_state_at_any_epoch_decides_like_one_run(
    values: list[float | None], split: int, patience: int, mode: str, min_delta: float,
) -> None:
    arguments = {"patience": patience, "mode": mode, "min_delta": min_delta}
    whole = EarlyStopping(**arguments)
    whole_stops = drive(whole, values)

    split = min(split, len(values))
    first = EarlyStopping(**arguments)
    first_stops = drive(first, values[:split])
    second = EarlyStopping(**arguments)
    second.load_state_dict(first.state_dict())
    second_stops = drive(second, values[split:], first_epoch=split + 1)
    assert first_stops + second_stops == whole_stops
    assert second.state_dict() == whole.state_dict()


@given(values=values_strategy, patience=st.integers(1, 4))
def test_unvalidated_epochs_change_nothing_and_nan_is_never_best(
    values: list[float | None], patience: int,
) -> None:
    with_gaps = EarlyStopping(patience=patience)
    stops = drive(with_gaps, values)
    counted = [v for v in values if v is not None]
    without = EarlyStopping(patience=patience)
    counted_stops = drive(without, counted)
    counted_epochs = [i for i, v in enumerate(values, start=1) if v is not None]
    assert stops == [counted_epochs[e - 1] for e in counted_stops]
    assert not math.isnan(with_gaps.best)
    finite = [v for v in counted if not math.isnan(v)]
    assert with_gaps.best == (min(finite) if finite else math.inf)


@given(values=st.lists(st.one_of(st.none(), st.floats(-10, 10, allow_nan=False)), max_size=20),
       patience=st.integers(1, 3))
def test_mode_max_is_mode_min_on_negated_values(values: list[float | None], patience: int) -> None:
    negated = [None if v is None else -v for v in values]
    assert (drive(EarlyStopping(patience=patience, mode="max"), values)
            == drive(EarlyStopping(patience=patience, mode="min"), negated))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "avg"}, "mode"),
        ({"patience": 0}, "patience"),
        ({"patience": "3"}, "patience"),
        ({"patience": 2.0}, "patience"),
        ({"min_delta": -0.1}, "min_delta"),
        ({"min_delta": math.nan}, "min_delta"),
        ({"min_delta": "0.1"}, "min_delta"),
        ({"monitor": ""}, "monitor"),
    ],
    ids=["mode", "patience-0", "patience-str", "patience-float", "negative-delta", "nan-delta",
         "str-delta", "empty-monitor"],
)
def test_bad_arguments_are_validation_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        EarlyStopping(**kwargs)


def test_misspelt_monitor_is_an_error_on_the_first_validating_epoch() -> None:
    handler = make_handler()
    handler.add_callback(EarlyStopping(monitor="val_maee"))
    with pytest.raises(ConfigurationError,
                       match=r"val_maee.*available: epoch, loss, mae, val_loss"):
        handler.train(1, seed=0, progress_bar=False)


def test_a_training_key_must_exist_every_epoch() -> None:
    with pytest.raises(ConfigurationError, match="'accuracy'"):
        drive(EarlyStopping(monitor="accuracy"), [MISSING], monitor="accuracy")


def test_epochs_without_validation_do_not_count_in_training() -> None:
    handler = make_handler()
    callback = EarlyStopping(patience=3, min_delta=1e9)  # nothing after the first counts
    handler.add_callback(callback)
    handler.train(7, seed=0, validate_every=2, progress_bar=False)
    # validated epochs 2, 4, 6: the first sets the best, the next two do not improve
    assert (callback.best_epoch, callback.wait, callback.stopped_epoch) == (2, 2, None)
    assert handler.epoch == 7


def test_stop_ends_training_and_an_end_of_call_autosave_saves_that_epoch() -> None:
    handler = make_handler()
    handler.add_callback(EarlyStopping(patience=2, min_delta=1e9))
    handler.auto_save(-1, "ck", name="last_ep{epoch}")
    handler.train(10, seed=0, progress_bar=False)
    assert handler.epoch == 3
    assert checkpoint_files(Path("ck")) == ["last_ep3.pth"]
    saved = read_checkpoint("ck/last_ep3.pth").state["early_stopping:val_loss"]
    assert (saved["best_epoch"], saved["wait"], saved["stopped_epoch"]) == (1, 2, 3)


def test_counters_survive_load_and_the_resumed_run_stops_like_the_uninterrupted_one() -> None:
    settings: dict[str, Any] = {"seed": 3, "progress_bar": False}
    arguments = {"patience": 3, "min_delta": 0.02}
    full = make_handler()
    full_stopping = EarlyStopping(**arguments)
    full.add_callback(full_stopping)
    full.auto_save(1, "ck", name="ep{epoch:02d}")
    full.train(40, **settings)
    stop = full_stopping.stopped_epoch
    assert stop is not None and stop < 40, "the scenario must stop early"

    # resume from an epoch in the middle of a patience count
    candidates = [epoch for epoch in range(1, stop)
                  if read_checkpoint(f"ck/ep{epoch:02d}.pth")
                  .state["early_stopping:val_loss"]["wait"] > 0]
    assert candidates, "no checkpoint caught a running patience count"
    resume_epoch = candidates[-1]
    saved = read_checkpoint(f"ck/ep{resume_epoch:02d}.pth").state["early_stopping:val_loss"]

    stopping = EarlyStopping(**arguments)
    resumed = NNHandler.load(f"ck/ep{resume_epoch:02d}.pth", callbacks=[stopping])
    assert (stopping.best, stopping.wait) == (saved["best"], saved["wait"])
    attach_loaders(resumed)
    resumed.train(until_epoch=40, **settings)
    assert resumed.epoch == stop
    assert stopping.state_dict() == full_stopping.state_dict()
    assert resumed.val_losses == full.val_losses
    assert_same_tensors(resumed.module.state_dict(), full.module.state_dict())
    assert torch.equal(torch.tensor(resumed.train_losses), torch.tensor(full.train_losses))
