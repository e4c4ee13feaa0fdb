"""The peers section of ``python -m benchmarks``: the bit-flip tools find the tensor bytes of
each format the peers write, and the section runs at a tiny size with whatever peers are
installed here (Lightning, Accelerate, Ignite are optional: ``nnhandler[bench]``), its rows well
formed. The figures themselves are not judged here."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch

from benchmarks import peers
from benchmarks.bitflip import data_regions, flip_bit, flipped, outcome_of
from benchmarks.peer_systems import LAYERS, PeerModel, missing, width_for
from nnhandler import CheckpointCorruptedError

OUTCOME = r"(detected|loaded silently wrong|loaded intact|crashed \(\w+\)) \d+/\d+"
FLIP_ROW = re.compile(rf"\[(no )?fsync\]: one bit flipped in a tensor's data: "
                      rf"{OUTCOME}(, {OUTCOME})*$")
PEERS = {"Lightning": "lightning", "Accelerate": "accelerate", "Ignite": "ignite"}


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"big": torch.randn(1000), "small": torch.randn(10),
            "ints": torch.arange(50, dtype=torch.int32)}


def test_the_model_has_32_tensors_of_the_size_asked_for() -> None:
    parameters = list(PeerModel(8).parameters())
    assert len(parameters) == 2 * LAYERS == 32
    assert sum(p.numel() for p in parameters) == LAYERS * (8 * 8 + 8)
    for megabytes in (50, 200):
        width = width_for(megabytes)
        assert LAYERS * (width**2 + width) * 4 == pytest.approx(megabytes * 2**20, rel=0.01)


def test_regions_of_a_torch_save_file_are_its_tensor_bytes(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "state.pt"
    torch.save(state, path)
    regions = data_regions(path)
    assert [region.length for region in regions] == [4000, 200, 40]
    raw = path.read_bytes()
    assert raw[regions[0].offset:regions[0].offset + 4000] == state["big"].numpy().tobytes()
    with flipped(regions[0], 6):
        damaged = torch.load(path, weights_only=True)
        assert not torch.equal(damaged["big"], state["big"])
        assert torch.equal(damaged["small"], state["small"])
    assert path.read_bytes() == raw  # restored


def test_regions_of_a_safetensors_file(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    state = _state()
    path = tmp_path / "model.safetensors"
    safetensors.save_file(state, str(path))
    regions = data_regions(path)
    assert sorted(region.length for region in regions) == [40, 200, 4000]
    flip_bit(path, regions[0].middle, 0)
    assert not torch.equal(safetensors.load_file(str(path))["big"], state["big"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_regions_of_a_dcp_checkpoint_are_inside_its_items(tmp_path: Path) -> None:
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    state = _state()
    dcp.save({key: value.clone() for key, value in state.items()}, checkpoint_id=tmp_path)
    regions = data_regions(tmp_path)
    assert [region.length for region in regions] == [4000, 200, 40]
    assert all(region.path.suffix == ".distcp" for region in regions)
    flip_bit(regions[2].path, regions[2].middle, 3)
    loaded = {key: torch.zeros_like(value) for key, value in state.items()}
    dcp.load(loaded, checkpoint_id=tmp_path)
    assert torch.equal(loaded["big"], state["big"]) and torch.equal(loaded["ints"], state["ints"])
    assert not torch.equal(loaded["small"], state["small"])


def test_a_file_without_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(ValueError, match="no tensor data"):
        data_regions(path)


def _raise(error: Exception) -> None:
    raise error


@pytest.mark.parametrize(("load", "intact", "outcome"), [
    (lambda: _raise(CheckpointCorruptedError("x.pth: CRC mismatch")), True, "detected"),
    (lambda: _raise(RuntimeError("PytorchStreamReader failed: invalid header or archive is "
                                 "corrupted")), True, "detected"),
    (lambda: _raise(KeyError("model")), True, "crashed (KeyError)"),
    (lambda: None, False, "loaded silently wrong"),
    (lambda: None, True, "loaded intact"),
], ids=["our-error", "says-corrupted", "other-error", "wrong", "intact"])
def test_outcomes(load: object, intact: bool, outcome: str) -> None:
    assert outcome_of(load, lambda: intact) == outcome  # type: ignore[arg-type]


def test_fsyncs_are_counted_and_still_made(tmp_path: Path) -> None:
    original = os.fsync
    with peers.counting_fsyncs() as calls, open(tmp_path / "f", "wb") as file:
        file.write(b"x")
        os.fsync(file.fileno())
        os.fsync(file.fileno())
    assert calls["fsync"] == 2 and calls["fdatasync"] == 0
    assert os.fsync is original


@pytest.mark.slow
def test_the_section_runs_with_the_peers_installed_here(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = peers.run(rounds=1, train_rounds=1, epochs=1, epoch_seconds=0.001, load_rounds=1,
                     flips=2, megabytes=0.25, directory=tmp_path)
    printed = capsys.readouterr().out
    assert {row.section for row in rows} == {"peers"}
    for row in rows:
        assert row.baseline_value > 0 and row.ours_value >= 0 and math.isfinite(row.ratio)
        assert row.verdict == "" or row.verdict.startswith(("met", "MISSED"))
        if not row.case.startswith("hand-written loop"):
            assert re.search(r"\[(no )?fsync\]", row.case), row.case
    installed = {system for system, module in PEERS.items() if not missing(module)}
    for system in PEERS:
        skipped = f"{system} skipped: not installed (pip install 'nnhandler[bench]'"
        assert (skipped in printed) == (system not in installed), printed
    systems = {"nnhandler", "torch DCP", "torch.save / torch.load by hand", *installed}
    flips = [row for row in rows if "bit flipped" in row.case]
    assert {row.case.split(" [")[0] for row in flips} == systems
    assert all(FLIP_ROW.search(row.case) and row.baseline_value == 2 for row in flips)
    ours = next(row for row in flips if row.case.startswith("nnhandler ["))
    assert "detected 2/2" in ours.case and ours.verdict.startswith("met")
    savers = 2 + (2 if "Lightning" in installed else 0) + len(installed - {"Lightning"}) + 2
    assert len([row for row in rows if "blocked per save" in row.case]) == savers
    assert len([row for row in rows if "train 1 epoch," in row.case]) == savers + 1
    # nnhandler has two load rows (verify on and off), the baseline none of its own
    assert len([row for row in rows if "resume by" in row.case]) == len(systems)
    assert "nnhandler sync auto-save [fsync]" in " ".join(row.case for row in rows)
    assert not [path for path in tmp_path.rglob("*")
                if path.is_file() and path.suffix != ".log"]  # every checkpoint removed
