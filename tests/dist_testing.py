"""Helpers for multi-process tests: bounded torchrun launches (test side) and the small pieces
every worker script records results with (worker side).

``tests/ddp_worker.py`` and ``tests/test_distributed.py`` still hold their own copies of some of
these; they can import them from here instead.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from nnhandler import Callback, CheckpointError, NNHandler

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

#: launcher variables of an enclosing torchrun/SLURM job must not leak into the child launch
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_PROCID",
                    "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


# -- test side ---------------------------------------------------------------------------------
def child_environment() -> dict[str, str]:
    """This process's environment without launcher variables, with this repository and
    ``tests/`` on the path and one OpenMP thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS_DIR), str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update({"OMP_NUM_THREADS": "1", "COLUMNS": "120"})
    return env


#: the test being set up or run (``conftest.pytest_runtest_setup`` sets it): a launch checks
#: that it carries the ``distributed`` marker, so ``-m "not distributed"`` leaves every
#: multi-process run out
current_test: pytest.Item | None = None


def require_distributed_marker() -> None:
    """Fail the current test unless it is marked ``distributed`` (it is about to launch
    torch.distributed processes)."""
    if current_test is not None and current_test.get_closest_marker("distributed") is None:
        pytest.fail(f"{current_test.nodeid} launches torch.distributed processes but is not "
                    "marked distributed: add @pytest.mark.distributed (or DISTRIBUTED_MARKS), "
                    "so that the quick subset leaves it out", pytrace=False)


def torchrun(ranks: int, script: Path, *arguments: str) -> list[str]:
    """The command that runs ``script`` on ``ranks`` local processes (only from a test marked
    ``distributed``: :func:`require_distributed_marker`)."""
    require_distributed_marker()
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={ranks}", str(script), *arguments]


def run_bounded(command: list[str], cwd: Path, what: str, timeout_s: float) -> tuple[int, str]:
    """Run ``command`` (stdout and stderr together) with this repository and ``tests/`` on the
    path; a hang kills the whole process group (launcher and workers) and fails the test."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=child_environment(), cwd=cwd,
                               start_new_session=True)
    return communicate_bounded(process, what, timeout_s)


def communicate_bounded(process: subprocess.Popen[str], what: str,
                        timeout_s: float) -> tuple[int, str]:
    """Wait for ``process`` (text pipes); (exit status, stdout + the tail of stderr). A hang
    kills it — with its whole process group when it leads one (``start_new_session``: a
    launcher and its workers) — and fails the test."""
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
        out, err = process.communicate()
        pytest.fail(f"{what} hung (> {timeout_s} s):\n{out[-8000:]}\n{(err or '')[-4000:]}")
    return process.returncode, out if err is None else f"{out}\n{err[-6000:]}"


#: marks of a test module that launches real multi-process runs over gloo
DISTRIBUTED_MARKS = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with the gloo backend is not available"),
]


def launch_scenario(script: Path, scenario: str, workdir: Path, ranks: int,
                    timeout_s: float) -> list[dict[str, Any]]:
    """Run a worker ``script`` (see :func:`run_worker`) on ``ranks`` processes; it must succeed.
    Returns each rank's ``result_rank<r>.json``, in rank order."""
    returncode, output = run_bounded(torchrun(ranks, script, scenario, str(workdir)),
                                     workdir.parent, f"DDP scenario {scenario!r}", timeout_s)
    assert returncode == 0, (
        f"DDP scenario {scenario!r} failed (exit {returncode}):\n{output[-8000:]}")
    results = [json.loads((workdir / f"result_rank{r}.json").read_text())
               for r in range(ranks)]
    assert [r["rank"] for r in results] == list(range(ranks))
    return results


# -- worker side -------------------------------------------------------------------------------
class FailingState(Callback):
    """A state provider whose ``state_dict`` raises on rank 0 only (while armed)."""

    state_key = "failing_state"

    def __init__(self) -> None:
        self.armed = False

    def state_dict(self) -> dict[str, Any]:
        if self.armed and dist.get_rank() == 0:
            raise RuntimeError("boom on rank 0")
        return {"ok": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def history_of(handler: NNHandler) -> dict[str, Any]:
    """The handler's history as plain JSON data (a copy: the handler keeps appending)."""
    history = {
        "train_losses": handler.train_losses,
        "val_losses": handler.val_losses,
        "train_metrics": handler.train_metrics_history,
        "val_metrics": handler.val_metrics_history,
        "epoch": handler.epoch,
        "global_step": handler.global_step,
        "run_seed": handler.progress.run_seed,
    }
    copied: dict[str, Any] = json.loads(json.dumps(history))
    return copied


def error_record(error: BaseException) -> dict[str, Any]:
    return {"type": type(error).__name__,
            "is_checkpoint_error": isinstance(error, CheckpointError),
            "message": str(error),
            "traceback": traceback.format_exc()}


def attempt(action: Callable[[], Any]) -> dict[str, Any]:
    """``action()``'s error as a record (``{"type": None}`` when it raised nothing)."""
    try:
        action()
    except Exception as error:
        return error_record(error)
    return {"type": None}


def group_still_works() -> float:
    """A collective after an error: proves the ranks are still in step (sum of rank + 1)."""
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return float(value.item())


Scenario = Callable[[Path, list[str]], dict[str, Any]]


def run_worker(scenarios: dict[str, Scenario], rank: int, world_size: int,
               before: Callable[[Path], None] | None = None) -> None:
    """A worker's ``main``: ``argv = SCENARIO DIR [ARGS...]``. Runs the scenario inside DIR,
    writes ``result_rank<r>.json`` there, and always tears the process group and the hang
    watchdog down. ``before(DIR)`` runs first (e.g. creating the process group)."""
    scenario, workdir, extra = sys.argv[1], Path(sys.argv[2]).resolve(), sys.argv[3:]
    if scenario not in scenarios:
        raise SystemExit(f"unknown scenario {scenario!r}; known: {sorted(scenarios)}")
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    try:
        if before is not None:
            before(workdir)
        result = scenarios[scenario](workdir, extra)
        result.update({"rank": rank, "world_size": world_size})
        (workdir / f"result_rank{rank}.json").write_text(json.dumps(result, indent=1))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()
