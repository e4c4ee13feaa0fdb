"""Disk errors: an unwritable ``save_path`` fails when ``train`` starts, before any epoch runs;
ENOSPC, EIO and permission errors during a save leave the previous checkpoint intact and no
partial file; the ``on_save_error`` policies ``"warn"`` and ``"raise"``; the free-space warning.

Faults are injected where the writer touches the disk: ``open`` of the temp file (a
module-global lookup in :mod:`nnhandler.checkpoint.writer`), the file object's ``write`` and
``flush``, and ``os.fsync``.
"""

from __future__ import annotations

import builtins
import errno
import io
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

import pytest
import torch
from nnh_testing import make_handler

import nnhandler.checkpoint.writer as writer_module
from nnhandler import AutoSaveCallback, Callback, ConfigurationError, NNHandler
from nnhandler.checkpoint import read_checkpoint
from nnhandler.checkpoint.integrity import verify_file

CK = Path("ck")
NAME = "ep{epoch:03d}"


# ============================================================================================
# helpers
# ============================================================================================
def new_handler() -> NNHandler:
    return make_handler(n=32, batch_size=8)


def train(handler: NNHandler, epochs: int) -> dict[str, Any]:
    return handler.train(epochs, seed=0, progress_bar=False)


def listing(directory: Path) -> list[str]:
    """Every entry, hidden temp files included."""
    return sorted(p.name for p in directory.iterdir())


class EpochRecorder(Callback):
    def __init__(self) -> None:
        self.begun: list[int] = []

    def on_epoch_begin(self, epoch: int, **kwargs: Any) -> None:
        self.begun.append(epoch)


def error_records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == level and r.name.startswith("nnhandler")]


# ============================================================================================
# 1. an unwritable save_path is an error when train starts, before any epoch runs
# ============================================================================================
def _parent_is_a_file(monkeypatch: pytest.MonkeyPatch) -> Path:
    Path("blocker").write_bytes(b"a regular file")
    return Path("blocker") / "ck"


def _read_only_mode(monkeypatch: pytest.MonkeyPatch) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    CK.mkdir()
    CK.chmod(stat.S_IRUSR | stat.S_IXUSR)  # 0o500
    return CK


def _proc_directory(monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = Path("/proc/self")
    if not sys.platform.startswith("linux") or not directory.is_dir():
        pytest.skip("needs Linux /proc")
    return directory  # a real directory nobody (root included) can create files in


def _read_only_mount(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Simulates a read-only filesystem under ``ck``: every way of creating a file there fails
    with EROFS (the directory itself exists and can be listed)."""
    CK.mkdir()
    root = CK.resolve()

    def inside(path: Any) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(root)
        except (TypeError, ValueError):
            return False

    def refuse(path: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_io_open, real_os_open = io.open, os.open

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if not isinstance(file, int) and set(mode) & set("wxa+") and inside(file):
            refuse(file)
        return real_io_open(file, mode, *args, **kwargs)

    def fake_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    return CK


UNWRITABLE: dict[str, Callable[[pytest.MonkeyPatch], Path]] = {
    "parent-is-a-file": _parent_is_a_file,
    "chmod-0o500": _read_only_mode,
    "proc-directory": _proc_directory,
    "read-only-mount": _read_only_mount,
}


@pytest.mark.parametrize("policy", ["warn", "raise"], ids=["warn", "raise"])
@pytest.mark.parametrize("case", list(UNWRITABLE), ids=list(UNWRITABLE))
def test_unwritable_save_path_fails_when_train_starts_before_any_epoch(
    monkeypatch: pytest.MonkeyPatch, case: str, policy: str
) -> None:
    handler = new_handler()
    recorder = EpochRecorder()
    handler.add_callback(recorder)
    weights = {k: v.clone() for k, v in handler.module.state_dict().items()}
    directory = UNWRITABLE[case](monkeypatch)
    handler.auto_save(1, directory, name=NAME, on_save_error=policy)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="auto-save cannot write to save_path") as caught:
        train(handler, 2)
    monkeypatch.undo()
    assert isinstance(caught.value, ValueError)
    assert str(directory) in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)  # the reason is kept
    assert recorder.begun == []
    assert handler.epoch == 0 and handler.global_step == 0 and handler.train_losses == []
    for key, value in handler.module.state_dict().items():
        assert torch.equal(value, weights[key]), key
    if case in ("chmod-0o500", "read-only-mount"):
        assert listing(directory) == []


def test_a_writable_save_path_passes_the_preflight_and_leaves_no_probe() -> None:
    handler = new_handler()
    handler.auto_save(1, CK, name=NAME)
    train(handler, 1)
    assert listing(CK) == ["ep001.pth"]


# ============================================================================================
# 2. faults during a save
# ============================================================================================
class Fault:
    """Fails the save(s) whose temp-file ``open`` is number ``calls`` (1-based) at ``stage``.

    Stages: ``open`` (creating the temp file), ``first-write``, ``mid-write`` (after
    ``MID_WRITE_BYTES`` bytes reached the file, as a filling disk does), ``flush``, ``fsync``.
    """

    MID_WRITE_BYTES = 4096

    def __init__(self, code: int, stage: str, calls: set[int]) -> None:
        self.code, self.stage, self.calls = code, stage, set(calls)
        self.opened = 0
        self.failed: set[int] = set()  # numbers of the opens whose save got an error
        self.bytes_before_failure: list[int] = []
        self._armed_fd: int | None = None

    def error(self, filename: Any = None) -> OSError:
        self.failed.add(self.opened)
        return OSError(self.code, os.strerror(self.code), *([filename] if filename else []))

    def open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        self.opened += 1
        armed = self.opened in self.calls
        if armed and self.stage == "open":
            raise self.error(os.fsdecode(file))
        real = open(file, mode, *args, **kwargs)  # noqa: SIM115 - returned to the writer
        if not armed:
            return real
        if self.stage == "fsync":
            self._armed_fd = real.fileno()
            return real
        return FailingFile(real, self)

    def fsync(self, fd: int) -> None:
        if self._armed_fd is not None and fd == self._armed_fd:
            self._armed_fd = None
            raise self.error()
        os.fsync(fd)

    def clear(self) -> None:
        self.calls = set()


class FailingFile:
    """A binary file whose ``write``/``flush`` fail as the :class:`Fault` says."""

    def __init__(self, file: IO[Any], fault: Fault) -> None:
        self._file, self._fault = file, fault
        self._written = 0
        self._failed = False
        limit = {"first-write": 0, "mid-write": Fault.MID_WRITE_BYTES}
        self._limit = limit.get(fault.stage)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._limit is not None and self._written + len(view) > self._limit:
            fits = self._limit - self._written
            if fits > 0:  # the part that still fits reaches the disk, as on a full one
                self._file.write(view[:fits])
                self._written += fits
            if not self._failed:  # later writes fail too: a full disk stays full
                self._fault.bytes_before_failure.append(self._written)
                self._failed = True
            raise self._fault.error()
        self._written += len(view)
        return self._file.write(view)

    def flush(self) -> None:
        if self._fault.stage == "flush":
            self._fault.bytes_before_failure.append(self._written)
            raise self._fault.error()
        self._file.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> FailingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


class _OsWithFaultyFsync:
    """The writer module's view of ``os``, with ``fsync`` going through the fault."""

    def __init__(self, fault: Fault) -> None:
        self._fault = fault

    def fsync(self, fd: int) -> None:
        self._fault.fsync(fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def inject(monkeypatch: pytest.MonkeyPatch, code: int, stage: str, calls: set[int]) -> Fault:
    fault = Fault(code, stage, calls)
    monkeypatch.setattr(writer_module, "open", fault.open, raising=False)
    monkeypatch.setattr(writer_module, "os", _OsWithFaultyFsync(fault))
    return fault


FAULTS = [
    pytest.param(errno.ENOSPC, "first-write", id="ENOSPC-first-write"),
    pytest.param(errno.ENOSPC, "mid-write", id="ENOSPC-mid-write"),
    pytest.param(errno.ENOSPC, "flush", id="ENOSPC-flush"),
    pytest.param(errno.EIO, "mid-write", id="EIO-mid-write"),
    pytest.param(errno.EIO, "fsync", id="EIO-fsync"),
    pytest.param(errno.EACCES, "open", id="EACCES-open"),
    pytest.param(errno.EACCES, "mid-write", id="EACCES-mid-write"),
]


def check_fault_landed(fault: Fault, calls: set[int]) -> None:
    assert fault.failed == calls
    if fault.stage == "mid-write":  # the failure came part-way through the file
        assert fault.bytes_before_failure == [Fault.MID_WRITE_BYTES] * len(calls)


@pytest.mark.parametrize(
    ("name", "overwrite"),
    [(NAME, False), (NAME, True), ("latest", True)],
    ids=["own-files", "overwrite", "fixed-name"],
)
@pytest.mark.parametrize(("code", "stage"), FAULTS)
def test_raise_policy_propagates_and_leaves_the_previous_checkpoint_intact(
    monkeypatch: pytest.MonkeyPatch, code: int, stage: str, name: str, overwrite: bool
) -> None:
    handler = new_handler()
    callback = handler.auto_save(1, CK, name=name, overwrite=overwrite, on_save_error="raise")
    train(handler, 1)
    (first,) = CK.iterdir()
    before = first.read_bytes()
    fault = inject(monkeypatch, code, stage, {1})
    with pytest.raises(OSError, match=os.strerror(code)) as caught:
        train(handler, 2)
    check_fault_landed(fault, {1})
    assert caught.value.errno == code
    assert handler.epoch == 2  # epoch 2 ran; its save failed and ended train
    assert listing(CK) == [first.name]  # no temp file, no partial final file
    assert first.read_bytes() == before
    assert verify_file(first)["epoch"] == 1
    assert callback.last_saved_path == str(first) and callback.last_saved_epoch == 1
    assert callback.save_count == 1


@pytest.mark.parametrize(("code", "stage"), FAULTS)
def test_warn_policy_logs_continues_retries_and_reports_the_failures(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int, stage: str
) -> None:
    handler = new_handler()
    callback = handler.auto_save(1, CK, name=NAME)  # on_save_error="warn" is the default
    assert callback.config.on_save_error == "warn"
    fault = inject(monkeypatch, code, stage, {2, 3})  # the saves of epochs 2 and 3 fail
    with caplog.at_level(logging.INFO, logger="nnhandler"):
        train(handler, 5)
    check_fault_landed(fault, {2, 3})
    assert handler.epoch == 5 and len(handler.train_losses) == 5
    # epochs 4 and 5 saved again once the fault was gone; no partial file of 2 or 3
    assert listing(CK) == ["ep001.pth", "ep004.pth", "ep005.pth"]
    for epoch in (1, 4, 5):
        assert verify_file(CK / f"ep{epoch:03d}.pth")["epoch"] == epoch
    errors = error_records(caplog, logging.ERROR)
    assert len(errors) == 3, errors
    for epoch, message in zip((2, 3), errors[:2], strict=True):
        assert f"AUTO-SAVE FAILED at epoch {epoch}" in message
        assert f"[Errno {code}] {os.strerror(code)}" in message
        assert "ck/ep001.pth is intact" in message  # names the last good checkpoint
    assert "2 auto-save(s) to ck failed during this train call" in errors[2]
    assert "ck/ep005.pth" in errors[2]
    assert callback.failed_saves == 2
    assert callback.last_saved_epoch == 5 and callback.save_count == 3
    saved = read_checkpoint(CK / "ep005.pth").state[callback.state_key]
    assert saved["failed_saves"] == 2 and saved["save_count"] == 3


@pytest.mark.parametrize(
    ("failing", "expected"),
    [({2, 3}, ["ep004.pth"]), ({2, 3, 4}, ["ep001.pth"])],
    ids=["recovers", "never-recovers"],
)
def test_warn_policy_with_overwrite_keeps_the_last_good_file_until_a_new_one_exists(
    monkeypatch: pytest.MonkeyPatch, failing: set[int], expected: list[str]
) -> None:
    handler = new_handler()
    callback = handler.auto_save(1, CK, name=NAME, overwrite=True)
    fault = inject(monkeypatch, errno.ENOSPC, "mid-write", failing)
    train(handler, 4)
    check_fault_landed(fault, failing)
    assert listing(CK) == expected
    assert callback.last_saved_path == str(CK / expected[0])
    assert callback.pending_removal is None
    assert verify_file(CK / expected[0])["epoch"] == int(expected[0][2:5])


def test_warn_policy_report_is_per_train_call(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    handler = new_handler()
    callback = handler.auto_save(1, CK, name=NAME)
    fault = inject(monkeypatch, errno.ENOSPC, "mid-write", {1})
    with caplog.at_level(logging.ERROR, logger="nnhandler"):
        train(handler, 1)
    assert "1 auto-save(s) to ck failed during this train call" in caplog.text
    assert "no auto-save has succeeded yet" in caplog.text
    assert listing(CK) == []
    fault.clear()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="nnhandler"):
        train(handler, 1)
    assert error_records(caplog, logging.ERROR) == []  # a clean call reports nothing
    assert listing(CK) == ["ep002.pth"]
    assert callback.failed_saves == 1  # the lifetime count is kept


def test_a_failed_save_does_not_change_the_training(monkeypatch: pytest.MonkeyPatch) -> None:
    clean = new_handler()
    clean.auto_save(1, "clean", name=NAME)
    train(clean, 4)
    faulty = new_handler()
    faulty.auto_save(1, CK, name=NAME)
    inject(monkeypatch, errno.EIO, "mid-write", {1, 3})
    train(faulty, 4)
    assert faulty.train_losses == clean.train_losses
    assert faulty.val_losses == clean.val_losses
    for key, value in clean.module.state_dict().items():
        assert torch.equal(faulty.module.state_dict()[key], value), key


@pytest.mark.parametrize(("code", "stage"), FAULTS)
def test_handler_save_by_hand_raises_and_keeps_the_file_it_would_replace(
    monkeypatch: pytest.MonkeyPatch, code: int, stage: str
) -> None:
    handler = new_handler()
    train(handler, 1)
    handler.save("model.pth")
    before = Path("model.pth").read_bytes()
    train(handler, 1)
    inject(monkeypatch, code, stage, {1})
    with pytest.raises(OSError, match=os.strerror(code)):
        handler.save("model.pth")
    assert Path("model.pth").read_bytes() == before
    assert sorted(p.name for p in Path().iterdir() if "model" in p.name) == ["model.pth"]


# ============================================================================================
# 3. the policy value is validated
# ============================================================================================
BAD_POLICIES = [
    pytest.param("ignore", id="unknown-word"),
    pytest.param("WARN", id="wrong-case"),
    pytest.param("", id="empty"),
    pytest.param(None, id="None"),
    pytest.param(True, id="bool"),
    pytest.param(1, id="int"),
]


@pytest.mark.parametrize("policy", BAD_POLICIES)
def test_bad_on_save_error_is_a_validation_error_in_auto_save(policy: Any) -> None:
    handler = new_handler()
    with pytest.raises(ValueError, match="on_save_error"):
        handler.auto_save(1, CK, name=NAME, on_save_error=policy)
    assert handler.auto_save_callback is None


@pytest.mark.parametrize("policy", BAD_POLICIES)
def test_bad_on_save_error_is_a_validation_error_in_the_callback(policy: Any) -> None:
    with pytest.raises(ValueError, match="on_save_error"):
        AutoSaveCallback(1, CK, NAME, False, on_save_error=policy)


def test_bad_on_save_error_on_reconfiguration_keeps_the_old_configuration() -> None:
    handler = new_handler()
    callback = handler.auto_save(1, CK, name=NAME, on_save_error="raise")
    with pytest.raises(ValueError, match="on_save_error"):
        handler.auto_save(2, CK, name=NAME, on_save_error="sometimes")  # type: ignore[arg-type]
    assert handler.auto_save_callback is callback
    assert callback.config.on_save_error == "raise" and callback.config.interval == 1


# ============================================================================================
# 4. the free-space warning
# ============================================================================================
class _Usage(NamedTuple):
    total: int
    used: int
    free: int


class FakeDisk:
    def __init__(self) -> None:
        self.free = 10**12
        self.asked: list[Path] = []

    def disk_usage(self, path: Any) -> _Usage:
        self.asked.append(Path(path))
        return _Usage(10**12, 10**12 - self.free, self.free)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDisk]:
    fake = FakeDisk()
    monkeypatch.setattr("nnhandler.callbacks.autosave_files.shutil.disk_usage", fake.disk_usage)
    yield fake


def space_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in error_records(caplog, logging.WARNING) if "free in" in m]


def test_free_space_warning_fires_below_twice_the_last_checkpoint_size(
    disk: FakeDisk, caplog: pytest.LogCaptureFixture
) -> None:
    handler = new_handler()
    handler.auto_save(1, CK, name=NAME)
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        train(handler, 1)
    assert space_warnings(caplog) == []
    assert disk.asked and all(p == CK for p in disk.asked)

    size = (CK / "ep001.pth").stat().st_size
    disk.free = 2 * size - 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        train(handler, 1)
    (warning,) = space_warnings(caplog)
    assert "less than twice the expected checkpoint size" in warning
    assert str(CK) in warning
    assert (CK / "ep002.pth").exists()  # a warning, not a refusal

    disk.free = 2 * (CK / "ep002.pth").stat().st_size  # exactly twice: enough
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        train(handler, 1)
    assert space_warnings(caplog) == []
    assert listing(CK) == ["ep001.pth", "ep002.pth", "ep003.pth"]


@pytest.mark.parametrize(("free", "warns"), [(1, True), (10**9, False)], ids=["tiny", "ample"])
def test_free_space_warning_before_the_first_save_uses_an_estimate(
    disk: FakeDisk, caplog: pytest.LogCaptureFixture, free: int, warns: bool
) -> None:
    disk.free = free
    handler = new_handler()
    handler.auto_save(1, Path("new") / "ck", name=NAME)
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        train(handler, 1)
    assert len(space_warnings(caplog)) == (1 if warns else 0)
    assert (Path("new") / "ck" / "ep001.pth").exists()


def test_interval_minus_one_tries_a_failed_last_save_once_more_at_the_end_of_train(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The save after the last epoch has no next scheduled save to retry it: the end of
    ``train`` tries once more. A transient fault then costs no checkpoint; each failed attempt
    is counted."""
    handler = new_handler()
    callback = handler.auto_save(-1, CK, name=NAME)
    fault = inject(monkeypatch, errno.ENOSPC, "mid-write", {1})  # only the first attempt fails
    with caplog.at_level(logging.ERROR, logger="nnhandler"):
        train(handler, 3)
    check_fault_landed(fault, {1})
    assert listing(CK) == ["ep003.pth"] and verify_file(CK / "ep003.pth")["epoch"] == 3
    assert callback.failed_saves == 1
    errors = error_records(caplog, logging.ERROR)
    assert "AUTO-SAVE FAILED at epoch 3" in errors[0]
    assert "1 auto-save(s) to ck failed" in errors[1] and "ck/ep003.pth" in errors[1]

    fault = inject(monkeypatch, errno.ENOSPC, "mid-write", {1, 2})  # both attempts fail
    train(handler, 1)
    check_fault_landed(fault, {1, 2})
    assert listing(CK) == ["ep003.pth"] and callback.failed_saves == 3
