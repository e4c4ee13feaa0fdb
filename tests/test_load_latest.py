"""``NNHandler.load_latest`` and ``train(resume=...)``: the newest checkpoint is the one with the
highest *recorded* epoch (never the file time or name); damaged files are skipped with a warning
that says why; temp files are never candidates; resuming equals an uninterrupted run."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nnh_testing import assert_deep_equal, make_handler

from nnhandler import (
    CheckpointCorruptedError,
    CheckpointError,
    ConfigurationError,
    NNHandler,
    NoCheckpointFoundError,
)

CK = Path("ck")
NAME = "ep{epoch:03d}"
SEED = 7
SETTINGS: dict[str, Any] = {"ema_decay": 0.5, "gradient_accumulation_steps": 2,
                            "progress_bar": False}


# ============================================================================================
# helpers
# ============================================================================================
def write_run(epochs: int, directory: Path = CK) -> NNHandler:
    handler = make_handler(n=32)
    handler.auto_save(1, directory, name=NAME)
    handler.train(until_epoch=epochs, seed=SEED, **SETTINGS)
    return handler


def ckpt(epoch: int, directory: Path = CK) -> Path:
    return directory / f"ep{epoch:03d}.pth"


def skip_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("nnhandler")
            and r.getMessage().startswith("skipping")]


TRAINING_KEYS = ("model", "optimizer", "scheduler", "ema", "history", "progress", "rng")


def assert_same_training(expected: NNHandler, actual: NNHandler) -> None:
    left, right = expected.state_dict(), actual.state_dict()
    for key in TRAINING_KEYS:
        assert_deep_equal(left[key], right[key], key)


def make_old(path: Path, seconds_ago: float) -> None:
    stamp = time.time() - seconds_ago
    os.utime(path, (stamp, stamp))


# ============================================================================================
# 1. newest by recorded epoch
# ============================================================================================
def _touch_oldest(directory: Path) -> dict[str, int]:
    for age, epoch in ((300, 3), (200, 2)):
        make_old(ckpt(epoch, directory), age)
    os.utime(ckpt(1, directory))  # the epoch-1 file now has the newest mtime
    return {"ep001.pth": 1, "ep002.pth": 2, "ep003.pth": 3}


def _rename_reversed(directory: Path) -> dict[str, int]:
    names = {1: "zz_newest.pth", 2: "mm.pth", 3: "aa_oldest.pth"}  # names sort the wrong way
    for epoch, name in names.items():
        ckpt(epoch, directory).rename(directory / name)
    return {name: epoch for epoch, name in names.items()}


def _both(directory: Path) -> dict[str, int]:
    expected = _rename_reversed(directory)
    for name, epoch in expected.items():
        make_old(directory / name, 100 * epoch)  # the higher the epoch, the older the mtime
    return expected


MISLEADING: dict[str, Callable[[Path], dict[str, int]]] = {
    "touched-oldest": _touch_oldest,
    "names-reversed": _rename_reversed,
    "names-and-mtimes-reversed": _both,
}


@pytest.mark.parametrize("mislead", list(MISLEADING), ids=list(MISLEADING))
def test_newest_is_the_highest_recorded_epoch_not_file_time_or_name(mislead: str) -> None:
    original = write_run(3)
    epochs = MISLEADING[mislead](CK)
    newest_mtime = max(CK.iterdir(), key=lambda p: p.stat().st_mtime).name
    last_name = sorted(epochs)[-1]
    assert epochs[newest_mtime] != 3 or epochs[last_name] != 3  # the trap is set
    loaded = NNHandler.load_latest(CK)
    assert loaded.epoch == 3
    assert loaded.train_losses == original.train_losses
    assert_deep_equal(original.module.state_dict(), loaded.module.state_dict(), "model")


def test_load_latest_passes_load_arguments_through() -> None:
    write_run(2)
    loaded = NNHandler.load_latest(CK, device="cpu", skip_optimizer=True, skip_history=True)
    assert loaded.epoch == 2
    assert loaded.train_losses == []
    assert loaded.optimizer is not None and loaded.optimizer.state_dict()["state"] == {}


# ============================================================================================
# 2. damaged newer files are skipped with a warning that says why
# ============================================================================================
def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncate_last_byte(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _append_bytes(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 16)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a checkpoint at all " * 40)


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    # id: (damage, what the warning must say)
    "bit-flip": (_flip_middle, "corrupted: CRC-32"),
    "truncated-half": (_truncate_half, "truncated"),
    "truncated-1-byte": (_truncate_last_byte, "truncated"),
    "extended": (_append_bytes, "no intact integrity record"),
    "empty": (_empty, "too short"),
    "garbage": (_garbage, "no intact integrity record"),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_newest_file_is_skipped_with_a_warning_saying_why(
    caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    write_run(3)
    harm, reason = DAMAGE[damage]
    harm(ckpt(3))
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        loaded = NNHandler.load_latest(CK)
    assert loaded.epoch == 2
    (warning,) = skip_warnings(caplog)
    assert str(ckpt(3)) in warning
    assert reason in warning


def test_several_damaged_files_are_each_skipped_and_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_run(4)
    _truncate_half(ckpt(4))
    _flip_middle(ckpt(3))
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        loaded = NNHandler.load_latest(CK)
    assert loaded.epoch == 2
    warnings = skip_warnings(caplog)
    assert len(warnings) == 2
    assert any(str(ckpt(4)) in w and "truncated" in w for w in warnings)
    assert any(str(ckpt(3)) in w and "CRC-32" in w for w in warnings)


def test_only_damaged_files_is_no_checkpoint_found(caplog: pytest.LogCaptureFixture) -> None:
    write_run(2)
    _flip_middle(ckpt(1))
    _truncate_half(ckpt(2))
    with caplog.at_level(logging.WARNING, logger="nnhandler"), \
            pytest.raises(NoCheckpointFoundError, match="no valid checkpoint in 'ck'"):
        NNHandler.load_latest(CK)
    assert len(skip_warnings(caplog)) == 2


def test_load_of_a_damaged_file_by_name_still_refuses_it() -> None:
    write_run(2)
    _flip_middle(ckpt(2))
    with pytest.raises(CheckpointCorruptedError, match="corrupted"):
        NNHandler.load(ckpt(2))


# ============================================================================================
# 3. temp files are never candidates
# ============================================================================================
TEMP_NAMES = [
    pytest.param(".ep009.pth.tmp-123-abcd", id="writer-style"),
    pytest.param(".x.pth.tmp-123-abcd", id="brief-style"),
    pytest.param(".ep009.tmp-123-abcd.pth", id="ends-in-pth"),
    pytest.param(f".ep009.pth.tmp-{os.getpid()}-abcd", id="own-pid"),
]


@pytest.mark.parametrize("temp_name", TEMP_NAMES)
def test_temp_files_are_never_candidates_even_when_complete(temp_name: str) -> None:
    write_run(3)
    # a complete, valid epoch-3 file that was never renamed into place
    ckpt(3).rename(CK / temp_name)
    loaded = NNHandler.load_latest(CK)
    assert loaded.epoch == 2
    assert (CK / temp_name).exists()  # choosing does not touch it


@pytest.mark.parametrize("temp_name", TEMP_NAMES)
def test_a_directory_of_only_temp_files_has_no_checkpoint(temp_name: str) -> None:
    write_run(1)
    ckpt(1).rename(CK / temp_name)
    with pytest.raises(NoCheckpointFoundError, match="no valid checkpoint"):
        NNHandler.load_latest(CK)


# ============================================================================================
# 4. nothing to load
# ============================================================================================
def _missing() -> Path:
    return Path("missing") / "ck"


def _empty_dir() -> Path:
    CK.mkdir()
    return CK


def _only_other_files() -> Path:
    CK.mkdir()
    (CK / "notes.txt").write_text("no checkpoints here")
    (CK / "sub.pth").mkdir()  # a directory named like a checkpoint
    return CK


def _a_file() -> Path:
    Path("plain.pth").write_bytes(b"x")
    return Path("plain.pth")


NOTHING: dict[str, Callable[[], Path]] = {
    "missing-dir": _missing,
    "empty-dir": _empty_dir,
    "no-pth-files": _only_other_files,
    "path-is-a-file": _a_file,
}


@pytest.mark.parametrize("case", list(NOTHING), ids=list(NOTHING))
def test_nothing_to_load_is_no_checkpoint_found(case: str) -> None:
    directory = NOTHING[case]()
    with pytest.raises(NoCheckpointFoundError, match="no valid checkpoint") as caught:
        NNHandler.load_latest(directory)
    assert isinstance(caught.value, CheckpointError)
    assert str(directory) in str(caught.value)


# ============================================================================================
# 5. train(until_epoch=E, resume="latest", seed=s)
# ============================================================================================
def restartable(until: int, *, resume: str | Path | None = "latest", directory: Path = CK,
                init_seed: int = 123) -> NNHandler:
    """What a restartable script does: configure from scratch, then one ``train`` line."""
    handler = make_handler(n=32, init_seed=init_seed)
    handler.auto_save(1, directory, name=NAME)
    handler.train(until_epoch=until, resume=resume, seed=SEED, **SETTINGS)
    return handler


@pytest.mark.parametrize("done", [1, 2, 3], ids=["from-1", "from-2", "from-3"])
def test_resume_latest_continues_and_equals_an_uninterrupted_run(done: int) -> None:
    reference = write_run(4, Path("reference"))
    write_run(done)
    _touch_oldest_if_possible(done)
    resumed = restartable(4)
    assert resumed.epoch == 4
    assert_same_training(reference, resumed)
    assert sorted(p.name for p in CK.iterdir()) == [f"ep{e:03d}.pth" for e in range(1, 5)]
    for epoch in range(done + 1, 5):  # the auto-saves after the resume match too
        left = NNHandler.load(ckpt(epoch, Path("reference")))
        right = NNHandler.load(ckpt(epoch))
        assert_same_training(left, right)


def _touch_oldest_if_possible(done: int) -> None:
    if done > 1:  # make the oldest file the newest by mtime: it must not matter
        os.utime(ckpt(1))
        make_old(ckpt(done), 600)


def test_resume_latest_skips_a_damaged_newest_file_and_still_equals_the_reference(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reference = write_run(4, Path("reference"))
    write_run(3)
    _truncate_half(ckpt(3))  # the crash damaged the newest file: resume from epoch 2
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        resumed = restartable(4)
    assert any(str(ckpt(3)) in w for w in skip_warnings(caplog))
    assert_same_training(reference, resumed)
    # the damaged file records no readable lineage, so the resumed run's epoch-3 save does not
    # replace it (it cannot tell it from another run's file): it goes beside it as -v1
    assert NNHandler.load(CK / "ep003-v1.pth").epoch == 3


@pytest.mark.parametrize("setup", ["missing-dir", "empty-dir"], ids=["missing-dir", "empty-dir"])
def test_resume_latest_without_a_checkpoint_starts_fresh(
    caplog: pytest.LogCaptureFixture, setup: str
) -> None:
    if setup == "empty-dir":
        CK.mkdir()
    plain = make_handler(n=32, init_seed=123)
    plain.auto_save(1, "plain", name=NAME)
    plain.train(until_epoch=2, seed=SEED, **SETTINGS)
    with caplog.at_level(logging.INFO, logger="nnhandler"):
        fresh = restartable(2)
    assert "no valid checkpoint in ck; starting fresh" in caplog.text
    assert fresh.epoch == 2
    assert_same_training(plain, fresh)
    assert sorted(p.name for p in CK.iterdir()) == ["ep001.pth", "ep002.pth"]


def test_resume_latest_when_already_at_the_target_trains_nothing() -> None:
    original = write_run(3)
    resumed = restartable(2)  # the script's target is behind the newest checkpoint
    assert resumed.epoch == 3
    assert_same_training(original, resumed)
    assert sorted(p.name for p in CK.iterdir()) == ["ep001.pth", "ep002.pth", "ep003.pth"]


def test_resume_latest_without_auto_save_is_a_configuration_error() -> None:
    write_run(2)
    handler = make_handler(n=32)
    with pytest.raises(ConfigurationError, match=r"auto_save\(\.\.\.\) first or pass resume"):
        handler.train(until_epoch=4, resume="latest", seed=SEED, progress_bar=False)
    assert handler.epoch == 0 and handler.train_losses == []


@pytest.mark.parametrize("as_path", [False, True], ids=["str", "Path"])
def test_resume_from_a_given_path_equals_an_uninterrupted_run(as_path: bool) -> None:
    reference = write_run(4, Path("reference"))
    write_run(3)
    path = ckpt(2)  # not the newest: an explicit path is taken as given
    resumed = restartable(4, resume=path if as_path else str(path))
    assert_same_training(reference, resumed)


def test_resume_from_a_path_works_without_auto_save() -> None:
    reference = make_handler(n=32)
    reference.train(until_epoch=3, seed=SEED, **SETTINGS)
    first = make_handler(n=32)
    first.train(until_epoch=1, seed=SEED, **SETTINGS)
    first.save("one.pth")
    handler = make_handler(n=32, init_seed=5)
    handler.train(until_epoch=3, resume="one.pth", seed=SEED, **SETTINGS)
    assert_same_training(reference, handler)


def _damaged_copy() -> Path:
    write_run(1)
    shutil.copy(ckpt(1), "bad.pth")
    _flip_middle(Path("bad.pth"))
    return Path("bad.pth")


@pytest.mark.parametrize(
    ("make_bad", "error", "match"),
    [
        (lambda: Path("nope.pth"), CheckpointError, "does not exist"),
        (_damaged_copy, CheckpointCorruptedError, "corrupted"),
    ],
    ids=["missing-file", "damaged-file"],
)
def test_resume_from_a_bad_path_is_an_error_before_training(
    make_bad: Callable[[], Path], error: type[Exception], match: str
) -> None:
    path = make_bad()
    handler = make_handler(n=32)
    with pytest.raises(error, match=match):
        handler.train(until_epoch=2, resume=path, seed=SEED, progress_bar=False)
    assert handler.epoch == 0 and handler.train_losses == []

