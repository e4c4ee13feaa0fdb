"""The auto-save rules of DESIGN §1, one test (or table row) per rule.

| interval None/0: off | N > 0: absolute multiples of N, across resumes | -1: last epoch of each
call, also when it stops early | name filled from epoch-end logs | save_path created | overwrite:
new file durable before the old one goes, bookkeeping restored by load | several callbacks |
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from nnh_testing import attach_loaders, checkpoint_files, make_handler

from nnhandler import (
    AutoSaveCallback,
    Callback,
    DuplicateStateKeyError,
    NNHandler,
    read_checkpoint,
)
from nnhandler.components.history import Progress
from nnhandler.distributed import DistributedContext

N = 16  # tiny dataset: 2 training batches of 8, one validation batch


def new_handler() -> NNHandler:
    return make_handler(n=N, batch_size=8)


def train(handler: NNHandler, epochs: int, **kwargs: Any) -> dict[str, Any]:
    return handler.train(epochs=epochs, progress_bar=False, **kwargs)


def load(path: str | Path, **kwargs: Any) -> NNHandler:
    handler = NNHandler.load(path, device="cpu", **kwargs)
    attach_loaders(handler, n=N)
    return handler


def saved_epochs(directory: Path, prefix: str = "ep") -> list[int]:
    """Epochs of ``{prefix}{epoch:03d}.pth`` files in ``directory`` (none if it is missing)."""
    if not directory.exists():
        return []
    return sorted(int(name[len(prefix):-4]) for name in checkpoint_files(directory)
                  if name.startswith(prefix))


def hidden_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


class SaveRecorder(Callback):
    """Records every ``on_checkpoint_saved`` and which ``.pth`` files existed at that moment."""

    def __init__(
        self, directory: Path | None = None, saves: list[tuple[Path, int, list[str]]] | None = None
    ) -> None:
        self.directory = directory
        self.saves: list[tuple[Path, int, list[str]]] = [] if saves is None else saves

    def on_checkpoint_saved(self, path: Path, epoch: int, **kwargs: Any) -> None:
        path = Path(path)
        if self.directory is not None and path.parent.resolve() != self.directory.resolve():
            return
        self.saves.append((path, epoch, checkpoint_files(path.parent)))

    @property
    def epochs(self) -> list[int]:
        return [epoch for _, epoch, _ in self.saves]


class LogsRecorder(Callback):
    def __init__(self) -> None:
        self.logs: dict[int, dict[str, Any]] = {}

    def on_epoch_end(self, epoch: int, logs: dict[str, Any], **kwargs: Any) -> None:
        self.logs[epoch] = dict(logs)


class StopAtEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, handler: NNHandler, epoch: int, **kwargs: Any) -> None:
        if epoch == self.epoch:
            handler.request_stop()


class StopDuringBatch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, handler: NNHandler, epoch: int, **kwargs: Any) -> None:
        if epoch == self.epoch:
            handler.request_stop()


class AddMarker(Callback):
    def on_epoch_end(self, epoch: int, logs: dict[str, Any], **kwargs: Any) -> None:
        logs["marker"] = f"m{epoch * 11}"
        logs["phase"] = "warm" if epoch < 2 else "main"


# ============================================================================================
# Rule 1: when a save happens
# ============================================================================================
@pytest.mark.parametrize("interval", [None, 0], ids=["None", "0"])
def test_interval_none_or_zero_writes_nothing(interval: int | None) -> None:
    handler = new_handler()
    recorder = SaveRecorder()
    handler.add_callback(recorder)
    handler.auto_save(interval, "ck", name="ep{epoch:03d}")
    train(handler, 4)
    assert recorder.saves == []
    assert not Path("ck").exists()
    assert checkpoint_files(Path(".")) == []


@pytest.mark.parametrize(
    ("interval", "first", "resume", "second", "expected"),
    [
        (1, 3, "continue", 2, [1, 2, 3, 4, 5]),
        (2, 3, "continue", 4, [2, 4, 6]),
        (3, 4, "continue", 5, [3, 6, 9]),
        (5, 3, "continue", 9, [5, 10]),
        (2, 3, "load-manual", 4, [2, 4, 6]),
        (3, 4, "load-manual", 5, [3, 6, 9]),
        (5, 3, "load-manual", 9, [5, 10]),
        # resuming from the latest auto-save (epoch 2 / 3) repeats the epochs after it
        (2, 3, "load-latest", 4, [2, 4, 6]),
        (3, 4, "load-latest", 5, [3, 6]),
    ],
    ids=["1-continue", "2-continue", "3-continue", "5-continue", "2-load-manual",
         "3-load-manual", "5-load-manual", "2-load-latest", "3-load-latest"],
)
def test_interval_n_saves_at_absolute_multiples_across_resumes(
    interval: int, first: int, resume: str, second: int, expected: list[int]
) -> None:
    handler = new_handler()
    handler.auto_save(interval, "ck", name="ep{epoch:03d}")
    train(handler, first)
    assert saved_epochs(Path("ck")) == [e for e in range(1, first + 1) if e % interval == 0]
    if resume == "load-manual":
        handler = load(handler.save(Path("manual") / "end.pth"))
    elif resume == "load-latest":
        handler = load(Path("ck") / checkpoint_files(Path("ck"))[-1])
    recorder = SaveRecorder(Path("ck"))
    handler.add_callback(recorder)
    start = handler.epoch
    train(handler, second)  # no new auto_save call: the configuration came back with load
    assert saved_epochs(Path("ck")) == expected
    assert recorder.epochs == [e for e in range(start + 1, start + second + 1)
                               if e % interval == 0]


def test_interval_n_counts_absolute_epochs_with_until_epoch() -> None:
    handler = new_handler()
    handler.auto_save(4, "ck", name="ep{epoch:03d}")
    handler.train(until_epoch=3, progress_bar=False)
    handler.train(until_epoch=3, progress_bar=False)  # already there: nothing
    handler.train(until_epoch=9, progress_bar=False)
    assert saved_epochs(Path("ck")) == [4, 8]


def test_interval_minus_one_saves_after_last_epoch_of_each_call() -> None:
    handler = new_handler()
    recorder = SaveRecorder(Path("ck"))
    handler.add_callback(recorder)
    handler.auto_save(-1, "ck", name="ep{epoch:03d}")
    for epochs in (3, 2, 0, 1):
        train(handler, epochs)
    assert recorder.epochs == [3, 5, 6]  # one save per non-empty call, none for the empty one
    assert saved_epochs(Path("ck")) == [3, 5, 6]
    resumed = load(handler.save(Path("manual") / "end.pth"))
    train(resumed, 2)
    assert saved_epochs(Path("ck")) == [3, 5, 6, 8]


@pytest.mark.parametrize(
    ("stopper", "epochs", "expected"),
    [
        (StopAtEpoch(2), 5, [2]),
        (StopAtEpoch(1), 5, [1]),
        (StopAtEpoch(5), 5, [5]),
        (StopDuringBatch(3), 5, [3]),
    ],
    ids=["on-epoch-end-2", "on-epoch-end-1", "on-last-planned", "on-train-batch-end"],
)
def test_interval_minus_one_saves_final_epoch_actually_run(
    stopper: Callback, epochs: int, expected: list[int]
) -> None:
    handler = new_handler()
    recorder = SaveRecorder(Path("ck"))
    handler.auto_save(-1, "ck", name="ep{epoch:03d}")
    handler.add_callback(stopper)  # added after the auto-save: writers still run last
    handler.add_callback(recorder)
    train(handler, epochs)
    assert handler.epoch == expected[-1]
    assert recorder.epochs == expected  # exactly once
    assert saved_epochs(Path("ck")) == expected
    handler.remove_callback(stopper)
    train(handler, 2)
    assert saved_epochs(Path("ck")) == [*expected, expected[-1] + 2]


def test_interval_n_with_early_stop_keeps_the_multiples_rule() -> None:
    handler = new_handler()
    handler.auto_save(2, "ck", name="ep{epoch:03d}")
    handler.add_callback(StopAtEpoch(3))
    train(handler, 6)
    assert handler.epoch == 3
    assert saved_epochs(Path("ck")) == [2]


def test_resume_from_a_checkpoint_written_before_any_training() -> None:
    """A save at epoch 0 (before the first ``train``) holds no run yet; resuming from it trains
    (as a fresh run) and keeps the auto-save rules."""
    handler = new_handler()
    handler.auto_save(2, "ck", name="ep{epoch:03d}")
    resumed = load(handler.save(Path("manual") / "initial.pth"))
    train(resumed, 4)
    assert saved_epochs(Path("ck")) == [2, 4]


# ============================================================================================
# Rule 3: the name template
# ============================================================================================
def test_name_is_filled_from_epoch_end_logs_with_val_loss_and_metrics() -> None:
    template = "ckpt_ep{epoch:03d}_valloss{val_loss:.4f}_mae{mae:.3f}_vmae{val_mae:.3f}"
    handler = new_handler()
    logs = LogsRecorder()
    handler.add_callback(logs)
    handler.auto_save(1, "ck", name=template)
    train(handler, 2)
    assert sorted(logs.logs) == [1, 2]
    expected = []
    for epoch, epoch_logs in logs.logs.items():
        assert {"epoch", "loss", "mae", "val_loss", "val_mae"} <= set(epoch_logs)
        name = (f"ckpt_ep{epoch:03d}_valloss{epoch_logs['val_loss']:.4f}"
                f"_mae{epoch_logs['mae']:.3f}_vmae{epoch_logs['val_mae']:.3f}.pth")
        expected.append(name)
        checkpoint = read_checkpoint(Path("ck") / name)
        assert checkpoint.epoch == epoch
        assert checkpoint.meta["logs"]["val_loss"] == epoch_logs["val_loss"]
        assert checkpoint.meta["logs"]["mae"] == epoch_logs["mae"]
        assert checkpoint.meta["logs"]["epoch"] == epoch
    assert checkpoint_files(Path("ck")) == sorted(expected)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("final.pth", ["final.pth"]), ("final", ["final.pth"]),
     ("ep{epoch:03d}.pth", ["ep003.pth"])],
    ids=["literal-pth", "no-suffix", "field-then-pth"],
)
def test_pth_is_appended_only_once(name: str, expected: list[str]) -> None:
    handler = new_handler()
    handler.auto_save(-1, "ck", name=name)
    train(handler, 3)
    assert checkpoint_files(Path("ck")) == expected


@pytest.mark.parametrize("marker_first", [True, False], ids=["marker-added-first",
                                                            "marker-added-after-autosave"])
def test_keys_added_to_logs_by_callbacks_are_usable(marker_first: bool) -> None:
    handler = new_handler()
    if marker_first:
        handler.add_callback(AddMarker())
    handler.auto_save(1, "ck", name="ep{epoch}_{marker}_{phase}")
    if not marker_first:
        handler.add_callback(AddMarker())
    train(handler, 2)
    assert checkpoint_files(Path("ck")) == ["ep1_m11_warm.pth", "ep2_m22_main.pth"]
    assert read_checkpoint(Path("ck") / "ep2_m22_main.pth").meta["logs"]["marker"] == "m22"


@pytest.mark.parametrize(
    ("name", "expected", "missing"),
    [
        # validation only every 2nd epoch: epoch 1 has no val_loss
        ("ep{epoch:02d}_v{val_loss:.4f}", "ep01_vNA.pth", "val_loss"),
        ("ep{epoch:02d}_{typo_key}", "ep01_NA.pth", "typo_key"),
    ],
    ids=["val-loss-on-non-validating-epoch", "unknown-key"],
)
def test_key_missing_at_save_time_saves_under_na_and_warns(
    caplog: pytest.LogCaptureFixture, name: str, expected: str, missing: str
) -> None:
    handler = new_handler()
    handler.auto_save(1, "ck", name=name)
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        train(handler, 1, validate_every=2)
    assert checkpoint_files(Path("ck")) == [expected]
    assert read_checkpoint(Path("ck") / expected).epoch == 1
    warnings = [r for r in caplog.records
                if r.levelno == logging.WARNING and r.name.startswith("nnhandler")]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert missing in message and "missing" in message and expected in message


def test_val_loss_template_uses_real_value_on_validating_epochs() -> None:
    handler = new_handler()
    logs = LogsRecorder()
    handler.add_callback(logs)
    handler.auto_save(1, "ck", name="ep{epoch:02d}_v{val_loss:.4f}")
    train(handler, 2, validate_every=2)
    assert checkpoint_files(Path("ck")) == sorted(
        ["ep01_vNA.pth", f"ep02_v{logs.logs[2]['val_loss']:.4f}.pth"]
    )


# ============================================================================================
# Rule 4: save_path
# ============================================================================================
def test_save_path_and_its_parents_are_created() -> None:
    directory = Path("runs") / "a" / "b" / "ck"
    handler = new_handler()
    handler.auto_save(1, directory, name="ep{epoch:03d}")
    assert not Path("runs").exists()  # created at the first save, not at configuration
    train(handler, 1)
    assert checkpoint_files(directory) == ["ep001.pth"]


def test_existing_file_of_this_run_with_the_same_name_is_replaced_atomically(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(Another run's file of that name is never replaced: see test_crafted_removals.py.)"""
    directory = Path("ck")
    handler = new_handler()
    handler.auto_save(1, directory, name="latest")
    train(handler, 1)
    replaced: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def recording_replace(src: Any, dst: Any) -> None:
        replaced.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    train(handler, 1)
    assert read_checkpoint(directory / "latest.pth").epoch == 2
    assert checkpoint_files(directory) == ["latest.pth"]
    # one rename of a temp file beside the target over the target, no remove-then-write
    ((source, target),) = replaced
    assert target == directory / "latest.pth"
    assert source.parent == directory and source.name.startswith(".")
    assert hidden_files(directory) == []


def test_failed_write_leaves_existing_file_with_the_same_name_intact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory = Path("ck")
    directory.mkdir()
    (directory / "latest.pth").write_bytes(b"previous")

    def failing_replace(src: Any, dst: Any) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", failing_replace)
    handler = new_handler()
    handler.auto_save(1, directory, name="latest", on_save_error="raise")
    with pytest.raises(OSError, match="simulated"):
        train(handler, 1)
    assert (directory / "latest.pth").read_bytes() == b"previous"
    assert hidden_files(directory) == []


# ============================================================================================
# Rule 5: overwrite
# ============================================================================================
def test_overwrite_false_keeps_one_file_per_save() -> None:
    handler = new_handler()
    handler.auto_save(1, "ck", name="ep{epoch:03d}", overwrite=False)
    train(handler, 3)
    assert saved_epochs(Path("ck")) == [1, 2, 3]


def test_overwrite_true_keeps_only_latest_and_writes_new_before_removing_old() -> None:
    handler = new_handler()
    recorder = SaveRecorder(Path("ck"))
    handler.add_callback(recorder)
    handler.auto_save(1, "ck", name="ep{epoch:03d}", overwrite=True)
    train(handler, 4)
    assert checkpoint_files(Path("ck")) == ["ep004.pth"]
    assert read_checkpoint(Path("ck") / "ep004.pth").epoch == 4
    # on_checkpoint_saved fires once the new file is durable: the previous one still exists then
    assert [files for _, _, files in recorder.saves] == [
        ["ep001.pth"],
        ["ep001.pth", "ep002.pth"],
        ["ep002.pth", "ep003.pth"],
        ["ep003.pth", "ep004.pth"],
    ]


def test_overwrite_true_failed_second_save_keeps_the_first_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0
    real_replace = os.replace

    def replace_failing_on_second_save(src: Any, dst: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("crash while writing (simulated)")
        real_replace(src, dst)

    handler = new_handler()
    callback = handler.auto_save(1, "ck", name="ep{epoch:03d}", overwrite=True,
                                 on_save_error="raise")
    monkeypatch.setattr(os, "replace", replace_failing_on_second_save)
    with pytest.raises(OSError, match="simulated"):
        train(handler, 3)
    assert checkpoint_files(Path("ck")) == ["ep001.pth"]
    assert read_checkpoint(Path("ck") / "ep001.pth").epoch == 1
    assert hidden_files(Path("ck")) == []
    # bookkeeping rolled back: the file on disk is still this lineage's latest save
    assert callback.last_saved_path == str(Path("ck") / "ep001.pth")
    assert callback.last_saved_epoch == 1
    assert callback.save_count == 1
    monkeypatch.setattr(os, "replace", real_replace)
    train(handler, 1)  # epoch 3: the next good save replaces the first file
    assert checkpoint_files(Path("ck")) == ["ep003.pth"]


def test_overwrite_true_with_fixed_name_replaces_the_single_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unlinked: list[Path] = []
    real_unlink = Path.unlink

    def recording_unlink(self: Path, missing_ok: bool = False) -> None:
        if self.suffix == ".pth":
            unlinked.append(self)
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", recording_unlink)
    handler = new_handler()
    recorder = SaveRecorder(Path("ck"))
    handler.add_callback(recorder)
    handler.auto_save(1, "ck", name="latest", overwrite=True)
    train(handler, 3)
    assert checkpoint_files(Path("ck")) == ["latest.pth"]
    assert read_checkpoint(Path("ck") / "latest.pth").epoch == 3
    assert [files for _, _, files in recorder.saves] == [["latest.pth"]] * 3
    assert unlinked == []  # replaced by rename, never deleted


def test_load_of_overwrite_checkpoint_restores_config_and_lineage() -> None:
    original = new_handler()
    original.auto_save(2, "ck", name="ep{epoch:03d}", overwrite=True)
    Path("ck").mkdir()
    (Path("ck") / "unrelated.pth").write_bytes(b"someone else's file")
    train(original, 4)
    assert checkpoint_files(Path("ck")) == ["ep004.pth", "unrelated.pth"]

    resumed = load(Path("ck") / "ep004.pth")
    restored = resumed.auto_save_callback
    assert restored is not None and original.auto_save_callback is not None
    assert restored.config == original.auto_save_callback.config
    assert restored.state_key == original.auto_save_callback.state_key
    assert restored.last_saved_path == str(Path("ck") / "ep004.pth")
    assert restored.last_saved_epoch == 4
    assert [c for c in resumed.callbacks if isinstance(c, AutoSaveCallback)] == [restored]

    train(resumed, 3)  # epochs 5..7, no auto_save call: saves at 6, removes its own ep004
    assert checkpoint_files(Path("ck")) == ["ep006.pth", "unrelated.pth"]
    assert restored.last_saved_path == str(Path("ck") / "ep006.pth")


# ============================================================================================
# Rule 6: several auto-save callbacks
# ============================================================================================
def test_two_autosave_callbacks_both_write() -> None:
    handler = new_handler()
    latest = AutoSaveCallback(1, "ck", name="latest", overwrite=True)
    every_two = AutoSaveCallback(2, "ck", name="ep{epoch:03d}")
    handler.add_callback(latest)
    handler.add_callback(every_two)
    assert latest.state_key != every_two.state_key
    train(handler, 5)
    assert checkpoint_files(Path("ck")) == ["ep002.pth", "ep004.pth", "latest.pth"]
    assert read_checkpoint(Path("ck") / "latest.pth").epoch == 5
    state = read_checkpoint(Path("ck") / "latest.pth").state
    assert latest.state_key in state and every_two.state_key in state

    resumed = load(Path("ck") / "latest.pth")  # both come back and keep writing
    train(resumed, 2)
    assert checkpoint_files(Path("ck")) == ["ep002.pth", "ep004.pth", "ep006.pth", "latest.pth"]
    assert read_checkpoint(Path("ck") / "latest.pth").epoch == 7


def test_auto_save_and_a_hand_attached_callback_both_write() -> None:
    handler = new_handler()
    own = handler.auto_save(2, "ck", name="ep{epoch:03d}")
    handler.add_callback(AutoSaveCallback(1, "ck", name="latest", overwrite=True))
    train(handler, 2)
    assert checkpoint_files(Path("ck")) == ["ep002.pth", "latest.pth"]
    assert handler.auto_save_callback is own


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"save_path": "ck", "name": "x"}, {"save_path": "ck", "name": "x"}),
        ({"save_path": "ck", "name": "x"}, {"save_path": "./ck", "name": "x"}),
        ({"save_path": "ck", "name": "x"}, {"save_path": "ck/", "name": "x"}),
        ({"save_path": "ck", "name": "x"}, {"save_path": "ck/../ck", "name": "x"}),
    ],
    ids=["identical", "dot-prefix", "trailing-slash", "normalised"],
)
def test_true_duplicate_autosave_is_an_error_naming_both(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    handler = new_handler()
    kept = AutoSaveCallback(1, **first)
    handler.add_callback(kept)
    duplicate = AutoSaveCallback(5, overwrite=True, **second)
    with pytest.raises(DuplicateStateKeyError, match="autosave:ck/x") as caught:
        handler.add_callback(duplicate)
    assert str(caught.value).count("AutoSaveCallback") == 2
    assert [c for c in handler.callbacks if isinstance(c, AutoSaveCallback)] == [kept]


def test_auto_save_clashing_with_attached_callback_is_an_error() -> None:
    handler = new_handler()
    handler.add_callback(AutoSaveCallback(1, "ck", name="x"))
    with pytest.raises(DuplicateStateKeyError, match="autosave:ck/x"):
        handler.auto_save(2, "ck", name="x")
    assert handler.auto_save_callback is None


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"save_path": "ck", "name": "x"}, {"save_path": "ck", "name": "y"}),
        ({"save_path": "ck", "name": "x"}, {"save_path": "ck2", "name": "x"}),
    ],
    ids=["same-dir-other-name", "other-dir-same-name"],
)
def test_different_targets_are_not_duplicates(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    handler = new_handler()
    handler.add_callback(AutoSaveCallback(1, **first))
    handler.add_callback(AutoSaveCallback(1, **second))
    assert len([c for c in handler.callbacks if isinstance(c, AutoSaveCallback)]) == 2


def test_auto_save_twice_reconfigures_the_same_instance() -> None:
    handler = new_handler()
    first = handler.auto_save(1, "ck", name="a{epoch:03d}", overwrite=True)
    train(handler, 1)
    assert checkpoint_files(Path("ck")) == ["a001.pth"]
    second = handler.auto_save(2, "ck", name="b{epoch:03d}", overwrite=True)
    assert second is first and handler.auto_save_callback is first
    assert [c for c in handler.callbacks if isinstance(c, AutoSaveCallback)] == [first]
    assert first.config.interval == 2 and first.config.name == "b{epoch:03d}"
    keys = [k for k in handler.state_dict() if k.startswith("autosave:")]
    assert keys == [first.state_key] == ["autosave:ck/b{epoch:03d}"]
    assert first.last_saved_path == str(Path("ck") / "a001.pth")  # bookkeeping kept
    train(handler, 3)  # epochs 2..4 saved at 2 and 4 under the new name
    assert checkpoint_files(Path("ck")) == ["b004.pth"]


def test_auto_save_none_switches_the_same_instance_off() -> None:
    handler = new_handler()
    callback = handler.auto_save(1, "ck", name="ep{epoch:03d}")
    train(handler, 1)
    assert handler.auto_save(None, "ck", name="ep{epoch:03d}") is callback
    train(handler, 2)
    assert saved_epochs(Path("ck")) == [1]


# ============================================================================================
# Rule 7a: the schedule as a property
# ============================================================================================
INTERVALS = [-1, 0, None, 1, 2, 3, 4, 5, 6, 7]


def expected_epochs(interval: int | None, calls: list[tuple[int, int]]) -> list[int]:
    """The rule, from the epochs each call actually ran: ``(first, last)``, empty if last<first."""
    saved = []
    for first, last in calls:
        if last < first:
            continue
        if interval == -1:
            saved.append(last)
        elif interval:
            saved.extend(e for e in range(first, last + 1) if e % interval == 0)
    return saved


@st.composite
def schedules(draw: st.DrawFn, max_total: int = 15) -> list[tuple[int, bool, int | None]]:
    """Train calls as ``(epochs, resume_before, stop_after)``; total epochs 0..15."""
    calls = []
    remaining = draw(st.integers(0, max_total))
    for _ in range(draw(st.integers(0, 5))):
        size = draw(st.integers(0, remaining))
        remaining -= size
        stop = draw(st.one_of(st.none(), st.integers(1, max(size, 1)))) if size else None
        calls.append((size, draw(st.booleans()), stop))
    if remaining:
        calls.append((remaining, draw(st.booleans()), None))
    return calls


class _StubHandler:
    """Just enough of the Trainer protocol for AutoSaveCallback: records the saves it asks of
    the checkpointing seam instead of writing."""

    def __init__(self) -> None:
        self.epoch = 0
        self.global_step = 0  # names may use {step}
        self.stop_requested = False
        self.saved: list[tuple[int, Path]] = []
        self.logger = logging.getLogger("nnhandler.test_autosave_rules.stub")
        self.distributed = DistributedContext.single()
        self.module = torch.nn.Linear(4, 1)  # sizes the first free-space check
        self.sharded_checkpoints = False  # plain .pth names
        self.progress = Progress(run_id="stub")  # the lineage the callback's records name
        self.stopped_mid_epoch = False
        self.checkpoints = self  # the seam's save, recorded

    def save(self, path: Path, logs: dict[str, Any]) -> Path:
        self.saved.append((self.epoch, path))
        return path


@hypothesis_settings(max_examples=300)
@given(interval=st.sampled_from(INTERVALS), calls=schedules())
def test_schedule_property_on_the_callback(
    interval: int | None, calls: list[tuple[int, bool, int | None]]
) -> None:
    """The callback's own hook logic, driven like the loop drives it (no training, no files)."""
    handler: Any = _StubHandler()
    callback = AutoSaveCallback(interval, "ck", name="ep{epoch:03d}", overwrite=False)
    ran: list[tuple[int, int]] = []
    for size, resume, stop in calls:
        if resume:  # what NNHandler.load does: rebuild from the config, restore bookkeeping
            state = callback.state_dict()
            callback = AutoSaveCallback(**state["config"])
            callback.load_state_dict(state)
        if size == 0:
            continue  # train() returns before any event when there is nothing to do
        start = handler.epoch
        handler.stop_requested = False
        callback.on_train_begin(handler=handler, start_epoch=start, end_epoch=start + size)
        logs: dict[str, Any] = {}
        for epoch in range(start + 1, start + size + 1):
            handler.epoch = epoch
            logs = {"epoch": epoch, "loss": 0.5}
            if stop is not None and epoch == start + stop:
                handler.stop_requested = True
            callback.on_epoch_end(handler=handler, epoch=epoch, logs=logs)
            if handler.stop_requested:
                break
        callback.on_train_end(handler=handler, logs=logs)
        ran.append((start + 1, handler.epoch))
    expected = expected_epochs(interval, ran)
    assert [epoch for epoch, _ in handler.saved] == expected
    assert [path.name for _, path in handler.saved] == [f"ep{e:03d}.pth" for e in expected]
    assert callback.save_count == len(expected)


@pytest.mark.slow  # dozens of hypothesis examples, each training or writing files
@hypothesis_settings(max_examples=25)
@given(interval=st.sampled_from(INTERVALS), calls=schedules())
def test_schedule_property_end_to_end(
    interval: int | None, calls: list[tuple[int, bool, int | None]]
) -> None:
    """Real training, real files, resumes through save + NNHandler.load between calls."""
    work = Path(tempfile.mkdtemp(dir=Path.cwd()))
    ck = work / "ck"
    recorder = SaveRecorder(ck)
    handler = new_handler()
    handler.add_callback(recorder)
    handler.auto_save(interval, ck, name="ep{epoch:03d}")
    ran: list[tuple[int, int]] = []
    for index, (size, resume, stop) in enumerate(calls):
        if resume:
            path = handler.save(work / "manual" / f"before{index}.pth")
            recorder = SaveRecorder(ck, saves=recorder.saves)
            handler = load(path, callbacks=[recorder])
            assert handler.auto_save_callback is not None
            assert handler.auto_save_callback.config.interval == interval
        start = handler.epoch
        stopper = StopAtEpoch(start + stop) if stop is not None else None
        if stopper is not None:
            handler.add_callback(stopper)
        train(handler, size)
        if stopper is not None:
            handler.remove_callback(stopper)
        last = start + (size if stop is None else stop)
        assert handler.epoch == last
        if size:
            ran.append((start + 1, last))
    expected = expected_epochs(interval, ran)
    assert recorder.epochs == expected  # each epoch saved once, in order
    assert saved_epochs(ck) == expected
    if interval:
        assert all(read_checkpoint(ck / f"ep{e:03d}.pth").epoch == e for e in expected)


def test_relative_and_absolute_paths_to_the_same_files_are_duplicates() -> None:
    handler = new_handler()
    handler.add_callback(AutoSaveCallback(1, "ck", name="x"))
    with pytest.raises(DuplicateStateKeyError, match="would write the same files"):
        handler.add_callback(AutoSaveCallback(2, Path("ck").resolve(), name="x"))
    other = handler.auto_save(1, "elsewhere", name="x")
    with pytest.raises(DuplicateStateKeyError, match="would write the same files"):
        handler.auto_save(1, Path("ck").resolve(), name="x")
    assert other.config.save_path == Path("elsewhere")  # the failed reconfiguration is undone
