"""Asynchronous auto-save on two real DDP ranks (torchrun, gloo, CPU): rank 0 writes in the
background, every rank learns the outcome, and when ``train`` returns every promised file is
durable on every rank; a background failure on rank 0 follows ``on_save_error`` on both ranks.

Launched like tests/test_distributed.py: ``tests/async_ddp_worker.py`` under
``python -m torch.distributed.run`` in a subprocess with a timeout that fails instead of hanging.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dist_testing import DISTRIBUTED_MARKS, launch_scenario

pytestmark = DISTRIBUTED_MARKS

WORKER = Path(__file__).resolve().parent / "async_ddp_worker.py"
WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 120
EPOCHS = 3  # must match tests/async_ddp_worker.py


def launch(scenario: str, workdir: Path) -> list[dict[str, Any]]:
    return launch_scenario(WORKER, scenario, workdir, WORLD_SIZE, LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def train_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch("train", tmp_path_factory.mktemp("async_ddp") / "train")


def test_only_rank_zero_writes_in_a_background_thread(
    train_results: list[dict[str, Any]]
) -> None:
    rank0, rank1 = train_results
    assert rank1["writes"] == [] and rank1["removals"] == []
    written = sorted(Path(w["path"]).name for w in rank0["writes"])
    expected = sorted([f"ep{e:03d}.pth" for e in range(1, EPOCHS + 1)]
                      + [f"latest_ep{e:03d}.pth" for e in range(1, EPOCHS + 1)])
    assert written == expected
    assert {w["thread"] for w in rank0["writes"]} == {"nnhandler-checkpoint-writer"}
    # overwrite=True: rank 0 removed each superseded "latest" file once its successor existed
    assert sorted(Path(r["path"]).name for r in rank0["removals"]) == [
        "latest_ep001.pth", "latest_ep002.pth"]


def test_every_rank_finds_every_file_durable_when_train_returns(
    train_results: list[dict[str, Any]]
) -> None:
    expected = {f"ep{e:03d}.pth": e for e in range(1, EPOCHS + 1)}
    expected[f"latest_ep{EPOCHS:03d}.pth"] = EPOCHS
    for result in train_results:
        assert result["on_disk_at_return"] == expected
        assert result["writer_threads_left"] == []


def test_every_rank_sees_the_same_saved_events(train_results: list[dict[str, Any]]) -> None:
    rank0, rank1 = train_results
    assert rank0["events"] == rank1["events"]
    assert sorted(epoch for _, epoch in rank0["events"]) == sorted(
        [e for e in range(1, EPOCHS + 1)] * 2)
    assert rank0["weights"] == rank1["weights"]  # DDP kept the replicas in step


def test_a_background_failure_on_rank_zero_reaches_both_ranks(tmp_path: Path) -> None:
    rank0, rank1 = launch("errors", tmp_path / "errors")
    # raise: the epoch-2 write failed; both ranks stop together at the next event
    raised0, raised1 = rank0["raise"], rank1["raise"]
    assert raised0["error"]["type"] == "OSError"
    assert "No space left on device" in raised0["error"]["message"]
    assert raised1["error"]["is_checkpoint_error"]
    assert "rank 0 failed: OSError" in raised1["error"]["message"]
    assert raised0["epoch"] == raised1["epoch"] == 3
    for outcome in (raised0, raised1):
        assert outcome["save_count"] == 1 and outcome["last_saved_path"] == "raise/ep001.pth"
        assert outcome["group_still_works"] == 2.0
    assert raised0["on_disk"] == {"ep001.pth": 1}
    # warn: both ranks train on, count the failure and keep the same bookkeeping
    warned0, warned1 = rank0["warn"], rank1["warn"]
    for outcome in (warned0, warned1):
        assert outcome["error"] is None and outcome["epoch"] == EPOCHS + 1
        assert outcome["failed_saves"] == 1 and outcome["save_count"] == EPOCHS
        assert outcome["last_saved_path"] == f"warn/ep{EPOCHS + 1:03d}.pth"
        assert outcome["on_disk"] == {"ep001.pth": 1, "ep003.pth": 3, "ep004.pth": 4}


def test_a_saver_on_the_public_seam_works_on_two_ranks(tmp_path: Path) -> None:
    rank0, rank1 = launch("seam", tmp_path / "seam")
    expected_files = sorted([f"sync{e}.pth" for e in range(1, EPOCHS + 1)]
                            + [f"bg{e}.pth" for e in range(1, EPOCHS + 1)])
    assert rank1["writes"] == []
    assert sorted(Path(w["path"]).name for w in rank0["writes"]) == expected_files
    background = {w["thread"] for w in rank0["writes"] if Path(w["path"]).name.startswith("bg")}
    assert background == {"nnhandler-checkpoint-writer"}
    assert rank0["saved"] == rank1["saved"] and len(rank0["saved"]) == 2 * EPOCHS
    assert rank0["events"] == rank1["events"] == [[path, epoch] for path, epoch, _ in
                                                   rank0["saved"]]
    for result in (rank0, rank1):  # every promised file durable when train returns
        assert result["on_disk_at_return"] == {
            name: int(name.removesuffix(".pth").lstrip("bgsync")) for name in expected_files}
        assert result["group_still_works"] == 2.0
    assert rank0["failure"]["error"]["type"] in ("FileExistsError", "NotADirectoryError")
    assert rank1["failure"]["error"]["is_checkpoint_error"]
    assert "rank 0 failed" in rank1["failure"]["error"]["message"]
