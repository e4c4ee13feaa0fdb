"""Real two-process DDP runs (torchrun, gloo, CPU): rank 0 writes, every rank agrees, a resume is
bit-exact on every rank, and a failure on rank 0 during a save is an error on every rank.

Each scenario runs ``tests/ddp_worker.py`` under ``python -m torch.distributed.run`` in a
subprocess with a timeout, so a hang fails the test instead of stalling the suite. The worker
writes ``result_rank<r>.json`` (and parameter snapshots) that the tests assert on.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from nnhandler import read_checkpoint

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="torch.distributed with the gloo backend is not available",
    ),
]

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
WORKER = TESTS_DIR / "ddp_worker.py"
WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 120
# must match tests/ddp_worker.py
TRAIN_N, VAL_N, EPOCHS = 60, 31, 4

#: launcher variables of an enclosing torchrun/SLURM job must not leak into the child launch
_LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                     "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_PROCID",
                     "SLURM_NTASKS", "SLURM_LOCALID")


def launch(scenario: str, workdir: Path, *extra: str) -> list[dict[str, Any]]:
    """Run the worker on two ranks; the per-rank results, in rank order."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS_DIR), str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={WORLD_SIZE}", str(WORKER), scenario, str(workdir), *extra]
    # a session of its own, so a hang kills the launcher *and* its workers
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, cwd=workdir.parent, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"DDP scenario {scenario!r} hung (> {LAUNCH_TIMEOUT_S} s):\n{output[-8000:]}")
    assert process.returncode == 0, (
        f"DDP scenario {scenario!r} failed (exit {process.returncode}):\n{output[-8000:]}"
    )
    results = [json.loads((workdir / f"result_rank{r}.json").read_text())
               for r in range(WORLD_SIZE)]
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["world_size"] == WORLD_SIZE
        assert result["context"] == {"enabled": True, "rank": rank, "world_size": WORLD_SIZE,
                                     "device": "cpu", "model_is_ddp": True}
    return results


def snapshots(workdir: Path, rank: int) -> dict[int, dict[str, torch.Tensor]]:
    loaded: dict[int, dict[str, torch.Tensor]] = torch.load(
        workdir / f"snapshots_rank{rank}.pt", weights_only=True)
    return loaded


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def all_files(directory: Path) -> list[str]:
    """Every file below ``directory``, hidden ones included (temp files are hidden)."""
    return sorted(os.path.relpath(os.path.join(root, name), directory)
                  for root, _, names in os.walk(directory) for name in names)


def paths(records: Sequence[dict[str, Any]], workdir: Path) -> list[str]:
    """The recorded paths relative to ``workdir`` (the worker's cwd), in call order."""
    return [Path(os.path.relpath(Path(workdir, r["path"]).resolve(), workdir.resolve())).as_posix()
            for r in records]


def weighted_mean(batches: Sequence[Sequence[float]], column: int = 0) -> tuple[float, int]:
    total = math.fsum(row[column] * row[1] for row in batches)
    count = sum(int(row[1]) for row in batches)
    return total / count, count


@pytest.fixture(scope="module")
def train_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """One uninterrupted 2-rank run of EPOCHS epochs, auto-saving every epoch."""
    workdir = tmp_path_factory.mktemp("ddp") / "train"
    workdir.mkdir()
    return workdir, launch("train", workdir)


def test_training_with_autosave_on_two_ranks(
    train_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    workdir, (rank0, rank1) = train_run
    # NNHandler(...) itself created the process group from torchrun's environment
    assert rank0["initialised_before_handler"] is rank1["initialised_before_handler"] is False

    # only rank 0 writes and only rank 0 removes superseded files
    expected = [f"ck/ep{e:03d}.pth" for e in range(1, EPOCHS + 1)]
    latest = [f"ck/latest_ep{e:03d}.pth" for e in range(1, EPOCHS + 1)]
    assert sorted(paths(rank0["writes"], workdir)) == sorted(expected + latest)
    assert {w["rank"] for w in rank0["writes"]} == {0}
    assert rank1["writes"] == []
    assert paths(rank0["unlinks"], workdir) == latest[:-1]
    assert rank1["unlinks"] == []
    assert all_files(workdir / "ck") == sorted(Path(p).name for p in [*expected, latest[-1]])
    assert not [name for name in all_files(workdir) if ".tmp-" in name]

    # every rank holds the same history and the same weights, epoch by epoch
    assert rank0["history"] == rank1["history"]
    assert rank0["last_logs"] == rank1["last_logs"]
    history = rank0["history"]
    assert len(history["train_losses"]) == len(history["val_losses"]) == EPOCHS
    assert history["epoch"] == EPOCHS
    # 4 batches per rank and epoch, accumulated in groups of 3 + 1: two optimizer steps
    assert history["global_step"] == 2 * EPOCHS
    weights0, weights1 = snapshots(workdir, 0), snapshots(workdir, 1)
    assert sorted(weights0) == sorted(weights1) == list(range(1, EPOCHS + 1))
    for epoch in weights0:
        assert_same_tensors(weights0[epoch], weights1[epoch])
    assert not torch.equal(weights0[1]["net.0.weight"], weights0[EPOCHS]["net.0.weight"])

    # the checkpoint holds the trained weights and every rank's random streams
    final = read_checkpoint(workdir / "ck" / f"ep{EPOCHS:03d}.pth")
    assert_same_tensors(final.state["model"], weights0[EPOCHS])
    assert final.meta["world_size"] == WORLD_SIZE
    rng = final.state["rng"]
    assert rng["world_size"] == WORLD_SIZE and len(rng["ranks"]) == WORLD_SIZE
    # rank 1 draws extra random numbers in the worker: its saved stream is its own
    assert not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])

    for epoch in range(1, EPOCHS + 1):
        key = str(epoch)
        # DistributedSampler: the ranks split each epoch's shuffle without overlap or padding
        seen0, seen1 = rank0["train_samples"][key], rank1["train_samples"][key]
        assert len(seen0) == len(seen1) == TRAIN_N // WORLD_SIZE
        assert not set(seen0) & set(seen1)
        assert len(set(seen0) | set(seen1)) == TRAIN_N

        # epoch loss and metrics: sample-weighted means over the batches of *both* ranks
        train_batches = rank0["train_batches"][key] + rank1["train_batches"][key]
        loss, count = weighted_mean(train_batches)
        assert count == TRAIN_N
        assert math.isclose(history["train_losses"][epoch - 1], loss, rel_tol=1e-12)
        # uneven batches (8, 8, 8, 6 per rank): a mean of batch means would differ
        batch_mean = sum(row[0] for row in train_batches) / len(train_batches)
        assert not math.isclose(batch_mean, loss, rel_tol=1e-9)

        # validation: ShardSampler gives 16 + 15 samples, each counted once
        val0, val1 = rank0["val_batches"][key], rank1["val_batches"][key]
        assert sum(int(row[1]) for row in val0) == (VAL_N + 1) // 2
        assert sum(int(row[1]) for row in val1) == VAL_N // 2
        val_loss, val_count = weighted_mean(val0 + val1)
        assert val_count == VAL_N
        assert math.isclose(history["val_losses"][epoch - 1], val_loss, rel_tol=1e-12)
        val_mae, _ = weighted_mean(val0 + val1, column=2)
        assert math.isclose(history["val_metrics"]["mae"][epoch - 1], val_mae, rel_tol=1e-9)
        rank_means = [weighted_mean(v)[0] for v in (val0, val1)]
        assert not math.isclose(sum(rank_means) / 2, val_loss, rel_tol=1e-12)

    # each epoch reshuffles (DistributedSampler.set_epoch)
    assert rank0["train_samples"]["1"] != rank0["train_samples"]["2"]


def test_load_and_resume_on_two_ranks_is_bit_exact(
    train_run: tuple[Path, list[dict[str, Any]]], tmp_path: Path,
) -> None:
    reference_dir, reference = train_run
    workdir = tmp_path / "resume"
    results = launch("resume", workdir, str(reference_dir))
    reference_weights = [snapshots(reference_dir, r) for r in range(WORLD_SIZE)]
    for rank, result in enumerate(results):
        # load() itself created the process group from torchrun's variables
        assert result["initialised_before_load"] is False
        assert result["initialised_after_load"] is True
        # device=None: this rank's own device (CPU here); the weights are the saved ones
        assert result["loaded_equals_file"] is True
        assert result["loaded_equals_epoch2"] is True
        after_load = result["history_after_load"]
        expected = reference[rank]["history"]
        assert after_load["epoch"] == 2
        assert after_load["train_losses"] == expected["train_losses"][:2]
        assert after_load["val_losses"] == expected["val_losses"][:2]
        assert after_load["run_seed"] == expected["run_seed"]
        assert result["autosave_restored"] is not None

        # resumed to the same epoch: identical history and weights, bitwise, on every rank
        assert result["history"] == expected
        assert result["last_logs"] == reference[rank]["last_logs"]
        resumed = snapshots(workdir, rank)
        assert sorted(resumed) == [3, 4]
        for epoch in (3, 4):
            assert_same_tensors(resumed[epoch], reference_weights[rank][epoch])

    rank0, rank1 = results
    # the restored auto-saves keep saving, from rank 0 only
    assert sorted(paths(rank0["writes"], workdir)) == [
        "ck/ep003.pth", "ck/ep004.pth", "ck/latest_ep003.pth", "ck/latest_ep004.pth"]
    assert {w["rank"] for w in rank0["writes"]} == {0}
    assert rank1["writes"] == [] and rank1["unlinks"] == []
    assert all_files(workdir / "ck") == ["ep003.pth", "ep004.pth", "latest_ep004.pth"]
    assert not [name for name in all_files(workdir) if ".tmp-" in name]
    resumed_file = read_checkpoint(workdir / "ck" / "ep004.pth")
    assert_same_tensors(resumed_file.state["model"], reference_weights[0][4])


def test_error_on_rank_zero_during_save_raises_on_every_rank(tmp_path: Path) -> None:
    workdir = tmp_path / "errors"
    rank0, rank1 = launch("errors", workdir)  # a hang fails inside launch()

    for case, rank0_type, rank0_text in (
        ("save_by_hand", "RuntimeError", "boom on rank 0"),
        ("autosave_in_train", "RuntimeError", "boom on rank 0"),
        ("unwritable_path", None, "blocker"),
    ):
        error0, error1 = rank0[case], rank1[case]
        # rank 0 raises its own error; the other rank raises a CheckpointError that names it
        assert error0["type"] is not None, f"{case}: rank 0 raised nothing"
        assert error1["type"] is not None, f"{case}: rank 1 raised nothing"
        if rank0_type is not None:
            assert error0["type"] == rank0_type, error0
        assert rank0_text in error0["message"], error0
        assert error1["is_checkpoint_error"], error1
        assert "rank 0" in error1["message"] and rank0_text in error1["message"], error1
        # and afterwards the ranks are still in step: a collective completes on both
        assert rank0[f"after_{case}"] == rank1[f"after_{case}"] == 3.0

    # the failed auto-save happened at the end of epoch 1 on both ranks and left no file and
    # no bookkeeping of a file behind
    assert rank0["epoch_after_failed_autosave"] == rank1["epoch_after_failed_autosave"] == 1
    assert rank0["autosave_bookkeeping_after_failure"] == [0, None]
    assert rank1["autosave_bookkeeping_after_failure"] == [0, None]
    # under the default policy "warn" both ranks keep training and count the same failures
    assert rank0["warn_policy"] == rank1["warn_policy"] == {"epochs_run": 2, "failed_saves": 2}
    assert rank0["after_warn_policy"] == rank1["after_warn_policy"] == 3.0
    assert not (workdir / "by_hand.pth").exists()
    assert not (workdir / "auto").exists() or all_files(workdir / "auto") == []
    assert not [name for name in all_files(workdir) if ".tmp-" in name]

    # the handler stays usable: the next save works and is written by rank 0 alone
    assert paths(rank0["writes"], workdir) == ["fine.pth"]
    assert rank1["writes"] == []
    assert (workdir / "fine.pth").is_file()

    # seed=None draws one seed for the run: rank 0's, the same on every rank
    assert isinstance(rank0["drawn_seed"], int)
    assert rank0["drawn_seed"] == rank1["drawn_seed"]
