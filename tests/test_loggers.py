"""LearningRateMonitor, CSVLogger and TensorBoardLogger: what they write, how their keys reach
the history and file names, and how they behave across a resume."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from nnh_testing import attach_loaders, checkpoint_files, make_handler

from nnhandler import (
    Callback,
    ConfigurationError,
    CSVLogger,
    LearningRateMonitor,
    MissingDependencyError,
    NNHandler,
    TensorBoardLogger,
    read_checkpoint,
)
from nnhandler.checkpoint import TEMP_INFIX


def read_csv(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def as_floats(row: dict[str, str]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if v != ""}


def plain(entry: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in entry.items()}


# -- LearningRateMonitor -----------------------------------------------------------------------
def test_lr_reaches_logs_history_checkpoint_meta_and_file_names() -> None:
    handler = make_handler()  # Adam lr=1e-2, StepLR(step_size=2, gamma=0.5)
    monitor = LearningRateMonitor()
    handler.add_callback(monitor)
    handler.auto_save(1, "ck", name="ep{epoch}_lr{lr:.5f}")
    logs = handler.train(4, seed=0, progress_bar=False)
    # the rate each epoch trained with: the scheduler steps at the end of epochs 2 and 4
    assert [entry["lr"] for entry in handler.history] == [0.01, 0.01, 0.005, 0.005]
    assert logs["lr"] == 0.005 and monitor.last == {"lr": 0.005}
    assert checkpoint_files(Path("ck")) == ["ep1_lr0.01000.pth", "ep2_lr0.01000.pth",
                                            "ep3_lr0.00500.pth", "ep4_lr0.00500.pth"]
    assert read_checkpoint("ck/ep3_lr0.00500.pth").meta["logs"]["lr"] == 0.005
    # the history a checkpoint holds has it too, so a loaded handler's history does
    loaded = NNHandler.load("ck/ep4_lr0.00500.pth", callbacks=[fresh := LearningRateMonitor()])
    assert [entry["lr"] for entry in loaded.history] == [0.01, 0.01, 0.005, 0.005]
    assert fresh.last == {"lr": 0.005}


class TwoGroupAdam(torch.optim.Adam):
    """Adam with the first parameter tensor in a group of its own at a tenth of the rate."""

    def __init__(self, params: Any, lr: float = 1e-3) -> None:
        params = list(params)
        super().__init__([{"params": params[:1], "lr": lr / 10}, {"params": params[1:]}], lr=lr)


def test_several_parameter_groups_give_one_key_each() -> None:
    handler = make_handler(scheduler=False)
    handler.set_optimizer(TwoGroupAdam, lr=1e-2)
    handler.add_callback(LearningRateMonitor())
    logs = handler.train(1, seed=0, progress_bar=False)
    assert "lr" not in logs
    assert (logs["lr_group0"], logs["lr_group1"]) == pytest.approx((1e-3, 1e-2))


def test_per_step_scheduler_logs_the_rate_at_the_start_of_the_epoch() -> None:
    handler = make_handler(scheduler=False)
    handler.set_scheduler(torch.optim.lr_scheduler.ExponentialLR, gamma=0.5, interval="step")
    handler.add_callback(LearningRateMonitor())
    handler.train(2, seed=0, progress_bar=False)  # 8 steps per epoch
    assert [entry["lr"] for entry in handler.history] == pytest.approx([1e-2, 1e-2 * 0.5**8])


def test_lr_monitor_without_an_optimizer_is_a_configuration_error() -> None:
    handler = NNHandler(torch.nn.Linear, device="cpu", in_features=2, out_features=1)
    with pytest.raises(ConfigurationError, match="no optimizer"):
        LearningRateMonitor().current_rates(handler)


# -- CSVLogger ---------------------------------------------------------------------------------
def test_one_row_per_epoch_equal_to_the_history() -> None:
    handler = make_handler()
    handler.add_callback(LearningRateMonitor())
    handler.add_callback(CSVLogger("logs/train.csv"))
    handler.train(3, seed=0, progress_bar=False)
    header, rows = read_csv("logs/train.csv")
    assert header == ["epoch", "loss", "mae", "val_loss", "val_mae", "lr"]
    assert [as_floats(row) for row in rows] == [plain(entry) for entry in handler.history]


def test_a_key_that_appears_later_extends_the_header() -> None:
    handler = make_handler()
    handler.add_callback(CSVLogger("train.csv"))
    handler.train(4, seed=0, validate_every=2, progress_bar=False)
    header, rows = read_csv("train.csv")
    assert header == ["epoch", "loss", "mae", "val_loss", "val_mae"]
    assert [row["val_loss"] != "" for row in rows] == [False, True, False, True]
    assert [as_floats(row) for row in rows] == [plain(entry) for entry in handler.history]
    assert [p for p in Path(".").iterdir() if TEMP_INFIX in p.name] == []


class RowReader(Callback):
    """Reads the CSV file at every epoch end, after the logger wrote its row."""

    def __init__(self, path: str) -> None:
        self.path, self.seen = path, []

    def on_epoch_end(self, epoch: int, **kwargs: Any) -> None:
        self.seen.append([int(row["epoch"]) for row in read_csv(self.path)[1]])


def test_each_row_is_flushed_as_it_is_written() -> None:
    handler = make_handler()
    handler.add_callback(CSVLogger("train.csv"))
    reader = RowReader("train.csv")
    handler.add_callback(reader)
    handler.train(3, seed=0, progress_bar=False)
    assert reader.seen == [[1], [1, 2], [1, 2, 3]]


def test_resume_drops_rows_beyond_the_checkpoint_and_appends_without_duplicates() -> None:
    original = make_handler()
    original.add_callback(CSVLogger("train.csv"))
    original.auto_save(2, "ck", name="ep{epoch}")
    original.train(5, seed=0, progress_bar=False)  # rows 1..5, checkpoints at 2 and 4
    _, written = read_csv("train.csv")
    assert [int(row["epoch"]) for row in written] == [1, 2, 3, 4, 5]

    logger = CSVLogger("train.csv")
    resumed = NNHandler.load("ck/ep4.pth", callbacks=[logger])  # "crashed" after epoch 5
    assert logger.fieldnames == ["epoch", "loss", "mae", "val_loss", "val_mae"]
    assert logger.last_epoch == 4
    attach_loaders(resumed)
    resumed.train(until_epoch=6, seed=0, progress_bar=False)
    _, rows = read_csv("train.csv")
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[:4] == written[:4]  # the rows of the lineage are kept verbatim
    assert [as_floats(row) for row in rows] == [plain(entry) for entry in resumed.history]


def test_rows_lost_between_checkpoint_and_row_are_filled_from_the_history() -> None:
    original = make_handler()
    original.add_callback(CSVLogger("train.csv"))
    original.auto_save(3, "ck", name="ep{epoch}")
    original.train(3, seed=0, progress_bar=False)
    header, rows = read_csv("train.csv")
    with open("train.csv", "w", newline="", encoding="utf-8") as file:  # row 3 never made it
        writer = csv.DictWriter(file, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows[:2])

    resumed = NNHandler.load("ck/ep3.pth", callbacks=[CSVLogger("train.csv")])
    attach_loaders(resumed)
    resumed.train(1, seed=0, progress_bar=False)
    _, after = read_csv("train.csv")
    assert [int(row["epoch"]) for row in after] == [1, 2, 3, 4]
    assert [as_floats(row) for row in after] == [plain(entry) for entry in resumed.history]


def test_a_fresh_run_starts_the_file_anew() -> None:
    for _ in range(2):
        handler = make_handler()
        handler.add_callback(CSVLogger("train.csv"))
        handler.train(2, seed=0, progress_bar=False)
    assert [int(row["epoch"]) for row in read_csv("train.csv")[1]] == [1, 2]


def test_a_file_it_did_not_write_is_refused_and_left_alone() -> None:
    Path("notes.csv").write_text("name,value\nx,1\n")
    handler = make_handler()
    handler.add_callback(CSVLogger("notes.csv"))
    with pytest.raises(ConfigurationError, match="no 'epoch' column"):
        handler.train(1, seed=0, progress_bar=False)
    assert Path("notes.csv").read_text() == "name,value\nx,1\n"


def test_csv_logger_path_checks() -> None:
    Path("folder").mkdir()
    with pytest.raises(ConfigurationError, match="is a directory"):
        CSVLogger("folder")
    with pytest.raises(TypeError, match="str or path"):
        CSVLogger(3)  # type: ignore[arg-type]
    assert CSVLogger("a/../b.csv").state_key == "csv_logger:b.csv"


# -- TensorBoardLogger -------------------------------------------------------------------------
def scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(log_dir)
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_scalars_per_epoch() -> None:
    pytest.importorskip("tensorboard")
    handler = make_handler()
    handler.add_callback(LearningRateMonitor())
    handler.add_callback(TensorBoardLogger("tb"))
    handler.train(3, seed=0, progress_bar=False)
    written = scalars("tb")
    assert set(written) == {"loss", "mae", "val_loss", "val_mae", "lr"}
    assert [step for step, _ in written["loss"]] == [1, 2, 3]
    assert [value for _, value in written["val_loss"]] == pytest.approx(handler.val_losses)


def test_tensorboard_resume_purges_what_a_crashed_run_wrote_after_its_checkpoint() -> None:
    pytest.importorskip("tensorboard")
    original = make_handler()
    original.add_callback(TensorBoardLogger("tb"))
    original.auto_save(2, "ck", name="ep{epoch}")
    original.train(4, seed=0, progress_bar=False)

    logger = TensorBoardLogger("tb")
    resumed = NNHandler.load("ck/ep2.pth", callbacks=[logger])
    assert logger.last_epoch == 2
    attach_loaders(resumed)
    resumed.train(3, seed=1, progress_bar=False)  # a different seed: different epochs 3..5
    losses = scalars("tb")["loss"]
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5]
    assert [value for _, value in losses] == pytest.approx(resumed.train_losses)
    assert not math.isclose(losses[2][1], original.train_losses[2])
    assert logger.last_epoch == 5


def test_missing_tensorboard_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for loaded in [m for m in sys.modules if m == "tensorboard" or m.startswith(
            ("tensorboard.", "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MissingDependencyError,
                       match=r"TensorBoardLogger.*'tensorboard'.*"
                             r"pip install nnhandler\[tensorboard\]") as raised:
        TensorBoardLogger("tb")
    assert isinstance(raised.value, ImportError)
    assert not Path("tb").exists()
