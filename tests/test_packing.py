"""Small storages packed into one record per dtype (nnhandler/checkpoint/packing.py): what
``torch.load(weights_only=True)`` alone gives, what nnhandler's reader gives after splitting
the packs (exactly ``torch.save``'s storages), and that sharing is kept as it was."""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nnh_testing import fast_writer_only, make_handler, regression_dataset, tensors_of
from torch import nn

from nnhandler import CheckpointFormatError, NNHandler
from nnhandler.checkpoint import read_checkpoint
from nnhandler.checkpoint.envelope import build_meta, envelope_of, write_checkpoint
from nnhandler.checkpoint.format import unpack
from nnhandler.checkpoint.io import FAST_WRITER, first_difference
from nnhandler.checkpoint.packing import PACK_BELOW, PACKS_KEY, split_packs
from nnhandler.checkpoint.pickling import pickle_with_storages
from nnhandler.checkpoint.plainread import read_plain_envelope
from nnhandler.checkpoint.zipwriter import write_torch_zip

META = build_meta(epoch=1, step=2, logs={"loss": 0.5}, world_size=1)
SUMMARY = {"format_version": 1, "epoch": 1, "step": 2, "time": META["time"], "logs": {}}


def torch_saved(value: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


def mixed_state() -> dict[str, Any]:
    torch.manual_seed(0)
    tied = torch.randn(4, 3)
    base = torch.arange(12.0)
    return {
        "small": [torch.randn(5) for _ in range(6)],
        "scalars": {"step": torch.tensor(3.0), "count": torch.tensor(7)},
        "tied": {"encoder": tied, "decoder": tied},  # one storage, twice
        "views": (base, base.view(3, 4)[1:]),  # the second view comes later
        "odd_strides": torch.empty_strided((3, 1), (1, 5)).fill_(2.0),  # contiguous all the same
        "transposed": torch.randn(2, 3).t(),  # not contiguous: a record of its own
        "grad": torch.ones(2, requires_grad=True),
        "large": torch.randn(PACK_BELOW // 4),  # the smallest storage never packed
        "dtypes": [torch.ones(3, dtype=dtype) for dtype in (
            torch.float16, torch.bfloat16, torch.int8, torch.bool, torch.float64)],
        "complex": torch.randn(2, dtype=torch.complex64),
        "ordered": OrderedDict(w=torch.randn(2)),
        "empty": torch.zeros(0),
    }


@fast_writer_only
def test_plain_torch_load_gives_the_same_values_as_views_of_the_packs(tmp_path: Path) -> None:
    state = mixed_state()
    write_checkpoint(tmp_path / "ck.pth", state, META)
    envelope = torch.load(tmp_path / "ck.pth", weights_only=True)
    packs = envelope[PACKS_KEY]
    assert [pack.dtype for pack in packs] == [torch.float32, torch.int64, torch.float16,
                                              torch.bfloat16, torch.int8, torch.bool,
                                              torch.float64]
    pointers = {pack.untyped_storage().data_ptr() for pack in packs}
    for saved, loaded in zip(tensors_of(state), tensors_of(envelope["state"]), strict=True):
        assert (loaded.dtype, loaded.shape, loaded.stride()) == (saved.dtype, saved.shape,
                                                                 saved.stride())
        assert torch.equal(loaded, saved)
    loaded_state = envelope["state"]
    assert all(tensor.untyped_storage().data_ptr() in pointers
               for tensor in loaded_state["small"])
    assert loaded_state["small"][1].storage_offset() == 5
    for unpacked in (loaded_state["tied"]["encoder"], loaded_state["views"][0],
                     loaded_state["transposed"], loaded_state["grad"], loaded_state["large"],
                     loaded_state["complex"]):
        assert unpacked.untyped_storage().data_ptr() not in pointers


def test_the_reader_gives_back_exactly_the_storages_torch_save_does(tmp_path: Path) -> None:
    """After splitting: the same offsets, storage sizes and sharing as ``torch.save``'s file
    (the self-check's comparison), tied weights and views still one storage each."""
    state = mixed_state()
    write_checkpoint(tmp_path / "ck.pth", state, META)
    expected = torch_saved(envelope_of(state, META))
    assert first_difference(expected, split_packs(torch.load(tmp_path / "ck.pth",
                                                             weights_only=True))) == ""
    checkpoint = read_checkpoint(tmp_path / "ck.pth")
    assert first_difference(expected["state"], checkpoint.state) == ""
    small = checkpoint.state["small"]
    assert len({tensor.untyped_storage().data_ptr() for tensor in small}) == len(small)
    tied = checkpoint.state["tied"]
    assert tied["encoder"].data_ptr() == tied["decoder"].data_ptr()


@fast_writer_only
def test_a_mapped_or_plain_read_keeps_the_views_and_passes_the_schema(tmp_path: Path) -> None:
    state = {"small": [torch.randn(3) for _ in range(4)]}
    path = tmp_path / "ck.pth"
    write_checkpoint(path, state, META)
    mapped = read_checkpoint(path, verify=False, mmap=True)
    storages = {tensor.untyped_storage().data_ptr() for tensor in mapped.state["small"]}
    assert len(storages) == 1  # views of the mapped pack, never read into memory
    plain = unpack(path, read_plain_envelope(path))
    offsets = [ref.offset for ref in plain.state["small"]]
    assert offsets == [0, 3, 6, 9]
    assert {ref.storage for ref in plain.state["small"]} == {"0"}


def test_a_loaded_handler_holds_independent_tensors(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Adam's moments (small, one per parameter) come back as tensors of their own, not as
    views of one pack that every optimizer step would keep alive; training goes on."""
    monkeypatch.chdir(tmp_path)
    handler = make_handler(n=16)
    handler.train(1, progress_bar=False, seed=0)
    handler.save("ck.pth")
    loaded = NNHandler.load("ck.pth", logger_mode="file")
    assert loaded.optimizer is not None
    moments = [value for state in loaded.optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor)]
    assert len(moments) >= 8
    pointers = [tensor.untyped_storage().data_ptr() for tensor in moments]
    assert len(set(pointers)) == len(pointers)
    assert all(tensor.storage_offset() == 0 for tensor in moments)
    expected = torch.load("ck.pth", weights_only=True)["state"]["optimizer"]["state"]
    saved = [value for state in expected.values() for value in state.values()
             if isinstance(value, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(moments, saved, strict=True))
    loaded.set_train_loader(regression_dataset(16), batch_size=8)
    loaded.train(1, progress_bar=False, seed=0)


def crafted_packs() -> list[tuple[str, dict[str, Any], Any, str]]:
    """(case, state, 'packs' entry, the error it must raise): files a writer of ours never
    writes, each with a valid CRC (a crafted file, not a damaged one)."""
    base = torch.arange(6.0)
    return [
        ("not a list", {"w": torch.ones(2)}, "not tensors",
         "'packs' entry is not a list of tensors: str"),
        ("not tensors", {"w": base}, [base, "x"], "item 1 is a str"),
        ("dtype", {"w": torch.ones(2, dtype=torch.complex64)},
         [torch.ones(2, dtype=torch.complex64)], "has dtype torch.complex64, which is never"),
        ("two of a dtype", {"a": base, "b": torch.ones(2)}, [base, torch.ones(2)],
         "entry 1 is a second pack of dtype torch.float32"),
        ("a slice", {"w": base}, [base[2:]], r"does not span its storage of 24 bytes: shape "
         r"\(4,\), stride \(1,\), offset 2"),
        ("two dimensions", {"w": base}, [base.view(2, 3)], r"shape \(2, 3\)"),
        ("empty", {"w": torch.zeros(0)}, [torch.zeros(0)], "storage of 0 bytes"),
        ("tied weights", {"encoder": base, "decoder": base}, [base],
         r"entry 0 \(24 bytes\) do not tile it: bytes 0-24 overlap the tensor before them"),
        ("bytes left over", {"w": base[:3]}, [base], "bytes 12-24 are in no tensor"),
        ("a gap", {"a": base[:2], "b": base[4:]}, [base], "bytes 8-16 are in no tensor"),
        ("transposed", {"w": base.view(2, 3).t()}, [base],
         r"not contiguous: shape \(3, 2\), stride \(1, 3\)"),
    ]


@fast_writer_only
@pytest.mark.parametrize(("state", "packs", "error"),
                         [case[1:] for case in crafted_packs()],
                         ids=[case[0] for case in crafted_packs()])
def test_a_crafted_packs_entry_is_refused_naming_the_bad_value(
        tmp_path: Path, state: dict[str, Any], packs: Any, error: str) -> None:
    envelope = envelope_of(state, META)
    envelope[PACKS_KEY] = packs
    FAST_WRITER.write(tmp_path / "ck.pth", envelope, SUMMARY)  # unpacked: written as it is
    with pytest.raises(CheckpointFormatError, match=error):
        read_checkpoint(tmp_path / "ck.pth")


@fast_writer_only
def test_a_genuine_packs_entry_passes_the_same_checks(tmp_path: Path) -> None:
    base = torch.arange(6.0)
    envelope = envelope_of({"a": base[:2], "b": base[2:].view(2, 2)}, META)
    envelope[PACKS_KEY] = [base]  # tiled exactly, as the writer lays a pack out
    FAST_WRITER.write(tmp_path / "ck.pth", envelope, SUMMARY)
    state = read_checkpoint(tmp_path / "ck.pth").state
    assert torch.equal(state["b"], torch.tensor([[2.0, 3.0], [4.0, 5.0]]))
    assert state["a"].untyped_storage().data_ptr() != state["b"].untyped_storage().data_ptr()
    assert state["b"].storage_offset() == 0 and state["b"].untyped_storage().nbytes() == 16


def test_packing_needs_a_dict_without_the_packs_key() -> None:
    with pytest.raises(ValueError, match="packing needs a dict"):
        pickle_with_storages([torch.ones(1)], pack=True)
    with pytest.raises(ValueError, match="packing needs a dict"):
        pickle_with_storages({PACKS_KEY: 1}, pack=True)


@st.composite
def sharing_states(draw: st.DrawFn) -> dict[str, Any]:
    """Small tensors of a few storages, each placed once or several times, as itself or as a
    view, in an order hypothesis draws: every storage met again after others were held."""
    count = draw(st.integers(1, 6))
    dtypes = draw(st.lists(st.sampled_from([torch.float32, torch.int64, torch.bfloat16]),
                           min_size=count, max_size=count))
    storages = [torch.arange(6, dtype=torch.float32).to(dtype) + index
                for index, dtype in enumerate(dtypes)]
    uses = draw(st.lists(st.tuples(st.integers(0, count - 1), st.sampled_from(
        ["whole", "whole", "reshaped", "sliced"])), min_size=1, max_size=12))
    items: list[torch.Tensor] = []
    for index, view in uses:
        base = storages[index]
        items.append(base if view == "whole" else base.view(2, 3) if view == "reshaped"
                     else base[2:])
    return {"items": items, "nested": {"first": items[0], "last": items[-1]}}


@settings(max_examples=40, deadline=None)
@given(state=sharing_states())
def test_any_sharing_pattern_round_trips_as_torch_save_gives_it(state: dict[str, Any]) -> None:
    pickled, storages = pickle_with_storages(state, pack=True)
    pickletools.dis(pickled, out=io.StringIO())  # well formed: each memo index stored once
    buffer = io.BytesIO()
    write_torch_zip(buffer, pickled, storages, lambda size, crc: b"")
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        assert archive.testzip() is None
    loaded = split_packs(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert first_difference(torch_saved(state), loaded) == ""


def test_a_storage_met_again_through_another_path_keeps_its_sharing() -> None:
    """A held candidate met again as a parameter's data, or by the C pickler (a tensor with
    attributes), is written as a record of its own, shared as torch.save shares it."""
    parameter = nn.Parameter(torch.ones(3))
    tagged_base = torch.arange(4.0)
    tagged = tagged_base.view(2, 2)
    tagged.tag = "x"  # type: ignore[attr-defined]
    for state in ({"plain": parameter.detach(), "parameter": parameter},
                  {"plain": tagged_base, "tagged": tagged}):
        pickled, storages = pickle_with_storages(state, pack=True)
        assert len(storages) == 1
        buffer = io.BytesIO()
        write_torch_zip(buffer, pickled, storages, lambda size, crc: b"")
        loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
        assert PACKS_KEY not in loaded
        first, second = loaded.values()
        assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
        assert torch.equal(first.reshape(-1), second.reshape(-1))


def test_parameters_and_snapshot_placeholders_are_never_packed(tmp_path: Path) -> None:
    state = {"parameter": nn.Parameter(torch.ones(3)), "plain": torch.ones(3)}
    _, storages = pickle_with_storages(state, pack=True)
    assert len(storages) == 2  # the parameter's storage alone, the plain one in a pack
