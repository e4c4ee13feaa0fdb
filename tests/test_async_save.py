"""Asynchronous auto-save: the file is what a synchronous save writes, the snapshot is immune to
later mutation, pending writes are flushed (end of train, exception, KeyboardInterrupt,
interpreter exit), failures follow ``on_save_error``, ``overwrite`` removes the previous file
only after the new one is committed, at most one write is in flight, staging memory is reused.

Background writes are held back where a test needs them in flight: ``write_envelope`` in
:mod:`nnhandler.checkpoint.background` is wrapped so that it waits for a gate the test opens.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from nnh_testing import make_handler, without_run_identity
from test_snapshot import write_both
from test_write_path import assert_same, states, storage_groups

import nnhandler.checkpoint.background as background
import nnhandler.checkpoint.writer as writer_module
from nnhandler import AutoSaveCallback, Callback, NNHandler, read_checkpoint
from nnhandler.checkpoint.envelope import build_meta, ensure_plain, envelope_of, write_envelope
from nnhandler.checkpoint.integrity import verify_file
from nnhandler.checkpoint.packing import split_packs
from nnhandler.checkpoint.snapshot import StagingBuffers

CK = Path("ck")
NAME = "ep{epoch:03d}"
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
SUBPROCESS_TIMEOUT_S = 120


def train(handler: NNHandler, epochs: int) -> dict[str, Any]:
    return handler.train(epochs, seed=0, progress_bar=False)


def load_envelope(path: Path) -> dict[str, Any]:
    envelope: dict[str, Any] = split_packs(torch.load(path, weights_only=True))  # as we read
    return envelope


class Timeline:
    """Records background writes (start/end, with the file) and snapshots, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.running = 0
        self.max_running = 0

    def add(self, kind: str, what: str = "") -> None:
        with self.lock:
            self.events.append((kind, what))


class Gate:
    """Background writes wait here until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.waiting = threading.Semaphore(0)

    def open(self) -> None:
        self.opened.set()


class SnapshotProbe:
    """A state provider that records each collect of the handler's state (a snapshot of it,
    for a background save) in ``timeline``, with the epoch saved."""

    state_key = "snapshot-probe"

    def __init__(self, timeline: Timeline, handler: NNHandler) -> None:
        self.timeline, self.handler = timeline, handler

    def state_dict(self) -> dict[str, Any]:
        self.timeline.add("snapshot", str(self.handler.epoch))
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert state == {}


@pytest.fixture
def timeline(monkeypatch: pytest.MonkeyPatch) -> Timeline:
    record = Timeline()
    original_write = background.write_envelope

    def write(path: Path, *args: Any, **kwargs: Any) -> int:
        with record.lock:
            record.running += 1
            record.max_running = max(record.max_running, record.running)
        record.add("write-start", path.name)
        try:
            return original_write(path, *args, **kwargs)
        finally:
            with record.lock:
                record.running -= 1
            record.add("write-end", path.name)

    monkeypatch.setattr(background, "write_envelope", write)
    return record


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    held = Gate()
    original = background.write_envelope

    def write(path: Path, *args: Any, **kwargs: Any) -> int:
        held.waiting.release()
        held.opened.wait()
        return original(path, *args, **kwargs)

    monkeypatch.setattr(background, "write_envelope", write)
    yield held
    held.open()  # never leave a writer thread blocked


class OpenGateLater(Callback):
    """Opens the gate from another thread once a write is waiting at it, so that a flush that
    waits for the write can finish (a flush that did not wait would return before)."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def on_train_begin(self, **kwargs: Any) -> None:
        def opener() -> None:
            self.gate.waiting.acquire()
            self.gate.opened.wait(0.2)  # let the training thread reach its flush
            self.gate.open()

        threading.Thread(target=opener, daemon=True).start()


def inject_enospc(monkeypatch: pytest.MonkeyPatch, failing: set[int]) -> list[int]:
    """Temp-file opens number ``failing`` (1-based) fail with ENOSPC; returns the opens seen."""
    opens: list[int] = []

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        opens.append(len(opens) + 1)
        if len(opens) in failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(file))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(writer_module, "open", fake_open, raising=False)
    return opens


def error_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.ERROR and r.name.startswith("nnhandler")]


# ============================================================================================
# content: an asynchronous file holds what a synchronous save writes
# ============================================================================================
def test_async_files_equal_sync_files_of_the_same_run(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    runs = {}
    for mode in ("sync", "async"):
        directory = tmp_path / mode
        directory.mkdir()
        monkeypatch.chdir(directory)  # same relative save_path: the same state keys
        handler = make_handler()
        handler.auto_save(1, CK, name=NAME, overwrite=False, async_save=mode == "async")
        train(handler, 3)
        runs[mode] = directory / CK
    names = sorted(p.name for p in runs["sync"].iterdir())
    assert names == sorted(p.name for p in runs["async"].iterdir()) == [
        "ep001.pth", "ep002.pth", "ep003.pth"]
    for name in names:
        sync, written_async = (without_run_identity(load_envelope(runs[m] / name))
                               for m in ("sync", "async"))
        for envelope in (sync, written_async):
            del envelope["meta"]["time"]
        config = written_async["state"]["autosave:ck/ep{epoch:03d}"]["config"]
        assert config.pop("async_save") is True
        assert sync["state"]["autosave:ck/ep{epoch:03d}"]["config"].pop("async_save") is False
        assert_same(sync, written_async)
        verify_file(runs["async"] / name)


def test_a_snapshot_writes_exactly_what_a_sync_save_writes(tmp_path: Path) -> None:
    from test_write_path import mixed_state

    state = mixed_state()
    state["module"] = torch.nn.Sequential(torch.nn.Linear(2, 3),
                                          torch.nn.BatchNorm1d(3)).state_dict()
    meta = build_meta(epoch=1, step=1, logs={"loss": 1.0}, world_size=1)
    envelope = envelope_of(state, meta)
    ensure_plain(envelope)
    snapshot = StagingBuffers().take(envelope)
    snapshot.wait()
    write_envelope(tmp_path / "async.pth", snapshot.value, snapshot.records)
    write_envelope(tmp_path / "sync.pth", envelope)
    sync, written_async = (load_envelope(tmp_path / n) for n in ("sync.pth", "async.pth"))
    assert_same(sync, written_async)
    assert storage_groups(written_async) == storage_groups(sync) == storage_groups(envelope)
    assert vars(written_async["state"]["module"]) == vars(sync["state"]["module"]) == vars(
        state["module"])  # the state dict's _metadata


@settings(max_examples=40, deadline=None)
@given(state=states())
def test_random_snapshots_write_what_sync_saves_write(tmp_path: Path,
                                                       state: dict[str, Any]) -> None:
    from test_write_path import assert_same_metadata

    staging = StagingBuffers()
    for _ in range(2):  # a new plan, then the same plan again after the tensors changed
        sync, written_async = write_both(tmp_path, staging, state)
        assert_same(sync, written_async)
        assert_same_metadata(sync, written_async)
        assert storage_groups(written_async) == storage_groups(sync)
        for tensor in tensors_in(state):
            if tensor.numel() and not tensor.is_conj() and tensor.dtype != torch.bool:
                with torch.no_grad():
                    tensor.add_(1)


def tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(
        value, (list, tuple)) else []
    return [tensor for item in items for tensor in tensors_in(item)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_writer_thread_runs_at_the_lowest_cpu_priority(gate: Gate) -> None:
    handler = make_handler()
    callback = handler.auto_save(None, CK, name=NAME, async_save=True)
    callback.save_now(handler, 1, {})
    gate.waiting.acquire()  # the writer thread is running (held at the gate)
    assert callback.write_in_flight == CK / "ep001.pth"
    (writer,) = [thread for thread in threading.enumerate()
                 if thread.name == "nnhandler-checkpoint-writer"]
    native_id = writer.native_id
    assert native_id is not None
    assert os.getpriority(os.PRIO_PROCESS, native_id) == background.WRITER_NICE == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19  # training's own
    gate.open()
    callback.flush(handler)
    verify_file(CK / "ep001.pth")


def test_mutation_after_the_snapshot_does_not_reach_the_file(tmp_path: Path) -> None:
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer_state = {"exp_avg": torch.zeros(3), "step": torch.tensor(1.0)}
    history = {"losses": [1.0, 0.5], "nested": {"a": [1, 2]}}
    state = {"model": {"w": parameter.detach()}, "param": parameter, "optimizer": optimizer_state,
             "history": history}
    envelope = envelope_of(state, build_meta(epoch=1, step=1, logs={}, world_size=1))
    ensure_plain(envelope)
    snapshot = StagingBuffers().take(envelope)
    with torch.no_grad():  # what the next training steps do
        parameter.add_(5)
        optimizer_state["exp_avg"].fill_(7)
        optimizer_state["step"] += 1
    history["losses"].append(0.1)
    history["nested"]["a"].append(3)
    history["nested"]["b"] = 0
    write_envelope(tmp_path / "ck.pth", snapshot.value, snapshot.records)
    saved = load_envelope(tmp_path / "ck.pth")["state"]
    assert torch.equal(saved["model"]["w"], torch.ones(3))
    assert torch.equal(saved["param"], torch.ones(3))
    assert torch.equal(saved["optimizer"]["exp_avg"], torch.zeros(3))
    assert saved["optimizer"]["step"].item() == 1.0
    assert saved["history"] == {"losses": [1.0, 0.5], "nested": {"a": [1, 2]}}


class WeightsAtEpochEnd(Callback):
    """The weights as they are when the epoch's auto-save snapshots them."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_end(self, handler: NNHandler, epoch: int, **kwargs: Any) -> None:
        self.weights[epoch] = {k: v.clone() for k, v in handler.module.state_dict().items()}


def test_training_on_while_a_write_is_held_back_does_not_leak_into_it(gate: Gate) -> None:
    handler = make_handler()
    recorder = WeightsAtEpochEnd()
    handler.add_callback(recorder)
    handler.add_callback(OpenGateLater(gate))
    handler.auto_save(2, CK, name=NAME, async_save=True)
    train(handler, 3)  # epoch 3 trains while epoch 2's write waits at the gate
    saved = read_checkpoint(CK / "ep002.pth").state["model"]
    for key, value in recorder.weights[2].items():
        assert torch.equal(saved[key], value), key
    assert not all(torch.equal(saved[k], v) for k, v in recorder.weights[3].items())


# ============================================================================================
# flushing: train's end, exceptions, KeyboardInterrupt, interpreter exit
# ============================================================================================
def test_train_returns_only_when_every_promised_file_is_durable(gate: Gate) -> None:
    handler = make_handler()
    handler.add_callback(OpenGateLater(gate))
    callback = handler.auto_save(-1, CK, name=NAME, async_save=True)
    train(handler, 2)  # the one save (epoch 2) is held at the gate when train ends
    assert verify_file(CK / "ep002.pth")["epoch"] == 2
    assert callback.last_saved_epoch == 2 and callback.save_count == 1


class Raise(Callback):
    def __init__(self, at_epoch: int, error: BaseException) -> None:
        self.at_epoch, self.error = at_epoch, error

    def on_train_batch_end(self, epoch: int, batch_idx: int, **kwargs: Any) -> None:
        if epoch == self.at_epoch and batch_idx == 1:
            raise self.error


@pytest.mark.parametrize(
    "error", [RuntimeError("boom in epoch 3"), KeyboardInterrupt()],
    ids=["exception", "KeyboardInterrupt"],
)
def test_an_interrupted_train_waits_for_the_write_in_flight(gate: Gate,
                                                            error: BaseException) -> None:
    handler = make_handler()
    handler.add_callback(OpenGateLater(gate))
    handler.add_callback(Raise(3, error))
    callback = handler.auto_save(2, CK, name=NAME, async_save=True)
    with pytest.raises(type(error)):
        train(handler, 5)
    assert verify_file(CK / "ep002.pth")["epoch"] == 2  # epoch 2's write finished before
    assert callback.last_saved_epoch == 2
    assert not any(t.name == "nnhandler-checkpoint-writer" for t in threading.enumerate())


def test_a_failure_found_while_training_fails_is_noted_on_the_exception(
    gate: Gate, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    handler = make_handler()
    handler.add_callback(OpenGateLater(gate))
    handler.add_callback(Raise(2, RuntimeError("boom")))
    callback = handler.auto_save(1, CK, name=NAME, async_save=True)
    inject_enospc(monkeypatch, {1})
    with caplog.at_level(logging.ERROR, logger="nnhandler"), \
            pytest.raises(RuntimeError, match="boom") as caught:
        train(handler, 3)
    assert any("background auto-save of epoch 1" in note and "No space left" in note
               for note in caught.value.__notes__)
    assert any("AUTO-SAVE FAILED at epoch 1" in m for m in error_messages(caplog))
    assert callback.failed_saves == 1 and callback.last_saved_path is None
    assert list(CK.iterdir()) == []


ATEXIT_SCRIPT = """
import sys, time
from pathlib import Path
import nnhandler.checkpoint.background as background
import nnhandler.checkpoint.writer as writer
from nnh_testing import make_handler

original = background.write_envelope
def slow_write(*args, **kwargs):
    time.sleep(1.0)  # main() has long returned when the write goes ahead
    return original(*args, **kwargs)
background.write_envelope = slow_write
if sys.argv[1] == "fail":
    def refuse(file, *args, **kwargs):
        raise OSError(28, "No space left on device", str(file))
    writer.open = refuse

def main():
    handler = make_handler()
    callback = handler.auto_save(None, "ck", name="by_hand", async_save=True)
    handler.train(1, seed=0, progress_bar=False)
    callback.save_now(handler, handler.epoch, {"loss": 1.0})
    assert not Path("ck/by_hand.pth").exists()
    print("main returns", flush=True)

main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_interpreter_exit_waits_for_the_write_and_reports_a_failure(tmp_path: Path,
                                                                    outcome: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(TESTS_DIR), str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-c", ATEXIT_SCRIPT, outcome], cwd=tmp_path,
                            env=env, capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr
    assert "main returns" in result.stdout
    path = tmp_path / "ck" / "by_hand.pth"
    if outcome == "ok":
        assert verify_file(path)["epoch"] == 1
        assert "FAILED" not in result.stderr
    else:
        assert not path.exists()
        assert "background write of the epoch-1 checkpoint" in result.stderr
        assert "FAILED (OSError: [Errno 28] No space left on device" in result.stderr
        assert [p.name for p in (tmp_path / "ck").iterdir()] == []


# ============================================================================================
# failures follow on_save_error
# ============================================================================================
def test_warn_counts_a_background_failure_and_saving_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    handler = make_handler()
    callback = handler.auto_save(1, CK, name=NAME, async_save=True)
    inject_enospc(monkeypatch, {2})
    with caplog.at_level(logging.INFO, logger="nnhandler"):
        train(handler, 4)
    assert sorted(p.name for p in CK.iterdir()) == ["ep001.pth", "ep003.pth", "ep004.pth"]
    errors = error_messages(caplog)
    assert len(errors) == 2, errors
    assert "AUTO-SAVE FAILED at epoch 2 (OSError: [Errno 28]" in errors[0]
    assert "ck/ep001.pth is intact" in errors[0]
    assert "1 auto-save(s) to ck failed during this train call" in errors[1]
    assert callback.failed_saves == 1 and callback.save_count == 3
    assert callback.last_saved_epoch == 4
    saved = read_checkpoint(CK / "ep004.pth").state[callback.state_key]
    assert saved["failed_saves"] == 1 and saved["save_count"] == 3


@pytest.mark.parametrize(("failing", "epochs", "raised_by_epoch"),
                         [({2}, 4, 3), ({3}, 3, 3)], ids=["mid-run", "last-save"])
def test_raise_ends_train_at_the_next_event_with_the_background_error(
    monkeypatch: pytest.MonkeyPatch, failing: set[int], epochs: int, raised_by_epoch: int
) -> None:
    handler = make_handler()
    callback = handler.auto_save(1, CK, name=NAME, on_save_error="raise", async_save=True)
    inject_enospc(monkeypatch, failing)
    with pytest.raises(OSError, match="No space left") as caught:
        train(handler, epochs)
    assert caught.value.errno == errno.ENOSPC
    # the failure of the epoch-k write surfaces at the end of epoch k + 1 at the latest (or
    # at the end of train for the last save), never later
    assert handler.epoch <= raised_by_epoch
    failed = min(failing)
    assert not (CK / f"ep{failed:03d}.pth").exists()
    assert callback.last_saved_epoch == failed - 1
    assert callback.save_count == failed - 1


def test_a_snapshot_error_is_a_save_failure_like_a_sync_one(
    caplog: pytest.LogCaptureFixture
) -> None:
    class Unpicklable(Callback):
        state_key = "bad"

        def state_dict(self) -> dict[str, Any]:
            return {"set": {1, 2}}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    handler = make_handler()
    handler.add_callback(Unpicklable())
    callback = handler.auto_save(1, CK, name=NAME, async_save=True)
    with caplog.at_level(logging.ERROR, logger="nnhandler"):
        train(handler, 1)
    assert any("AUTO-SAVE FAILED at epoch 1 (CheckpointError: state['bad']['set'] is a "
               "builtins.set" in m for m in error_messages(caplog))
    assert callback.failed_saves == 1 and list(CK.iterdir()) == []


# ============================================================================================
# overwrite, one write in flight, staging reuse
# ============================================================================================
def test_overwrite_removes_the_previous_file_only_after_the_new_one_is_committed(
    timeline: Timeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    original_unlink = os.unlink

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(path).endswith(".pth"):
            timeline.add("remove", Path(os.fspath(path)).name)
        original_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    handler = make_handler()
    callback = handler.auto_save(1, CK, name=NAME, overwrite=True, async_save=True)
    train(handler, 3)
    writes = [(k, w) for k, w in timeline.events if k != "snapshot"]
    assert writes == [
        ("write-start", "ep001.pth"), ("write-end", "ep001.pth"),
        ("write-start", "ep002.pth"), ("write-end", "ep002.pth"), ("remove", "ep001.pth"),
        ("write-start", "ep003.pth"), ("write-end", "ep003.pth"), ("remove", "ep002.pth"),
    ]
    assert [p.name for p in CK.iterdir()] == ["ep003.pth"]
    # each file records its predecessor as still to remove (a crash before the removal
    # leaves a resumed run that information); the callback has done it
    saved = read_checkpoint(CK / "ep003.pth").state[callback.state_key]
    assert saved["pending_removal"] == str(CK / "ep002.pth")
    assert saved["last_saved_path"] == str(CK / "ep003.pth")
    assert callback.pending_removal is None


def test_overwrite_keeps_the_previous_file_when_the_new_write_fails(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = make_handler()
    callback = handler.auto_save(1, CK, name=NAME, overwrite=True, async_save=True)
    inject_enospc(monkeypatch, {2, 3})
    train(handler, 3)
    assert [p.name for p in CK.iterdir()] == ["ep001.pth"]
    assert callback.last_saved_path == str(CK / "ep001.pth")
    assert callback.pending_removal is None


def test_at_most_one_write_is_in_flight(timeline: Timeline) -> None:
    handler = make_handler()
    handler.auto_save(1, CK, name=NAME, async_save=True)
    handler.register_state_provider(SnapshotProbe(timeline, handler))
    train(handler, 4)
    assert timeline.max_running == 1
    events = timeline.events
    for epoch in (2, 3, 4):  # each snapshot is taken after the previous write ended
        assert events.index(("snapshot", str(epoch))) > events.index(
            ("write-end", f"ep{epoch - 1:03d}.pth"))


def test_handler_save_stays_synchronous_beside_async_auto_save(gate: Gate) -> None:
    handler = make_handler()
    handler.auto_save(1, CK, name=NAME, async_save=True)
    gate.open()
    train(handler, 1)
    path = handler.save("by_hand.pth")
    assert verify_file(path)["epoch"] == 1  # durable when save() returns


class ArenaRecorder(Callback):
    def __init__(self, callback: AutoSaveCallback) -> None:
        self.callback = callback
        self.pointers: list[int] = []

    def on_checkpoint_saved(self, **kwargs: Any) -> None:
        staging = self.callback.background.staging
        assert staging is not None and staging.arena is not None
        self.pointers.append(staging.arena.data_ptr())


def test_staging_memory_is_allocated_once_and_reused() -> None:
    handler = make_handler()
    callback = handler.auto_save(1, CK, name=NAME, async_save=True)
    recorder = ArenaRecorder(callback)
    handler.add_callback(recorder)
    train(handler, 5)
    assert len(recorder.pointers) == 5 and len(set(recorder.pointers)) == 1
    staging = callback.background.staging
    assert staging is not None and staging.arena is not None  # kept for the next call
    train(handler, 2)  # the next train call reuses the arena and the plan
    assert len(recorder.pointers) == 7 and len(set(recorder.pointers)) == 1


def test_staging_memory_goes_with_the_handler() -> None:
    handler = make_handler()
    callback = handler.auto_save(1, CK, name=NAME, async_save=True)
    train(handler, 2)
    staging = callback.background.staging
    assert staging is not None and staging.arena is not None
    arena = weakref.ref(staging.arena)
    del handler, callback, staging
    gc.collect()
    assert arena() is None


def test_staging_buffers_follow_the_layout() -> None:
    staging = StagingBuffers()
    state = {"a": torch.randn(100), "b": torch.randn(10)}
    first = staging.take(state)
    arena = staging.arena
    assert arena is not None
    for _ in range(3):
        staging.take({"a": torch.randn(100), "b": torch.randn(10)})  # new tensors, same layout
        assert staging.arena is arena
    staging.take({"a": torch.randn(10)})  # smaller: fits, the arena is kept
    assert staging.arena is arena
    staging.take({"a": torch.randn(10_000)})  # larger: a new arena
    assert staging.arena is not arena and first.nbytes < staging.take(
        {"a": torch.randn(10_000)}).nbytes


# ============================================================================================
# configuration
# ============================================================================================
@pytest.mark.parametrize("value", ["yes", 1, None, 0.0], ids=["str", "int", "None", "float"])
def test_async_save_must_be_a_bool(value: Any) -> None:
    with pytest.raises(ValueError, match="async_save"):
        AutoSaveCallback(1, CK, NAME, async_save=value)
    handler = make_handler()
    with pytest.raises(ValueError, match="async_save"):
        handler.auto_save(1, CK, name=NAME, async_save=value)


def test_async_save_comes_back_with_load_and_reconfigures() -> None:
    handler = make_handler()
    callback = handler.auto_save(1, CK, name=NAME, async_save=True)
    train(handler, 1)
    assert "async_save=True" in repr(callback)
    loaded = NNHandler.load(CK / "ep001.pth")
    assert loaded.auto_save_callback is not None
    assert loaded.auto_save_callback.config.async_save is True
    again = loaded.auto_save(1, CK, name=NAME)  # reconfigured: back to synchronous
    assert again is loaded.auto_save_callback and again.config.async_save is False


def test_run_on_rank_zero_can_keep_its_result_local() -> None:
    """Snapshots are not broadcast: rank 0 keeps the very object, only the outcome travels."""
    from nnhandler.distributed import DistributedContext, run_on_rank_zero

    result = object()
    single = DistributedContext.single()
    assert run_on_rank_zero(single, lambda: result, share_result=False) is result


@pytest.mark.parametrize("change", ["shape", "dtype", "sharing", "count", "parameter"])
def test_a_changed_layout_gets_a_new_plan_and_the_right_data(tmp_path: Path, change: str) -> None:
    base = torch.arange(12.0)
    before = {"a": base, "b": torch.ones(3), "c": torch.zeros(2)}
    after = {
        "shape": {"a": base.view(3, 4), "b": torch.ones(3), "c": torch.zeros(2)},
        "dtype": {"a": base.double(), "b": torch.ones(3), "c": torch.zeros(2)},
        "sharing": {"a": base, "b": base[1:4], "c": torch.zeros(2)},
        "count": {"a": base, "b": torch.ones(3), "c": torch.zeros(2), "d": torch.full((2,), 5.0)},
        "parameter": {"a": torch.nn.Parameter(base.clone()), "b": torch.ones(3),
                      "c": torch.zeros(2)},
    }[change]
    meta = build_meta(epoch=1, step=1, logs={}, world_size=1)
    staging = StagingBuffers()
    staging.take(envelope_of(before, meta))
    staging.take(envelope_of(before, meta))  # the plan is in use
    snapshot = staging.take(envelope_of(after, meta))
    write_envelope(tmp_path / "ck.pth", snapshot.value, snapshot.records)
    loaded = load_envelope(tmp_path / "ck.pth")["state"]
    assert_same(after, loaded)
    assert storage_groups(loaded) == storage_groups(after)
