"""Exact resume from step checkpoints across a real SIGKILL (``examples/long_epoch_steps.py``):
a job saving every 10 optimizer steps is killed at a batch (no handler runs, no emergency
checkpoint), a requeued job resumes from the newest step checkpoint, and its final weights
equal those of an uninterrupted run bit for bit. Every job is its own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnhandler.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "long_epoch_steps.py"
TIMEOUT_S = 600  # three processes of a few seconds each; a hang fails the test


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize(("kill_at", "newest_step"), [
    ("1:57", 20),  # between two saves: steps 20 (batch 40) and 30 (batch 60)
    ("1:21", 10),  # as the batch right after a save starts
    ("2:3", 40),   # in epoch 2, whose end was not saved: back into epoch 1 after batch 80
], ids=["between-saves", "right-after-a-save", "next-epoch"])
def test_a_killed_job_resumes_from_its_newest_step_checkpoint_exactly(
        tmp_path: Path, kill_at: str, newest_step: int) -> None:
    out = tmp_path / "ck"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get(
               "PYTHONPATH")])])}
    completed = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(out), "--kill-at",
                                kill_at], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=TIMEOUT_S)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "first job: exit -9" in completed.stdout
    assert f"step {newest_step}, inside an epoch: True" in completed.stdout
    assert "resumed exactly: True" in completed.stdout
    kept = sorted(out.glob("*.pth"))
    assert len(kept) == 3  # keep_last=3 across both jobs
    for path in kept:
        checkpoint = read_checkpoint(path)
        assert checkpoint.state["position"]["partial"]["reason"] == "step"
    final = torch.load(out / "final_weights.pt", weights_only=True)
    assert set(final) == {"layers.0.weight", "layers.0.bias", "layers.3.weight", "layers.3.bias"}
