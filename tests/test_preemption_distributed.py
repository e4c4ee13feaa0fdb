"""Preemption on two real DDP ranks (torchrun, gloo, CPU): a signal that reaches one rank (or
each rank at a different batch) stops every rank after the same optimizer step; one emergency
checkpoint is written; resuming it on two ranks equals the uninterrupted run bit for bit; a
partial epoch refuses another world size; ``save_on_exception`` does nothing under DDP.

``tests/preempt_ddp_worker.py`` runs under ``python -m torch.distributed.run`` in a subprocess
with a timeout that fails instead of hanging.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_testing import run_bounded, torchrun
from nnh_testing import assert_deep_equal, regression_dataset

from nnhandler import ConfigurationError, NNHandler

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()) or not hasattr(signal, "SIGUSR1"),
        reason="needs torch.distributed with gloo and POSIX signals",
    ),
]

WORKER = Path(__file__).resolve().parent / "preempt_ddp_worker.py"
WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 150
EPOCHS = 3  # tests/preempt_ddp_worker.py
BATCHES = 8  # per rank and epoch
TRAINING_KEYS = ("model", "optimizer", "scheduler", "ema", "history", "progress", "rng",
                 "position")


def launch(scenario: str, workdir: Path, *arguments: str) -> list[dict[str, Any]]:
    returncode, output = run_bounded(
        torchrun(WORLD_SIZE, WORKER, scenario, str(workdir), *arguments), workdir.parent,
        f"DDP scenario {scenario!r}", LAUNCH_TIMEOUT_S)
    assert returncode == 0, f"DDP scenario {scenario!r} failed (exit {returncode}):\n" + \
        output[-8000:]
    return [json.loads((workdir / f"result_rank{r}.json").read_text())
            for r in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("preempt_ddp")
    results = {name: launch(name, base / name) for name in ("reference", "one-rank")}
    shutil.copytree(base / "one-rank", base / "resume")
    (base / "resume" / "final.pth").unlink()
    emergency = results["one-rank"][0]["report"]["paths"][0]
    results["resume"] = launch("resume", base / "resume", emergency)
    return {"base": base, **results}


def test_a_signal_on_one_rank_stops_both_after_the_same_step(runs: dict[str, Any]) -> None:
    rank0, rank1 = runs["one-rank"]
    # rank 1 got SIGUSR1 after batch 2 of epoch 2 (the first batch of a group of two); rank 0
    # learns of it through the all-reduce started at the step after batch 3 and collected at
    # the next step: both stop after batch 5 (6 batches done), with no pending gradients
    for result in (rank0, rank1):
        assert result["preempted"] and result["stopped_mid_epoch"]
        assert result["report"] == {"signal": "SIGUSR1", "epoch": 2, "batches": 6,
                                    "paths": ["ck/preempted_ep002_b00006.pth"]}
        assert result["handlers_restored"]
        assert result["batches"] == [[1, b] for b in range(BATCHES)] + [[2, b] for b in range(6)]
        assert result["files"] == ["ep001.pth", "preempted_ep002_b00006.pth"]
    assert rank0["history"] == rank1["history"]
    assert rank0["history"]["epoch"] == 1 and rank0["history"]["global_step"] == 4 + 3
    partial = torch.load(runs["base"] / "one-rank" / "ck" / "preempted_ep002_b00006.pth",
                         weights_only=True)["state"]["position"]["partial"]
    assert len(partial["totals"]) == WORLD_SIZE  # every rank's partial sums
    assert partial["totals"][0]["count"] == partial["totals"][1]["count"] == 6 * 8


def test_the_resumed_two_rank_run_equals_the_uninterrupted_one(runs: dict[str, Any]) -> None:
    for result in runs["resume"]:
        assert result["continued_mid_epoch"] and not result["preempted"]
        assert result["batches"] == [[2, b] for b in range(6, BATCHES)] + [
            [3, b] for b in range(BATCHES)]
    assert [r["history"] for r in runs["resume"]] == [r["history"] for r in runs["reference"]]
    base = runs["base"]
    reference = torch.load(base / "reference" / "final.pth", weights_only=True)
    resumed = torch.load(base / "resume" / "final.pth", weights_only=True)
    for key in TRAINING_KEYS:
        assert_deep_equal(reference["state"][key], resumed["state"][key], key)
    assert reference["meta"]["logs"] == resumed["meta"]["logs"]
    for epoch in (2, 3):
        name = f"ep{epoch:03d}.pth"
        assert_deep_equal(torch.load(base / "reference" / "ck" / name, weights_only=True)["state"]
                          ["model"],
                          torch.load(base / "resume" / "ck" / name, weights_only=True)["state"]
                          ["model"], name)


def test_a_partial_epoch_refuses_another_world_size(runs: dict[str, Any]) -> None:
    with pytest.warns(RuntimeWarning, match="written by 2 rank"):
        handler = NNHandler.load(runs["base"] / "one-rank" / "ck" / "preempted_ep002_b00006.pth",
                                 device="cpu", use_distributed=False)
    assert handler.stopped_mid_epoch and "mae" in handler.metrics
    handler.set_train_loader(regression_dataset(125))
    with pytest.raises(ConfigurationError, match=r"on 2 rank\(s\); this run has 1"):
        handler.train(until_epoch=EPOCHS, progress_bar=False)


def test_signals_on_both_ranks_at_different_batches_stop_both_together(
    tmp_path: Path
) -> None:
    rank0, rank1 = launch("both-ranks", tmp_path / "both")
    for result in (rank0, rank1):
        # rank 0's SIGTERM after batch 0 travels with the step after batch 1 and is seen at
        # the step after batch 3; rank 1's (after batch 3) would have been seen later
        assert result["report"] == {"signal": "SIGTERM", "epoch": 2, "batches": 4,
                                    "paths": ["ck/preempted_ep002_b00004.pth"]}
        assert result["files"] == ["ep001.pth", "preempted_ep002_b00004.pth"]
    assert rank0["batches"] == rank1["batches"]


def test_save_on_exception_writes_nothing_under_ddp(tmp_path: Path) -> None:
    rank0, rank1 = launch("exception", tmp_path / "exception")
    for result in (rank0, rank1):
        assert result["error"]["type"] == "RuntimeError"
        assert not any("emergency" in note for note in result["error"]["notes"])
        assert result["files"] == ["ep001.pth"]
    assert rank0["warned"]  # rank 0 said so when train started
