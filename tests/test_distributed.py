"""Real multi-process DDP runs (gloo, CPU) on 2 and 3 ranks: rank 0 writes, every rank agrees,
sample-weighted numbers over uneven shards, a resume is bit-exact on every rank (and allowed,
with a warning, at another world size), a failure on rank 0 during a save is an error on every
rank, a NaN loss on one rank keeps the collectives in step, SLURM's variables alone start a
run, and examples/ddp_train.py runs under torchrun.

Each scenario runs ``tests/ddp_worker.py`` under ``python -m torch.distributed.run`` (or, for
SLURM, as plain processes carrying SLURM's variables) in a subprocess with a timeout, so a hang
fails the test instead of stalling the suite. The worker writes ``result_rank<r>.json`` (and
parameter snapshots) that the tests assert on.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_testing import LAUNCH_VARIABLES, child_environment, require_distributed_marker
from nnh_testing import attach_loaders, free_port

from nnhandler import NNHandler, read_checkpoint

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
DDP_EXAMPLE = REPO_ROOT / "examples" / "ddp_train.py"
WORLD_SIZES = [2, 3]
LAUNCH_TIMEOUT_S = 150
# must match tests/ddp_worker.py
TRAIN_N, VAL_N, EPOCHS, BATCH, ACCUMULATION = 61, 31, 4, 8, 3

def run_bounded(commands: Sequence[tuple[list[str], dict[str, str]]], cwd: Path,
                what: str) -> list[str]:
    """Start every command (each in a session of its own, so a hang kills its workers too) and
    wait for all within LAUNCH_TIMEOUT_S; a hang or a non-zero exit fails the test."""
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=env, cwd=cwd, start_new_session=True)
                 for command, env in commands]
    outputs = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in processes:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            output, _ = process.communicate()
            pytest.fail(f"{what} hung (> {LAUNCH_TIMEOUT_S} s):\n{output[-8000:]}")
        outputs.append(output)
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, (
            f"{what} failed (exit {process.returncode}):\n{output[-8000:]}")
    return outputs


def torchrun(world_size: int, script: Path, *arguments: str, cwd: Path, what: str) -> str:
    require_distributed_marker()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world_size}", str(script), *arguments]
    return run_bounded([(command, child_environment())], cwd, what)[0]


def launch(scenario: str, workdir: Path, *extra: str, world_size: int = 2,
           launcher: str = "torchrun") -> list[dict[str, Any]]:
    """Run the worker on ``world_size`` ranks; the per-rank results, in rank order.

    ``launcher="slurm"`` starts the ranks as plain processes with only SLURM's variables (as
    ``srun`` does), SLURM_JOB_NODELIST naming this machine and MASTER_ADDR left unset.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    arguments = [str(WORKER), scenario, str(workdir), *extra]
    what = f"DDP scenario {scenario!r} on {world_size} ranks ({launcher})"
    if launcher == "torchrun":
        torchrun(world_size, WORKER, *arguments[1:], cwd=workdir.parent, what=what)
    else:
        port = str(free_port())
        commands = []
        for rank in range(world_size):
            env = child_environment()
            env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                       SLURM_NTASKS=str(world_size), SLURM_JOB_NODELIST="localhost",
                       MASTER_PORT=port)
            commands.append(([sys.executable, *arguments], env))
        run_bounded(commands, workdir.parent, what)
    results = [json.loads((workdir / f"result_rank{r}.json").read_text())
               for r in range(world_size)]
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["world_size"] == world_size
        assert result["context"] == {"enabled": True, "rank": rank, "local_rank": rank,
                                     "world_size": world_size, "device": "cpu",
                                     "model_is_ddp": True}
    return results


def snapshots(workdir: Path, rank: int) -> dict[int, dict[str, torch.Tensor]]:
    loaded: dict[int, dict[str, torch.Tensor]] = torch.load(
        workdir / f"snapshots_rank{rank}.pt", weights_only=True)
    return loaded


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bitwise equal, NaN included (the same NaN payload on every rank)."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=key)


def assert_close_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to float rounding (see test_load_and_resume_is_bit_exact)."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


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


def no_temp_files(directory: Path) -> bool:
    return not [name for name in all_files(directory) if ".tmp-" in name]


TrainRun = tuple[Path, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], TrainRun]:
    """One uninterrupted run of EPOCHS epochs per world size, auto-saving every epoch
    (launched on first use and shared by the tests of this module)."""
    runs: dict[int, TrainRun] = {}

    def run(world_size: int) -> TrainRun:
        if world_size not in runs:
            workdir = tmp_path_factory.mktemp(f"ddp{world_size}") / "train"
            runs[world_size] = (workdir, launch("train", workdir, world_size=world_size))
        return runs[world_size]

    return run


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=[f"{n}ranks" for n in WORLD_SIZES])
def test_training_with_autosave(train_runs: Callable[[int], TrainRun], world_size: int) -> None:
    workdir, results = train_runs(world_size)
    rank0, others = results[0], results[1:]
    # NNHandler(...) itself created the process group from torchrun's environment
    assert all(r["initialised_before_handler"] is False for r in results)

    # only rank 0 writes and only rank 0 removes superseded files
    expected = [f"ck/ep{e:03d}.pth" for e in range(1, EPOCHS + 1)]
    latest = [f"ck/latest_ep{e:03d}.pth" for e in range(1, EPOCHS + 1)]
    assert sorted(paths(rank0["writes"], workdir)) == sorted(expected + latest)
    assert {w["rank"] for w in rank0["writes"]} == {0}
    assert paths(rank0["unlinks"], workdir) == latest[:-1]
    assert all(r["writes"] == [] and r["unlinks"] == [] for r in others)
    assert all_files(workdir / "ck") == sorted(Path(p).name for p in [*expected, latest[-1]])
    assert no_temp_files(workdir)

    # every rank holds the same history and the same weights, epoch by epoch
    history = rank0["history"]
    for other in others:
        assert other["history"] == history
        assert other["last_logs"] == rank0["last_logs"]
    assert len(history["train_losses"]) == len(history["val_losses"]) == EPOCHS
    assert history["epoch"] == EPOCHS
    # DistributedSampler pads each shard to ceil(61 / n) samples: batches of 8 (the last one
    # shorter), accumulated in groups of 3
    shard = -(-TRAIN_N // world_size)
    batches = -(-shard // BATCH)
    assert history["global_step"] == EPOCHS * -(-batches // ACCUMULATION)
    weights = [snapshots(workdir, r) for r in range(world_size)]
    assert all(sorted(w) == list(range(1, EPOCHS + 1)) for w in weights)
    for epoch in weights[0]:
        for other in weights[1:]:
            assert_same_tensors(weights[0][epoch], other[epoch])
    assert not torch.equal(weights[0][1]["net.0.weight"], weights[0][EPOCHS]["net.0.weight"])

    # the checkpoint holds the trained weights and every rank's own random streams
    final = read_checkpoint(workdir / "ck" / f"ep{EPOCHS:03d}.pth")
    assert_same_tensors(final.state["model"], weights[0][EPOCHS])
    assert final.meta["world_size"] == world_size
    rng = final.state["rng"]
    assert rng["world_size"] == world_size and len(rng["ranks"]) == world_size
    # rank r draws r extra random numbers per epoch in the worker: every saved stream differs
    streams = [state["torch"] for state in rng["ranks"]]
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not torch.equal(streams[a], streams[b]), (a, b)

    for epoch in range(1, EPOCHS + 1):
        key = str(epoch)
        # DistributedSampler: equal shards covering every sample; the padding repeats samples
        seen = [r["train_samples"][key] for r in results]
        assert [len(s) for s in seen] == [shard] * world_size
        union = set().union(*map(set, seen))
        assert len(union) == TRAIN_N
        assert sum(len(s) for s in seen) - TRAIN_N == shard * world_size - TRAIN_N > 0

        # epoch loss: the sample-weighted mean over the batches of *every* rank
        train_batches = [row for r in results for row in r["train_batches"][key]]
        loss, count = weighted_mean(train_batches)
        assert count == shard * world_size
        assert math.isclose(history["train_losses"][epoch - 1], loss, rel_tol=1e-12)
        # uneven batches (a short last one per rank): a mean of batch means would differ
        batch_mean = sum(row[0] for row in train_batches) / len(train_batches)
        assert not math.isclose(batch_mean, loss, rel_tol=1e-9)

        # validation: ShardSampler gives uneven shards (16 + 15; 11 + 10 + 10), each sample once
        val = [r["val_batches"][key] for r in results]
        assert [sum(int(row[1]) for row in v) for v in val] == [
            len(range(r, VAL_N, world_size)) for r in range(world_size)]
        everything = [row for v in val for row in v]
        val_loss, val_count = weighted_mean(everything)
        assert val_count == VAL_N
        assert math.isclose(history["val_losses"][epoch - 1], val_loss, rel_tol=1e-12)
        val_mae, _ = weighted_mean(everything, column=2)
        assert math.isclose(history["val_metrics"]["mae"][epoch - 1], val_mae, rel_tol=1e-9)
        rank_means = [weighted_mean(v)[0] for v in val]
        assert not math.isclose(sum(rank_means) / world_size, val_loss, rel_tol=1e-12)

    # each epoch reshuffles (DistributedSampler.set_epoch)
    assert rank0["train_samples"]["1"] != rank0["train_samples"]["2"]


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=[f"{n}ranks" for n in WORLD_SIZES])
def test_load_and_resume_is_bit_exact(
    train_runs: Callable[[int], TrainRun], world_size: int, tmp_path: Path,
) -> None:
    """Resumed from its own epoch-2 auto-save, a 2-rank run equals the uninterrupted one bitwise
    on every rank: weights, history, logs.

    From 3 ranks up the weights after the resume agree up to float rounding only: DDP puts the
    gradients into one bucket in parameter order for its first step and rebuilds the buckets
    in the order backward produced them after it, and gloo (like nccl) sums three or more
    ranks in an order that follows the bucket layout. The resumed run's first step uses the
    first layout, the uninterrupted run's epoch 3 the rebuilt one ((a+b)+c vs a+(b+c); with two
    ranks a+b == b+a, so that run stays exact). The 3-rank launch then also loads the 2-rank
    run's checkpoint (check_cross_world_resume)."""
    exact = world_size == 2
    reference_dir, reference = train_runs(world_size)
    workdir = tmp_path / "resume"
    extra = [str(reference_dir)]
    if world_size == 3:
        extra.append(str(train_runs(2)[0]))
    results = launch("resume", workdir, *extra, world_size=world_size)
    reference_weights = [snapshots(reference_dir, r) for r in range(world_size)]
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

        # resumed to the same epoch: the same history and weights on every rank
        resumed = snapshots(workdir, rank)
        assert sorted(resumed) == [3, 4]
        for epoch in (3, 4):
            assert_same_tensors(resumed[epoch], snapshots(workdir, 0)[epoch])  # across ranks
            if exact:
                assert_same_tensors(resumed[epoch], reference_weights[rank][epoch])
            else:
                assert_close_tensors(resumed[epoch], reference_weights[rank][epoch])
        if exact:
            assert result["history"] == expected
            assert result["last_logs"] == reference[rank]["last_logs"]
        else:
            for key in ("train_losses", "val_losses"):
                assert result["history"][key] == pytest.approx(expected[key], rel=1e-6)
            assert {k: v for k, v in result["history"].items()
                    if k not in ("train_losses", "val_losses", "train_metrics", "val_metrics")
                    } == {k: v for k, v in expected.items() if k not in (
                        "train_losses", "val_losses", "train_metrics", "val_metrics")}

    rank0, others = results[0], results[1:]
    # the restored auto-saves keep saving, from rank 0 only
    assert sorted(paths(rank0["writes"], workdir)) == [
        "ck/ep003.pth", "ck/ep004.pth", "ck/latest_ep003.pth", "ck/latest_ep004.pth"]
    assert {w["rank"] for w in rank0["writes"]} == {0}
    assert all(r["writes"] == [] and r["unlinks"] == [] for r in others)
    assert all_files(workdir / "ck") == ["ep003.pth", "ep004.pth", "latest_ep004.pth"]
    assert no_temp_files(workdir)
    resumed_file = read_checkpoint(workdir / "ck" / "ep004.pth")
    assert_same_tensors(resumed_file.state["model"], snapshots(workdir, 0)[4])
    if world_size == 3:
        check_cross_world_resume(workdir / "cross", train_runs(2), results)


def check_cross_world_resume(workdir: Path, source: TrainRun,
                             results: list[dict[str, Any]]) -> None:
    """The 3-rank launch loaded the 2-rank run's epoch-2 checkpoint and trained to EPOCHS."""
    source_history = source[1][0]["history"]
    world_size = len(results)
    crosses = [r["cross"] for r in results]
    for rank, cross in enumerate(crosses):
        # every rank is told that exact equality cannot hold
        assert len(cross["warnings"]) == 1, cross["warnings"]
        assert "written by 2 rank(s), this run has 3" in cross["warnings"][0]
        assert "cannot equal an uninterrupted one exactly" in cross["warnings"][0]
        # rank r continues saved rank r % 2's random streams (rank 2 repeats rank 0's)
        assert cross["saved_world_size"] == 2
        assert cross["torch_stream_equals_saved_rank"] == [rank % 2 == 0, rank % 2 == 1]
        # the history up to the checkpoint is the 2-rank run's; training went on from there
        history = cross["history"]
        assert history["epoch"] == EPOCHS
        assert history["train_losses"][:2] == source_history["train_losses"][:2]
        assert history["train_losses"][2:] != source_history["train_losses"][2:]
        assert all(math.isfinite(x) for x in history["train_losses"])
        assert history == crosses[0]["history"]
        assert cross["new_meta_world_size"] == cross["new_rng_world_size"] == world_size
    assert sorted(crosses[0]["writes"]) == [
        "ck/ep003.pth", "ck/ep004.pth", "ck/latest_ep003.pth", "ck/latest_ep004.pth"]
    assert all(c["writes"] == [] for c in crosses[1:])
    final = [torch.load(workdir / f"final_rank{r}.pt", weights_only=True)
             for r in range(world_size)]
    for other in final[1:]:
        assert_same_tensors(final[0], other)


def test_resume_at_another_world_size_in_one_process(
    train_runs: Callable[[int], TrainRun], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 2-rank checkpoint loaded by a plain single process: allowed, with a warning; the
    process continues saved rank 0's random streams."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    source_dir, source = train_runs(2)
    path = source_dir / "ck" / "ep002.pth"
    with pytest.warns(RuntimeWarning, match=r"written by 2 rank\(s\), this run has 1") as caught:
        handler = NNHandler.load(path, device="cpu", logger_mode="file")
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert not handler.distributed.enabled and not dist.is_initialized()
    saved = read_checkpoint(path).state["rng"]["ranks"]
    assert torch.equal(torch.get_rng_state(), saved[0]["torch"])
    assert handler.train_losses == source[0]["history"]["train_losses"][:2]
    attach_loaders(handler, n=TRAIN_N)
    handler.train(until_epoch=EPOCHS, seed=7, progress_bar=False)
    assert handler.epoch == EPOCHS and all(math.isfinite(x) for x in handler.train_losses)
    written = read_checkpoint(Path("ck") / f"ep{EPOCHS:03d}.pth")
    assert written.meta["world_size"] == 1 and written.state["rng"]["world_size"] == 1


def assert_raised_everywhere(results: list[dict[str, Any]], case: str,
                             rank0_type: str | None, rank0_text: str) -> None:
    """Rank 0 raises its own error; every other rank a CheckpointError naming it; afterwards
    the ranks are still in step (a collective completes on all of them)."""
    error0 = results[0][case]
    assert error0["type"] is not None, f"{case}: rank 0 raised nothing"
    if rank0_type is not None:
        assert error0["type"] == rank0_type, error0
    assert rank0_text in error0["message"], error0
    world_size = len(results)
    for result in results[1:]:
        error = result[case]
        assert error["type"] is not None, f"{case}: rank {result['rank']} raised nothing"
        assert error["is_checkpoint_error"], error
        assert "rank 0" in error["message"] and rank0_text in error["message"], error
    everyone = world_size * (world_size + 1) / 2
    assert [r[f"after_{case}"] for r in results] == [everyone] * world_size


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=[f"{n}ranks" for n in WORLD_SIZES])
def test_error_on_rank_zero_during_save_raises_on_every_rank(
    tmp_path: Path, world_size: int,
) -> None:
    workdir = tmp_path / "errors"
    results = launch("errors", workdir, world_size=world_size)  # a hang fails inside launch()
    rank0 = results[0]

    # use_distributed=False under torchrun: every process trains alone, without a group
    for rank, result in enumerate(results):
        assert result["solo"] == {
            "group_initialised": False, "enabled": False, "rank": 0, "world_size": 1,
            "model_is_ddp": False, "writes": [f"solo_rank{rank}.pth"], "meta_world_size": 1,
        }

    assert_raised_everywhere(results, "save_by_hand", "RuntimeError", "boom on rank 0")
    assert_raised_everywhere(results, "autosave_in_train", "RuntimeError", "boom on rank 0")
    assert_raised_everywhere(results, "disk_full_raise", "OSError", "No space left on device")
    assert_raised_everywhere(results, "unwritable_path", None, "blocker")
    assert_raised_everywhere(results, "load_latest_bad_options", "ConfigurationError", "anon")

    for result in results:
        # the failed auto-save happened at the end of epoch 1 on every rank and left no file
        # and no bookkeeping of a file behind
        assert result["epoch_after_failed_autosave"] == 1
        assert result["autosave_bookkeeping_after_failure"] == [0, None]
        # under the default policy "warn" every rank keeps training and counts the failures
        assert result["warn_policy"] == {"epochs_run": 2, "failed_saves": 2}
        # a full disk under "raise" ends train after epoch 1 everywhere; under "warn" both
        # epochs run and both saves fail on every rank
        assert result["disk_full_raise"]["epochs_run"] == 1
        assert result["disk_full_warn"] == {"epochs_run": 2, "failed_saves": 2}
    # only rank 0 went to the disk: epoch 4 (raise), epochs 5 and 6 (warn)
    assert rank0["disk_full_attempts"] == [f"auto_disk/ep00{e}.pth" for e in (4, 5, 6)]
    assert all(r["disk_full_attempts"] == [] for r in results[1:])
    everyone = world_size * (world_size + 1) / 2
    assert [r["after_warn_policy"] for r in results] == [everyone] * world_size
    assert [r["after_disk_full_warn"] for r in results] == [everyone] * world_size
    assert not (workdir / "by_hand.pth").exists()
    for directory in ("auto", "auto_disk"):
        assert all_files(workdir / directory) == []
    assert no_temp_files(workdir)

    # the handler stays usable: the next save works and is written by rank 0 alone
    assert paths(rank0["writes"], workdir) == ["fine.pth"]
    assert all(r["writes"] == [] for r in results[1:])
    assert (workdir / "fine.pth").is_file()

    # seed=None draws one seed for the run: rank 0's, the same on every rank
    assert isinstance(rank0["drawn_seed"], int)
    assert {r["drawn_seed"] for r in results} == {rank0["drawn_seed"]}


def test_nan_loss_on_one_rank_keeps_the_ranks_in_step(tmp_path: Path) -> None:
    """Rank 1 alone computes a NaN loss (epoch 2, batch 1). The loss goes into the same
    all-reduce as always, so every rank's epoch loss is NaN; DDP averages the NaN gradient into
    every rank's weights; training goes on identically (or stops together when a callback
    stops on the epoch loss); no collective is skipped, so nothing hangs."""
    workdir = tmp_path / "nan"
    rank0, rank1 = launch("nan", workdir)

    run0, run1 = rank0["continue"], rank1["continue"]
    for run in (run0, run1):
        losses = run["history"]["train_losses"]
        assert run["history"]["epoch"] == 3
        assert math.isfinite(losses[0]) and math.isnan(losses[1]) and math.isnan(losses[2])
        assert math.isnan(run["history"]["val_losses"][1])
        assert math.isnan(run["last_logs"]["loss"])
        assert run["after"] == 3.0
    assert run0["history"]["train_losses"][0] == run1["history"]["train_losses"][0]
    # rank 0 computed no NaN itself in batches 0 and 1 of epoch 2, rank 1 did in batch 1
    assert all(math.isfinite(row[0]) for row in run0["train_batches"]["2"][:2])
    assert math.isnan(run1["train_batches"]["2"][1][0])
    assert math.isfinite(run1["train_batches"]["2"][0][0])
    # the weights are the same on both ranks, bitwise, before and after the NaN
    weights0, weights1 = snapshots(workdir, 0), snapshots(workdir, 1)
    for epoch in (1, 2, 3):
        assert_same_tensors(weights0[epoch], weights1[epoch])
    assert all(torch.isfinite(t).all() for t in weights0[1].values())
    assert all(torch.isnan(t).all() for k, t in weights0[2].items() if "weight" in k)
    # auto-save ran every epoch, from rank 0, with the NaN in the name
    assert run0["files"] == ["ep001_loss" + f"{run0['history']['train_losses'][0]:.3f}.pth",
                             "ep002_lossnan.pth", "ep003_lossnan.pth"]
    assert len(run0["writes"]) == 3 and run1["writes"] == []
    saved = read_checkpoint(workdir / "nan_ck" / "ep003_lossnan.pth")
    assert_same_tensors(saved.state["model"], weights0[3])
    # rank 0 says once that the values are not finite
    log = (workdir / "nnhandler_rank0.log").read_text()
    assert "epoch 2: loss=nan, mae=nan, val_loss=nan, val_mae=nan not finite" in log
    assert "one rank's NaN reaches every rank" in log

    stop0, stop1 = rank0["stop"], rank1["stop"]
    # rank 1's lone stop request after epoch 1 is overruled by rank 0; the NaN epoch loss of
    # epoch 2 (the same everywhere) stops both ranks after epoch 2 of 4, saved once by rank 0
    assert stop0["epoch"] == stop1["epoch"] == 2
    assert math.isnan(stop0["train_losses"][1]) and math.isnan(stop1["train_losses"][1])
    assert stop0["files"] == stop1["files"] == ["last_ep002.pth"]
    assert stop0["writes"] == ["stop_ck/last_ep002.pth"] and stop1["writes"] == []
    assert stop0["after"] == stop1["after"] == 3.0


def test_slurm_variables_alone_start_a_two_rank_run(tmp_path: Path) -> None:
    """Processes started as ``srun`` starts them: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS and
    SLURM_JOB_NODELIST, no torchrun variables and no MASTER_ADDR."""
    workdir = tmp_path / "slurm"
    results = launch("slurm", workdir, launcher="slurm")
    port = results[0]["master"][1]
    for result in results:
        assert result["initialised_before_handler"] is False
        # MASTER_ADDR is the first host of SLURM_JOB_NODELIST; an exported MASTER_PORT is kept
        assert result["master"] == ["localhost", port]
        assert result["history"] == results[0]["history"]
    assert results[0]["history"]["epoch"] == 2
    assert results[0]["writes"] == ["ck/ep001.pth", "ck/ep002.pth"]
    assert results[1]["writes"] == []
    assert results[0]["files"] == ["ep001.pth", "ep002.pth"]


def test_ddp_example_runs_under_torchrun_then_resumes_in_one_process(tmp_path: Path) -> None:
    """examples/ddp_train.py as docs/distributed.md runs it (torchrun, 2 processes), then
    restarted as a plain single process: it resumes from the 2-rank checkpoint, with the
    world-size warning."""
    out = tmp_path / "ck"
    output = torchrun(2, DDP_EXAMPLE, "--out", str(out), "--epochs", "3", cwd=tmp_path,
                      what="examples/ddp_train.py under torchrun")
    # the ranks share one stdout, so their lines may interleave with each other's log lines
    reports = dict(re.findall(r"rank (\d) of 2: (epoch \d+, loss [\d.]+, val accuracy [\d.]+)",
                              output))
    assert sorted(reports) == ["0", "1"], output
    assert reports["0"] == reports["1"], reports  # the same result on both ranks
    assert reports["0"].startswith("epoch 3,")
    latest = read_checkpoint(out / "latest.pth")
    assert latest.meta["epoch"] == 3 and latest.meta["world_size"] == 2

    completed = subprocess.run(
        [sys.executable, str(DDP_EXAMPLE), "--out", str(out), "--epochs", "5"],
        cwd=tmp_path, env=child_environment(), capture_output=True, text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "rank 0 of 1: epoch 5" in completed.stdout
    assert "resumed from epoch 3" in completed.stdout
    assert "written by 2 rank(s), this run has 1" in completed.stdout + completed.stderr
    latest = read_checkpoint(out / "latest.pth")
    assert latest.meta["epoch"] == 5 and latest.meta["world_size"] == 1
