"""Auto-save to fsspec URLs (issue 15): the schedule, names, ``-v<N>``, ``overwrite``,
retention and its index, removal confinement, ``on_save_error``, ``async_save``,
``train(resume="latest")`` and ``resume_from`` on ``memory://`` and on moto's S3 server.

Nothing of nnhandler is mocked; a store that must misbehave is a real fsspec filesystem (a
``MemoryFileSystem`` subclass) that blocks its uploads, or a TCP server that never answers.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from nnh_testing import make_handler
from s3_testing import s3_filesystem

from nnhandler import ConfigurationError, NNHandler, RemoteStorageError
from nnhandler.checkpoint.index import INDEX_FILE
from nnhandler.checkpoint.remote_checkpoints import remote_integrity_record
from nnhandler.checkpoint.removal import Outcome
from nnhandler.checkpoint.storage import URL, store_for
from nnhandler.checkpoint.store_files import StoreRemovalGuard, abort_stale_uploads

LOGGER = logging.getLogger("nnhandler.test_object_storage_autosave")


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh ``memory://`` folder, emptied afterwards."""
    root = f"memory://nnh-autosave-{id(object()):x}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(URL(root).key):
        fs.rm(URL(root).key, recursive=True)


def names(root: str) -> list[str]:
    """The object names directly under ``root``, sorted."""
    fs, key = fsspec.filesystem(URL(root).protocol), URL(root).key
    fs.invalidate_cache()
    try:
        return sorted(path.rsplit("/", 1)[-1] for path in fs.ls(key, detail=False))
    except FileNotFoundError:
        return []


def index_of(root: str) -> dict[str, Any]:
    url = URL(root) / INDEX_FILE
    data = store_for(url).get_bytes(url)
    assert data is not None, f"no index at {url}"
    return json.loads(data)  # type: ignore[no-any-return]


# ============================================================================================
# the schedule, names, overwrite and retention on memory://
# ============================================================================================
def test_retention_on_a_url_keeps_its_rules_and_writes_the_index_last(memory_root: str) -> None:
    handler = make_handler(n=32)
    handler.auto_save(1, memory_root, name="ep{epoch:03d}", keep_last=2, keep_every=3)
    handler.train(epochs=5, seed=1, progress_bar=False)
    assert names(memory_root) == ["ep003.pth", "ep004.pth", "ep005.pth", INDEX_FILE]
    section = index_of(memory_root)["callbacks"][f"autosave:{memory_root}/ep{{epoch:03d}}"]
    kept = {entry["name"]: entry["reasons"] for entry in section["checkpoints"]}
    assert kept == {"ep003.pth": ["every 3 epochs"], "ep004.pth": ["latest 2/2"],
                    "ep005.pth": ["latest 1/2"]}
    assert section["removing"] == []


def test_overwrite_on_a_url_keeps_only_the_latest(memory_root: str) -> None:
    handler = make_handler(n=32)
    handler.auto_save(1, memory_root, name="ep{epoch:03d}", overwrite=True)
    handler.train(epochs=3, seed=1, progress_bar=False)
    assert names(memory_root) == ["ep003.pth"]
    assert handler.auto_save_callback is not None
    assert handler.auto_save_callback.last_saved_path == f"{memory_root}/ep003.pth"


def test_resume_latest_on_a_url_continues_the_lineage_and_its_retention(
        memory_root: str) -> None:
    first = make_handler(n=32)
    first.auto_save(1, memory_root, name="ep{epoch:03d}", keep_last=2)
    first.train(epochs=3, seed=1, progress_bar=False)
    second = make_handler(n=32)
    second.auto_save(1, memory_root, name="ep{epoch:03d}", keep_last=2)
    second.train(until_epoch=5, resume="latest", seed=1, progress_bar=False)
    assert second.epoch == 5 and len(second.train_losses) == 5
    assert second.train_losses[:3] == first.train_losses
    # the resumed run removed the files of its own lineage that no rule keeps any more
    assert names(memory_root) == ["ep004.pth", "ep005.pth", INDEX_FILE]


def test_another_runs_object_under_the_name_is_never_replaced(memory_root: str) -> None:
    other = make_handler(n=32)
    other.train(epochs=1, seed=2, progress_bar=False)
    other.save(f"{memory_root}/ep001.pth")
    foreign = bytes(remote_integrity_record(store_for(URL(memory_root)),
                                            URL(f"{memory_root}/ep001.pth"))["lineage"], "ascii")
    handler = make_handler(n=32)
    handler.auto_save(1, memory_root, name="ep{epoch:03d}", overwrite=True)
    handler.train(epochs=2, seed=1, progress_bar=False)
    assert names(memory_root) == ["ep001.pth", "ep002.pth"]  # -v1 removed by overwrite
    record = remote_integrity_record(store_for(URL(memory_root)),
                                     URL(f"{memory_root}/ep001.pth"))
    assert record["lineage"].encode() == foreign  # the other run's object is untouched
    first = make_handler(n=32)
    first.auto_save(1, memory_root, name="ep{epoch:03d}")
    first.train(epochs=1, seed=1, progress_bar=False)
    assert "ep001-v1.pth" in names(memory_root)


def test_resume_from_a_url_with_storage_options(memory_root: str) -> None:
    saved = make_handler(n=32)
    saved.train(epochs=2, seed=1, progress_bar=False)
    url = f"{memory_root}/ep002.pth"
    saved.save(url, storage_options={"skip_instance_cache": True})
    handler = make_handler(n=32)
    handler.resume_from(url, storage_options={"skip_instance_cache": True})
    assert handler.epoch == 2 and handler.train_losses == saved.train_losses


def test_storage_options_are_never_written_into_a_checkpoint(memory_root: str) -> None:
    secret = "s3cr3t-never-in-a-file"
    handler = make_handler(n=32)
    callback = handler.auto_save(1, memory_root, name="ep{epoch:03d}",
                                 storage_options={"secret_marker": secret})
    assert "storage_options" not in callback.state_dict()["config"]
    assert secret not in repr(callback)
    handler.train(epochs=1, seed=1, progress_bar=False)
    data = fsspec.filesystem("memory").cat_file(f"{URL(memory_root).key}/ep001.pth")
    assert secret.encode() not in data
    loaded = NNHandler.load(f"{memory_root}/ep001.pth")
    assert loaded.auto_save_callback is not None
    assert loaded.auto_save_callback.config.storage_options is None


@pytest.mark.parametrize(("save_path", "options", "match"), [
    ("ck", {"anon": True}, r"storage_options=\{'anon': True\} were given for the local path"),
    ("nosuchscheme://b/run", None, r"nosuchscheme"),
], ids=["options-for-a-local-path", "unknown-protocol"])
def test_a_wrong_store_is_refused_when_configured(save_path: str, options: Any,
                                                 match: str) -> None:
    handler = make_handler(n=8)
    with pytest.raises(ConfigurationError, match=match):
        handler.auto_save(1, save_path, storage_options=options)


# ============================================================================================
# removal confinement over a store
# ============================================================================================
@pytest.fixture
def guarded(memory_root: str) -> tuple[StoreRemovalGuard, NNHandler]:
    """A guard of ``memory_root`` with template ``ep{epoch:03d}``, and a handler whose lineage
    it is, with ``ep001.pth`` of that lineage, and traps outside the rules."""
    handler = make_handler(n=16)
    handler.auto_save(1, memory_root, name="ep{epoch:03d}")
    handler.train(epochs=1, seed=1, progress_bar=False)
    handler.save(f"{memory_root}/nested/ep005.pth")
    handler.save(f"{memory_root}-sibling/ep006.pth")
    other = make_handler(n=16)
    other.train(epochs=1, seed=2, progress_bar=False)  # a run of its own lineage
    other.save(f"{memory_root}/ep007.pth")
    other.save(f"{memory_root}/notmine.pth")
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{URL(memory_root).key}/ep008.pth", b"not a checkpoint")
    guard = StoreRemovalGuard(URL(memory_root), "ep{epoch:03d}", handler.progress.lineage,
                              LOGGER, store=store_for(URL(memory_root)))
    return guard, handler


@pytest.mark.parametrize(("recorded", "reason"), [
    ("{root}/nested/ep005.pth", "not directly inside save_path"),
    ("nested/ep005.pth", "not directly inside save_path"),
    ("{root}-sibling/ep006.pth", "not directly inside save_path"),
    ("..", "not a file name"),
    ("{root}/../{leaf}-sibling/ep006.pth", "not directly inside save_path"),
    ("ep007.pth", "belongs to another run"),
    ("notmine.pth", "does not match the name template"),
    ("ep008.pth", "records no lineage"),
    ("/tmp/ep001.pth", "not directly inside save_path"),
    ("{root}/nested", "does not match the name template"),
], ids=["nested-url", "nested-relative", "sibling-prefix", "dotdot", "url-with-dotdot",
        "other-lineage", "other-name", "no-lineage", "local-path", "a-folder"])
def test_the_store_guard_refuses_what_the_local_guard_refuses(
        guarded: tuple[StoreRemovalGuard, NNHandler], memory_root: str, recorded: str,
        reason: str, caplog: pytest.LogCaptureFixture) -> None:
    guard, _ = guarded
    value = recorded.format(root=memory_root, leaf=URL(memory_root).name)
    before = fsspec.filesystem("memory").find(URL(memory_root).key)
    with caplog.at_level(logging.WARNING, LOGGER.name):
        outcome = guard.remove(value, what="retention: superseded checkpoint",
                               in_directory=True)
    assert outcome in (Outcome.REFUSED, Outcome.GONE)
    if outcome is Outcome.REFUSED:
        assert reason in caplog.text
    assert fsspec.filesystem("memory").find(URL(memory_root).key) == before


@pytest.mark.parametrize("recorded", ["ep001.pth", "{root}/ep001.pth"], ids=["name", "url"])
def test_the_store_guard_removes_its_own_lineages_file(
        guarded: tuple[StoreRemovalGuard, NNHandler], memory_root: str, recorded: str) -> None:
    guard, _ = guarded
    assert guard.remove(recorded.format(root=memory_root), what="test",
                        in_directory=True) is Outcome.REMOVED
    assert "ep001.pth" not in names(memory_root)
    assert guard.remove("ep001.pth", what="test", in_directory=True) is Outcome.GONE


# ============================================================================================
# failures and background uploads
# ============================================================================================
class GatedMemoryFileSystem(MemoryFileSystem):  # type: ignore[misc]
    """``memory://`` whose uploads (``put_file``) wait until ``gate`` is set."""

    protocol = "gatedmemory"
    cachable = False

    def __init__(self, gate: threading.Event | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = gate

    def put_file(self, lpath: str, rpath: str, **kwargs: Any) -> None:
        if self.gate is not None:
            self.gate.wait()
        super().put_file(lpath, rpath, **kwargs)


fsspec.register_implementation("gatedmemory", GatedMemoryFileSystem, clobber=True)


def test_async_save_to_a_url_never_waits_for_the_upload(memory_root: str) -> None:
    gate = threading.Event()
    root = memory_root.replace("memory://", "gatedmemory://")
    handler = make_handler(n=16)
    callback = handler.auto_save(None, root, name="ep{epoch:03d}", async_save=True,
                                 storage_options={"gate": gate})
    handler.train(epochs=1, seed=1, progress_bar=False)
    try:
        path = callback.save_now(handler, 1, dict(handler.last_logs))
        # save_now returned while the upload is held at the gate: training was not blocked
        assert path == f"{root}/ep001.pth" and callback.write_in_flight == path
        assert "ep001.pth" not in names(memory_root)
    finally:
        gate.set()
    callback.flush(handler)
    assert callback.write_in_flight is None and callback.failed_saves == 0
    assert NNHandler.load(f"{memory_root}/ep001.pth").epoch == 1


@pytest.mark.slow
def test_an_unanswering_endpoint_fails_at_the_start_within_the_timeout(
        silent_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNHANDLER_REMOTE_TIMEOUT", "1")
    monkeypatch.setenv("NNHANDLER_REMOTE_RETRIES", "0")
    handler = make_handler(n=16)
    handler.auto_save(1, "s3://stuck/run", storage_options={
        "endpoint_url": silent_endpoint, "key": "k", "secret": "s"})
    with pytest.raises(ConfigurationError,
                       match=r"cannot write to save_path 's3://stuck/run'.*failed after 1 "
                             r"attempt"):
        handler.train(epochs=1, progress_bar=False)
    assert handler.epoch == 0


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_uploads_that_stop_answering_under_warn_let_training_go_on(
        memory_root: str, monkeypatch: pytest.MonkeyPatch, async_save: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NNHANDLER_REMOTE_TIMEOUT", "0.5")
    monkeypatch.setenv("NNHANDLER_REMOTE_RETRIES", "1")
    gate = threading.Event()  # never set while training: every upload hangs
    root = memory_root.replace("memory://", "gatedmemory://")
    handler = make_handler(n=16)
    callback = handler.auto_save(1, root, name="ep{epoch:03d}", async_save=async_save,
                                 storage_options={"gate": gate})
    try:
        with caplog.at_level(logging.ERROR, "nnhandler"):
            handler.train(epochs=2, seed=1, progress_bar=False)
        assert handler.epoch == 2 and callback.failed_saves == 2
        assert caplog.text.count("AUTO-SAVE FAILED") == 2
        assert "RemoteStorageError" in caplog.text and "no answer within" in caplog.text
        assert [name for name in names(memory_root) if name.endswith(".pth")] == []
    finally:
        gate.set()  # the abandoned attempts end (publishing the same complete bytes)


def test_on_save_error_raise_propagates_a_store_failure(
        memory_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNHANDLER_REMOTE_TIMEOUT", "0.2")
    monkeypatch.setenv("NNHANDLER_REMOTE_RETRIES", "0")
    gate = threading.Event()
    handler = make_handler(n=16)
    handler.auto_save(1, memory_root.replace("memory://", "gatedmemory://"),
                      on_save_error="raise", storage_options={"gate": gate})
    try:
        with pytest.raises(RemoteStorageError, match=r"upload to 'gatedmemory://.*failed "
                                                     r"after 1 attempt"):
            handler.train(epochs=1, seed=1, progress_bar=False)
    finally:
        gate.set()


# ============================================================================================
# moto's S3 server
# ============================================================================================
def test_s3_auto_save_rules_and_keep_best_with_the_index(s3_bucket: str) -> None:
    root = f"s3://{s3_bucket}/run"
    handler = make_handler(n=32)
    handler.auto_save(2, root, name="ep{epoch:03d}", keep_last=1, keep_best=1,
                      monitor="val_loss")
    handler.train(epochs=6, seed=1, progress_bar=False)
    fs = s3_filesystem()
    listed = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/run", detail=False))
    section = json.loads(fs.cat_file(f"{s3_bucket}/run/{INDEX_FILE}"))["callbacks"][
        f"autosave:{root}/ep{{epoch:03d}}"]
    kept = sorted(entry["name"] for entry in section["checkpoints"])
    assert listed == sorted([*kept, INDEX_FILE]) and "ep006.pth" in kept
    assert set(kept) <= {"ep002.pth", "ep004.pth", "ep006.pth"} and len(kept) <= 2
    resumed = NNHandler.load_latest(root)
    assert resumed.epoch == 6


def test_s3_stale_multipart_uploads_of_own_names_are_aborted(s3_bucket: str) -> None:
    fs = s3_filesystem()
    started = {key: fs.call_s3("create_multipart_upload", Bucket=s3_bucket, Key=key)["UploadId"]
               for key in ("run/ep001.pth", "run/other.bin", "elsewhere/ep001.pth")}
    store = store_for(URL(f"s3://{s3_bucket}/run"))
    aborted = abort_stale_uploads(store, URL(f"s3://{s3_bucket}/run"), ("ep{epoch:03d}",),
                                  LOGGER, before=datetime.now(timezone.utc).replace(year=2999))
    assert aborted == ["run/ep001.pth"]
    left = sorted(upload["Key"] for upload in fs.list_multipart_uploads(s3_bucket))
    assert left == ["elsewhere/ep001.pth", "run/other.bin"]
    assert not abort_stale_uploads(store, URL(f"s3://{s3_bucket}/run"), ("ep{epoch:03d}",),
                                   LOGGER)  # begun after this process started: not stale
    for key, upload in started.items():
        if key != "run/ep001.pth":
            fs.call_s3("abort_multipart_upload", Bucket=s3_bucket, Key=key, UploadId=upload)


def test_nnhandler_list_of_a_url_shows_what_the_index_keeps(memory_root: str) -> None:
    from nnhandler.remote_cli import list_url

    handler = make_handler(n=32)
    handler.auto_save(1, memory_root, name="ep{epoch:03d}", keep_last=2, keep_every=3)
    handler.train(epochs=4, seed=1, progress_bar=False)
    handler.save(f"{memory_root}/by-hand.pth")
    rows = list_url(memory_root, verify=False, keys=("loss",), logger=LOGGER)
    key = f"autosave:{memory_root}/ep{{epoch:03d}}"
    got = [(row["name"], row["in_index"], row["kept_by"], row["latest"]) for row in rows]
    # by-hand.pth has ep004's epoch and step: the one the index keeps ranks first
    assert got == [
        ("ep004.pth", True, [{"callback": key, "reasons": ["latest 1/2"]}], True),
        ("by-hand.pth", False, [], False),
        ("ep003.pth", True, [{"callback": key, "reasons": ["latest 2/2", "every 3 epochs"]}],
         False),
    ]
    from nnhandler.checkpoint.discovery import find_latest_valid

    assert find_latest_valid(memory_root, LOGGER) == f"{memory_root}/ep004.pth"
