"""The write path: nnhandler's own pickler and zip writer produce files that ``torch.load``
(``weights_only=True``, ``mmap=True``) and ``zipfile`` read, holding exactly what was saved."""

from __future__ import annotations

import errno
import io
import os
import pickletools
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nnh_testing import FAST_WRITER_IN_USE, fast_writer_only, tensors_of
from torch import nn

import nnhandler.checkpoint.zipwriter as zipwriter
from nnhandler import CheckpointError
from nnhandler.checkpoint import read_checkpoint
from nnhandler.checkpoint.envelope import build_meta, write_checkpoint
from nnhandler.checkpoint.integrity import crc32, crc32_combine, verify_file
from nnhandler.checkpoint.packing import split_packs

META = build_meta(epoch=3, step=7, logs={"loss": 0.25}, world_size=1)


def save_and_load(path: Path, state: dict[str, Any], **load: Any) -> dict[str, Any]:
    """``state`` written, then read by ``torch.load(weights_only=True)`` with small storages
    split off their packs as nnhandler's reader does (tests/test_packing.py covers the file as
    ``torch.load`` alone gives it)."""
    write_checkpoint(path, state, META)
    envelope = split_packs(torch.load(path, weights_only=True, **load))
    assert envelope["meta"] == META
    loaded: dict[str, Any] = envelope["state"]
    return loaded


def assert_same(saved: Any, loaded: Any, where: str = "state") -> None:
    """Equal values, same container and tensor types, dtypes, strides and flags."""
    assert type(loaded) is type(saved), where
    if isinstance(saved, torch.Tensor):
        assert loaded.dtype == saved.dtype and loaded.shape == saved.shape, where
        assert loaded.stride() == saved.stride(), where
        assert loaded.storage_offset() == saved.storage_offset(), where
        assert loaded.requires_grad == saved.requires_grad, where
        assert loaded.is_conj() == saved.is_conj(), where
        assert torch.equal(loaded, saved), where
    elif isinstance(saved, dict):
        assert list(loaded) == list(saved), where
        for key in saved:
            assert_same(saved[key], loaded[key], f"{where}[{key!r}]")
    elif isinstance(saved, (list, tuple)):
        assert len(loaded) == len(saved), where
        for index, (a, b) in enumerate(zip(saved, loaded, strict=True)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert same_or_both_nan(saved, loaded), where


def storage_groups(value: Any) -> list[list[int]]:
    """Positions of tensors (in traversal order) grouped by the storage they share."""
    tensors = tensors_of(value)
    groups: dict[int, list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault(tensor.untyped_storage().data_ptr() or -1 - index, []).append(index)
    return sorted(groups.values())


def mixed_state() -> dict[str, Any]:
    torch.manual_seed(0)
    base = torch.randn(6, 8)
    return {
        "float": torch.randn(3, 4),
        "views": [base, base[1:4, ::2], base.t()],  # one storage, three views
        "bf16": torch.randn(5, dtype=torch.bfloat16),
        "half": torch.randn(2, 2, dtype=torch.float16),
        "bool": torch.tensor([True, False, True]),
        "int8": torch.arange(-3, 3, dtype=torch.int8),
        "int64": torch.arange(10),
        "uint16": torch.arange(4, dtype=torch.int32).to(torch.uint16),  # rebuilt with v3
        "complex": torch.randn(3, dtype=torch.complex64),
        "conj": torch.randn(3, dtype=torch.complex64).conj(),  # torch's own reduction
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "grad": torch.ones(2, requires_grad=True),
        "parameter": nn.Parameter(torch.randn(3)),
        "frozen": nn.Parameter(torch.randn(2), requires_grad=False),
        "ordered": OrderedDict(b=torch.ones(1), a=2),
        "tuple": (1, "two", None, 3.5, torch.int32, torch.Size([2, 3]), torch.device("cpu")),
        "bytes": b"\x00\x01",
    }


def test_every_kind_of_tensor_round_trips_exactly(tmp_path: Path) -> None:
    state = mixed_state()
    loaded = save_and_load(tmp_path / "ck.pth", state)
    assert_same(state, loaded)
    assert storage_groups(loaded) == storage_groups(state)  # views still share one storage
    loaded["grad"].register_hook(lambda grad: grad)  # hooks still work on it


@fast_writer_only
def test_the_fast_writer_writes_no_backward_hooks(tmp_path: Path) -> None:
    loaded = save_and_load(tmp_path / "ck.pth", mixed_state())
    assert loaded["grad"]._backward_hooks is None  # what a fresh tensor has


def test_the_file_is_a_zip_like_torch_saves(tmp_path: Path) -> None:
    path = tmp_path / "ck.pth"
    write_checkpoint(path, mixed_state(), META)
    buffer = io.BytesIO()
    torch.save({"x": torch.ones(1)}, buffer)
    torch_names = {n.split("/", 1)[1] for n in zipfile.ZipFile(buffer).namelist()}
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # every record's CRC-32 is right
        names = archive.namelist()
        ours = {n.split("/", 1)[1] for n in names if not n.startswith("archive/data/")}
        assert ours == {n for n in torch_names if not n.startswith("data/")}
        assert names[0] == "archive/data.pkl"
        for info in archive.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            data_start = info.header_offset + 30 + len(info.filename) + _local_extra(path, info)
            assert data_start % zipwriter.ALIGNMENT == 0, info.filename


def _local_extra(path: Path, info: zipfile.ZipInfo) -> int:
    with open(path, "rb") as file:
        file.seek(info.header_offset + 28)
        return int.from_bytes(file.read(2), "little")


def test_mmap_loading_works(tmp_path: Path) -> None:
    state = mixed_state()
    loaded = save_and_load(tmp_path / "ck.pth", state, mmap=True)
    assert_same(state, loaded)


def test_a_checkpoint_of_torch_save_and_of_nnhandler_load_the_same(tmp_path: Path) -> None:
    state = mixed_state()
    torch.save(state, tmp_path / "torch.pth")
    ours = save_and_load(tmp_path / "ours.pth", state)
    assert_same(torch.load(tmp_path / "torch.pth", weights_only=True), ours)


def test_one_storage_viewed_with_two_dtypes_is_refused_before_writing(tmp_path: Path) -> None:
    base = torch.zeros(4)
    state = {"a": base, "b": base.view(torch.int32)}
    with pytest.raises(CheckpointError, match=r"same memory as torch.float32 and as torch.int32"):
        write_checkpoint(tmp_path / "ck.pth", state, META)
    assert list(tmp_path.iterdir()) == []


def test_zip64_records_and_directory_are_read_by_torch_and_zipfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints past 4 GiB or 65535 records need zip64 fields; lowering the limits makes a
    small file use every one of them (sizes, offsets, the zip64 end records)."""
    monkeypatch.setattr(zipwriter, "_ZIP64_LIMIT", 100)
    monkeypatch.setattr(zipwriter, "_ZIP64_COUNT_LIMIT", 5)
    state = {"big": torch.randn(1000), "small": [torch.ones(2) for _ in range(8)]}
    path = tmp_path / "ck.pth"
    loaded = save_and_load(path, state)
    assert_same(state, loaded)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        big = archive.getinfo("archive/data/0")
        # the fast writer packs all nine float32 storages into one record; torch.save does not
        packed = 8 * 8 if FAST_WRITER_IN_USE else 0
        assert big.file_size == 4000 + packed and big.header_offset > 100
    assert read_checkpoint(path).epoch == 3
    data = path.read_bytes()
    assert b"PK\x06\x06" in data and b"PK\x06\x07" in data


def test_crc32_combine_fallback_matches_isal() -> None:
    """Without ISA-L, zlib's CRC and a Python crc32_combine take over; same values."""
    code = (
        "import sys; sys.modules['isal'] = None; sys.modules['isal.isal_zlib'] = None\n"
        "from nnhandler.checkpoint.integrity import crc32, crc32_combine\n"
        "import zlib\n"
        "assert crc32 is zlib.crc32\n"
        "for a, b in [(b'', b'x'), (b'abc', b''), (b'hello ', b'world' * 999), "
        "(bytes(range(256)) * 3, b'\\x00' * 70000)]:\n"
        "    assert crc32_combine(crc32(a), crc32(b), len(b)) == crc32(a + b), (a[:5], len(b))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert crc32_combine(crc32(b"abc"), crc32(b"defg"), 4) == crc32(b"abcdefg")


# -- property: random state dicts round-trip exactly --------------------------------------------
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64]


@st.composite
def tensors(draw: st.DrawFn, pool: list[torch.Tensor]) -> torch.Tensor:
    """A fresh tensor (often tiny or empty), or a view of one drawn before (shared storage,
    non-contiguous, offset)."""
    if pool and draw(st.booleans()):
        base = draw(st.sampled_from(pool))
        if base.dim() >= 1 and base.shape[0] > 1:
            kind = draw(st.sampled_from(["slice", "step", "transpose", "same"]))
            if kind == "slice":
                return base[1:]
            if kind == "step":
                return base[::2]
            if kind == "transpose" and base.dim() >= 2:
                return base.transpose(0, 1)
        return base
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator) * 50
    tensor = values.to(dtype) if not dtype.is_complex else torch.complex(values, -values).to(dtype)
    pool.append(tensor)
    return tensor


#: leaves the C pickler writes (spliced into the emitter's stream), between plain values
OTHER_LEAVES = st.sampled_from([b"\x00bytes", torch.float16, torch.Size([2, 3]),
                                torch.device("cpu"), 2**2000, -(2**2030)])


@st.composite
def ordered_dicts(draw: st.DrawFn, children: st.SearchStrategy[Any]) -> OrderedDict[str, Any]:
    """An OrderedDict, sometimes with a state dict's ``_metadata`` attribute."""
    value = OrderedDict(draw(st.dictionaries(st.text(max_size=4), children, max_size=4)))
    if draw(st.booleans()):
        value._metadata = OrderedDict({"": {"version": draw(st.integers(0, 3))}})  # type: ignore[attr-defined]
    return value


@st.composite
def states(draw: st.DrawFn) -> dict[str, Any]:
    pool: list[torch.Tensor] = []
    keys = st.one_of(st.text(max_size=4), st.integers(-3, 300), st.booleans(), st.none(),
                     st.floats(allow_nan=False))
    leaves = st.one_of(tensors(pool), st.integers(-(2**70), 2**70), st.floats(),
                       st.text(max_size=5), st.none(), st.booleans(), OTHER_LEAVES)
    tree = st.recursive(leaves, lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.tuples(children) | st.tuples(children, children, children, children, children),
        st.lists(children, max_size=5).map(tuple),
        st.dictionaries(keys, children, max_size=4),
        ordered_dicts(children),
    ), max_leaves=40)
    many = st.lists(tensors(pool), min_size=0, max_size=60)
    return {"tree": draw(tree), "many": draw(many)}


def same_or_both_nan(saved: Any, loaded: Any) -> bool:
    return bool(saved == loaded or (saved != saved and loaded != loaded))


def assert_same_metadata(saved: Any, loaded: Any) -> None:
    """OrderedDict attributes (``_metadata``) arrive as they were, at any depth."""
    if isinstance(saved, OrderedDict):
        assert vars(loaded) == vars(saved)
    if isinstance(saved, dict):
        for key in saved:
            assert_same_metadata(saved[key], loaded[key])
    elif isinstance(saved, (list, tuple)):
        for a, b in zip(saved, loaded, strict=True):
            assert_same_metadata(a, b)


@pytest.mark.slow  # dozens of hypothesis examples, each training or writing files
@settings(max_examples=60)
@given(state=states())
def test_random_states_round_trip_exactly(tmp_path: Path, state: dict[str, Any]) -> None:
    path = tmp_path / "ck.pth"
    loaded = save_and_load(path, state)
    assert_same(state, loaded)
    assert_same_metadata(state, loaded)
    assert storage_groups(loaded) == storage_groups(state)
    verify_file(path)
    # the full unpickler (an array memo, every opcode) reads the same, and the stream is a
    # well-formed pickle: pickletools checks that every memo index is stored once, before use
    assert_same(split_packs(torch.load(path, weights_only=False))["state"], loaded)
    with zipfile.ZipFile(path) as archive:
        pickletools.dis(archive.read("archive/data.pkl"), out=io.StringIO())


EDGE_VALUES = [float("nan"), float("inf"), -0.0, 1e308, 2**31, -(2**31) - 1, 2**63, -(2**63),
               2**2038, -(2**2038), "\ud800 surrogate", "é∑😀"]


@pytest.mark.parametrize("value", EDGE_VALUES, ids=lambda value: repr(value)[:24])
def test_edge_values_round_trip(tmp_path: Path, value: Any) -> None:
    loaded = save_and_load(tmp_path / "ck.pth", {"v": value, "t": torch.ones(1), "k": {value: 1}
                                                  if value == value else {}})
    assert same_or_both_nan(value, loaded["v"])
    assert type(loaded["v"]) is type(value)
    if isinstance(value, float) and value == 0:
        assert str(loaded["v"]) == str(value)  # the sign of zero survives


def test_a_module_state_dict_keeps_its_metadata(tmp_path: Path) -> None:
    """``load_state_dict`` reads per-module versions from ``_metadata`` (BatchNorm's
    ``num_batches_tracked`` migration, say); torch.save keeps it, so do we."""
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    state = model.state_dict()
    loaded = save_and_load(tmp_path / "ck.pth", {"model": state})["model"]
    assert vars(loaded) == vars(state) and "_metadata" in vars(loaded)
    plain = torch.save(state, tmp_path / "plain.pth")
    assert plain is None
    assert vars(torch.load(tmp_path / "plain.pth", weights_only=True)) == vars(loaded)


@pytest.mark.parametrize("where", ["value", "key"])
def test_an_integer_too_long_for_weights_only_loading_is_refused(tmp_path: Path,
                                                                  where: str) -> None:
    huge = 2**3000
    state = {"x": huge} if where == "value" else {"x": {huge: 1}}
    with pytest.raises(CheckpointError, match="integer of 3001 bits; checkpoints hold integers "
                                              "of up to 2039 bits"):
        write_checkpoint(tmp_path / "ck.pth", state, META)
    loaded = save_and_load(tmp_path / "ok.pth", {"x": 2**2030 - 1, "y": {-(2**2030): 1}})
    assert loaded == {"x": 2**2030 - 1, "y": {-(2**2030): 1}}


@pytest.mark.parametrize("state", [{"x": b""}, {"x": [1, b""]}, {"x": {"y": (b"",)}}],
                         ids=["value", "in-list", "nested-tuple"])
def test_an_empty_bytes_value_is_refused_before_anything_is_written(
        tmp_path: Path, state: dict[str, Any]) -> None:
    """torch.load(weights_only=True) cannot read b"" back (torch.save writes it as a call of
    builtins.bytes): refused with the path to it, so no unloadable file is written."""
    with pytest.raises(CheckpointError, match=r"state\['x'\].* is an empty bytes value"):
        write_checkpoint(tmp_path / "ck.pth", state, META)
    assert not (tmp_path / "ck.pth").exists()
    assert save_and_load(tmp_path / "ok.pth", {"x": b"\x00", "y": [b"ab"]}) == {
        "x": b"\x00", "y": [b"ab"]}


def test_an_ordered_dict_attribute_that_is_not_plain_data_is_refused(tmp_path: Path) -> None:
    state = nn.Linear(2, 2).state_dict()
    state.owner = object()  # type: ignore[attr-defined]
    with pytest.raises(CheckpointError, match=r"state\['model'\]\.owner is a builtins.object"):
        write_checkpoint(tmp_path / "ck.pth", {"model": state}, META)
    assert not (tmp_path / "ck.pth").exists()


# -- large records: their aligned middle goes past the page cache (O_DIRECT) --------------------
def large_state() -> dict[str, Any]:
    """Records of 256 KB and more, of odd sizes, beside small ones and a view with an offset."""
    torch.manual_seed(1)
    base = torch.randn(300_001)
    return {"a": torch.randn(70_000), "odd": torch.arange(1_048_579, dtype=torch.uint8),
            "view": base[5:], "small": torch.ones(3), "half": torch.randn(200_000).half()}


def o_direct_supported(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | getattr(os, "O_DIRECT", 0)))
    except OSError:
        return False
    finally:
        probe.unlink()
    return hasattr(os, "O_DIRECT")


def counting_pwrite(monkeypatch: pytest.MonkeyPatch,
                    fail: int | None = None) -> list[int]:
    """Count the bytes written past the page cache; fail with errno ``fail`` instead."""
    written: list[int] = []
    real = os.pwrite

    def pwrite(fd: int, data: Any, position: int) -> int:
        if fail is not None:
            raise OSError(fail, os.strerror(fail))
        count = real(fd, data, position)
        written.append(count)
        return count

    monkeypatch.setattr(zipwriter.os, "pwrite", pwrite)
    return written


def test_large_records_bypass_the_page_cache_and_read_back_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nnhandler.checkpoint.envelope import envelope_of, write_envelope
    from nnhandler.checkpoint.snapshot import StagingBuffers

    state = large_state()
    written = counting_pwrite(monkeypatch)
    loaded = save_and_load(tmp_path / "sync.pth", state)
    assert_same(state, loaded)
    snapshot = StagingBuffers().take(envelope_of(state, META))
    write_envelope(tmp_path / "async.pth", snapshot.value, snapshot.records)
    for name in ("sync.pth", "async.pth"):
        verify_file(tmp_path / name)
        assert_same(state, torch.load(tmp_path / name, weights_only=True, mmap=True)["state"])
        with zipfile.ZipFile(tmp_path / name) as archive:
            assert archive.testzip() is None
    if FAST_WRITER_IN_USE and o_direct_supported(tmp_path):  # four large records per file,
        # block-aligned middles
        assert len(written) == 8 and all(count % 4096 == 0 for count in written)


@pytest.mark.parametrize("refusal", ["open", "pwrite"])
def test_without_o_direct_large_records_go_through_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str) -> None:
    if refusal == "open":
        real_open = os.open

        def no_direct(path: Any, flags: int, *args: Any) -> int:
            if flags & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "O_DIRECT not supported")
            return real_open(path, flags, *args)

        monkeypatch.setattr(zipwriter.os, "open", no_direct)
    else:
        counting_pwrite(monkeypatch, fail=errno.EINVAL)
    state = large_state()
    assert_same(state, save_and_load(tmp_path / "ck.pth", state))
    verify_file(tmp_path / "ck.pth")


@fast_writer_only
def test_a_failing_direct_write_fails_the_save_and_leaves_the_previous_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not o_direct_supported(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    path = tmp_path / "ck.pth"
    write_checkpoint(path, {"old": torch.ones(2)}, META)
    counting_pwrite(monkeypatch, fail=errno.ENOSPC)
    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(path, large_state(), META)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pth"]
    assert torch.equal(read_checkpoint(path).state["old"], torch.ones(2))
