"""Checkpoints at fsspec URLs (issue 15): the storage seam, ``memory://`` for the fast unit
tests and moto's real S3 server (``tests/s3_testing.py``) for the rest.

Nothing of nnhandler is mocked. Where a store must misbehave, it is a real fsspec filesystem
(a ``MemoryFileSystem`` subclass) that fails or blocks some calls, or a TCP server that never
answers.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from nnh_testing import Ballast, assert_deep_equal, make_handler
from s3_testing import s3_filesystem

from nnhandler import (
    CheckpointCorruptedError,
    CheckpointError,
    ConfigurationError,
    NNHandler,
    NoCheckpointFoundError,
    RemoteStorageError,
)
from nnhandler.checkpoint import read_checkpoint
from nnhandler.checkpoint.remote import FsspecStore, RemoteSettings
from nnhandler.checkpoint.remote_checkpoints import list_remote_checkpoints
from nnhandler.checkpoint.storage import LOCAL_STORE, URL, is_url, location_of, store_for


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh ``memory://`` folder, emptied afterwards."""
    root = f"memory://nnh-test-{id(object()):x}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(URL(root).key):
        fs.rm(URL(root).key, recursive=True)


def trained(epochs: int = 2) -> NNHandler:
    handler = make_handler(n=32)
    handler.train(epochs=epochs, seed=3, progress_bar=False)
    return handler


def assert_same_handler(a: NNHandler, b: NNHandler) -> None:
    assert b.epoch == a.epoch
    assert b.train_losses == a.train_losses and b.val_losses == a.val_losses
    assert_deep_equal(a.module.state_dict(), b.module.state_dict())


# ============================================================================================
# locations
# ============================================================================================
@pytest.mark.parametrize(("url", "protocol", "key", "name", "suffix", "parent"), [
    ("s3://bucket/run/ep010.pth", "s3", "bucket/run/ep010.pth", "ep010.pth", ".pth",
     "s3://bucket/run"),
    ("S3://bucket/run/", "s3", "bucket/run", "run", "", "s3://bucket"),
    ("gs://b/x.dcp", "gs", "b/x.dcp", "x.dcp", ".dcp", "gs://b"),
    ("memory://root", "memory", "root", "root", "", "memory://root"),
], ids=["s3-file", "trailing-slash-and-case", "gs-dcp", "bucket-only"])
def test_url_parts(url: str, protocol: str, key: str, name: str, suffix: str,
                   parent: str) -> None:
    location = URL(url)
    assert (location.protocol, location.key, location.name, location.suffix) == (
        protocol, key, name, suffix)
    assert location.parent == parent and isinstance(location.parent, URL)
    assert str(location / "a.pth") == f"{location}/a.pth"


@pytest.mark.parametrize("bad", ["", "..", "a/b"], ids=["empty", "dotdot", "separator"])
def test_url_join_takes_plain_names_only(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="is not a plain name"):
        URL("s3://bucket/run") / bad


@pytest.mark.parametrize(("value", "expected"), [
    ("checkpoints/ep1.pth", Path("checkpoints/ep1.pth")),
    (Path("s3:/odd"), Path("s3:/odd")),
    ("file:///tmp/run/x.pth", Path("/tmp/run/x.pth")),
    ("C://windows-like", Path("C://windows-like")),
    ("s3://b/x.pth", URL("s3://b/x.pth")),
], ids=["relative-path", "path-object", "file-url-is-local", "drive-letter", "s3"])
def test_location_of(value: Any, expected: Path | URL) -> None:
    location = location_of(value)
    assert location == expected and type(location) is type(expected)
    assert is_url(value) == isinstance(expected, URL) or str(value).startswith("file://")


@pytest.mark.parametrize("value", ["s3://", "s3:///"], ids=["nothing", "slash"])
def test_url_without_bucket_is_refused(value: str) -> None:
    with pytest.raises(ConfigurationError, match="names no bucket or path"):
        URL(value)


def test_local_paths_get_the_local_store_and_refuse_storage_options(tmp_path: Path) -> None:
    assert store_for(tmp_path) is LOCAL_STORE
    with pytest.raises(ConfigurationError, match=r"storage_options=\{'anon': True\}.*local path"):
        store_for(tmp_path, {"anon": True})
    handler = trained(1)
    with pytest.raises(ConfigurationError, match="apply to URLs"):
        handler.save("ck.pth", storage_options={"anon": True})


def test_a_url_without_fsspec_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if it were not installed
    with pytest.raises(ConfigurationError, match=r"pip install nnhandler\[remote\]"):
        store_for(URL("s3://bucket/run"))
    with pytest.raises(ConfigurationError, match=r"'s3://bucket/x.pth'.*nnhandler\[remote\]"):
        trained(1).save("s3://bucket/x.pth")


def test_an_unknown_protocol_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="nosuchstore"):
        store_for(URL("nosuchstore://bucket/x.pth"))


@pytest.mark.parametrize(("variable", "value", "match"), [
    ("NNHANDLER_REMOTE_TIMEOUT", "soon", "is not a number"),
    ("NNHANDLER_REMOTE_TIMEOUT", "0", "positive number of seconds"),
    ("NNHANDLER_REMOTE_TIMEOUT", "inf", "positive number of seconds"),
    ("NNHANDLER_REMOTE_RETRIES", "2.5", "is not an integer"),
    ("NNHANDLER_REMOTE_RETRIES", "-1", "0 or more"),
], ids=["timeout-text", "timeout-zero", "timeout-inf", "retries-float", "retries-negative"])
def test_bad_remote_settings_name_the_value(monkeypatch: pytest.MonkeyPatch, variable: str,
                                            value: str, match: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=match):
        RemoteSettings.from_environment()


# ============================================================================================
# memory://: round trips, verification, choosing the latest
# ============================================================================================
def test_save_and_load_round_trip_on_memory(memory_root: str) -> None:
    handler = trained(2)
    url = f"{memory_root}/run/ep002.pth"
    saved = handler.save(url)
    assert saved == url and isinstance(saved, URL)
    loaded = NNHandler.load(url, device="cpu")
    assert_same_handler(handler, loaded)
    # the object is byte for byte a checkpoint that the local reader accepts
    local = Path("copy.pth")
    local.write_bytes(fsspec.filesystem("memory").cat_file(URL(url).key))
    assert read_checkpoint(local).epoch == 2


def test_saved_checkpoint_event_names_the_url(memory_root: str) -> None:
    from nnhandler import Callback

    seen: list[Any] = []

    class Recorder(Callback):
        def on_checkpoint_saved(self, path: Any, **kwargs: Any) -> None:
            seen.append(path)

    handler = trained(1)
    handler.add_callback(Recorder())
    handler.save(f"{memory_root}/x.pth")
    assert seen == [f"{memory_root}/x.pth"]


@pytest.mark.parametrize(("damage", "match"), [
    ("flip", "is corrupted: CRC-32"),
    ("truncate", "no intact integrity record|too short|truncated"),
], ids=["bit-flip", "truncated"])
def test_a_damaged_object_is_corruption_named_by_its_url(memory_root: str, damage: str,
                                                         match: str) -> None:
    url = URL(f"{memory_root}/ep001.pth")
    trained(1).save(url)
    fs = fsspec.filesystem("memory")
    data = bytearray(fs.cat_file(url.key))
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        del data[len(data) // 3:]
    fs.pipe_file(url.key, bytes(data))
    with pytest.raises(CheckpointCorruptedError, match=match) as raised:
        NNHandler.load(url, device="cpu")
    assert str(url) in str(raised.value) and "nnhandler-staging" not in str(raised.value)


def test_load_of_a_missing_object_names_it(memory_root: str) -> None:
    with pytest.raises(CheckpointError, match=r"'memory://.*/nothing.pth' does not exist"):
        NNHandler.load(f"{memory_root}/nothing.pth", device="cpu")


def test_load_latest_falls_back_past_a_corrupt_newest_object(
        memory_root: str, caplog: pytest.LogCaptureFixture) -> None:
    handler = make_handler(n=32)
    for epoch in (1, 2, 3):
        handler.train(until_epoch=epoch, seed=3, progress_bar=False)
        handler.save(f"{memory_root}/run/ep{epoch:03d}.pth")
    fs = fsspec.filesystem("memory")
    newest = URL(f"{memory_root}/run/ep003.pth")
    data = bytearray(fs.cat_file(newest.key))
    data[200] ^= 1
    fs.pipe_file(newest.key, bytes(data))
    fs.pipe_file(URL(f"{memory_root}/run/notes.txt").key, b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        latest = NNHandler.load_latest(f"{memory_root}/run", device="cpu")
    assert latest.epoch == 2
    assert f"skipping {newest}" in caplog.text and "corrupted" in caplog.text


def test_load_latest_of_an_empty_url_is_no_checkpoint_found(memory_root: str) -> None:
    with pytest.raises(NoCheckpointFoundError, match="memory://"):
        NNHandler.load_latest(f"{memory_root}/empty", device="cpu")


def test_listing_ranks_by_recorded_epoch_and_skips_non_checkpoints(memory_root: str) -> None:
    handler = make_handler(n=32)
    directory = URL(f"{memory_root}/ranked")
    # names that sort the other way round than the recorded epochs
    for epoch, name in ((1, "z.pth"), (2, "m.pth"), (3, "a.pth")):
        handler.train(until_epoch=epoch, seed=3, progress_bar=False)
        handler.save(directory / name)
    handler.export(Path("weights.pth"))
    fs = fsspec.filesystem("memory")
    fs.put_file("weights.pth", (directory / "weights.pth").key)
    fs.pipe_file((directory / ".ep9.pth.tmp-1-00000000").key, b"partial")
    store = store_for(directory)
    candidates = list_remote_checkpoints(store, directory)
    assert [c.path.name for c in candidates] == ["a.pth", "m.pth", "z.pth"]
    assert [c.record.epoch for c in candidates if c.record] == [3, 2, 1]


# ============================================================================================
# bounded failure: retries, deadlines (a real fsspec filesystem that misbehaves)
# ============================================================================================
class FlakyMemoryFileSystem(MemoryFileSystem):  # type: ignore[misc]
    """``memory://`` whose ``put_file`` fails ``failures`` times (``error``), or blocks until
    ``release`` is set."""

    protocol = "flakymemory"
    cachable = False

    def __init__(self, failures: int = 0, error: type[Exception] = ConnectionError,
                 release: threading.Event | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failures, self.error, self.release, self.calls = failures, error, release, 0

    def put_file(self, lpath: str, rpath: str, **kwargs: Any) -> None:
        self.calls += 1
        if self.release is not None:
            self.release.wait()
        if self.calls <= self.failures:
            raise self.error(f"injected failure {self.calls}")
        super().put_file(lpath, rpath, **kwargs)


def flaky_store(**kwargs: Any) -> tuple[FsspecStore, FlakyMemoryFileSystem]:
    settings = kwargs.pop("settings", RemoteSettings(timeout=30, retries=2, backoff=0.01))
    fs = FlakyMemoryFileSystem(**kwargs)
    return FsspecStore(fs, settings), fs


def write_bytes(data: bytes) -> Any:
    def write(local: Path) -> int:
        local.write_bytes(data)
        return len(data)

    return write


@pytest.mark.parametrize(("failures", "published"), [(0, True), (2, True), (3, False)],
                         ids=["no-failure", "within-retries", "beyond-retries"])
def test_transient_failures_are_retried_a_bounded_number_of_times(
        memory_root: str, failures: int, published: bool) -> None:
    store, fs = flaky_store(failures=failures)
    target = URL(f"{memory_root}/flaky.bin")
    if published:
        assert store.publish(target, write_bytes(b"complete")) == 8
        assert fs.cat_file(target.key) == b"complete"
    else:
        with pytest.raises(RemoteStorageError,
                           match=r"upload to '.*flaky.bin' failed after 3 attempt.*injected"):
            store.publish(target, write_bytes(b"complete"))
        assert not fs.exists(target.key)
    assert fs.calls == min(failures + 1, 3)
    assert not list(Path(store_staging()).glob(".flaky.bin.tmp-*")), "staging file left over"


def store_staging() -> Path:
    from nnhandler.checkpoint.remote import staging_directory

    return staging_directory()


def test_a_permanent_error_is_not_retried(memory_root: str) -> None:
    store, fs = flaky_store(failures=5, error=PermissionError)
    with pytest.raises(PermissionError, match="injected failure 1"):
        store.publish(URL(f"{memory_root}/denied.bin"), write_bytes(b"x"))
    assert fs.calls == 1


def test_an_operation_past_its_deadline_fails_and_training_code_goes_on(
        memory_root: str) -> None:
    release = threading.Event()
    store, fs = flaky_store(release=release,
                            settings=RemoteSettings(timeout=0.2, retries=1, backoff=0.0))
    target = URL(f"{memory_root}/stuck.bin")
    try:
        with pytest.raises(RemoteStorageError,
                           match=r"failed after 2 attempt.*TimeoutError.*no answer within"):
            store.publish(target, write_bytes(b"late"))
        assert fs.calls == 2
    finally:
        release.set()  # the abandoned attempts end (and publish the same complete bytes)


# ============================================================================================
# moto's S3 server
# ============================================================================================
def test_s3_round_trip_with_the_environment_configuration(s3_bucket: str) -> None:
    handler = trained(2)
    url = f"s3://{s3_bucket}/run/ep002.pth"
    assert handler.save(url) == url
    assert s3_filesystem().exists(f"{s3_bucket}/run/ep002.pth")
    assert_same_handler(handler, NNHandler.load(url, device="cpu"))


def test_s3_round_trip_with_storage_options(s3_bucket: str, s3_endpoint: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the options name the server
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    handler = trained(1)
    url = f"s3://{s3_bucket}/opts/ep001.pth"
    handler.save(url, storage_options=options)
    loaded = NNHandler.load(url, device="cpu", storage_options=options)
    assert_same_handler(handler, loaded)
    assert NNHandler.load_latest(f"s3://{s3_bucket}/opts", device="cpu",
                                 storage_options=options).epoch == 1


def test_s3_load_latest_with_a_corrupt_newest_object(
        s3_bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    handler = make_handler(n=32)
    for epoch in (1, 2):
        handler.train(until_epoch=epoch, seed=3, progress_bar=False)
        handler.save(f"s3://{s3_bucket}/run/ep{epoch:03d}.pth")
    fs = s3_filesystem()
    key = f"{s3_bucket}/run/ep002.pth"
    data = bytearray(fs.cat_file(key))
    data[-200] ^= 0xFF  # inside the integrity record: the listing already refuses it
    fs.pipe_file(key, bytes(data))
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        latest = NNHandler.load_latest(f"s3://{s3_bucket}/run", device="cpu")
    assert latest.epoch == 1
    assert f"skipping s3://{s3_bucket}/run/ep002.pth" in caplog.text


@pytest.mark.slow
def test_a_large_object_goes_up_whole_by_multipart_upload(s3_bucket: str) -> None:
    """Above s3fs's threshold (2 x 50 MiB) the upload is multipart: still one object,
    visible only once complete, that verifies."""
    handler = make_handler(n=32)
    handler.register_state_provider(Ballast(torch.arange(28 * 2**20, dtype=torch.int32)))
    url = f"s3://{s3_bucket}/big/ep000.pth"
    handler.save(url)
    fs = s3_filesystem()
    assert fs.info(f"{s3_bucket}/big/ep000.pth")["size"] > 110 * 2**20
    assert fs.ls(f"{s3_bucket}/big") == [f"{s3_bucket}/big/ep000.pth"]
    with pytest.warns(UserWarning, match=r"holds state for \['ballast'\]"):
        assert NNHandler.load(url, device="cpu").epoch == 0




@pytest.mark.slow
def test_an_endpoint_that_never_answers_fails_within_the_bounded_retries(
        silent_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNHANDLER_REMOTE_TIMEOUT", "1")
    monkeypatch.setenv("NNHANDLER_REMOTE_RETRIES", "1")
    handler = trained(1)
    with pytest.raises(RemoteStorageError, match=r"upload to 's3://stuck/x.pth' failed after "
                                                 r"2 attempt"):
        handler.save("s3://stuck/x.pth", storage_options={"endpoint_url": silent_endpoint,
                                                          "key": "k", "secret": "s"})
    assert handler.epoch == 1  # the handler is intact: training can go on
    handler.train(epochs=1, progress_bar=False)
    assert handler.epoch == 2


# ============================================================================================
# the CLI on s3:// URLs (a real subprocess, configured by the environment like a user's shell)
# ============================================================================================
def run_cli(*arguments: str) -> Any:
    import json
    import os
    import subprocess

    process = subprocess.run([sys.executable, "-m", "nnhandler.cli", *arguments],
                             capture_output=True, text=True, timeout=120, env=dict(os.environ),
                             check=False)
    parsed = json.loads(process.stdout) if "--json" in arguments and process.stdout else None
    return process.returncode, parsed, process.stdout + process.stderr


@pytest.mark.slow
def test_cli_list_verify_inspect_on_s3(s3_bucket: str) -> None:
    handler = make_handler(n=32)
    for epoch in (1, 2):
        handler.train(until_epoch=epoch, seed=3, progress_bar=False)
        handler.save(f"s3://{s3_bucket}/run/ep{epoch:03d}.pth")
    run = f"s3://{s3_bucket}/run"
    code, rows, output = run_cli("list", run, "--json")
    assert code == 0, output
    assert [(row["name"], row["epoch"], row["valid"], row["latest"]) for row in rows] == [
        ("ep002.pth", 2, True, True), ("ep001.pth", 1, True, False)]
    code, results, _ = run_cli("verify", f"{run}/ep001.pth", f"{run}/missing.pth", "--json")
    assert code == 1
    assert [(r["path"], r["kind"]) for r in results] == [
        (f"{run}/ep001.pth", "checkpoint"), (f"{run}/missing.pth", "missing")]
    code, info, _ = run_cli("inspect", f"{run}/ep002.pth", "--json")
    assert code == 0 and info["epoch"] == 2 and info["path"] == f"{run}/ep002.pth"
    fs = s3_filesystem()
    data = bytearray(fs.cat_file(f"{s3_bucket}/run/ep002.pth"))
    data[100] ^= 1
    fs.pipe_file(f"{s3_bucket}/run/ep002.pth", bytes(data))
    code, rows, _ = run_cli("list", run, "--json")
    assert code == 1
    assert [(row["name"], row["valid"], row["latest"]) for row in rows] == [
        ("ep002.pth", False, False), ("ep001.pth", True, True)]
    assert f"'{run}/ep002.pth' is corrupted" in rows[0]["problem"]
    code, results, _ = run_cli("verify", f"{run}/ep002.pth", "--json")
    assert code == 1 and results[0]["kind"] == "corrupt"
    assert "nnhandler-staging" not in results[0]["error"]
    code, _, text = run_cli("list", run)
    assert code == 1 and "ep002.pth" in text and "CORRUPT" in text


CLI_PROBE = """
import json, sys
from nnhandler.cli import main
codes = [main(arguments) for arguments in json.loads(sys.argv[1])]
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
"""


@pytest.mark.slow
def test_cli_verify_and_list_of_urls_never_import_torch(s3_bucket: str) -> None:
    """Like local paths, ``nnhandler verify``/``list`` of an ``s3://`` URL start without torch
    (the copy is checked by the same torch-free reader)."""
    import json
    import os
    import subprocess

    handler = make_handler(n=32)
    handler.train(epochs=1, seed=3, progress_bar=False)
    run = f"s3://{s3_bucket}/run"
    handler.save(f"{run}/ep001.pth")
    commands = [["verify", f"{run}/ep001.pth"], ["list", run], ["list", "--no-verify", run],
                ["list", "--json", run]]
    finished = subprocess.run([sys.executable, "-c", CLI_PROBE, json.dumps(commands)],
                              capture_output=True, text=True, timeout=120, env=dict(os.environ),
                              check=False)
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0] * len(commands), "torch": False}


def test_an_endpoint_from_the_environment_is_part_of_the_cached_filesystems_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """fsspec caches filesystems by their arguments: a process whose AWS_ENDPOINT_URL changes
    (a second S3 server) must not keep writing through the first one."""
    url = location_of("s3://bucket/run/ck.pth")
    assert isinstance(url, URL)
    endpoints = []
    for endpoint in ("http://127.0.0.1:1", "http://127.0.0.1:2"):
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        store = FsspecStore.for_url(url, None)
        endpoints.append(store.fs.client_kwargs["endpoint_url"])
    assert endpoints == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    explicit = FsspecStore.for_url(url, {"client_kwargs": {"endpoint_url": "http://127.0.0.1:3"}})
    assert explicit.fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:3"
