"""The verified read that leaves the model's tensors as views of the file
(nnhandler/checkpoint/mapped_read.py): the same values and sharing as the checking reader,
memory of its own for everything that is kept, and damage found before anything is applied."""

from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from nnh_testing import assert_deep_equal, make_handler, regression_dataset, tensors_of

from nnhandler import CheckpointCorruptedError, NNHandler
from nnhandler.checkpoint import read_checkpoint
from nnhandler.checkpoint.envelope import build_meta, write_checkpoint
from nnhandler.checkpoint.integrity import read_integrity_record
from nnhandler.checkpoint.mapped_read import (
    PARALLEL_FROM,
    can_map,
    crc32_through_storages,
    mapped_crc32,
    parallel_crc32,
)
from nnhandler.checkpoint.packing import PACK_BELOW

META = build_meta(epoch=1, step=2, logs={}, world_size=1)


def sample_state() -> dict[str, Any]:
    """Large and small tensors, tied ones, views and a parameter, under "model" and beside
    (the large ones above PACK_BELOW: records of their own, not cloned off a pack)."""
    torch.manual_seed(0)
    tied = torch.randn(64, 32)
    base = torch.arange(40_000.0)
    return {
        "model": {"weight": torch.randn(600, 200), "bias": torch.randn(7),
                  "tied.a": tied, "tied.b": tied},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(600, 200),
                                    "step": torch.tensor(3.0)},
                                1: {"exp_avg": torch.randn(7), "step": torch.tensor(3.0)}}},
        "kept": {"views": [base, base.view(200, 200)[10:]],
                 "small": [torch.randn(3) for _ in range(5)],
                 "parameter": torch.nn.Parameter(torch.randn(4)),
                 "tied": (tied, tied)},
    }


@pytest.fixture
def written(tmp_path: Path) -> Path:
    path = tmp_path / "ck.pth"
    write_checkpoint(path, sample_state(), META)
    return path


def storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def overwrite_in_place(path: Path) -> None:
    """Garbage over every byte of the file, through the same inode (what no nnhandler writer
    ever does: a mapping of the file sees it)."""
    size = path.stat().st_size
    with open(path, "r+b") as file:
        file.write(random.Random(3).randbytes(size))


def test_the_mapped_read_gives_what_the_reader_gives(written: Path) -> None:
    mapped = read_checkpoint(written, copied={"model"})
    read = read_checkpoint(written)
    assert_deep_equal(mapped.state, read.state)
    assert_deep_equal(mapped.state, sample_state())
    kept = mapped.state["kept"]
    assert storage_of(kept["views"][0]) == storage_of(kept["views"][1])
    assert storage_of(kept["tied"][0]) == storage_of(kept["tied"][1])
    assert type(kept["parameter"]) is torch.nn.Parameter and kept["parameter"].requires_grad
    small = [storage_of(tensor) for tensor in kept["small"]]
    assert len(set(small)) == len(small)  # split off their pack, one storage each
    model = mapped.state["model"]
    assert storage_of(model["tied.a"]) == storage_of(model["tied.b"])
    assert model["weight"].nbytes > PACK_BELOW


def test_only_the_copied_keys_stay_views_of_the_file(written: Path) -> None:
    """Overwriting the file in place after the read changes the tensors under "model" (they
    are the file's pages, copied once by whoever loads them) and nothing else."""
    expected = sample_state()
    mapped = read_checkpoint(written, copied={"model"})
    read = read_checkpoint(written)
    overwrite_in_place(written)
    for where in ("optimizer", "kept"):
        assert_deep_equal(mapped.state[where], expected[where], where)
    assert_deep_equal(read.state, expected)  # the reader: memory of its own throughout
    assert not torch.equal(mapped.state["model"]["weight"], expected["model"]["weight"])


def test_a_loaded_handler_owns_all_its_state(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """NNHandler.load reads mapped; once it returns, the file can change under it without
    touching the weights, the optimizer's moments or the history, and training goes on."""
    monkeypatch.chdir(tmp_path)
    handler = make_handler(hidden=20_000)
    handler.train(1, seed=0, progress_bar=False)
    path = handler.save("ck.pth")
    loaded = NNHandler.load(path, logger_mode="file")
    assert loaded.optimizer is not None
    before = [tensor.clone() for tensor in tensors_of(loaded.module.state_dict())
              + tensors_of(loaded.optimizer.state_dict())]
    overwrite_in_place(path)
    after = tensors_of(loaded.module.state_dict()) + tensors_of(loaded.optimizer.state_dict())
    assert len(after) == len(before) > 8
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    loaded.set_train_loader(regression_dataset(64), batch_size=8)
    loaded.train(1, seed=0, progress_bar=False)


def test_resume_from_reads_the_same_state_as_the_reader(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    handler = make_handler(hidden=20_000)
    handler.train(2, seed=0, progress_bar=False)
    path = handler.save("ck.pth")
    resumed = make_handler(hidden=20_000, init_seed=5)
    resumed.resume_from(path)
    assert_deep_equal(resumed.module.state_dict(), handler.module.state_dict())
    assert resumed.optimizer is not None and handler.optimizer is not None
    assert_deep_equal(resumed.optimizer.state_dict(), handler.optimizer.state_dict())


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("where", [0.05, 0.3, 0.6, 0.9, 0.999])
def test_damage_is_found_before_anything_is_applied(tmp_path: Path, damage: str,
                                                    where: float) -> None:
    saved = make_handler(hidden=20_000)
    saved.train(1, seed=0, progress_bar=False)
    data = bytearray(saved.save(tmp_path / "ck.pth").read_bytes())
    at = int(where * (len(data) - 1))
    if damage == "flip":
        data[at] ^= 0x20
    else:
        del data[at:]
    path = tmp_path / "damaged.pth"
    path.write_bytes(bytes(data))
    live = make_handler(hidden=20_000, init_seed=1)
    live.train(1, seed=1, progress_bar=False)
    assert live.optimizer is not None
    before = [tensor.clone() for tensor in tensors_of(live.module.state_dict())
              + tensors_of(live.optimizer.state_dict())]
    with pytest.raises(CheckpointCorruptedError, match=r"damaged\.pth"):
        live.resume_from(path)
    with pytest.raises(CheckpointCorruptedError, match=r"damaged\.pth"):
        read_checkpoint(path, copied={"model"})
    after = tensors_of(live.module.state_dict()) + tensors_of(live.optimizer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_the_mapped_crc_is_the_records(written: Path) -> None:
    record = read_integrity_record(written)
    covered = int(record["covered_size"])
    assert mapped_crc32(written, covered) == (covered, record["crc32"])
    size = written.stat().st_size
    assert mapped_crc32(written, size + 100)[0] == size  # past the end: what is there


def test_what_cannot_be_mapped_is_named(tmp_path: Path, written: Path) -> None:
    empty = tmp_path / "empty.pth"
    empty.touch()
    assert can_map(written) and not can_map(empty)
    with pytest.raises(CheckpointCorruptedError):
        read_checkpoint(empty, copied={"model"})


@pytest.mark.parametrize("size", [0, 1, PARALLEL_FROM - 1, PARALLEL_FROM, 2 * PARALLEL_FROM + 3])
def test_the_crc_cut_across_cores_is_the_crc_of_the_whole(size: int) -> None:
    data = random.Random(size).randbytes(size)
    assert parallel_crc32(memoryview(data)) == zlib.crc32(data)


@pytest.mark.parametrize("large", [False, True], ids=["small", "cut-across-cores"])
def test_the_crc_through_torchs_mapping_is_the_records(tmp_path: Path, large: bool) -> None:
    path = tmp_path / "ck.pth"
    state = sample_state()
    if large:  # past PARALLEL_FROM: the pieces are cut and combined across cores
        state["model"]["big"] = torch.randn(PARALLEL_FROM // 4 + 12_345)
    write_checkpoint(path, state, META)
    record = read_integrity_record(path)
    covered = int(record["covered_size"])
    envelope = torch.load(path, weights_only=True, mmap=True)
    assert crc32_through_storages(path, covered, envelope) == (covered, record["crc32"])


def test_storages_that_do_not_match_the_records_are_not_used(written: Path) -> None:
    """A record no tensor uses, or a tensor that is not the file's: the caller maps the file
    itself (None), rather than count a record twice or leave one out."""
    covered = int(read_integrity_record(written)["covered_size"])
    envelope = torch.load(written, weights_only=True, mmap=True)
    del envelope["state"]["model"]["weight"]
    assert crc32_through_storages(written, covered, envelope) is None
    envelope = torch.load(written, weights_only=True, mmap=True)
    envelope["state"]["extra"] = torch.ones(3)
    assert crc32_through_storages(written, covered, envelope) is None
    assert crc32_through_storages(written, covered, {"state": {}}) is None


@pytest.mark.parametrize("region", ["record", "pickle"])
def test_a_flip_in_a_record_or_between_records_is_found_through_the_storages(
        tmp_path: Path, written: Path, region: str) -> None:
    data = bytearray(written.read_bytes())
    at = data.index(b"data.pkl") + 200 if region == "pickle" else len(data) // 2
    data[at] ^= 0x01
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    record = read_integrity_record(damaged)
    covered = int(record["covered_size"])
    try:
        envelope = torch.load(damaged, weights_only=True, mmap=True)
    except Exception:  # the flip broke the pickle itself: read_checkpoint reports corruption
        envelope = None
    if envelope is not None:
        counted = crc32_through_storages(damaged, covered, envelope)
        assert counted is None or counted != (covered, record["crc32"])
    with pytest.raises(CheckpointCorruptedError, match=r"damaged\.pth"):
        read_checkpoint(damaged, copied={"model"})


def test_storages_moved_off_the_mapping_are_checked_on_a_mapping_of_its_own(
        tmp_path: Path, written: Path) -> None:
    """A map_location that gives every storage memory of its own: the CRC cannot be taken
    through torch's mapping (None), the read checks the file itself, and a flip is still
    found."""
    def move(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        return storage.clone()

    covered = int(read_integrity_record(written)["covered_size"])
    envelope = torch.load(written, weights_only=True, mmap=True, map_location=move)
    assert crc32_through_storages(written, covered, envelope) is None
    assert_deep_equal(read_checkpoint(written, map_location=move, copied={"model"}).state,
                      read_checkpoint(written).state)
    data = bytearray(written.read_bytes())
    data[len(data) // 2] ^= 0x04
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptedError, match=r"damaged\.pth"):
        read_checkpoint(damaged, map_location=move, copied={"model"})
