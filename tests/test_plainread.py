"""The torch-free envelope reader (``nnhandler/checkpoint/plainread.py``, issue 13 item 5).

It must read exactly what ``torch.load(weights_only=True)`` reads, with a ``TensorRef`` for each
tensor, for every file of both writers; anything outside its subset is ``NeedsTorch`` (the
caller then asks torch), never a verdict of its own. ``check_candidate`` gives the same answer
either way.
"""

from __future__ import annotations

import io
import pickle
import struct
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from nnh_testing import make_handler

from nnhandler import CheckpointFormatError
from nnhandler.checkpoint.discovery import check_candidate
from nnhandler.checkpoint.envelope import write_envelope
from nnhandler.checkpoint.integrity import crc32, integrity_record
from nnhandler.checkpoint.io import checkpoint_io
from nnhandler.checkpoint.plainread import NeedsTorch, TensorRef, read_plain_envelope, tensor_facts

SUMMARY = {"format_version": 1, "epoch": 1, "step": 2, "time": "2026-01-01T00:00:00+00:00",
           "logs": {}}
WRITERS = ("fast", "torch")


def normal(value: Any) -> Any:
    """Tensors and tensor references as (dtype, shape, stride, offset, requires_grad); the
    containers kept, with an OrderedDict's attributes."""
    if isinstance(value, TensorRef):
        return ("tensor", value.dtype, value.shape, value.stride, value.offset,
                value.requires_grad)
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).removeprefix("torch."), tuple(value.shape),
                value.stride(), value.storage_offset(), value.requires_grad)
    if type(value) is OrderedDict:
        return ("ordered", [(k, normal(v)) for k, v in value.items()],
                {k: normal(v) for k, v in vars(value).items()})
    if type(value) is dict:
        return {k: normal(v) for k, v in value.items()}
    if type(value) is list:
        return [normal(v) for v in value]
    if type(value) is tuple:
        return ("tuple", [normal(v) for v in value])
    return (type(value).__name__, value)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
          torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    base = torch.zeros(shape, dtype=dtype)
    view = draw(st.sampled_from(["whole", "transposed", "offset"]))
    if view == "transposed" and base.dim() >= 2:
        return base.transpose(0, 1)
    if view == "offset" and base.dim() >= 1 and base.shape[0] > 1:
        return base[1:]
    return base


plain_leaves = (st.none() | st.booleans() | st.integers(-2**80, 2**80)
                | st.floats(allow_nan=False) | st.text(max_size=8) | st.binary(max_size=8)
                | tensors())
states = st.recursive(
    plain_leaves,
    lambda children: (st.lists(children, max_size=3)
                      | st.lists(children, max_size=3).map(tuple)
                      | st.dictionaries(st.text(max_size=5), children, max_size=3)
                      | st.dictionaries(st.text(max_size=5), children, max_size=3).map(
                          OrderedDict)),
    max_leaves=12)


def write(path: Path, payload: Any, writer: str) -> Path:
    checkpoint_io(writer).write(path, payload, SUMMARY, ())
    return path


@pytest.mark.parametrize("writer", WRITERS, ids=WRITERS)
@hypothesis_settings(max_examples=40, deadline=None)
@given(state=states)
def test_it_reads_what_torch_load_reads(writer: str, state: Any) -> None:
    """Equal content where torch reads the file; left to torch where torch refuses it
    (``b""`` pickles as a call of ``builtins.bytes``, which weights_only refuses)."""
    with tempfile.TemporaryDirectory() as directory:
        path = write(Path(directory) / "x.pth", {"state": state}, writer)
        try:
            expected = torch.load(path, weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            with pytest.raises(NeedsTorch):
                read_plain_envelope(path)
            return
        assert normal(read_plain_envelope(path)) == normal(expected)


@pytest.mark.parametrize("writer", WRITERS, ids=WRITERS)
def test_a_state_dict_keeps_its_metadata_and_shared_storages(tmp_path: Path,
                                                              writer: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    weight = torch.arange(12.0)
    path = write(tmp_path / "x.pth", {"model": model.state_dict(),
                                      "views": [weight[2:], weight.view(3, 4).t()],
                                      "parameter": torch.nn.Parameter(torch.zeros(2))}, writer)
    read = read_plain_envelope(path)
    assert normal(read) == normal(torch.load(path, weights_only=True))
    assert read["parameter"].parameter and read["parameter"].requires_grad
    assert vars(read["model"])["_metadata"][""]["version"] == 1
    first, second = read["views"]
    assert first.storage == second.storage  # one storage record, as in the file
    assert (first.offset, second.stride) == (2, (1, 4))


def rewritten(path: Path, change: Callable[[dict[str, bytes]], None]) -> Path:
    """A copy of ``path`` with its records changed by ``change`` (name -> bytes), stored."""
    with zipfile.ZipFile(path) as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    change(records)
    target = path.with_name("changed.pth")
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(name, data)
    return target


def with_pickle(state: Any) -> Callable[[dict[str, bytes]], None]:
    def change(records: dict[str, bytes]) -> None:
        records["archive/data.pkl"] = state

    return change


def shrink_storage(records: dict[str, bytes]) -> None:
    records["archive/data/0"] = records["archive/data/0"][:-4]


def drop_storage(records: dict[str, bytes]) -> None:
    del records["archive/data/0"]


def torchscript(records: dict[str, bytes]) -> None:
    records["archive/constants.pkl"] = pickle.dumps((), protocol=2)


def protocol_4(records: dict[str, bytes]) -> None:
    records["archive/data.pkl"] = pickle.dumps({"state": 1}, protocol=4)


class Size(tuple):  # type: ignore[type-arg]
    """Pickles as a call of ``builtins.eval`` (which must never run)."""

    def __reduce__(self) -> Any:
        return (eval, ("1 + 1",))


def evil(records: dict[str, bytes]) -> None:
    records["archive/data.pkl"] = pickle.dumps(Size(), protocol=2)


OUTSIDE = {
    "torch.Size": lambda p: write(p, {"state": torch.Size([2, 3])}, "torch"),
    "torch.dtype": lambda p: write(p, {"state": torch.float32}, "torch"),
    "torch.device": lambda p: write(p, {"state": torch.device("cpu")}, "torch"),
    "float8 (rebuild v3)": lambda p: write(p, {"state": torch.zeros(2, dtype=torch.float8_e4m3fn)},
                                           "torch"),
    "storage record too small": lambda p: rewritten(write(p, {"t": torch.zeros(4)}, "torch"),
                                                    shrink_storage),
    "storage record missing": lambda p: rewritten(write(p, {"t": torch.zeros(4)}, "torch"),
                                                  drop_storage),
    "TorchScript archive": lambda p: rewritten(write(p, {"t": 1}, "torch"), torchscript),
    "pickle protocol 4": lambda p: rewritten(write(p, {"t": 1}, "torch"), protocol_4),
    "a call of eval": lambda p: rewritten(write(p, {"t": 1}, "torch"), evil),
    "not a zip": lambda p: (p.write_bytes(b"PK nonsense"), p)[1],
}


@pytest.mark.parametrize("make", OUTSIDE.values(), ids=OUTSIDE.keys())
def test_anything_outside_the_subset_is_left_to_torch(tmp_path: Path,
                                                      make: Callable[[Path], Path]) -> None:
    path = make(tmp_path / "x.pth")
    with pytest.raises(NeedsTorch):
        read_plain_envelope(path)


def test_a_tensor_beyond_its_storage_is_left_to_torch(tmp_path: Path) -> None:
    path = write(tmp_path / "x.pth", {"t": torch.zeros(4)}, "torch")
    data = zipfile.ZipFile(path).read("archive/data.pkl")
    # the tensor's size (4,) becomes (9,): more than its storage of 4 elements holds
    crafted = rewritten(path, with_pickle(data.replace(b"K\x04\x85", b"K\x09\x85", 1)))
    with pytest.raises(NeedsTorch, match="beyond its storage"):
        read_plain_envelope(crafted)
    with pytest.raises(RuntimeError, match="resize storage"):  # torch refuses it too
        torch.load(crafted, weights_only=True)


def test_tensor_facts_reads_tensors_and_references_alike() -> None:
    ref = TensorRef("uint8", (5,), (1,), 0, "0")
    assert tensor_facts(ref) == ("uint8", (5,))
    assert tensor_facts(torch.zeros(5, dtype=torch.uint8)) == ("uint8", (5,))
    assert tensor_facts([1, 2]) is None


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    handler = make_handler(n=16)
    return handler.save(tmp_path / "one.pth")


def test_check_candidate_reads_a_checkpoint_without_asking_torch(saved: Path) -> None:
    read = read_plain_envelope(saved)
    assert isinstance(read["state"]["rng"]["ranks"][0]["torch"], TensorRef)
    assert check_candidate(saved)["epoch"] == 0


def test_check_candidate_asks_torch_for_the_rest(tmp_path: Path, saved: Path) -> None:
    envelope = torch.load(saved, weights_only=True)
    envelope["state"]["extra"] = {"dtype": torch.float16}  # a torch.dtype: not in the subset
    changed = tmp_path / "extra.pth"
    write_envelope(changed, envelope, io=checkpoint_io("torch"))
    with pytest.raises(NeedsTorch, match=r"torch\.float16"):
        read_plain_envelope(changed)
    assert check_candidate(changed)["epoch"] == 0


def sealed(path: Path, records: dict[str, bytes]) -> Path:
    """A zip of ``records`` sealed with a valid nnhandler integrity record (its comment)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(name, data)
    unsealed = buffer.getvalue()
    assert unsealed[-2:] == b"\0\0"  # no comment yet
    covered = unsealed[:-2]
    record = integrity_record(SUMMARY, len(covered), crc32(covered))
    path.write_bytes(covered + struct.pack("<H", len(record)) + record)
    return path


def test_a_refused_global_is_refused_by_torch_as_before(tmp_path: Path) -> None:
    with zipfile.ZipFile(write(tmp_path / "x.pth", {"t": 1}, "torch")) as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    evil(records)
    crafted = sealed(tmp_path / "crafted.pth", records)
    with pytest.raises(NeedsTorch, match=r"__builtin__\.eval"):
        read_plain_envelope(crafted)
    with pytest.raises(CheckpointFormatError, match="other than tensors and plain data"):
        check_candidate(crafted)
