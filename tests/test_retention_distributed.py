"""Retention on two real DDP / FSDP2 ranks (torchrun, gloo, CPU): only rank 0 writes the index
and removes files, every rank keeps the same bookkeeping, a resume from the middle removes the
right files, and sharded ``.dcp`` checkpoints follow the same rules.

Launched like tests/test_async_distributed.py: ``tests/retention_ddp_worker.py`` under
``python -m torch.distributed.run`` in a subprocess with a timeout that fails instead of hanging.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dist_testing import DISTRIBUTED_MARKS, launch_scenario

pytestmark = DISTRIBUTED_MARKS

WORKER = Path(__file__).resolve().parent / "retention_ddp_worker.py"
WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 180
EP = "autosave:ck/ep{epoch:03d}"
BEST = "autosave:ck/best_ep{epoch:03d}"


def launch(scenario: str, workdir: Path) -> list[dict[str, Any]]:
    return launch_scenario(WORKER, scenario, workdir, WORLD_SIZE, LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def train_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch("train", tmp_path_factory.mktemp("retention_ddp") / "train")


def best_epoch(history: dict[str, Any]) -> int:
    losses = history["val_losses"]
    return 1 + min(range(len(losses)), key=lambda i: (losses[i], i))


def test_only_rank_zero_writes_the_index_and_removes(train_results: list[dict[str, Any]]) -> None:
    rank0, rank1 = train_results
    assert rank1["index_writes"] == [] and rank1["removals"] == []
    assert rank0["index_writes"] and rank0["removals"]
    threads = {w["thread"] for w in rank0["index_writes"]}
    # the synchronous auto-saver commits in the training thread, the asynchronous one in its
    # writer thread once its file is durable
    assert threads == {"MainThread", "nnhandler-checkpoint-writer"}
    removed = [r["name"] for r in rank0["removals"] if r["name"].startswith("ep")]
    assert removed == ["ep001.pth", "ep002.pth", "ep004.pth", "ep005.pth"]
    # keep_best=1 holds at most the best and the newest: every save after the second removes
    assert {r["thread"] for r in rank0["removals"] if r["name"].startswith("best")} == {
        "nnhandler-checkpoint-writer"}


def test_every_rank_keeps_the_same_bookkeeping(train_results: list[dict[str, Any]]) -> None:
    rank0, rank1 = train_results
    lineages = set()
    for phase in ("first", "resumed"):
        assert rank0[phase]["bookkeeping"] == rank1[phase]["bookkeeping"], phase
        assert rank0[phase]["history"] == rank1[phase]["history"], phase
        lineages |= {keeper["lineage"] for keeper in rank0[phase]["bookkeeping"].values()}
    # one lineage (the run id rank 0 drew and broadcast), kept by the resumed run
    assert len(lineages) == 1 and next(iter(lineages)).startswith("run:"), lineages


def test_the_rules_hold_on_the_shared_folder(train_results: list[dict[str, Any]]) -> None:
    rank0, rank1 = train_results
    first = rank0["first"]
    best = best_epoch(first["history"])
    expected_best = {f"best_ep{best:03d}.pth", "best_ep005.pth"}
    assert first["files"] == sorted(["ep003.pth", "ep004.pth", "ep005.pth", *expected_best,
                                     "nnhandler-index.json"])
    assert rank1["first"]["files"] == first["files"]
    # resumed from ep003: the interrupted run's ep004/ep005 were the lineage's own, replaced
    # by the resumed run's saves of the same names and then removed by keep_last
    resumed = rank0["resumed"]
    best = best_epoch(resumed["history"])
    assert resumed["files"] == sorted(["ep003.pth", "ep006.pth", "ep007.pth",
                                       *{f"best_ep{best:03d}.pth", "best_ep007.pth"},
                                       "nnhandler-index.json"])
    index = rank0["index"]["callbacks"]
    assert sorted(index) == [BEST, EP]
    kept = {c["name"]: c["reasons"] for c in index[EP]["checkpoints"]}
    assert kept == {"ep003.pth": ["every 3 epochs"],
                    "ep006.pth": ["latest 2/2", "every 3 epochs"],
                    "ep007.pth": ["latest 1/2"]}
    assert [entry[0] for entry in resumed["bookkeeping"][EP]["files"]] == [
        "ep003.pth", "ep006.pth", "ep007.pth"]


def test_sharded_checkpoints_follow_the_same_rules(tmp_path: Path) -> None:
    rank0, rank1 = launch("sharded", tmp_path / "sharded")
    assert rank0["sharded"] and rank1["sharded"]
    assert rank0["files"] == ["ep002.dcp", "ep003.dcp", "nnhandler-index.json"]
    assert rank1["index_writes"] == [] and rank1["removals"] == []
    assert [r["name"] for r in rank0["removals"]] == ["ep001.dcp"]
    assert rank0["bookkeeping"] == rank1["bookkeeping"]
    rows = {row["name"]: row for row in rank0["listing"]}
    assert sorted(rows) == ["ep002.dcp", "ep003.dcp"]
    for name, row in rows.items():
        assert row["valid"] and row["verified"]
        assert row["size"] == rank0["sizes"][name] > 0
    assert rows["ep003.dcp"]["latest"] and rows["ep003.dcp"]["kept_by"][0]["reasons"] == [
        "latest 1/1"]
    assert rows["ep002.dcp"]["kept_by"][0]["reasons"] == ["every 2 epochs"]
