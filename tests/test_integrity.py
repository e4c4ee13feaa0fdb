"""Integrity (CRC-32 written with the file), safe loading, format versions and the CLI."""

from __future__ import annotations

import contextlib
import json
import pickle
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from nnh_testing import make_handler

from nnhandler import CheckpointCorruptedError, CheckpointError, CheckpointFormatError, NNHandler
from nnhandler.checkpoint import FORMAT_VERSION, read_checkpoint
from nnhandler.checkpoint.envelope import build_meta, write_checkpoint
from nnhandler.checkpoint.integrity import read_integrity_record, verify_file
from nnhandler.checkpoint.migrations import register_migration, unregister_migration
from nnhandler.checkpoint.packing import PACKS_KEY
from nnhandler.cli import main as cli_main


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a small but complete checkpoint (model, optimizer, EMA, history, rng …)."""
    directory = tmp_path_factory.mktemp("pristine")
    handler = make_handler()
    handler.train(2, seed=0, ema_decay=0.5, progress_bar=False)
    return handler.save(directory / "ck.pth").read_bytes()


def _load_all(path: Path) -> None:
    NNHandler.load(path, logger_mode="file")


def test_a_written_checkpoint_verifies_and_opens_with_plain_torch(tmp_path: Path,
                                                                  pristine: bytes) -> None:
    path = tmp_path / "ck.pth"
    path.write_bytes(pristine)
    record = verify_file(path)
    assert record["algorithm"] == "crc32" and record.epoch == 2
    envelope = torch.load(path, weights_only=True)
    # the fast writer lists its packs of small storages (checkpoint/packing.py) beside them
    assert set(envelope) - {PACKS_KEY} == {"format", "meta", "state"}
    assert envelope["format"]["version"] == FORMAT_VERSION


def _flip(data: bytes, bit: int) -> bytes:
    damaged = bytearray(data)
    damaged[bit // 8] ^= 1 << (bit % 8)
    return bytes(damaged)


def test_sweep_of_single_bit_flips_and_truncations_is_always_detected(
    tmp_path: Path, pristine: bytes
) -> None:
    """>= 200 flips anywhere and >= 100 truncations: each raises CheckpointCorruptedError from
    NNHandler.load, and nothing else ever escapes."""
    rng = random.Random(1234)
    size_bits = len(pristine) * 8
    # every region matters: zip headers, the pickle, tensor data, the integrity record
    bits = [rng.randrange(size_bits) for _ in range(200)]
    bits += [size_bits - 1 - i for i in range(0, 400, 7)]  # the tail: record and EOCD
    cuts = sorted({rng.randrange(len(pristine)) for _ in range(100)} | {0, 1, len(pristine) - 1})
    path = tmp_path / "damaged.pth"
    detected = 0
    for bit in bits:
        path.write_bytes(_flip(pristine, bit))
        with pytest.raises(CheckpointCorruptedError):
            _load_all(path)
        detected += 1
    for cut in cuts:
        path.write_bytes(pristine[:cut])
        with pytest.raises(CheckpointCorruptedError):
            _load_all(path)
        detected += 1
    assert detected == len(bits) + len(cuts) >= 300


@given(bit=st.integers(min_value=0), verify=st.booleans(), mapped=st.booleans())
def test_any_flip_never_loads_wrong_data_silently(tmp_path: Path, pristine: bytes, bit: int,
                                                  verify: bool, mapped: bool) -> None:
    """With verify=True a flip is always detected; with verify=False it may go unnoticed, but
    reading still raises nothing but CheckpointError. ``mapped``: the read that leaves the
    model's tensors as views of the file (checkpoint/mapped_read.py) instead of the reader."""
    path = tmp_path / "flip.pth"
    path.write_bytes(_flip(pristine, bit % (len(pristine) * 8)))
    copied = {"model"} if mapped else set()
    if verify:
        with pytest.raises(CheckpointCorruptedError):
            read_checkpoint(path, verify=True, copied=copied)
    else:
        with contextlib.suppress(CheckpointError):
            read_checkpoint(path, verify=False, copied=copied)


def test_verify_false_skips_the_checksum(tmp_path: Path, pristine: bytes) -> None:
    # damage a byte inside the integrity record's JSON: the zip and its content stay intact
    path = tmp_path / "ck.pth"
    data = bytearray(pristine)
    index = pristine.rindex(b'"crc32":') + len('"crc32":')
    data[index] = ord("1") if data[index] != ord("1") else ord("2")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptedError):
        NNHandler.load(path)
    assert NNHandler.load(path, verify=False).epoch == 2


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_a_pickle_that_would_run_a_command_is_refused(tmp_path: Path, verify: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"format": {"name": "nnhandler.checkpoint", "version": 1},
                "meta": {"epoch": 1}, "state": {"x": _Exploit(marker)}}, path)
    with pytest.raises(CheckpointError):
        NNHandler.load(path, verify=verify)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        read_checkpoint(path, verify=False)
    assert not marker.exists()
    # and plain pickle protocol files are not zip files at all
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError):
        NNHandler.load(raw, verify=verify)
    assert not marker.exists()


@pytest.mark.parametrize(
    "loss_reference",
    ["os:system", "builtins:exec", "subprocess:call", "shutil:rmtree"],
)
def test_a_checkpoint_cannot_install_an_arbitrary_function_as_loss(
    tmp_path: Path, loss_reference: str
) -> None:
    handler = make_handler()
    handler.train(1, seed=0, progress_bar=False)
    state = handler.state_dict()
    state["config"]["loss_fn"] = {"kind": "function", "ref": loss_reference}
    state["config"]["metrics"] = {"mae": {"kind": "function", "ref": loss_reference}}
    path = tmp_path / "ck.pth"
    write_checkpoint(path, state, build_meta(epoch=1, step=1, logs={}, world_size=1))
    loaded = NNHandler.load(path)
    assert loaded.loss_fn is None and loaded.metrics == {}


def _write_version(path: Path, version: int) -> None:
    handler = make_handler()
    state = handler.state_dict()
    meta = build_meta(epoch=0, step=0, logs={}, world_size=1)
    import nnhandler.checkpoint.envelope as envelope

    original = envelope.FORMAT_VERSION
    envelope.FORMAT_VERSION = version  # type: ignore[misc]
    try:
        write_checkpoint(path, state, meta)
    finally:
        envelope.FORMAT_VERSION = original  # type: ignore[misc]


def test_a_newer_format_version_is_refused_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "future.pth"
    _write_version(path, FORMAT_VERSION + 1)
    with pytest.raises(CheckpointFormatError,
                       match=f"version {FORMAT_VERSION + 1}.*version {FORMAT_VERSION}"):
        NNHandler.load(path)


def test_an_older_format_version_goes_through_its_migration(tmp_path: Path) -> None:
    path = tmp_path / "old.pth"
    _write_version(path, FORMAT_VERSION - 1)
    with pytest.raises(CheckpointFormatError, match="no migration"):
        NNHandler.load(path)

    calls: list[int] = []

    @register_migration(from_version=FORMAT_VERSION - 1)
    def _lift(envelope: dict) -> dict:  # type: ignore[type-arg]
        calls.append(envelope["format"]["version"])
        envelope["meta"]["logs"]["migrated"] = True  # a field the current schema has
        return envelope

    try:
        checkpoint = read_checkpoint(path)
        assert calls == [FORMAT_VERSION - 1]
        assert checkpoint.meta["logs"]["migrated"] is True
        assert NNHandler.load(path).epoch == 0
    finally:
        unregister_migration(FORMAT_VERSION - 1)


def test_integrity_record_is_readable_from_the_tail_alone(tmp_path: Path, pristine: bytes) -> None:
    path = tmp_path / "ck.pth"
    path.write_bytes(pristine)
    record = read_integrity_record(path)
    assert record["epoch"] == 2 and record["covered_size"] < len(pristine)
    assert set(record["logs"]) >= {"epoch", "loss", "val_loss", "mae", "val_mae"}


def test_cli_verify_exit_status(tmp_path: Path, pristine: bytes,
                                capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.pth", tmp_path / "bad.pth"
    good.write_bytes(pristine)
    bad.write_bytes(_flip(pristine, 8 * 100))
    assert cli_main(["verify", str(good)]) == 0
    assert cli_main(["verify", str(good), str(bad)]) == 1
    output = capsys.readouterr().out
    assert "OK" in output and "CORRUPT" in output and str(bad) in output.replace("\n", "")


def test_cli_verify_json_lists_each_file(tmp_path: Path, pristine: bytes,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.pth", tmp_path / "bad.pth"
    good.write_bytes(pristine)
    bad.write_bytes(pristine[:-10])
    assert cli_main(["verify", "--json", str(good), str(bad)]) == 1
    results = json.loads(capsys.readouterr().out)
    assert [r["ok"] for r in results] == [True, False]
    assert "truncated" in results[1]["error"] or "integrity" in results[1]["error"]


def test_cli_inspect_shows_components(tmp_path: Path, pristine: bytes,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ck.pth"
    path.write_bytes(pristine)
    assert cli_main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["epoch"] == 2
    assert info["components"]["model"]["tensors"] == 4
    assert info["components"]["optimizer"]["bytes"] > 0
    assert info["config"]["model_class"] == "nnh_testing:TinyNet"
    assert cli_main(["inspect", str(path)]) == 0
    table = capsys.readouterr().out
    assert "components" in table and "ema" in table
    path.write_bytes(pristine[:100])
    assert cli_main(["inspect", str(path)]) == 1
