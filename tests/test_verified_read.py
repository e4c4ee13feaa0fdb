"""The one-pass verified read (checkpoint/verified_read.py): CRCs of the reads torch.load makes,
put together into the file's CRC, and damage in large records detected on the bytes read."""

from __future__ import annotations

import random
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nnh_testing import make_handler

from nnhandler import CheckpointCorruptedError
from nnhandler.checkpoint import read_checkpoint
from nnhandler.checkpoint.envelope import build_meta, write_checkpoint
from nnhandler.checkpoint.integrity import read_integrity_record
from nnhandler.checkpoint.verified_read import LARGE_READ, CheckingReader

_SIZE = 3 * LARGE_READ + 1234
_READS = st.lists(st.tuples(st.integers(0, _SIZE + 100),
                            st.sampled_from([0, 1, 30, LARGE_READ - 1, LARGE_READ,
                                             LARGE_READ + 17, 2 * LARGE_READ, _SIZE + 50])),
                  max_size=12)


@pytest.fixture(scope="module")
def content(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    data = random.Random(7).randbytes(_SIZE)
    path = tmp_path_factory.mktemp("reader") / "data.bin"
    path.write_bytes(data)
    return path, data


@settings(deadline=None, max_examples=150)
@given(reads=_READS, covered=st.integers(0, _SIZE + 10))
def test_the_combined_crc_is_the_files_whatever_the_reads(
    content: tuple[Path, bytes], reads: list[tuple[int, int]], covered: int
) -> None:
    """Overlapping, repeated, out-of-order, past-the-end and partial reads: every read hands
    back the file's bytes, and the CRC put together counts each covered byte once."""
    path, data = content
    with CheckingReader(path) as reader:
        for offset, length in reads:
            reader.seek(offset)
            buffer = bytearray(length)
            count = reader.readinto(buffer)
            assert bytes(buffer[:count]) == data[offset:offset + length]
            assert reader.tell() == offset + count
        counted, crc = reader.file_crc32(covered)
    assert counted == min(covered, _SIZE)
    assert crc == zlib.crc32(data[:covered])


def test_read_seek_and_tell_behave_as_a_binary_file(content: tuple[Path, bytes]) -> None:
    path, data = content
    with CheckingReader(path) as reader:
        assert reader.read(4) == data[:4]
        assert reader.seek(-10, 2) == _SIZE - 10 and reader.read() == data[-10:]
        assert reader.seek(-5, 1) == _SIZE - 5 and reader.read(100) == data[-5:]
        assert reader.read(3) == b""
        with pytest.raises(ValueError, match="invalid whence 7"):
            reader.seek(0, 7)
        with pytest.raises(ValueError, match="negative seek position -1"):
            reader.seek(-1)
    assert reader.closed


@pytest.fixture(scope="module")
def large_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, torch.Tensor]:
    """A checkpoint whose weight record is far above LARGE_READ (checked as it is read)."""
    weight = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("large") / "ck.pth"
    write_checkpoint(path, {"model": {"weight": weight, "bias": torch.arange(7.0)}},
                     build_meta(epoch=1, step=3, logs={}, world_size=1))
    return path.read_bytes(), weight


def test_a_verified_large_checkpoint_loads_its_exact_values(
    tmp_path: Path, large_checkpoint: tuple[bytes, torch.Tensor]
) -> None:
    data, weight = large_checkpoint
    path = tmp_path / "ck.pth"
    path.write_bytes(data)
    checkpoint = read_checkpoint(path)
    assert torch.equal(checkpoint.state["model"]["weight"], weight)
    assert read_integrity_record(path)["covered_size"] < len(data)


@pytest.mark.parametrize("where", [0.0, 0.01, 0.3, 0.5, 0.7, 0.95, 0.999],
                         ids=lambda where: f"at{where:g}")
def test_a_flip_anywhere_in_a_large_record_or_around_it_is_detected(
    tmp_path: Path, large_checkpoint: tuple[bytes, torch.Tensor], where: float
) -> None:
    data, _ = large_checkpoint
    damaged = bytearray(data)
    damaged[int(where * (len(data) - 1))] ^= 0x10
    path = tmp_path / "ck.pth"
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointCorruptedError, match=r"ck\.pth"):
        read_checkpoint(path)


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_a_flip_in_the_weights_is_named_as_corruption(
    tmp_path: Path, large_checkpoint: tuple[bytes, torch.Tensor], mmap: bool
) -> None:
    data, weight = large_checkpoint
    start = data.find(weight[:64].numpy().tobytes())
    assert start > 0
    damaged = bytearray(data)
    damaged[start + 400_000] ^= 0x01
    path = tmp_path / "ck.pth"
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointCorruptedError, match="CRC-32 of its content is"):
        read_checkpoint(path, mmap=mmap)
    assert torch.load(path, weights_only=True)["state"]["model"]["weight"].numel() == 200_000


def test_a_damaged_file_leaves_a_live_handler_exactly_as_it_was(tmp_path: Path) -> None:
    """resume_from a file with a flipped weight byte (in a record checked as it is read):
    the error comes before anything is applied, so no weight, moment or step changes."""
    saved = make_handler(hidden=5000)  # first layer's weight: 80 KB, above LARGE_READ
    saved.train(1, seed=0, progress_bar=False)
    weight = saved.module.state_dict()["net.0.weight"]
    assert weight.numel() * weight.element_size() >= LARGE_READ
    data = bytearray(saved.save(tmp_path / "ck.pth").read_bytes())
    start = bytes(data).find(weight.numpy().tobytes()[:256])
    assert start > 0
    data[start + 40_000] ^= 0x04
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    live = make_handler(hidden=5000, init_seed=1)
    live.train(1, seed=1, progress_bar=False)
    optimizer = live.optimizer
    assert optimizer is not None
    before = ({k: v.clone() for k, v in live.module.state_dict().items()},
              [{k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
               for s in optimizer.state_dict()["state"].values()])
    with pytest.raises(CheckpointCorruptedError, match=r"damaged\.pth"):
        live.resume_from(damaged)
    after_model = live.module.state_dict()
    assert all(torch.equal(after_model[k], v) for k, v in before[0].items())
    after_optimizer = list(optimizer.state_dict()["state"].values())
    assert all(torch.equal(after[k], v)
               for state, after in zip(before[1], after_optimizer, strict=True)
               for k, v in state.items())
