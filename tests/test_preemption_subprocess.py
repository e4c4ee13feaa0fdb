"""Preemption of a real training process: the test sends SIGTERM to a child that is training
(``proc.send_signal``); the child finishes its step, writes the emergency checkpoint, returns
from ``train`` and exits with the status a requeue script looks for. A new process resumes
from the newest checkpoint and must end where an uninterrupted process ends, bit for bit.

Every run is its own Python process (``OMP_NUM_THREADS=1``), bounded by a timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_testing import child_environment, communicate_bounded
from nnh_testing import assert_deep_equal

from nnhandler.checkpoint.integrity import verify_file
from nnhandler.checkpoint.writer import is_temp_file

pytestmark = [pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32",
                                 reason="needs POSIX signals"),
              pytest.mark.slow]  # ~25 s: real training processes signalled and resumed

CHILD_TIMEOUT_S = 240  # a hang fails the test; a run takes a few seconds
PREEMPTED_EXIT = 3

CHILD = textwrap.dedent(
    """
    import sys
    import time
    from pathlib import Path
    from typing import Any

    from nnh_testing import attach_loaders, make_handler, regression_dataset

    from nnhandler import Callback, NNHandler

    mode, workers = sys.argv[1], int(sys.argv[2])
    SETTINGS: dict[str, Any] = {"ema_decay": 0.8, "gradient_accumulation_steps": 3,
                                "seed": 21, "progress_bar": False}


    class Ready(Callback):
        # after batch 1 of epoch 2: tell the test, then wait (at most 60 s) until it has sent
        # the signal, so that the signal reaches a process that is in the middle of an epoch
        def on_train_batch_end(self, epoch: int, batch_idx: int, **kwargs: Any) -> None:
            if (epoch, batch_idx) == (2, 1):
                print("READY", flush=True)
                for _ in range(600):
                    if Path("signal-sent").exists():
                        break
                    time.sleep(0.1)


    def fresh() -> NNHandler:
        handler = make_handler(dropout=0.3)
        # DataLoader workers forked while train runs inherit its signal handlers: a signal
        # sent to the whole process group does not kill them
        handler.set_train_loader(regression_dataset(64), num_workers=workers)
        handler.auto_save(1, "ck", name="ep{epoch:03d}", save_on_signal=True)
        return handler


    if mode == "full":
        handler = fresh()
        handler.train(until_epoch=3, **SETTINGS)
    elif mode == "preempt":
        handler = fresh()
        handler.add_callback(Ready())
        handler.train(until_epoch=3, **SETTINGS)
        if handler.preempted:
            print("PREEMPTED", *handler.preemption.paths, flush=True)
            sys.exit(3)
        print("NOT PREEMPTED")
        sys.exit(4)
    elif mode == "resume":
        handler = NNHandler.load_latest("ck", device="cpu")
        print("RESUMED AT", handler.epoch, handler.stopped_mid_epoch)
        attach_loaders(handler)
        handler.train(until_epoch=3, seed=21, progress_bar=False)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    handler.save("final.pth")
    print("FINAL EPOCH", handler.epoch)
    """
)


def start(script: Path, workdir: Path, mode: str, workers: int) -> subprocess.Popen[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, str(script), mode, str(workers)], cwd=workdir,
                            env=child_environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    return communicate_bounded(process, f"child {process.args!r}", CHILD_TIMEOUT_S)


def wait_for_line(process: subprocess.Popen[str], expected: str) -> None:
    """Read the child's output until ``expected`` (bounded: the child's own wait is)."""
    assert process.stdout is not None
    for line in process.stdout:
        if line.strip() == expected:
            return
    code, output = finish(process)
    pytest.fail(f"the child never printed {expected!r} (exit {code}):\n{output}")


def final_state(workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    envelope = torch.load(workdir / "final.pth", weights_only=True)
    return envelope["state"], envelope["meta"]


HOW = {
    # id: (DataLoader workers, send to the whole process group — as SLURM signals a step)
    "send-signal": (0, False),
    "process-group-with-loader-workers": (2, True),
}


@pytest.mark.parametrize("how", list(HOW), ids=list(HOW))
def test_sigterm_to_a_training_process_stops_it_cleanly_and_the_resume_is_exact(
    tmp_path: Path, how: str
) -> None:
    workers, group = HOW[how]
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    reference = start(script, tmp_path / "reference", "full", workers)

    preempted = start(script, tmp_path / "preempted", "preempt", workers)
    wait_for_line(preempted, "READY")
    if group:
        os.killpg(preempted.pid, signal.SIGTERM)  # the child leads its own session
    else:
        preempted.send_signal(signal.SIGTERM)
    (tmp_path / "preempted" / "signal-sent").touch()
    code, output = finish(preempted)
    assert code == PREEMPTED_EXIT, f"exit {code}:\n{output}"
    # the signal came after batch 1 of epoch 2; the accumulation group of batches 0-2 ends
    # with the optimizer step after which training stopped
    emergency = Path("ck") / "preempted_ep002_b00003.pth"
    assert f"PREEMPTED {emergency}" in output
    directory = tmp_path / "preempted" / "ck"
    assert sorted(p.name for p in directory.iterdir()) == ["ep001.pth", emergency.name]
    assert not any(is_temp_file(p) for p in directory.iterdir())
    assert verify_file(directory / emergency.name)["epoch"] == 1

    code, output = finish(reference)
    assert code == 0, output
    resumed = start(script, tmp_path / "preempted", "resume", workers)
    code, output = finish(resumed)
    assert code == 0, output
    assert "RESUMED AT 1 True" in output and "FINAL EPOCH 3" in output

    state, meta = final_state(tmp_path / "preempted")
    expected, expected_meta = final_state(tmp_path / "reference")
    for key in ("model", "optimizer", "scheduler", "ema", "history", "progress", "rng",
                "position"):
        assert_deep_equal(expected[key], state[key], key)
    assert (meta["epoch"], meta["step"], meta["logs"]) == (
        expected_meta["epoch"], expected_meta["step"], expected_meta["logs"])
    for epoch in (2, 3):  # the resumed process auto-saved the same epochs, the same content
        name = f"ep{epoch:03d}.pth"
        written = torch.load(directory / name, weights_only=True)["state"]
        wanted = torch.load(tmp_path / "reference" / "ck" / name, weights_only=True)["state"]
        for key in ("model", "optimizer", "ema", "history", "rng"):
            assert_deep_equal(wanted[key], written[key], f"{name} {key}")
