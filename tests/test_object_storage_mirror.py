"""``auto_save(..., mirror=URL)`` (issue 15 item 5): the local checkpoint as without a mirror,
then uploaded in the background with the same retention; failures under ``on_save_error``;
``train(resume="latest")`` takes the newer of the local folder and the mirror.

On ``memory://`` and moto's S3 server. Nothing of nnhandler is mocked: a mirror that must
misbehave is a real fsspec filesystem (a ``MemoryFileSystem`` subclass) whose uploads wait.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from memory_store import drop_memory_root, memory_object_names
from nnh_testing import make_handler
from s3_testing import s3_filesystem

from nnhandler import ConfigurationError, NNHandler, NoCheckpointFoundError, RemoteStorageError
from nnhandler.callbacks.autosave_mirror import latest_with_mirror
from nnhandler.checkpoint.index import INDEX_FILE
from nnhandler.checkpoint.storage import URL

LOGGER = logging.getLogger("nnhandler.test_object_storage_mirror")


class HeldMemoryFileSystem(MemoryFileSystem):  # type: ignore[misc]
    """``memory://`` whose uploads (``put_file``) wait until ``gate`` is set."""

    protocol = "heldmemory"
    cachable = False

    def __init__(self, gate: threading.Event | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = gate

    def put_file(self, lpath: str, rpath: str, **kwargs: Any) -> None:
        if self.gate is not None:
            self.gate.wait()
        super().put_file(lpath, rpath, **kwargs)


fsspec.register_implementation("heldmemory", HeldMemoryFileSystem, clobber=True)


@pytest.fixture
def mirror_root() -> Iterator[str]:
    """A fresh ``memory://`` folder, emptied afterwards."""
    root = f"memory://nnh-mirror-{id(object()):x}"
    yield root
    drop_memory_root(root)


def local_names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_mirror_holds_complete_copies_under_the_same_retention(
        tmp_path: Path, mirror_root: str, async_save: bool) -> None:
    handler = make_handler(n=16)
    callback = handler.auto_save(1, tmp_path / "ck", name="ep{epoch:03d}", keep_last=2,
                                 async_save=async_save, mirror=mirror_root)
    handler.train(epochs=4, seed=1, progress_bar=False)
    assert callback.mirror.pending == 0 and callback.mirror.uploads == 4
    assert local_names(tmp_path / "ck") == ["ep003.pth", "ep004.pth", INDEX_FILE]
    assert memory_object_names(mirror_root) == ["ep003.pth", "ep004.pth", INDEX_FILE]
    fs = fsspec.filesystem("memory")
    for name in ("ep003.pth", "ep004.pth"):  # byte for byte the local file
        assert fs.cat_file(f"{URL(mirror_root).key}/{name}") == (tmp_path / "ck" / name
                                                                 ).read_bytes()
    index = json.loads(fs.cat_file(f"{URL(mirror_root).key}/{INDEX_FILE}"))
    kept = {entry["name"] for section in index["callbacks"].values()
            for entry in section["checkpoints"]}
    assert kept == {"ep003.pth", "ep004.pth"}
    assert NNHandler.load(f"{mirror_root}/ep004.pth").epoch == 4


def test_overwrite_keeps_only_the_latest_on_the_mirror_too(tmp_path: Path,
                                                           mirror_root: str) -> None:
    handler = make_handler(n=16)
    handler.auto_save(1, tmp_path, name="ep{epoch:03d}", overwrite=True, mirror=mirror_root)
    handler.train(epochs=3, seed=1, progress_bar=False)
    assert [p.name for p in tmp_path.glob("*.pth")] == ["ep003.pth"]
    assert memory_object_names(mirror_root) == ["ep003.pth"]


def test_mirror_retention_never_removes_another_runs_object(tmp_path: Path,
                                                            mirror_root: str) -> None:
    other = make_handler(n=16)
    other.auto_save(1, tmp_path / "other", name="ep{epoch:03d}", mirror=mirror_root)
    other.train(epochs=1, seed=2, progress_bar=False)  # ep001.pth of another lineage
    handler = make_handler(n=16)
    handler.auto_save(1, tmp_path / "mine", name="ep{epoch:03d}", keep_last=1,
                      mirror=mirror_root)
    handler.train(epochs=2, seed=1, progress_bar=False)
    # the other run's ep001 is untouched; this run's went to ep001-v1, then retention
    # removed it (its own lineage) and kept the newest
    assert memory_object_names(mirror_root) == ["ep001.pth", "ep002.pth", INDEX_FILE]
    assert NNHandler.load(f"{mirror_root}/ep001.pth").progress.lineage == \
        other.progress.lineage


def test_a_wiped_local_folder_resumes_from_the_mirror(tmp_path: Path, mirror_root: str) -> None:
    handler = make_handler(n=16)
    handler.auto_save(1, tmp_path / "ck", name="ep{epoch:03d}", keep_last=2,
                      mirror=mirror_root)
    handler.train(epochs=3, seed=1, progress_bar=False)
    shutil.rmtree(tmp_path / "ck")  # the VM's disk is gone
    again = make_handler(n=16)
    again.auto_save(1, tmp_path / "ck", name="ep{epoch:03d}", keep_last=2,
                    mirror=mirror_root)
    again.train(until_epoch=4, resume="latest", seed=1, progress_bar=False)
    assert again.epoch == 4 and len(again.train_losses) == 4
    assert again.train_losses[:3] == handler.train_losses
    assert local_names(tmp_path / "ck") == ["ep004.pth", INDEX_FILE]
    # the resumed bookkeeping keeps ep003 (on the mirror), as the lost folder would have
    assert memory_object_names(mirror_root) == ["ep003.pth", "ep004.pth", INDEX_FILE]


@pytest.mark.parametrize("newer", ["local", "mirror", "tie"], ids=["local", "mirror", "tie"])
def test_resume_latest_takes_the_newer_and_the_local_one_on_a_tie(
        tmp_path: Path, mirror_root: str, newer: str) -> None:
    handler = make_handler(n=16)
    callback = handler.auto_save(1, tmp_path, name="ep{epoch:03d}", mirror=mirror_root)
    handler.train(epochs=2, seed=1, progress_bar=False)
    if newer == "local":  # the mirror lost its newest
        fsspec.filesystem("memory").rm(f"{URL(mirror_root).key}/ep002.pth")
    elif newer == "mirror":
        (tmp_path / "ep002.pth").unlink()
    chosen, options = latest_with_mirror(callback.config, handler.distributed, LOGGER)
    expected = {"local": str(tmp_path / "ep002.pth"), "mirror": f"{mirror_root}/ep002.pth",
                "tie": str(tmp_path / "ep002.pth")}[newer]
    assert chosen == expected and options is None


def mirrored_run(tmp_path: Path, mirror_root: str, epochs: int = 3) -> NNHandler:
    handler = make_handler(n=16)
    handler.auto_save(1, tmp_path, name="ep{epoch:03d}", mirror=mirror_root)
    handler.train(epochs=epochs, seed=1, progress_bar=False)
    return handler


def loaded_from(caplog: pytest.LogCaptureFixture) -> str:
    (message,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    return message.split()[1]


@pytest.mark.parametrize(("damage", "expected"), [
    ("none", "local ep003"),
    ("local-newest-gone", "mirror ep003"),
    ("mirror-newest-gone", "local ep003"),
    ("local-newest-corrupt", "mirror ep003"),
    ("mirror-newest-truncated-local-gone", "local ep002"),  # both sides fall back; a tie
    ("local-folder-lost", "mirror ep003"),
], ids=lambda value: value.replace(" ", "-"))
def test_load_latest_with_a_mirror_takes_the_newest_valid_of_both(
        tmp_path: Path, mirror_root: str, damage: str, expected: str,
        caplog: pytest.LogCaptureFixture) -> None:
    mirrored_run(tmp_path / "ck", mirror_root)
    fs, key = fsspec.filesystem("memory"), f"{URL(mirror_root).key}/ep003.pth"
    local = tmp_path / "ck" / "ep003.pth"
    if damage == "local-newest-gone":
        local.unlink()
    elif damage == "mirror-newest-gone":
        fs.rm(key)
    elif damage == "local-newest-corrupt":
        data = bytearray(local.read_bytes())
        data[len(data) // 2] ^= 0xFF
        local.write_bytes(bytes(data))
    elif damage == "mirror-newest-truncated-local-gone":
        fs.pipe_file(key, fs.cat_file(key)[:-100])
        local.unlink()
    elif damage == "local-folder-lost":
        shutil.rmtree(tmp_path / "ck")
    with caplog.at_level(logging.INFO, "nnhandler"):
        loaded = NNHandler.load_latest(tmp_path / "ck", mirror=mirror_root,
                                       storage_options={"skip_instance_cache": True})
    side, name = expected.split()
    where = f"{mirror_root}/{name}.pth" if side == "mirror" else str(tmp_path / "ck" /
                                                                       f"{name}.pth")
    assert loaded_from(caplog) == where and loaded.epoch == int(name[2:])
    if "corrupt" in damage or "truncated" in damage:
        assert "skipping" in caplog.text


def test_load_latest_with_a_mirror_that_does_not_answer_takes_the_local_one(
        tmp_path: Path, mirror_root: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    mirrored_run(tmp_path, mirror_root, epochs=1)
    monkeypatch.setenv("NNHANDLER_REMOTE_TIMEOUT", "0.2")
    monkeypatch.setenv("NNHANDLER_REMOTE_RETRIES", "0")
    with caplog.at_level(logging.WARNING, "nnhandler"):
        loaded = NNHandler.load_latest(tmp_path, mirror="s3://nnh-no-such-endpoint/run",
                                       storage_options={"endpoint_url": "http://127.0.0.1:9",
                                                        "key": "k", "secret": "s"})
    assert loaded.epoch == 1 and "did not answer" in caplog.text


def test_load_latest_with_a_mirror_takes_a_file_url_as_the_local_folder(
        tmp_path: Path, mirror_root: str, caplog: pytest.LogCaptureFixture) -> None:
    mirrored_run(tmp_path / "ck", mirror_root, epochs=2)
    with caplog.at_level(logging.INFO, "nnhandler"):
        loaded = NNHandler.load_latest(f"file://{tmp_path / 'ck'}", mirror=mirror_root)
    assert loaded_from(caplog) == str(tmp_path / "ck" / "ep002.pth") and loaded.epoch == 2


@pytest.mark.parametrize(("save_path", "mirror", "error", "message"), [
    ("ck", "elsewhere", ConfigurationError, r"mirror='elsewhere' is not an object-storage URL"),
    ("ck", 5, ConfigurationError, r"mirror=5 is not an object-storage URL"),
    ("memory://bucket/run", "memory://bucket/copy", ConfigurationError,
     r"save_path 'memory://bucket/run' is a URL"),
    ("ck", "memory://nnh-nothing-here/run", NoCheckpointFoundError,
     r"no valid checkpoint in '.*ck' nor in its mirror 'memory://nnh-nothing-here/run'"),
], ids=["local-folder", "not-a-string", "url-save-path", "nothing-anywhere"])
def test_load_latest_refuses_a_wrong_mirror(tmp_path: Path, save_path: str, mirror: Any,
                                            error: type[Exception], message: str) -> None:
    target = save_path if "://" in save_path else tmp_path / save_path
    with pytest.raises(error, match=message):
        NNHandler.load_latest(target, mirror=mirror)


def test_an_unresponsive_mirror_under_warn_does_not_stop_training(
        tmp_path: Path, mirror_root: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NNHANDLER_REMOTE_TIMEOUT", "0.3")
    monkeypatch.setenv("NNHANDLER_REMOTE_RETRIES", "0")
    gate = threading.Event()  # never set while training: every upload hangs
    held = mirror_root.replace("memory://", "heldmemory://")
    handler = make_handler(n=16)
    callback = handler.auto_save(1, tmp_path, name="ep{epoch:03d}", mirror=held,
                                 storage_options={"gate": gate})
    try:
        with caplog.at_level(logging.INFO, "nnhandler"):
            handler.train(epochs=3, seed=1, progress_bar=False)
        assert handler.epoch == 3 and callback.failed_saves == 0
        assert caplog.text.count("MIRROR UPLOAD FAILED") == 3
        assert "RemoteStorageError" in caplog.text and "the local checkpoint stands" \
            in caplog.text
        assert sorted(p.name for p in tmp_path.glob("*.pth")) == [
            "ep001.pth", "ep002.pth", "ep003.pth"]
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # links gone
        assert NNHandler.load(tmp_path / "ep003.pth").epoch == 3
    finally:
        gate.set()


def test_a_queued_upload_waits_and_says_so(tmp_path: Path, mirror_root: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    gate = threading.Event()
    held = mirror_root.replace("memory://", "heldmemory://")
    handler = make_handler(n=16)
    callback = handler.auto_save(None, tmp_path, name="ep{epoch:03d}", mirror=held,
                                 storage_options={"gate": gate})
    handler.train(epochs=1, seed=1, progress_bar=False)
    with caplog.at_level(logging.INFO, "nnhandler"):
        callback.save_now(handler, 1, dict(handler.last_logs))  # returns: upload held
        callback.save_now(handler, 1, dict(handler.last_logs))  # ep001 again: it waits
        assert callback.mirror.pending == 2
        assert "waits for the upload of heldmemory://" in caplog.text
        (tmp_path / "ep001.pth").unlink()  # the queued upload's bytes are its own link
        gate.set()
        callback.mirror.report(handler, wait=True)
    assert callback.mirror.pending == 0 and callback.mirror.uploads == 2
    assert memory_object_names(mirror_root) == ["ep001.pth"]


def test_an_upload_failure_under_raise_reaches_the_next_save(
        tmp_path: Path, mirror_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNHANDLER_REMOTE_TIMEOUT", "0.2")
    monkeypatch.setenv("NNHANDLER_REMOTE_RETRIES", "0")
    gate = threading.Event()
    handler = make_handler(n=16)
    handler.auto_save(1, tmp_path, name="ep{epoch:03d}", on_save_error="raise",
                      mirror=mirror_root.replace("memory://", "heldmemory://"),
                      storage_options={"gate": gate})
    try:
        with pytest.raises(RemoteStorageError, match=r"upload to 'heldmemory://.*ep001\.pth' "
                                                     r"failed after 1 attempt"):
            handler.train(epochs=3, seed=1, progress_bar=False)
        assert (tmp_path / "ep001.pth").is_file()  # the local checkpoint stands
    finally:
        gate.set()


@pytest.mark.parametrize(("save_path", "mirror", "message"), [
    ("ck", "elsewhere", r"mirror='elsewhere' is not an object-storage URL"),
    ("ck", "file:///tmp/x", r"is not an object-storage URL"),
    ("memory://bucket/run", "memory://bucket/copy", r"needs a local save_path"),
], ids=["local-folder", "file-url", "url-save-path"])
def test_a_wrong_mirror_is_refused_when_configured(tmp_path: Path, save_path: str,
                                                   mirror: str, message: str) -> None:
    handler = make_handler(n=16)
    target = save_path if "://" in save_path else tmp_path / save_path
    with pytest.raises(ValueError, match=message):  # pydantic's, as for every option
        handler.auto_save(1, target, mirror=mirror)


def test_the_mirror_survives_a_checkpoint_but_not_its_options(tmp_path: Path,
                                                              mirror_root: str) -> None:
    handler = make_handler(n=16)
    handler.auto_save(1, tmp_path, name="ep{epoch:03d}", mirror=mirror_root,
                      storage_options={"skip_instance_cache": True})
    handler.train(epochs=1, seed=1, progress_bar=False)
    loaded = NNHandler.load(tmp_path / "ep001.pth")
    saver = loaded.auto_save_callback
    assert saver is not None and saver.config.mirror == mirror_root
    assert saver.config.storage_options is None
    assert f"mirror={mirror_root!r}" in repr(saver)


# ============================================================================================
# moto's S3 server
# ============================================================================================
def test_s3_mirror_with_retention_and_resume(tmp_path: Path, s3_bucket: str) -> None:
    mirror = f"s3://{s3_bucket}/run"
    handler = make_handler(n=16)
    handler.auto_save(1, tmp_path / "ck", name="ep{epoch:03d}", keep_last=2, async_save=True,
                      mirror=mirror)
    handler.train(epochs=3, seed=1, progress_bar=False)
    fs = s3_filesystem()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/run")) == [
        "ep002.pth", "ep003.pth", INDEX_FILE]
    shutil.rmtree(tmp_path / "ck")
    again = make_handler(n=16)
    again.auto_save(1, tmp_path / "ck", name="ep{epoch:03d}", keep_last=2, mirror=mirror)
    again.train(until_epoch=4, resume="latest", seed=1, progress_bar=False)
    assert again.epoch == 4 and again.train_losses[:3] == handler.train_losses
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/run")) == [
        "ep003.pth", "ep004.pth", INDEX_FILE]
