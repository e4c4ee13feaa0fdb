"""Auto-save by optimizer steps and by training time (``every_n_steps``, ``every_seconds``):
validation, the schedule's saves, names and mid-epoch logs, the time accounting across calls
and resumes, retention, emergency checkpoints and async writes with step triggers.

The time trigger runs on an injected clock (``callback.schedule.clock``) that a callback
advances by a fixed amount per batch, so every time decision here is deterministic.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from nnh_testing import attach_loaders, make_handler

from nnhandler import AutoSaveCallback, Callback, NNHandler, Retention
from nnhandler.callbacks.autosave_options import auto_save_config
from nnhandler.checkpoint import read_checkpoint
from nnhandler.checkpoint.index import INDEX_FILE
from nnhandler.cli import list_directory
from nnhandler.events import Event, EventDispatcher
from nnhandler.registered_callbacks import RegisteredCallbacks
from nnhandler.state import StateRegistry


class FakeClock:
    """A monotonic clock the test moves: ``advance`` seconds per training batch."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Ticking(Callback):
    """Moves ``clock`` forward by ``seconds`` at the start of every training batch."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    def on_train_batch_begin(self, **kwargs: Any) -> None:
        self.clock.now += self.seconds


class SavedSteps(Callback):
    """Records ``(global step, path name)`` of every checkpoint saved."""

    def __init__(self) -> None:
        self.saved: list[tuple[int, str]] = []

    def on_checkpoint_saved(self, handler: Any, path: Path, **kwargs: Any) -> None:
        self.saved.append((handler.global_step, Path(path).name))


def _saves(tmp_path: Path, epochs: int = 3, clock_step: float | None = None,
           **options: Any) -> list[tuple[int, str]]:
    handler = make_handler()
    interval = options.pop("interval", None)
    callback = handler.auto_save(interval, tmp_path / "ck", name="s{step:03d}", **options)
    if clock_step is not None:
        clock = FakeClock()
        callback.schedule.clock = clock
        handler.add_callback(Ticking(clock, clock_step))
    record = SavedSteps()
    handler.add_callback(record)
    handler.train(epochs, seed=0, progress_bar=False)
    return record.saved


# -- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "message"), [
    ({"every_n_steps": 0}, "every_n_steps"),
    ({"every_n_steps": -3}, "every_n_steps"),
    ({"every_n_steps": True}, "every_n_steps"),
    ({"every_n_steps": 2.0}, "every_n_steps"),
    ({"every_n_steps": "3"}, "every_n_steps"),
    ({"every_seconds": 0.5}, r"every_seconds=0\.5 is not allowed"),
    ({"every_seconds": 0}, r"every_seconds=0 is not allowed"),
    ({"every_seconds": True}, r"every_seconds=True is not a number"),
    ({"every_seconds": "1800"}, r"every_seconds='1800' is not a number"),
    ({"every_seconds": float("inf")}, r"every_seconds=inf is not allowed"),
    ({"every_seconds": float("nan")}, r"every_seconds=nan is not allowed"),
    ({"keep_every_n_steps": 0}, "keep_every_n_steps"),
    ({"every_n_steps": 5, "overwrite": True, "keep_every_n_steps": 10},
     "overwrite=True cannot be combined with keep_every_n_steps=10"),
], ids=["steps-zero", "steps-negative", "steps-bool", "steps-float", "steps-str",
        "seconds-half", "seconds-zero", "seconds-bool", "seconds-str", "seconds-inf",
        "seconds-nan", "keep-steps-zero", "keep-steps-with-overwrite"])
def test_bad_trigger_values_are_refused_by_both_doors(options: dict[str, Any],
                                                      message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AutoSaveCallback(None, "ck", **options)
    with pytest.raises(ValueError, match=message):
        make_handler().auto_save(None, "ck", **options)


@pytest.mark.parametrize(("options", "steps", "seconds"), [
    ({"every_n_steps": 1}, 1, None),
    ({"every_seconds": 1}, None, 1.0),
    ({"every_seconds": 1800.0}, None, 1800.0),
    ({"every_n_steps": 100, "every_seconds": 60}, 100, 60.0),
], ids=["steps", "int-seconds", "float-seconds", "both"])
def test_a_step_or_time_trigger_alone_is_a_valid_schedule(
        options: dict[str, Any], steps: int | None, seconds: float | None) -> None:
    callback = AutoSaveCallback(save_path="ck", **options)
    assert callback.config.interval is None and callback.config.enabled
    assert (callback.config.every_n_steps, callback.config.every_seconds) == (steps, seconds)
    assert "every_" in repr(callback)
    assert AutoSaveCallback.from_state(callback.state_key, callback.state_dict()).config == \
        callback.config


def test_retention_object_carries_keep_every_n_steps() -> None:
    flat = AutoSaveCallback(None, "ck", every_n_steps=2, keep_last=1, keep_every_n_steps=10)
    grouped = AutoSaveCallback(None, "ck", every_n_steps=2,
                               keep=Retention(last=1, every_n_steps=10))
    assert flat.config == grouped.config


# -- the hot path ------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "listens"), [
    ({"interval": 1}, False),
    ({"interval": 1, "save_on_signal": True, "keep_last": 2}, False),
    ({"interval": None, "every_n_steps": 4}, True),
    ({"interval": 1, "every_seconds": 60.0}, True),
    ({"interval": 1, "name": "ep{epoch}_b{batch}"}, True),
], ids=["interval", "interval-signal-retention", "steps", "seconds", "batch-in-name"])
def test_the_loop_fires_per_step_only_for_a_step_or_time_trigger(options: dict[str, Any],
                                                                  listens: bool) -> None:
    dispatcher = EventDispatcher([AutoSaveCallback(save_path="ck", **options)])
    assert dispatcher.has_listeners(Event.TRAIN_STEP_END) is listens
    assert dispatcher.has_listeners(Event.EPOCH_END)


def test_reconfiguring_turns_the_per_step_event_on_and_off() -> None:
    dispatcher = EventDispatcher()
    callbacks = RegisteredCallbacks(StateRegistry(), dispatcher, logging.getLogger("t"))
    callback = AutoSaveCallback(1, "ck")
    callbacks.add(callback)
    assert not dispatcher.has_listeners(Event.TRAIN_STEP_END)
    for options, listens in (({"every_n_steps": 3}, True), ({}, False)):
        old, new = callback.config, auto_save_config(1, "ck", "model_epoch{epoch:02d}", False,
                                                     options)
        callbacks.reconfigure(callback, lambda c=new: callback.reconfigure(c),
                              lambda c=old: callback.reconfigure(c))
        assert dispatcher.has_listeners(Event.TRAIN_STEP_END) is listens


# -- the schedule ------------------------------------------------------------------------------
# (interval, every_n_steps, every_seconds with one second per batch) -> the steps saved in 3
# epochs of 8 batches (steps 1..24): a step due at an epoch's last step is saved once, at the
# epoch's end
SCHEDULES = [
    ((1, None, None), [8, 16, 24]),
    ((None, 3, None), [3, 6, 9, 12, 15, 18, 21, 24]),
    ((None, 8, None), [8, 16, 24]),
    ((2, 4, None), [4, 8, 12, 16, 20, 24]),
    ((2, 5, None), [5, 10, 15, 16, 20]),
    ((-1, 10, None), [10, 20, 24]),
    ((None, None, 5.0), [5, 10, 15, 20]),
    ((None, None, 30.0), []),
    ((1, None, 5.0), [5, 8, 13, 16, 21, 24]),
    ((None, 1, None), list(range(1, 25))),
    ((1, 1, 1.0), list(range(1, 25))),
]


@pytest.mark.parametrize(("schedule", "expected"), SCHEDULES,
                         ids=[f"i{i}-n{n}-t{t}" for (i, n, t), _ in SCHEDULES])
def test_saves_per_run(tmp_path: Path, schedule: tuple[int | None, int | None, float | None],
                       expected: list[int]) -> None:
    interval, steps, seconds = schedule
    saved = _saves(tmp_path, interval=interval, every_n_steps=steps, every_seconds=seconds,
                   clock_step=1.0)
    assert [step for step, _ in saved] == expected
    assert len({name for _, name in saved}) == len(saved)  # never twice for one step


def test_time_saves_restart_the_clock_after_any_scheduled_save(tmp_path: Path) -> None:
    """With 1 s per batch, every_seconds=5 and an epoch save at steps 8, 16: the clock counts
    from each save, whichever trigger made it (5 s after step 8 is step 13, not 10)."""
    saved = _saves(tmp_path, interval=1, every_seconds=5.0, clock_step=1.0, epochs=2)
    assert [step for step, _ in saved] == [5, 8, 13, 16]


def test_with_gradient_accumulation_steps_count_optimizer_steps(tmp_path: Path) -> None:
    handler = make_handler()
    handler.auto_save(None, tmp_path / "ck", name="s{step:03d}_b{batch}", every_n_steps=2)
    handler.train(2, seed=0, progress_bar=False, gradient_accumulation_steps=3)
    # 8 batches in groups of 3, 3, 2: 3 steps an epoch; steps 2 and 4 inside, 6 at the end
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.pth")) == [
        "s002_b6.pth", "s004_b3.pth", "s006_b8.pth"]


# -- names and logs ----------------------------------------------------------------------------
def test_step_and_batch_in_names_and_the_running_logs(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    handler = make_handler()
    handler.auto_save(2, tmp_path / "ck", name="ep{epoch:02d}_b{batch:02d}_s{step:03d}_"
                      "v{val_loss:.3f}", every_n_steps=3)
    losses: list[tuple[float, int]] = []

    class Losses(Callback):
        def on_epoch_begin(self, **kwargs: Any) -> None:
            losses.clear()

        def on_train_batch_end(self, loss: torch.Tensor, batch: Any, **kwargs: Any) -> None:
            losses.append((float(loss), len(batch[1])))
            if len(losses) == 6 and not snapshot:  # step 6 (epoch 1) is saved next
                snapshot.extend(losses)

    snapshot: list[tuple[float, int]] = []
    handler.add_callback(Losses())
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        handler.train(2, seed=0, progress_bar=False)
    names = sorted(p.name for p in (tmp_path / "ck").glob("*.pth"))
    val = handler.val_losses[-1]
    assert names == ["ep01_b03_s003_vNA.pth", "ep01_b06_s006_vNA.pth",
                     "ep02_b01_s009_vNA.pth", "ep02_b04_s012_vNA.pth",
                     "ep02_b07_s015_vNA.pth", f"ep02_b08_s016_v{val:.3f}.pth"]
    assert not [r for r in caplog.records if "val_loss" in r.getMessage()]  # NA by nature
    mid = read_checkpoint(tmp_path / "ck" / "ep01_b06_s006_vNA.pth")
    logs = mid.meta["logs"]
    assert set(logs) == {"epoch", "batch", "step", "loss", "mae"}
    assert (logs["epoch"], logs["batch"], logs["step"]) == (1, 6, 6)
    expected = sum(loss * size for loss, size in snapshot) / sum(size for _, size in snapshot)
    assert logs["loss"] == pytest.approx(expected, rel=1e-12)
    assert mid.epoch == 0 and mid.meta["step"] == 6  # the epoch it continues after
    assert mid.state["position"]["partial"]["reason"] == "step"
    assert mid.state["position"]["partial"]["batches"] == 6
    end = read_checkpoint(tmp_path / "ck" / f"ep02_b08_s016_v{val:.3f}.pth")
    assert end.state["position"]["partial"] is None and "val_loss" in end.meta["logs"]


def test_a_key_no_epoch_has_is_still_explained_once(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    handler = make_handler()
    handler.auto_save(None, tmp_path / "ck", name="s{step}_{accuracy}", every_n_steps=2)
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        handler.train(2, seed=0, progress_bar=False)
    said = [r.getMessage() for r in caplog.records if "'accuracy'" in r.getMessage()]
    assert len(said) == 1 and "neither the training loop nor a callback put 'accuracy'" in said[0]
    assert (tmp_path / "ck" / "s2_NA.pth").exists()


# -- exact continuation ------------------------------------------------------------------------
def test_loading_a_step_checkpoint_continues_the_epoch_exactly(tmp_path: Path) -> None:
    reference = make_handler()
    reference.auto_save(None, tmp_path / "ck", name="s{step:03d}", every_n_steps=5)
    reference.train(3, seed=3, progress_bar=False, ema_decay=0.5)
    resumed = NNHandler.load(tmp_path / "ck" / "s010.pth", device="cpu")
    assert resumed.epoch == 1 and resumed.global_step == 10 and resumed.stopped_mid_epoch
    attach_loaders(resumed)
    resumed.train(until_epoch=3, progress_bar=False)
    for key, value in reference.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[key]), key
    assert resumed.history == reference.history
    assert resumed.global_step == reference.global_step == 24


# -- time accounting ---------------------------------------------------------------------------
def test_elapsed_time_counts_inside_train_calls_and_carries_across_a_resume(
        tmp_path: Path) -> None:
    handler = make_handler()
    callback = handler.auto_save(None, tmp_path / "ck", name="s{step:03d}", every_seconds=20.0)
    clock = FakeClock()
    callback.schedule.clock = clock
    handler.add_callback(Ticking(clock, 1.0))
    handler.train(1, seed=0, progress_bar=False)  # 8 s
    clock.now += 10_000.0  # between calls: not training time
    handler.train(1, progress_bar=False)  # 16 s
    assert callback.schedule.elapsed() == 16.0
    assert not list((tmp_path / "ck").glob("*.pth"))
    handler.save(tmp_path / "by_hand.pth")  # not a scheduled save: the clock runs on
    resumed = NNHandler.load(tmp_path / "by_hand.pth", device="cpu")
    saver = resumed.auto_save_callback
    assert saver is not None and saver.schedule.elapsed() == 16.0
    attach_loaders(resumed)
    clock2 = FakeClock()
    saver.schedule.clock = clock2
    resumed.add_callback(Ticking(clock2, 1.0))
    record = SavedSteps()
    resumed.add_callback(record)
    resumed.train(2, progress_bar=False)  # 4 s more reach 20 s
    assert [step for step, _ in record.saved] == [20]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # an epoch preempted twice: no change
def test_a_job_preempted_every_20_minutes_still_saves_every_30(tmp_path: Path) -> None:
    """60 s per batch, every_seconds=1800 (30 batches), a SIGTERM every 20 batches: each job's
    emergency checkpoint carries the elapsed time, so the time saves still come every 30
    batches of training: steps 30 and 60 (the signal at step 60 takes the time save's file)."""
    ck = tmp_path / "ck"
    scheduled: list[int] = []
    handler = make_handler(n=8 * 40)  # one epoch of 40 batches
    path = None
    for _job in range(4):
        if path is not None:
            handler = NNHandler.load(path, device="cpu")
            attach_loaders(handler, n=8 * 40)
        saver = handler.auto_save(None, ck, name="t{step:03d}", every_seconds=1800.0,
                                  save_on_signal=["SIGUSR1"])
        clock = FakeClock()
        saver.schedule.clock = clock
        handler.add_callback(Ticking(clock, 60.0))
        record = SavedSteps()
        handler.add_callback(record)
        handler.add_callback(SignalAt(handler.global_step + 20))
        handler.train(until_epoch=2, seed=0, progress_bar=False)
        scheduled += [step for step, name in record.saved if name.startswith("t")]
        if not handler.preempted:
            break
        path = handler.preemption.paths[0]  # type: ignore[union-attr]
    assert scheduled == [30, 60]


class SignalAt(Callback):
    """Sends this process SIGUSR1 after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, handler: Any, **kwargs: Any) -> None:
        if handler.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_a_signal_at_a_saved_step_takes_that_file(tmp_path: Path) -> None:
    handler = make_handler()
    handler.auto_save(None, tmp_path / "ck", name="s{step:03d}", every_n_steps=4,
                      save_on_signal=["SIGUSR1"])
    handler.add_callback(SignalAt(12))
    handler.train(3, seed=0, progress_bar=False)
    assert handler.preempted and handler.preemption is not None
    assert [p.name for p in handler.preemption.paths] == ["s012.pth"]
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.pth")) == [
        "s004.pth", "s008.pth", "s012.pth"]


# -- retention ---------------------------------------------------------------------------------
def test_step_checkpoints_take_part_in_retention(tmp_path: Path) -> None:
    handler = make_handler()
    ck = tmp_path / "ck"
    handler.auto_save(1, ck, name="s{step:03d}", every_n_steps=3, keep_last=2, keep_every=2,
                      keep_every_n_steps=12, keep_best=1, monitor="loss")
    handler.train(3, seed=0, progress_bar=False)
    index = json.loads((ck / INDEX_FILE).read_text())
    (section,) = index["callbacks"].values()
    kept = {entry["name"]: entry for entry in section["checkpoints"]}
    best = min(kept.values(), key=lambda e: e["value"])
    assert {"s012.pth", "s016.pth", "s024.pth", "s021.pth"} <= set(kept)
    assert "every 2 epochs" in kept["s016.pth"]["reasons"]  # epoch 2's end
    assert kept["s012.pth"].get("batch") == 4 and "every 12 steps" in kept["s012.pth"]["reasons"]
    assert "every 12 steps" in kept["s024.pth"]["reasons"] and "batch" not in kept["s024.pth"]
    assert any(reason.startswith("best loss=") for reason in best["reasons"])
    on_disk = sorted(p.name for p in ck.glob("*.pth"))
    assert on_disk == sorted(kept)
    rows = {row["name"]: row for row in list_directory(ck)}
    assert (rows["s012.pth"]["step"], rows["s012.pth"]["batch"]) == (12, 4)
    assert rows["s024.pth"]["batch"] is None


def test_keep_best_on_val_loss_passes_over_mid_epoch_files_silently(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    handler = make_handler()
    ck = tmp_path / "ck"
    handler.auto_save(1, ck, name="s{step:03d}", every_n_steps=3, keep_best=1,
                      monitor="val_loss")
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        handler.train(2, seed=0, progress_bar=False)
    assert not [r for r in caplog.records if "keep_best" in r.getMessage()]
    index = json.loads((ck / INDEX_FILE).read_text())
    (section,) = index["callbacks"].values()
    best = [e["name"] for e in section["checkpoints"]
            if any(r.startswith("best") for r in e["reasons"])]
    assert best[0] in {"s008.pth", "s016.pth"}


# -- async -------------------------------------------------------------------------------------
class Bulk(Callback):
    """A large state (8 MB) so that a background write outlasts a training step."""

    state_key = "bulk"

    def __init__(self) -> None:
        self.tensor = torch.randn(2 * 1024 * 1024)

    def state_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tensor = state["tensor"]


def test_async_step_saves_wait_for_the_write_in_flight_and_say_so_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    handler = make_handler()
    handler.add_callback(Bulk())
    callback = handler.auto_save(None, tmp_path / "ck", name="s{step:03d}", every_n_steps=1,
                                 async_save=True)
    in_flight: list[bool] = []

    class Watch(Callback):
        def on_train_step_end(self, **kwargs: Any) -> None:  # runs before the saver
            in_flight.append(callback.write_in_flight is not None)

    handler.add_callback(Watch())
    record = SavedSteps()
    handler.add_callback(record)
    with caplog.at_level(logging.INFO, logger="nnhandler"):
        handler.train(1, seed=0, progress_bar=False)
    assert sorted(name for _, name in record.saved) == [f"s{s:03d}.pth" for s in range(1, 9)]
    for step in range(1, 9):  # every one complete and readable: none skipped or torn
        assert read_checkpoint(tmp_path / "ck" / f"s{step:03d}.pth").meta["step"] == step
    waits = [r.getMessage() for r in caplog.records if "waited for the previous" in r.getMessage()]
    assert len(waits) == 1 and any(in_flight)
    count = int(waits[0].split("async_save: ")[1].split(" save(s)")[0])
    assert 1 <= count <= 7
