"""The unit that owns snapshot plans (:mod:`nnhandler.checkpoint.snapshot`): when a plan is
kept and when a new one is made. These tests read ``StagingBuffers``' plan, which is that
module's own business; the behaviour of background saves is tested through the public seam
in ``test_async_save.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_write_path import assert_same, storage_groups

from nnhandler.checkpoint.envelope import build_meta, ensure_plain, envelope_of, write_envelope
from nnhandler.checkpoint.packing import split_packs
from nnhandler.checkpoint.snapshot import StagingBuffers


def load_envelope(path: Path) -> dict[str, Any]:
    envelope: dict[str, Any] = split_packs(torch.load(path, weights_only=True))  # as we read
    return envelope


def write_both(directory: Path, staging: StagingBuffers, state: dict[str, Any]) -> tuple[
        dict[str, Any], dict[str, Any]]:
    """The envelopes of a snapshot of ``state`` and of a synchronous save of it, as loaded."""
    envelope = envelope_of(state, build_meta(epoch=1, step=1, logs={}, world_size=1))
    ensure_plain(envelope)
    snapshot = staging.take(envelope)
    write_envelope(directory / "async.pth", snapshot.value, snapshot.records)
    write_envelope(directory / "sync.pth", envelope)
    return load_envelope(directory / "sync.pth"), load_envelope(directory / "async.pth")


def test_a_fresh_tensor_in_the_place_of_an_unshared_one_keeps_the_plan(tmp_path: Path) -> None:
    """A provider that builds a new tensor per save (an RNG state) does not cost a new plan;
    the snapshot reads the new tensor."""
    staging = StagingBuffers()
    weights = torch.arange(6.0)
    for step in range(3):
        rng = torch.full((5,), step, dtype=torch.uint8)  # new storage, same layout
        sync, written_async = write_both(tmp_path, staging, {"w": weights, "rng": rng})
        plan = staging._plan
        if step == 0:
            first_plan = plan
        assert plan is first_plan
        assert_same(sync, written_async)
        assert torch.equal(written_async["state"]["rng"], rng)


@pytest.mark.parametrize("case", ["shared", "twice", "taken"])
def test_a_fresh_tensor_that_changes_the_sharing_gets_a_new_plan(tmp_path: Path,
                                                                   case: str) -> None:
    base = torch.arange(8.0)
    before = {"a": base, "b": base[2:], "c": torch.ones(3), "d": torch.zeros(3)}
    fresh = torch.full((3,), 7.0)
    after = {
        "shared": {"a": torch.arange(8.0) + 1, "b": base[2:], "c": torch.ones(3),
                   "d": torch.zeros(3)},  # a new storage where a shared one was planned
        "twice": {"a": base, "b": base[2:], "c": fresh, "d": fresh},  # now one storage, twice
        "taken": {"a": base, "b": base[2:], "c": before["d"], "d": before["d"]},
    }[case]
    staging = StagingBuffers()
    write_both(tmp_path, staging, before)
    first_plan = staging._plan
    sync, written_async = write_both(tmp_path, staging, after)
    assert staging._plan is not first_plan
    assert_same(sync, written_async)
    assert storage_groups(written_async) == storage_groups(sync) == storage_groups(after)
