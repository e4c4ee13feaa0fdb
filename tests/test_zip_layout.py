"""Hostile zip layouts are refused before anything is inflated (issue 11, item 7).

Each crafted file carries a valid nnhandler integrity record (its CRC-32 covers everything
before the zip comment's length field, as :func:`write_envelope` writes it), so only the layout
check can refuse it; ``read_checkpoint`` must raise :class:`CheckpointFormatError` naming the
file with and without ``verify``.
"""

from __future__ import annotations

import io
import re
import struct
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from nnh_testing import fast_writer_only

from nnhandler import CheckpointError, CheckpointFormatError, read_checkpoint
from nnhandler.checkpoint import zipwriter
from nnhandler.checkpoint.envelope import build_meta, write_checkpoint
from nnhandler.checkpoint.integrity import crc32, integrity_record, read_integrity_record
from nnhandler.checkpoint.ziplayout import MAX_RECORDS, check_zip_layout

SUMMARY = {"format_version": 1, "epoch": 1, "step": 2, "time": "2026-01-01T00:00:00+00:00",
           "logs": {"loss": 0.5}}
BOMB = 64 * 1024 * 1024
_EOCD = struct.Struct("<4sHHHHIIH")
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")
_LOCATOR = struct.Struct("<4sIQI")


# --- crafting --------------------------------------------------------------------------------
def seal(unsealed: bytes) -> bytes:
    """A zip without a comment, given the integrity record nnhandler writes as its comment."""
    assert unsealed[-2:] == b"\0\0"  # no comment yet
    covered = unsealed[:-2]
    record = integrity_record(SUMMARY, len(covered), crc32(covered))
    return covered + struct.pack("<H", len(record)) + record


def unsealed(path: Path) -> bytes:
    """One of our checkpoints without its comment (and with a zero comment length)."""
    covered = int(read_integrity_record(path)["covered_size"])
    return path.read_bytes()[:covered] + b"\0\0"


def central_entries(data: bytes) -> dict[bytes, int]:
    """Record name -> position of its central directory entry (in an unsealed zip)."""
    _, _, _, _, count, _, offset, _ = _EOCD.unpack_from(data, len(data) - 22)
    entries, position = {}, offset
    for _ in range(count):
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data,
                                                                       position + 28)
        entries[data[position + 46:position + 46 + name_length]] = position
        position += 46 + name_length + extra_length + comment_length
    return entries


def patched(data: bytes, position: int, layout: str, *values: int | bytes) -> bytes:
    out = bytearray(data)
    struct.pack_into(layout, out, position, *values)
    return bytes(out)


def patch_entry(name: bytes, at: int, layout: str, *values: int | bytes) -> Callable[[bytes],
                                                                                    bytes]:
    """A crafting step: overwrite bytes ``at`` the start of ``name``'s central entry."""
    def craft(data: bytes) -> bytes:
        return patched(data, central_entries(data)[name] + at, layout, *values)
    return craft


def patch_end(at: int, layout: str, value: int) -> Callable[[bytes], bytes]:
    def craft(data: bytes) -> bytes:
        return patched(data, len(data) - 22 + at, layout, value)
    return craft


def grow_directory(by: int) -> Callable[[bytes], bytes]:
    def craft(data: bytes) -> bytes:
        size = _EOCD.unpack_from(data, len(data) - 22)[5]
        return patched(data, len(data) - 22 + 12, "<I", size + by)
    return craft


def as_zip64(count: int | None = None) -> Callable[[bytes], bytes]:
    """Move the end of the directory into zip64 end records (optionally claiming ``count``
    records), as the writer does for files past 65535 records or 4 GiB."""
    def craft(data: bytes) -> bytes:
        _, _, _, _, records, size, offset, _ = _EOCD.unpack_from(data, len(data) - 22)
        claimed = records if count is None else count
        start = len(data) - 22
        end64 = _EOCD64.pack(b"PK\x06\x06", _EOCD64.size - 12, 45, 45, 0, 0, claimed, claimed,
                             size, offset)
        locator = _LOCATOR.pack(b"PK\x06\x07", 0, start, 1)
        eocd = _EOCD.pack(b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
        return data[:start] + end64 + locator + eocd
    return craft


@pytest.fixture
def ours(tmp_path: Path) -> Path:
    path = tmp_path / "ours.pth"
    # two records: small storages of one dtype share a pack (checkpoint/packing.py)
    state = {"model": {"w": torch.arange(1000.0), "b": torch.ones(7, dtype=torch.int64)}}
    write_checkpoint(path, state, build_meta(epoch=1, step=2, logs={"loss": 0.5}, world_size=1))
    return path


def zip_bomb(source: Path) -> bytes:
    """``source``'s records rewritten with zipfile, ``data.pkl`` deflated with BOMB zero bytes
    after the pickle (which unpickling ignores: the file would load, after inflating them)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(buffer, "w") as bomb:
        for info in original.infolist():
            content = original.read(info)
            if info.filename.endswith("/data.pkl"):
                bomb.writestr(info.filename, content + bytes(BOMB), zipfile.ZIP_DEFLATED)
            else:
                bomb.writestr(info.filename, content, zipfile.ZIP_STORED)
    return seal(buffer.getvalue())


def craft_file(path: Path, source: Path, craft: Callable[[bytes], bytes]) -> Path:
    path.write_bytes(seal(craft(unsealed(source))))
    read_integrity_record(path)  # a valid record: only the layout can refuse it
    return path


def refused(path: Path, reason: str) -> None:
    pattern = re.escape(repr(str(path))) + ".*" + reason
    for verify in (True, False):
        with pytest.raises(CheckpointFormatError, match=pattern):
            read_checkpoint(path, verify=verify)
    with pytest.raises(CheckpointFormatError, match=pattern):
        check_zip_layout(path)


# --- the zip bomb ----------------------------------------------------------------------------
def test_a_deflated_zip_bomb_is_refused_without_inflating_it(tmp_path: Path, ours: Path) -> None:
    path = tmp_path / "bomb.pth"
    path.write_bytes(zip_bomb(ours))
    assert path.stat().st_size < BOMB // 100
    tracemalloc.start()
    try:
        refused(path, r"zip record 'archive/data.pkl' is compressed \(method 8")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        # the control: torch itself inflates it (and loads it: the bomb is a working file)
        torch.load(path, weights_only=True)
        _, unchecked_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < BOMB // 16
    assert unchecked_peak > BOMB


# --- crafted layouts -------------------------------------------------------------------------
NAME = b"archive/data/0"
CRAFTS: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("declared-size-beyond-file", patch_entry(NAME, 20, "<II", 10**9, 10**9),
     r"zip record 'archive/data/0' \(offset \d+, \d+ bytes with its header\) reaches past "
     r"the end of the file"),
    ("size-into-central-directory",
     patch_entry(b"archive/.data/serialization_id", 20, "<II", 200, 200),
     r"zip record 'archive/.data/serialization_id' .* reaches into the central directory"),
    ("offset-beyond-file", patch_entry(NAME, 42, "<I", 0xFFFFFFF0),
     r"zip record 'archive/data/0' .* reaches past the end of the file"),
    ("directory-past-end", patch_end(16, "<I", 10**8),
     r"central directory \(offset 100000000, \d+ bytes\) reaches past the end of the file"),
    ("directory-into-end-record", grow_directory(10),
     r"central directory \(offset \d+, \d+ bytes\) reaches into its end records"),
    ("directory-too-small", patch_end(12, "<I", 46),
     r"central directory of 46 bytes cannot hold the \d+ records"),
    ("deflate-method", patch_entry(NAME, 10, "<H", 8),
     r"zip record 'archive/data/0' is compressed \(method 8"),
    ("bzip2-method", patch_entry(NAME, 10, "<H", 12), r"is compressed \(method 12"),
    ("sizes-differ", patch_entry(NAME, 20, "<I", 3),
     r"zip record 'archive/data/0' is stored with a compressed size of 3 bytes"),
    ("encrypted", patch_entry(NAME, 8, "<H", 0x801), r"zip record 'archive/data/0' is encrypted"),
    ("overlapping", patch_entry(NAME, 42, "<I", 0),
     r"zip records 'archive/data.pkl' and 'archive/data/0' overlap"),
    ("dotdot-name", patch_entry(NAME, 46, "14s", b"archive/../x/0"),
     r"zip record 'archive/../x/0' has a '\.\.' component"),
    ("absolute-name", patch_entry(NAME, 46, "14s", b"/rchive/data/0"),
     r"zip record '/rchive/data/0' has an absolute name"),
    ("drive-name", patch_entry(NAME, 46, "14s", b"C:chive/data/0"),
     r"zip record 'C:chive/data/0' has an absolute name"),
    ("duplicate-name", patch_entry(b"archive/data/1", 46, "14s", NAME),
     r"zip record 'archive/data/0' appears twice"),
    ("other-disk", patch_entry(NAME, 34, "<H", 1), r"zip record 'archive/data/0' is on another"),
    ("multi-disk", patch_end(4, "<H", 1), r"multi-disk archive"),
    ("too-many-records", as_zip64(MAX_RECORDS + 1),
     rf"declares {MAX_RECORDS + 1} records, more than the {MAX_RECORDS}"),
    ("zip64-size-missing", patch_entry(NAME, 20, "<II", 0xFFFFFFFF, 0xFFFFFFFF),
     r"zip record 'archive/data/0' lacks the zip64 sizes"),
]


#: crafts of the plain end record: torch.save's files (NNHANDLER_WRITER=torch) end in zip64 end
#: records, which take precedence over it
END_RECORD_CRAFTS = {"directory-past-end", "directory-into-end-record", "directory-too-small"}


@pytest.mark.parametrize(("craft", "reason"), [
    pytest.param(craft, reason, marks=[fast_writer_only] if case in END_RECORD_CRAFTS else [])
    for case, craft, reason in CRAFTS], ids=[case for case, _, _ in CRAFTS])
def test_a_hostile_layout_with_a_valid_crc_is_refused_naming_file_and_record(
    tmp_path: Path, ours: Path, craft: Callable[[bytes], bytes], reason: str
) -> None:
    refused(craft_file(tmp_path / "crafted.pth", ours, craft), reason)


def test_not_a_zip_at_all_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.pth"
    path.write_bytes(b"\x80\x04K\x01." * 10)
    with pytest.raises(CheckpointFormatError, match=re.escape(repr(str(path))) + ".*not a zip"):
        read_checkpoint(path, verify=False)


def test_records_past_covered_size_are_refused(ours: Path) -> None:
    covered = int(read_integrity_record(ours)["covered_size"])
    check_zip_layout(ours, covered_size=covered)
    with pytest.raises(CheckpointFormatError, match=r"end record at byte \d+ lies past the "
                                                    rf"covered {covered - 1} bytes"):
        check_zip_layout(ours, covered_size=covered - 1)


def test_a_vanished_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        check_zip_layout(tmp_path / "gone.pth")


# --- our own files pass ----------------------------------------------------------------------
def test_zip64_end_records_pass_and_still_load(tmp_path: Path, ours: Path) -> None:
    path = craft_file(tmp_path / "zip64-end.pth", ours, as_zip64())
    check_zip_layout(path)
    assert read_checkpoint(path).epoch == 1


def test_our_zip64_files_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lowered limits make a small file use zip64 sizes, offsets and end records."""
    monkeypatch.setattr(zipwriter, "_ZIP64_LIMIT", 100)
    monkeypatch.setattr(zipwriter, "_ZIP64_COUNT_LIMIT", 5)
    path = tmp_path / "zip64.pth"
    state = {"big": torch.randn(1000), "small": [torch.ones(2) for _ in range(8)]}
    write_checkpoint(path, state, build_meta(epoch=3, step=1, logs={}, world_size=1))
    check_zip_layout(path)
    assert read_checkpoint(path, verify=False).epoch == 3


@pytest.mark.parametrize("tensors", [0, 1, 300], ids=["empty", "one", "many"])
def test_our_files_pass(tmp_path: Path, tensors: int) -> None:
    path = tmp_path / "ck.pth"
    state = {"model": {f"t{i}": torch.full((i % 5,), float(i)) for i in range(tensors)}}
    write_checkpoint(path, state, build_meta(epoch=1, step=1, logs={}, world_size=1))
    check_zip_layout(path)
    check_zip_layout(path, covered_size=int(read_integrity_record(path)["covered_size"]))


def test_torch_save_files_pass(tmp_path: Path) -> None:
    path = tmp_path / "torch.pth"
    torch.save({"w": torch.ones(3), "n": 1}, path)
    check_zip_layout(path)


# --- property: damage to the directory is refused cleanly ------------------------------------
@hypothesis_settings(max_examples=300)
@given(offset=st.integers(min_value=0), value=st.integers(min_value=1, max_value=255))
def test_any_damage_to_the_end_of_the_file_raises_only_checkpoint_errors(
    tmp_path: Path, ours: Path, offset: int, value: int
) -> None:
    """A changed byte in the central directory or the end records: the check raises a
    CheckpointError (never struct.error, IndexError or a decoding error), or what it lets
    through is a zip of stored records whose sizes add up to no more than the file."""
    data = bytearray(unsealed(ours))
    _, _, _, _, _, _, start, _ = _EOCD.unpack_from(data, len(data) - 22)
    position = start + offset % (len(data) - 2 - start)  # not the comment length
    data[position] ^= value
    path = tmp_path / "damaged.pth"
    path.write_bytes(seal(bytes(data)))
    try:
        check_zip_layout(path)
    except CheckpointError:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, NotImplementedError):  # zipfile is stricter (versions, extras)
        return
    assert all(record.compress_type == zipfile.ZIP_STORED for record in records)
    assert sum(record.file_size for record in records) <= path.stat().st_size
