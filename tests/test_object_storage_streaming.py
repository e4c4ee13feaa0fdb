"""Streaming uploads to S3 (issue 15): a checkpoint written straight into a multipart upload.

Against moto's S3 server through s3fs (nothing of nnhandler mocked): the parts go up while
the rest is written, the object appears whole only on completion (an older object of the name
stays readable until then), a writer's error or a lost upload leaves nothing, and a checkpoint
smaller than a part is one PUT.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nnh_testing import Ballast, make_handler
from s3_testing import s3_filesystem

from nnhandler import NNHandler, RemoteStorageError
from nnhandler.checkpoint.io import WRITER_ENV
from nnhandler.checkpoint.multipart import (
    MAX_PARTS,
    MIN_PART_SIZE,
    PART_SIZE,
    MultipartUpload,
    part_size,
)
from nnhandler.checkpoint.remote import FsspecStore, RemoteSettings
from nnhandler.checkpoint.storage import URL, store_for

SMALL_PART = MIN_PART_SIZE  # S3's smallest part: keeps the payloads of these tests small


def s3_store() -> FsspecStore:
    store = store_for(URL("s3://any"))
    assert isinstance(store, FsspecStore)
    return FsspecStore(store.fs, RemoteSettings(timeout=30, retries=1, backoff=0.0))


def etag(bucket_key: str) -> str:
    fs = s3_filesystem()
    return str(fs.info(bucket_key)["ETag"]).strip('"')


def incomplete_uploads(bucket: str) -> list[str]:
    fs = s3_filesystem()
    return sorted(str(upload["Key"]) for upload in fs.list_multipart_uploads(bucket))


# ============================================================================================
# the part sizes
# ============================================================================================
def test_parts_double_every_thousand_and_hold_more_than_s3s_largest_object() -> None:
    assert [part_size(n) for n in (1, 1000, 1001, 2000, 2001)] == [
        PART_SIZE, PART_SIZE, 2 * PART_SIZE, 2 * PART_SIZE, 4 * PART_SIZE]
    assert sum(part_size(n) for n in range(1, MAX_PARTS + 1)) > 5 * 2**40
    assert PART_SIZE >= MIN_PART_SIZE


@pytest.mark.parametrize(("first", "in_flight", "match"), [
    (MIN_PART_SIZE - 1, 4, "below S3's minimum"), (MIN_PART_SIZE, 0, "in_flight must be")],
    ids=["part-too-small", "no-uploader"])
def test_bad_upload_settings_name_the_value(s3_bucket: str, first: int, in_flight: int,
                                            match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MultipartUpload(s3_store(), URL(f"s3://{s3_bucket}/x.bin"), first, in_flight)


# ============================================================================================
# publication: whole or nothing
# ============================================================================================
@settings(max_examples=4, deadline=None)
@given(chunks=st.lists(st.integers(1, 3 * SMALL_PART), min_size=1, max_size=6))
def test_written_bytes_become_one_object_only_on_completion(s3_bucket: str,
                                                            chunks: list[int]) -> None:
    """Any sequence of writes (sizes across part boundaries) gives exactly those bytes, in
    ``ceil(total / part)`` parts, and nothing is visible before the completion."""
    payload = os.urandom(sum(chunks))
    key = f"{s3_bucket}/stream/{len(chunks)}-{len(payload)}.bin"
    upload = MultipartUpload(s3_store(), URL(f"s3://{key}"), SMALL_PART, in_flight=2)
    try:
        offset = 0
        for size in chunks:
            assert upload.write(memoryview(payload)[offset:offset + size]) == size
            offset += size
        assert upload.tell() == len(payload)
        assert not s3_filesystem().exists(key)  # parts may be up: still no object
        upload.complete()
    except BaseException:
        upload.abort()
        raise
    assert s3_filesystem().cat_file(key) == payload
    parts = -(-len(payload) // SMALL_PART)
    assert etag(key).endswith(f"-{parts}") if parts > 1 else "-" not in etag(key)
    assert incomplete_uploads(s3_bucket) == []


def test_an_older_object_stays_readable_until_the_new_one_is_complete(s3_bucket: str) -> None:
    key = f"{s3_bucket}/over/ep001.pth"
    fs = s3_filesystem()
    fs.pipe_file(key, b"the old checkpoint")
    new = os.urandom(2 * PART_SIZE + 17)

    def write(stream: Any) -> int:
        stream.write(new[:PART_SIZE + 5])  # a part handed to the uploaders
        assert incomplete_uploads(s3_bucket) == ["over/ep001.pth"]
        assert s3_filesystem().cat_file(key) == b"the old checkpoint"
        stream.write(new[PART_SIZE + 5:])
        return len(new)

    assert s3_store().publish(URL(f"s3://{key}"), write) == len(new)
    assert fs.cat_file(key) == new
    assert incomplete_uploads(s3_bucket) == []


def test_a_writer_error_mid_stream_leaves_nothing(s3_bucket: str) -> None:
    key = f"{s3_bucket}/fail/ep002.pth"
    fs = s3_filesystem()
    fs.pipe_file(f"{s3_bucket}/fail/ep001.pth", b"earlier")

    def write(stream: BinaryIO) -> int:
        stream.write(os.urandom(2 * PART_SIZE + 1))  # parts are up, the upload is begun
        raise RuntimeError("the writer failed half way")

    with pytest.raises(RuntimeError, match="half way"):
        s3_store().publish(URL(f"s3://{key}"), write)
    fs.invalidate_cache()
    assert fs.ls(f"{s3_bucket}/fail") == [f"{s3_bucket}/fail/ep001.pth"]
    assert incomplete_uploads(s3_bucket) == []  # aborted


def test_an_upload_lost_on_the_server_fails_the_save_and_publishes_nothing(
        s3_bucket: str) -> None:
    """Someone aborts the upload on the server while it is written: the next part (after its
    retries) fails, the writer stops at its next write, nothing appears under the name."""
    key = f"{s3_bucket}/lost/ep001.pth"
    fs = s3_filesystem()
    writes = 0

    def write(stream: BinaryIO) -> int:
        nonlocal writes
        stream.write(os.urandom(PART_SIZE))  # the first part: the upload is begun
        begun = fs.list_multipart_uploads(s3_bucket)
        assert [upload["Key"] for upload in begun] == ["lost/ep001.pth"]
        fs.call_s3("abort_multipart_upload", Bucket=s3_bucket, Key=begun[0]["Key"],
                   UploadId=begun[0]["UploadId"])
        for _ in range(200):
            stream.write(os.urandom(SMALL_PART))
            writes += 1
        return 0

    with pytest.raises((RemoteStorageError, FileNotFoundError), match=r"part|NoSuchUpload"):
        s3_store().publish(URL(f"s3://{key}"), write)
    assert writes < 200, "the writer went on after the failed part"
    assert not fs.exists(key)
    assert incomplete_uploads(s3_bucket) == []


# ============================================================================================
# checkpoints
# ============================================================================================
def saved_etag(bucket: str, name: str, handler: NNHandler) -> str:
    url = f"s3://{bucket}/ck/{name}"
    handler.save(url)
    loaded = NNHandler.load(url, device="cpu")
    assert loaded.epoch == handler.epoch
    for mine, theirs in zip(handler.module.parameters(), loaded.module.parameters(),
                            strict=True):
        assert torch.equal(mine, theirs)
    return etag(f"{bucket}/ck/{name}")


@pytest.mark.parametrize("writer", ["fast", "torch"])
def test_a_small_checkpoint_is_one_put_with_either_writer(
        s3_bucket: str, writer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WRITER_ENV, writer)
    handler = make_handler(n=32)
    handler.train(epochs=1, progress_bar=False, seed=1)
    assert "-" not in saved_etag(s3_bucket, f"{writer}.pth", handler)
    assert incomplete_uploads(s3_bucket) == []


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["fast", "torch"])
def test_a_checkpoint_of_several_parts_streams_with_either_writer(
        s3_bucket: str, writer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WRITER_ENV, writer)
    handler = make_handler(n=32, hidden=2048)
    handler.register_state_provider(Ballast(torch.randn(3 * PART_SIZE // 4)))
    parts = saved_etag(s3_bucket, f"{writer}.pth", handler)
    assert parts.endswith("-4"), parts  # 3 full parts and the rest
    assert incomplete_uploads(s3_bucket) == []




