"""Exact resume across a real SIGKILL: with ``seed=`` on CPU, training N epochs in one go and
training k epochs, killing the process with SIGKILL, loading the latest auto-save in a fresh
process and training N-k more give bitwise-identical parameters, optimizer state and history.

Every run is its own Python process (``OMP_NUM_THREADS=1``): the uninterrupted reference once
per module, one killed run per kill point, and one resumed run per resume style. The training
uses dropout, validation, EMA, a StepLR scheduler, gradient accumulation (with a short last
group) and an auto-save every epoch.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_testing import communicate_bounded
from nnh_testing import assert_deep_equal

from nnhandler.checkpoint import read_checkpoint
from nnhandler.checkpoint.integrity import verify_file
from nnhandler.checkpoint.writer import is_temp_file

pytestmark = [pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)"),
              pytest.mark.slow]  # ~35 s: training processes killed and resumed

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
N_EPOCHS = 4
SEED = 1234
CHILD_TIMEOUT_S = 240  # a hang fails the test; a run takes a few seconds
CKPT_DIR = "ck"

CHILD = textwrap.dedent(
    """
    import os
    import signal
    import sys
    from pathlib import Path
    from typing import Any

    from nnh_testing import attach_loaders, make_handler

    from nnhandler import Callback, NNHandler

    mode, n_epochs, seed, kill_epoch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
        int(sys.argv[4])
    SETTINGS: dict[str, Any] = {
        "ema_decay": 0.8, "gradient_accumulation_steps": 3, "validate_every": 1,
        "seed": seed, "progress_bar": False,
    }
    CKPT_DIR, NAME = "ck", "ep{epoch:03d}"


    def die() -> None:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


    class KillAfterSave(Callback):
        # dies once the auto-save of epoch `epoch` is durable
        def __init__(self, epoch: int) -> None:
            self.epoch = epoch

        def on_checkpoint_saved(self, path: Any, epoch: int, **kwargs: Any) -> None:
            if epoch == self.epoch and Path(path).parent.name == CKPT_DIR:
                die()


    class KillMidEpoch(Callback):
        # dies in the middle of epoch `epoch + 1`: that epoch's work is lost
        def __init__(self, epoch: int) -> None:
            self.epoch = epoch + 1

        def on_train_batch_end(self, epoch: int, batch_idx: int, **kwargs: Any) -> None:
            if epoch == self.epoch and batch_idx == 4:
                die()


    def fresh() -> NNHandler:
        handler = make_handler(dropout=0.3)
        handler.auto_save(1, CKPT_DIR, name=NAME)
        return handler


    if mode == "full":
        handler = fresh()
        handler.train(until_epoch=n_epochs, **SETTINGS)
    elif mode in ("kill-after-save", "kill-mid-epoch"):
        handler = fresh()
        killer = KillAfterSave if mode == "kill-after-save" else KillMidEpoch
        handler.add_callback(killer(kill_epoch))
        handler.train(until_epoch=n_epochs, **SETTINGS)
        print("NOT KILLED")
        sys.exit(3)
    elif mode == "load-latest":
        handler = NNHandler.load_latest(CKPT_DIR, device="cpu")
        print("RESUMED AT", handler.epoch)
        attach_loaders(handler)
        handler.train(until_epoch=n_epochs, seed=seed, progress_bar=False)
    elif mode == "resume-latest":
        # a restartable script: configured from scratch (other initial weights), then resumed
        handler = make_handler(dropout=0.3, init_seed=987)
        handler.auto_save(1, CKPT_DIR, name=NAME)
        handler.train(until_epoch=n_epochs, resume="latest", **SETTINGS)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    handler.save("final.pth")
    print("FINAL EPOCH", handler.epoch)
    """
)


def _env() -> dict[str, str]:
    path = [str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in path if p)}


@dataclass
class Child:
    script: Path

    def start(self, workdir: Path, mode: str, kill_epoch: int = 0) -> subprocess.Popen[str]:
        workdir.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            [sys.executable, str(self.script), mode, str(N_EPOCHS), str(SEED), str(kill_epoch)],
            cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    return communicate_bounded(process, f"child {process.args!r}", CHILD_TIMEOUT_S)


def load_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    envelope = torch.load(path, weights_only=True)
    return envelope["state"], envelope["meta"]


KILLS: dict[str, tuple[str, int]] = {
    # id: (mode, k) — the newest auto-save on disk afterwards is epoch k
    "saved-1": ("kill-after-save", 1),
    "saved-2": ("kill-after-save", 2),
    "saved-3": ("kill-after-save", 3),
    "mid-epoch-3": ("kill-mid-epoch", 2),
}
RESUMES: dict[str, tuple[str, str]] = {
    # id: (kill id, resume style)
    **{f"{kill}-{style}": (kill, style)
       for kill in ("saved-1", "saved-2", "saved-3") for style in ("load-latest", "resume-latest")},
    "mid-epoch-3-load-latest": ("mid-epoch-3", "load-latest"),
}


@dataclass
class Runs:
    reference: Path  # workdir of the uninterrupted run
    workdirs: dict[str, Path]  # kill or resume id -> its workdir
    results: dict[str, tuple[int, str]]  # kill or resume id -> (exit code, output)


Job = tuple[str, Path, str, int]  # id, workdir, mode, k


def run_in_pairs(child: Child, jobs: list[Job]) -> dict[str, tuple[int, str]]:
    """Two processes at a time (two cores), each single-threaded."""
    results = {}
    for first in range(0, len(jobs), 2):
        started = [(job_id, child.start(workdir, mode, k))
                   for job_id, workdir, mode, k in jobs[first:first + 2]]
        for job_id, process in started:
            results[job_id] = finish(process)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    base = tmp_path_factory.mktemp("sigkill")
    script = base / "child.py"
    script.write_text(CHILD)
    child = Child(script)
    workdirs = {job_id: base / job_id for job_id in [*KILLS, *RESUMES]}
    results = run_in_pairs(child, [("reference", base / "reference", "full", 0)] + [
        (kill, workdirs[kill], mode, k) for kill, (mode, k) in KILLS.items()
    ])
    code, output = results.pop("reference")
    assert code == 0, output
    for resume, (kill, _) in RESUMES.items():  # each resumes from a copy of the killed run's ck/
        shutil.copytree(workdirs[kill], workdirs[resume])
    results.update(run_in_pairs(child, [
        (resume, workdirs[resume], style, 0) for resume, (_, style) in RESUMES.items()
    ]))
    return Runs(base / "reference", workdirs, results)


def checkpoints_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("kill", list(KILLS), ids=list(KILLS))
def test_the_killed_run_died_by_sigkill_leaving_exactly_k_verified_autosaves(
    runs: Runs, kill: str
) -> None:
    code, output = runs.results[kill]
    assert code == -signal.SIGKILL, f"exit {code}:\n{output}"
    assert "NOT KILLED" not in output
    k = KILLS[kill][1]
    directory = runs.workdirs[kill] / CKPT_DIR
    assert checkpoints_in(directory) == [f"ep{e:03d}.pth" for e in range(1, k + 1)]
    assert not any(is_temp_file(p) for p in directory.iterdir())
    for epoch in range(1, k + 1):
        path = directory / f"ep{epoch:03d}.pth"
        assert verify_file(path)["epoch"] == epoch
        # the auto-saves on the way are those of the uninterrupted run, bit for bit
        state, meta = load_state(path)
        reference_state, reference_meta = load_state(runs.reference / CKPT_DIR / path.name)
        assert_deep_equal(reference_state, state, f"ep{epoch:03d}")
        assert meta["epoch"] == reference_meta["epoch"] == epoch
        assert meta["step"] == reference_meta["step"]
        assert meta["logs"] == reference_meta["logs"]


@pytest.mark.parametrize("resume", list(RESUMES), ids=list(RESUMES))
def test_resumed_process_equals_the_uninterrupted_run_bitwise(runs: Runs, resume: str) -> None:
    kill, style = RESUMES[resume]
    code, output = runs.results[resume]
    assert code == 0, f"resumed child exited with {code}:\n{output}"
    workdir = runs.workdirs[resume]
    k = KILLS[kill][1]
    if style == "load-latest":
        assert f"RESUMED AT {k}" in output
    assert f"FINAL EPOCH {N_EPOCHS}" in output

    state, meta = load_state(workdir / "final.pth")
    reference, reference_meta = load_state(runs.reference / "final.pth")
    # the headline components first, for a readable failure
    for key in ("model", "optimizer", "history", "ema", "scheduler", "progress", "rng"):
        assert_deep_equal(reference[key], state[key], key)
    # then everything else the checkpoint holds (config, auto-save bookkeeping)
    assert_deep_equal(reference, state)
    assert (meta["epoch"], meta["step"]) == (reference_meta["epoch"], reference_meta["step"])
    assert meta["logs"] == reference_meta["logs"]
    history = state["history"]
    assert len(history["train_losses"]) == len(history["val_losses"]) == N_EPOCHS

    # the resumed process kept auto-saving by the same rules: epochs k+1..N, same content
    assert checkpoints_in(workdir / CKPT_DIR) == [
        f"ep{e:03d}.pth" for e in range(1, N_EPOCHS + 1)
    ]
    for epoch in range(k + 1, N_EPOCHS + 1):
        name = f"ep{epoch:03d}.pth"
        assert_deep_equal(load_state(runs.reference / CKPT_DIR / name)[0],
                          load_state(workdir / CKPT_DIR / name)[0], name)
    assert read_checkpoint(workdir / CKPT_DIR / f"ep{N_EPOCHS:03d}.pth").epoch == N_EPOCHS
