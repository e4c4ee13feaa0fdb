"""Preemption and mid-epoch resume in one process (CPU, seeded).

A run is interrupted by a real signal (``os.kill(os.getpid(), ...)`` from a callback) or an
exception; its emergency checkpoint is loaded into a fresh handler that finishes the run. The
result must equal an uninterrupted run bit for bit: parameters, optimizer, scheduler, EMA,
history (the interrupted epoch's logged loss and metrics included), progress, random streams,
and the scheduled auto-saves written on the way.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nnh_testing import assert_deep_equal, attach_loaders, make_handler, regression_dataset
from torch import nn
from torch.profiler import ProfilerActivity, profile

import nnhandler.checkpoint.background as background
import nnhandler.checkpointing as checkpointing_module
from nnhandler import (
    AutoSaveCallback,
    Callback,
    ConfigurationError,
    LearningRateMonitor,
    NNHandler,
)
from nnhandler.checkpoint import read_checkpoint, write_checkpoint
from nnhandler.checkpoint.integrity import verify_file
from nnhandler.cli import main as cli_main
from nnhandler.config import AutoSaveConfig
from nnhandler.preemption import emergency_name

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs POSIX signals")

EPOCHS = 3
SEED = 5
BATCHES = 8  # 64 samples, batch size 8
CK = Path("ck")
#: the state that must equal the uninterrupted run's
COMPARED = ("model", "optimizer", "scheduler", "ema", "history", "progress", "rng", "position",
            "lr_monitor")


@dataclass(frozen=True)
class Setup:
    accumulation: int = 1
    step_scheduler: bool = False
    ema: float = 0.0
    dropout: float = 0.3


def build(setup: Setup, **auto_save: Any) -> NNHandler:
    """A handler with dropout, a metric, validation, a scheduler and an LR monitor; an
    auto-save every epoch into ck/ with the given emergency options."""
    handler = make_handler(dropout=setup.dropout, scheduler=not setup.step_scheduler)
    if setup.step_scheduler:
        handler.set_scheduler(torch.optim.lr_scheduler.StepLR, interval="step", step_size=3,
                              gamma=0.8)
    handler.add_callback(LearningRateMonitor())
    auto_save.setdefault("interval", 1)
    handler.auto_save(save_path=CK, name="ep{epoch:03d}", **auto_save)
    return handler


def train_settings(setup: Setup) -> dict[str, Any]:
    return {"seed": SEED, "progress_bar": False, "ema_decay": setup.ema,
            "gradient_accumulation_steps": setup.accumulation}


def reference_run(setup: Setup, directory: Path = Path("reference")) -> dict[str, Any]:
    """The uninterrupted run's final state (its auto-saves in ``directory``)."""
    handler = make_handler(dropout=setup.dropout, scheduler=not setup.step_scheduler)
    if setup.step_scheduler:
        handler.set_scheduler(torch.optim.lr_scheduler.StepLR, interval="step", step_size=3,
                              gamma=0.8)
    handler.add_callback(LearningRateMonitor())
    handler.auto_save(1, directory, name="ep{epoch:03d}")
    handler.train(EPOCHS, **train_settings(setup))
    state = handler.state_dict()
    return {key: state[key] for key in COMPARED if key in state}


def resume(path: Path, **train_kwargs: Any) -> NNHandler:
    handler = NNHandler.load(path, device="cpu", callbacks=[LearningRateMonitor()])
    attach_loaders(handler)
    if handler.loss_fn is None:  # a test's failing loss could not be recorded
        handler.set_loss_fn(nn.MSELoss)
    handler.train(until_epoch=EPOCHS, seed=SEED, progress_bar=False, **train_kwargs)
    return handler


def assert_equals_reference(reference: dict[str, Any], handler: NNHandler,
                            reference_dir: Path = Path("reference")) -> None:
    state = handler.state_dict()
    for key in reference:
        assert_deep_equal(reference[key], state[key], key)
    for epoch in range(1, EPOCHS + 1):  # the auto-saves on the way, too
        name = f"ep{epoch:03d}.pth"
        expected = torch.load(reference_dir / name, weights_only=True)
        written = torch.load(CK / name, weights_only=True)
        for key in ("model", "optimizer", "scheduler", "history", "progress", "rng"):
            assert_deep_equal(expected["state"][key], written["state"][key], f"{name} {key}")
        assert expected["meta"]["logs"] == written["meta"]["logs"]


class SendSignal(Callback):
    """Sends this process ``number`` after batch ``batch`` of epoch ``epoch`` (once)."""

    def __init__(self, epoch: int, batch: int, number: int = signal.SIGUSR1,
                 times: int = 1) -> None:
        self.epoch, self.batch, self.number, self.times = epoch, batch, number, times
        self.sent = False

    def on_train_batch_end(self, epoch: int, batch_idx: int, **kwargs: Any) -> None:
        if (epoch, batch_idx) == (self.epoch, self.batch) and not self.sent:
            self.sent = True
            for _ in range(self.times):
                os.kill(os.getpid(), self.number)


# -- stopping on a signal and continuing exactly -------------------------------------------------
SIGNAL_CASES = {
    # id: (setup, signal after (epoch, batch index), batches done when training stops)
    "plain": (Setup(), (2, 3), 4),
    "inside-an-accumulation-group": (Setup(accumulation=3), (2, 3), 6),
    "per-step-scheduler-and-ema": (Setup(accumulation=2, step_scheduler=True, ema=0.9),
                                   (2, 2), 4),
    "first-batch-of-the-run": (Setup(accumulation=3), (1, 0), 3),
    "last-batch-of-an-epoch": (Setup(ema=0.8), (2, 7), BATCHES),
}


@pytest.mark.parametrize("case", list(SIGNAL_CASES), ids=list(SIGNAL_CASES))
def test_a_signal_stops_after_the_step_and_the_resumed_run_equals_the_uninterrupted_one(
    case: str
) -> None:
    setup, (epoch, batch), done = SIGNAL_CASES[case]
    reference = reference_run(setup)
    handler = build(setup, save_on_signal=True)
    handler.add_callback(SendSignal(epoch, batch))
    returned = handler.train(EPOCHS, **train_settings(setup))

    assert handler.preempted and handler.stopped_mid_epoch
    report = handler.preemption
    assert report is not None
    path = CK / emergency_name("preempted", epoch, done)
    assert (report.signal, report.epoch, report.batches, report.paths) == (
        "SIGUSR1", epoch, done, (path,))
    assert handler.epoch == epoch - 1 and len(handler.train_losses) == epoch - 1  # not appended
    assert returned == (handler.history[-1] if handler.history else {})
    assert sorted(p.name for p in CK.iterdir()) == [
        *(f"ep{e:03d}.pth" for e in range(1, epoch)), path.name]
    record = verify_file(path)
    assert record["epoch"] == epoch - 1
    partial = torch.load(path, weights_only=True)["state"]["position"]["partial"]
    assert (partial["epoch"], partial["batches"], partial["pending_grads"]) == (epoch, done, None)

    resumed = resume(path)
    assert not resumed.preempted and not resumed.stopped_mid_epoch
    assert_equals_reference(reference, resumed)


def test_the_stopped_handler_continues_in_process_and_epochs_counts_the_partial_epoch() -> None:
    setup = Setup(accumulation=2)
    reference = reference_run(setup)
    handler = build(setup, save_on_signal=True)
    handler.add_callback(SendSignal(2, 4))
    handler.train(EPOCHS, **train_settings(setup))
    assert handler.preempted and handler.epoch == 1
    handler.train(epochs=1)  # the partial epoch 2 is the first of the additional epochs
    assert handler.epoch == 2 and not handler.preempted and not handler.stopped_mid_epoch
    handler.train(until_epoch=EPOCHS)
    assert_equals_reference(reference, handler)


def test_a_signal_during_validation_stops_after_that_epoch() -> None:
    class SignalInValidation(Callback):
        def on_validation_begin(self, epoch: int, **kwargs: Any) -> None:
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    setup = Setup()
    reference = reference_run(setup)
    handler = build(setup, save_on_signal=True)
    handler.add_callback(SignalInValidation())
    handler.train(EPOCHS, **train_settings(setup))
    report = handler.preemption
    assert report is not None and (report.signal, report.epoch, report.batches) == (
        "SIGTERM", 3, 0)
    # the epoch's scheduled auto-save is the checkpoint to resume from: nothing written twice
    assert report.paths == (CK / "ep002.pth",)
    assert sorted(p.name for p in CK.iterdir()) == ["ep001.pth", "ep002.pth"]
    assert handler.epoch == 2 and not handler.stopped_mid_epoch
    assert_equals_reference(reference, resume(report.paths[0]))


def test_emergency_only_auto_save_writes_nothing_but_the_emergency_checkpoint() -> None:
    setup = Setup()
    reference = reference_run(setup)
    handler = build(setup, interval=None, save_on_signal=["SIGTERM"])
    handler.add_callback(SendSignal(3, 5, signal.SIGTERM))
    handler.train(EPOCHS, **train_settings(setup))
    assert sorted(p.name for p in CK.iterdir()) == ["preempted_ep003_b00006.pth"]
    resumed = NNHandler.load(CK / "preempted_ep003_b00006.pth", device="cpu",
                             callbacks=[LearningRateMonitor()])
    assert resumed.auto_save_callback is not None
    assert resumed.auto_save_callback.config.save_on_signal == ("SIGTERM",)
    attach_loaders(resumed)
    resumed.train(until_epoch=EPOCHS, seed=SEED, progress_bar=False)
    state = resumed.state_dict()
    for key in reference:
        assert_deep_equal(reference[key], state[key], key)


def test_a_signal_at_the_boundary_without_a_scheduled_save_writes_b00000() -> None:
    class SignalAtEpochEnd(Callback):
        def on_epoch_end(self, epoch: int, **kwargs: Any) -> None:
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGUSR1)

    handler = build(Setup(), interval=2, save_on_signal=True)
    handler.add_callback(SignalAtEpochEnd())
    handler.train(EPOCHS, **train_settings(Setup()))
    assert handler.preemption is not None
    assert handler.preemption.paths == (CK / "preempted_ep002_b00000.pth",)
    assert torch.load(CK / "preempted_ep002_b00000.pth",
                      weights_only=True)["state"]["position"] == {"partial": None}


def test_load_latest_and_resume_latest_continue_from_the_emergency_checkpoint() -> None:
    setup = Setup(accumulation=3)
    reference = reference_run(setup)
    handler = build(setup, save_on_signal=True)
    handler.add_callback(SendSignal(2, 1))
    handler.train(EPOCHS, **train_settings(setup))
    latest = NNHandler.load_latest(CK, device="cpu", callbacks=[LearningRateMonitor()])
    assert latest.stopped_mid_epoch and latest.epoch == 1

    # a restartable script: built from scratch (other initial weights), then resumed
    restarted = make_handler(dropout=setup.dropout, init_seed=99)
    restarted.add_callback(LearningRateMonitor())
    restarted.auto_save(1, CK, name="ep{epoch:03d}", save_on_signal=True)
    restarted.train(until_epoch=EPOCHS, resume="latest", **train_settings(setup))
    assert_equals_reference(reference, restarted)


def test_overwrite_keeps_only_the_newest_file_emergency_checkpoints_included() -> None:
    handler = make_handler()
    handler.auto_save(1, CK, name="latest", overwrite=True, save_on_signal=True)
    handler.add_callback(SendSignal(2, 2))
    handler.train(EPOCHS, seed=SEED, progress_bar=False)
    # the emergency file is this lineage's newest: the previous "latest" is gone
    assert sorted(p.name for p in CK.iterdir()) == ["preempted_ep002_b00003.pth"]
    resumed = NNHandler.load_latest(CK, device="cpu")
    attach_loaders(resumed)
    resumed.train(until_epoch=EPOCHS, seed=SEED, progress_bar=False)
    assert sorted(p.name for p in CK.iterdir()) == ["latest.pth"]
    assert verify_file(CK / "latest.pth")["epoch"] == EPOCHS


def test_interval_minus_one_does_not_save_a_mid_epoch_state_as_an_epoch() -> None:
    handler = build(Setup(), save_on_signal=True)
    last = AutoSaveCallback(-1, "last", name="ep{epoch:03d}")
    handler.add_callback(last)
    handler.add_callback(SendSignal(2, 3))
    handler.train(EPOCHS, **train_settings(Setup()))
    assert handler.preempted
    assert not Path("last").exists() or list(Path("last").iterdir()) == []


# -- signal handling -----------------------------------------------------------------------------
class HandlerProbe(Callback):
    """Records the SIGTERM handler in force while training runs."""

    def on_train_begin(self, **kwargs: Any) -> None:
        self.during = signal.getsignal(signal.SIGTERM)


@pytest.mark.parametrize("ending", ["normal", "preempted", "exception"])
def test_the_previous_signal_handlers_come_back_however_train_ends(ending: str) -> None:
    calls: list[int] = []

    def previous(number: int, frame: Any) -> None:
        calls.append(number)

    class Fail(Callback):
        def on_train_batch_end(self, epoch: int, batch_idx: int, **kwargs: Any) -> None:
            if (epoch, batch_idx) == (1, 2):
                raise RuntimeError("boom")

    old_usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, previous)
    try:
        handler = build(Setup(), save_on_signal=True)
        probe = HandlerProbe()
        handler.add_callback(probe)
        if ending == "preempted":
            handler.add_callback(SendSignal(1, 1, signal.SIGTERM))
        if ending == "exception":
            handler.add_callback(Fail())
            with pytest.raises(RuntimeError, match="boom"):
                handler.train(1, seed=0, progress_bar=False)
        else:
            handler.train(1, seed=0, progress_bar=False)
        assert probe.during not in (previous, signal.SIG_IGN)  # ours while training
        assert signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        assert calls == []  # not called while training: the stop was ours
        assert handler.preempted is (ending == "preempted")
    finally:
        signal.signal(signal.SIGUSR1, old_usr1)
        signal.signal(signal.SIGTERM, old_term)


def test_repeated_signals_are_counted_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    class SignalDuringTheSave(Callback):
        def on_checkpoint_saved(self, path: Path, **kwargs: Any) -> None:
            if path.name.startswith("preempted"):
                os.kill(os.getpid(), signal.SIGTERM)

    handler = build(Setup(), save_on_signal=True)
    handler.add_callback(SendSignal(1, 2, signal.SIGTERM, times=2))
    handler.add_callback(SignalDuringTheSave())
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        handler.train(EPOCHS, seed=0, progress_bar=False)
    assert handler.preempted
    assert sorted(p.name for p in CK.iterdir()) == ["preempted_ep001_b00003.pth"]
    verify_file(CK / "preempted_ep001_b00003.pth")
    assert any("2 further signal(s)" in r.getMessage() for r in caplog.records)


def test_save_on_signal_needs_the_main_thread() -> None:
    handler = build(Setup(), save_on_signal=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            handler.train(1, seed=0, progress_bar=False)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, name="trainer")
    thread.start()
    thread.join(timeout=60)
    assert len(errors) == 1 and isinstance(errors[0], ConfigurationError)
    assert "main thread" in str(errors[0]) and "'trainer'" in str(errors[0])
    assert handler.epoch == 0


def test_no_signal_handler_is_installed_when_the_feature_is_off() -> None:
    before = signal.getsignal(signal.SIGTERM)
    handler = build(Setup())
    probe = HandlerProbe()
    handler.add_callback(probe)
    handler.train(1, seed=0, progress_bar=False)
    assert probe.during is before


def test_two_emergency_savers_in_one_directory_are_refused() -> None:
    handler = build(Setup(), save_on_signal=True)
    handler.add_callback(AutoSaveCallback(5, CK, name="every5", save_on_exception=True))
    with pytest.raises(ConfigurationError, match="one auto-saver per directory"):
        handler.train(1, seed=0, progress_bar=False)


# -- resuming a partial epoch under other settings -----------------------------------------------
@pytest.mark.parametrize("change", ["batch_size", "accumulation", "metric"])
def test_a_partial_epoch_refuses_settings_that_would_change_it(change: str) -> None:
    handler = build(Setup(accumulation=2), save_on_signal=True)
    handler.add_callback(SendSignal(1, 3))
    handler.train(EPOCHS, **train_settings(Setup(accumulation=2)))
    resumed = NNHandler.load(CK / "preempted_ep001_b00004.pth", device="cpu",
                             callbacks=[LearningRateMonitor()])
    attach_loaders(resumed)
    arguments: dict[str, Any] = {"seed": SEED, "progress_bar": False}
    if change == "batch_size":
        resumed.set_train_loader(regression_dataset(64), batch_size=16)
        match = "batch_size=8.*batch_size=16"
    elif change == "accumulation":
        arguments["gradient_accumulation_steps"] = 1
        match = "gradient_accumulation_steps=2"
    else:
        resumed.add_metric("mse", nn.functional.mse_loss)
        match = r"metrics \['mae'\]"
    with pytest.raises(ConfigurationError, match=match):
        resumed.train(until_epoch=EPOCHS, **arguments)
    assert resumed.stopped_mid_epoch and resumed.epoch == 0


# -- asynchronous saving ---------------------------------------------------------------------------
def test_the_emergency_save_waits_for_the_background_write_in_flight(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = Setup()
    reference = reference_run(setup)
    events: list[str] = []
    original_background = background.write_envelope
    original_sync = checkpointing_module.write_checkpoint

    def slow_background(path: Path, *args: Any, **kwargs: Any) -> int:
        events.append(f"background start {path.name}")
        time.sleep(0.3)
        try:
            return original_background(path, *args, **kwargs)
        finally:
            events.append(f"background end {path.name}")

    def sync(path: Path, *args: Any, **kwargs: Any) -> int:
        events.append(f"sync {path.name}")
        return original_sync(path, *args, **kwargs)

    monkeypatch.setattr(background, "write_envelope", slow_background)
    monkeypatch.setattr(checkpointing_module, "write_checkpoint", sync)

    class InFlight(Callback):
        def on_train_batch_end(self, handler: NNHandler, epoch: int, batch_idx: int,
                               **kwargs: Any) -> None:
            if (epoch, batch_idx) == (2, 0):
                saver = handler.auto_save_callback
                assert saver is not None
                self.in_flight = saver.write_in_flight is not None
                os.kill(os.getpid(), signal.SIGUSR1)

    handler = build(setup, async_save=True, save_on_signal=True)
    probe = InFlight()
    handler.add_callback(probe)
    handler.train(EPOCHS, **train_settings(setup))
    assert probe.in_flight  # epoch 1's file was still being written when the signal came
    assert events == ["background start ep001.pth", "background end ep001.pth",
                      "sync preempted_ep002_b00001.pth"]
    verify_file(CK / "ep001.pth")
    resumed = resume(CK / "preempted_ep002_b00001.pth")
    assert_equals_reference(reference, resumed)


# -- an exception ---------------------------------------------------------------------------------
class Trigger(Callback):
    """Knows the batch being trained; raises ``error`` from ``hook`` at ``at``."""

    def __init__(self, at: tuple[int, int], hook: str | None = None,
                 error: BaseException | None = None) -> None:
        self.at, self.hook = at, hook
        self.error = error or RuntimeError("injected failure")
        self.current: tuple[int, int] = (0, -1)

    def on_train_batch_begin(self, epoch: int, batch_idx: int, **kwargs: Any) -> None:
        self.current = (epoch, batch_idx)

    def on_train_batch_end(self, epoch: int, batch_idx: int, **kwargs: Any) -> None:
        if self.hook == "batch_end" and (epoch, batch_idx) == self.at:
            raise self.error

    def on_validation_batch_end(self, epoch: int, batch_idx: int, **kwargs: Any) -> None:
        if self.hook == "validation" and (epoch, batch_idx) == self.at:
            raise self.error

    def on_epoch_end(self, epoch: int, **kwargs: Any) -> None:
        if self.hook == "epoch_end" and epoch == self.at[0]:
            raise self.error

    @property
    def armed(self) -> bool:
        return self.current == self.at


def failing_loss(trigger: Trigger) -> Any:
    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if trigger.armed:
            raise trigger.error
        return nn.functional.mse_loss(output, target)
    return loss


def arm(handler: NNHandler, trigger: Trigger, where: str) -> None:
    """Make ``trigger`` fire in ``where`` of its batch."""
    if where == "forward":
        handler.set_loss_fn(failing_loss(trigger))
    elif where == "backward":
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if trigger.armed:
                raise trigger.error
            return grad
        next(handler.module.parameters()).register_hook(hook)
    elif where == "optimizer":
        optimizer = handler.optimizer
        assert optimizer is not None
        step = optimizer.step

        def failing_step(*args: Any, **kwargs: Any) -> Any:
            if trigger.armed:
                raise trigger.error
            return step(*args, **kwargs)
        optimizer.step = failing_step  # type: ignore[method-assign]


EXCEPTION_CASES = {
    # id: (setup, trigger (epoch, batch), where, batches done in the file, pending gradients)
    "callback-inside-an-accumulation-group": (Setup(accumulation=3), (2, 4), "batch_end", 5,
                                              True),
    "validation": (Setup(accumulation=3), (2, 1), "validation", BATCHES, False),
    "forward-pass": (Setup(accumulation=3, dropout=0.0), (2, 4), "forward", 4, True),
    "backward-at-a-group-start": (Setup(dropout=0.0), (2, 3), "backward", 3, False),
    "keyboard-interrupt": (Setup(ema=0.5), (1, 6), "batch_end", 7, False),
}


@pytest.mark.parametrize("case", list(EXCEPTION_CASES), ids=list(EXCEPTION_CASES))
def test_an_exception_propagates_after_an_emergency_checkpoint_that_resumes_exactly(
    case: str
) -> None:
    setup, at, where, done, pending = EXCEPTION_CASES[case]
    reference = reference_run(setup)
    handler = build(setup, save_on_exception=True)
    error = KeyboardInterrupt() if case == "keyboard-interrupt" else RuntimeError("injected")
    trigger = Trigger(at, where, error)
    handler.add_callback(trigger)
    arm(handler, trigger, where)
    with pytest.raises(type(error)) as raised:
        handler.train(EPOCHS, **train_settings(setup))
    assert raised.value is error  # the original exception, unchanged
    path = CK / emergency_name("exception", at[0], done)
    assert any(str(path) in note for note in getattr(error, "__notes__", []))
    assert sorted(p.name for p in CK.iterdir()) == [
        *(f"ep{e:03d}.pth" for e in range(1, at[0])), path.name]
    partial = torch.load(path, weights_only=True)["state"]["position"]["partial"]
    assert (partial["epoch"], partial["batches"], partial["reason"]) == (at[0], done,
                                                                         "exception")
    assert (partial["pending_grads"] is not None) is pending
    resumed = resume(path)
    assert_equals_reference(reference, resumed)


REFUSALS = {
    "backward-inside-an-accumulation-group": (Setup(accumulation=3), (2, 4), "backward",
                                              "inside a gradient-accumulation group"),
    "optimizer-step": (Setup(), (2, 4), "optimizer", "interrupted the optimizer step"),
    "epoch-end-hook": (Setup(), (2, 0), "epoch_end", "outside an epoch's batches"),
}


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
def test_no_emergency_checkpoint_where_the_state_is_not_consistent(case: str) -> None:
    setup, at, where, reason = REFUSALS[case]
    handler = build(setup, save_on_exception=True)
    trigger = Trigger(at, where)
    handler.add_callback(trigger)
    arm(handler, trigger, where)
    with pytest.raises(RuntimeError) as raised:
        handler.train(EPOCHS, **train_settings(setup))
    assert raised.value is trigger.error
    notes = getattr(raised.value, "__notes__", [])
    assert any("no emergency checkpoint" in note and reason in note for note in notes), notes
    assert not any(p.name.startswith("exception") for p in CK.iterdir())


def test_a_failing_emergency_save_is_a_note_and_never_masks_the_exception() -> None:
    class Flaky:
        state_key = "flaky"
        armed = False

        def state_dict(self) -> dict[str, Any]:
            if self.armed:
                raise OSError("disk gone")
            return {}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    class FailAndBreakSaving(Trigger):
        def on_train_batch_end(self, epoch: int, batch_idx: int, **kwargs: Any) -> None:
            if (epoch, batch_idx) == self.at:
                flaky.armed = True
                raise self.error

    flaky = Flaky()
    handler = build(Setup(), save_on_exception=True)
    handler.register_state_provider(flaky)
    trigger = FailAndBreakSaving((2, 2))
    handler.add_callback(trigger)
    with pytest.raises(RuntimeError) as raised:
        handler.train(EPOCHS, seed=0, progress_bar=False)
    assert raised.value is trigger.error
    assert any("emergency checkpoint into ck failed" in note and "disk gone" in note
               for note in getattr(raised.value, "__notes__", []))
    assert sorted(p.name for p in CK.iterdir()) == ["ep001.pth"]


# -- configuration ---------------------------------------------------------------------------------
BAD_VALUES = {
    "a-bare-name": ("save_on_signal", "SIGTERM", "pass True or a list"),
    "a-number": ("save_on_signal", 15, "valid boolean"),
    "an-empty-list": ("save_on_signal", [], "names no signal"),
    "uncatchable": ("save_on_signal", ["SIGKILL"], "SIGKILL cannot be caught"),
    "unknown-name": ("save_on_signal", ["SIGTERN"], "unknown signal name 'SIGTERN'"),
    "unknown-number": ("save_on_signal", [999], "999 is not a signal number"),
    "a-float-in-the-list": ("save_on_signal", [15.0], "15.0 is neither"),
    "a-bool-in-the-list": ("save_on_signal", [True], "True is neither"),
    "exception-not-a-bool": ("save_on_exception", "yes", "valid boolean"),
    "exception-an-int": ("save_on_exception", 1, "valid boolean"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES), ids=list(BAD_VALUES))
def test_bad_emergency_options_are_validation_errors_naming_the_value(case: str) -> None:
    option, value, message = BAD_VALUES[case]
    with pytest.raises(ValueError, match=message):
        AutoSaveCallback(1, CK, **{option: value})
    with pytest.raises(ValueError, match=message):
        make_handler().auto_save(1, CK, **{option: value})


CATCHABLE = sorted(s for s in signal.Signals
                   if s.name not in ("SIGKILL", "SIGSTOP") and not s.name.startswith("SIGRT"))


@given(st.lists(st.sampled_from(CATCHABLE), min_size=1, max_size=6),
       st.lists(st.booleans(), min_size=6, max_size=6))
def test_signal_lists_normalise_to_unique_names_in_order(
    chosen: list[signal.Signals], as_number: list[bool]
) -> None:
    given_list: list[str | int] = [int(s) if number else s.name
                                   for s, number in zip(chosen, as_number, strict=False)]
    config = AutoSaveConfig(save_on_signal=given_list)
    expected = list(dict.fromkeys(s.name for s in chosen))
    assert list(config.save_on_signal) == expected  # type: ignore[arg-type]
    assert [s.name for s in config.signals] == expected
    assert AutoSaveConfig(**config.to_state()) == config  # survives a checkpoint


@settings(max_examples=12)
@given(accumulation=st.integers(1, 4), batch=st.integers(0, BATCHES - 1))
def test_a_signal_stops_training_at_the_first_optimizer_step_after_it(
    accumulation: int, batch: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    os.chdir(tmp_path_factory.mktemp("stop"))
    handler = build(Setup(accumulation=accumulation), interval=None, save_on_signal=True)
    handler.add_callback(SendSignal(1, batch))
    handler.train(1, seed=0, progress_bar=False,
                  gradient_accumulation_steps=accumulation)
    groups_end = [min(end, BATCHES) for end in range(accumulation, BATCHES + accumulation,
                                                      accumulation)]
    expected = next(end for end in groups_end if end > batch)
    assert handler.preemption is not None
    assert (handler.preemption.epoch, handler.preemption.batches) == (1, expected)
    assert handler.global_step == len([end for end in groups_end if end <= expected])


def test_a_checkpoint_without_a_position_is_an_epoch_boundary(
    caplog: pytest.LogCaptureFixture
) -> None:
    """Files written before positions were recorded load silently as an epoch's end, and
    restoring one into a handler that stopped mid-epoch drops that partial epoch."""
    handler = build(Setup(), save_on_signal=True)
    handler.add_callback(SendSignal(2, 3))
    handler.train(EPOCHS, **train_settings(Setup()))
    assert handler.stopped_mid_epoch
    old = read_checkpoint(CK / "ep001.pth")
    state = {k: v for k, v in old.state.items() if k != "position"}
    write_checkpoint(Path("old.pth"), state, old.meta)
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        handler.resume_from("old.pth")
    assert not handler.stopped_mid_epoch and handler.epoch == 1
    assert not any("position" in r.getMessage() for r in caplog.records)


def test_a_signal_after_the_last_epoch_is_reported_and_changes_nothing(
    caplog: pytest.LogCaptureFixture
) -> None:
    class SignalAtTrainEnd(Callback):
        def on_train_end(self, **kwargs: Any) -> None:
            os.kill(os.getpid(), signal.SIGTERM)

    handler = build(Setup(), save_on_signal=True)
    handler.add_callback(SignalAtTrainEnd())
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        handler.train(2, seed=0, progress_bar=False)
    assert not handler.preempted and handler.epoch == 2
    assert sorted(p.name for p in CK.iterdir()) == ["ep001.pth", "ep002.pth"]
    assert any("SIGTERM arrived after the last point" in r.getMessage()
               for r in caplog.records)


def test_watching_for_signals_and_exceptions_adds_no_tensor_work_to_a_single_process() -> None:
    """The lean hot path: in one process, save_on_signal and save_on_exception add no torch
    operation (no allocation, no collective) to training; only a flag is read per step."""
    def aten_calls(**auto_save: Any) -> Counter[str]:
        handler = make_handler(validation=False)
        handler.auto_save(None, Path(str(len(auto_save))), **auto_save)
        handler.train(1, seed=0, progress_bar=False)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as recorded:
            handler.train(1, progress_bar=False)
        return Counter(e.name for e in recorded.events() if e.name.startswith("aten::"))

    plain = aten_calls()
    watched = aten_calls(save_on_signal=True, save_on_exception=True)
    assert watched == plain


# -- emergency checkpoints and retention ----------------------------------------------------------
def test_an_emergency_checkpoint_is_never_best_or_every_and_ages_out_as_the_run_goes_on() -> None:
    """Mid-epoch state is not an epoch's result: an emergency file carries the last complete
    epoch's logs (here the best loss so far, an epoch that keep_every keeps) yet it is kept only
    as the newest file, and the resumed run's next scheduled save removes it."""
    setup = Setup()
    handler = build(setup, save_on_signal=True, keep_best=1, monitor="loss", keep_every=1)
    handler.add_callback(SendSignal(2, 3))
    handler.train(EPOCHS, **train_settings(setup))
    emergency = CK / emergency_name("preempted", 2, 4)
    index = json.loads((CK / "nnhandler-index.json").read_text())
    (section,) = index["callbacks"].values()
    reasons = {entry["name"]: entry["reasons"] for entry in section["checkpoints"]}
    assert reasons[emergency.name] == ["newest"]
    assert "every 1 epochs" in reasons["ep001.pth"]

    resume(emergency)
    assert not emergency.exists()
    assert sorted(p.name for p in CK.glob("*.pth")) == [f"ep{e:03d}.pth" for e in (1, 2, 3)]


def test_inspect_shows_where_an_emergency_checkpoint_continues(
    capsys: pytest.CaptureFixture[str]
) -> None:
    handler = build(Setup(accumulation=3), save_on_signal=True)
    handler.add_callback(SendSignal(2, 3))
    handler.train(EPOCHS, **train_settings(Setup(accumulation=3)))
    emergency = CK / emergency_name("preempted", 2, 6)
    capsys.readouterr()  # the training logs
    assert cli_main(["inspect", str(emergency), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mid_epoch"] == {"epoch": 2, "batches_done": 6, "reason": "signal",
                                 "pending_gradients": False}
    assert cli_main(["inspect", str(emergency)]) == 0
    assert "epoch 2 after 6 batches (signal)" in capsys.readouterr().out
    assert cli_main(["inspect", str(CK / "ep001.pth"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mid_epoch"] is None
