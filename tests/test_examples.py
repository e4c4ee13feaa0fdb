"""Every example runs as part of the suite (in a subprocess, bounded by a timeout)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def run_example(script: Path, *args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    completed = subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=180,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def test_every_example_is_covered() -> None:
    assert {p.name for p in EXAMPLES} == {
        "quickstart.py", "manual_autosave_callback.py", "custom_state_provider.py",
        "fsdp_sharded.py",  # run under torchrun in tests/test_sharded_checkpoint.py
    }


def test_quickstart_trains_saves_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "ck"
    stdout = run_example(ROOT / "examples" / "quickstart.py", "--out", str(out), "--epochs", "4",
                         "--interval", "2", cwd=tmp_path)
    names = sorted(p.name for p in out.glob("*.pth"))
    assert [n.split("_acc")[0] for n in names] == ["spiral_ep002", "spiral_ep004", "spiral_ep006"]
    assert "resumed from spiral_ep004" in stdout
    assert "epochs trained: 6" in stdout
    final = torch.load(out / names[-1], weights_only=True)
    assert final["meta"]["epoch"] == 6
    assert len(final["state"]["history"]["train_losses"]) == 6


def test_quickstart_default_command_runs(tmp_path: Path) -> None:
    """The README's main command, exactly as written (default output folder)."""
    stdout = run_example(ROOT / "examples" / "quickstart.py", cwd=tmp_path)
    assert "epochs trained: 25" in stdout
    assert len(list((tmp_path / "checkpoints" / "quickstart").glob("*.pth"))) == 5


def test_manual_autosave_callbacks_example(tmp_path: Path) -> None:
    out = tmp_path / "manual"
    stdout = run_example(ROOT / "examples" / "manual_autosave_callback.py", "--out", str(out),
                         "--epochs", "4", cwd=tmp_path)
    assert sorted(p.name for p in out.glob("*.pth")) == ["latest.pth"]
    history = sorted(p.name.split("_val")[0] for p in (out / "history").glob("*.pth"))
    assert history == ["regressor_ep002", "regressor_ep004", "regressor_ep006"]
    assert torch.load(out / "latest.pth", weights_only=True)["meta"]["epoch"] == 6
    assert "after resume: epoch 6" in stdout


def test_custom_state_provider_example(tmp_path: Path) -> None:
    out = tmp_path / "custom"
    stdout = run_example(ROOT / "examples" / "custom_state_provider.py", "--out", str(out),
                         "--epochs", "3", cwd=tmp_path)
    checkpoint = torch.load(next(out.glob("*.pth")), weights_only=True)
    saved = checkpoint["state"]["best_validation_tracker"]
    assert f"best val loss {saved['best_loss']:.4f} at epoch {saved['best_epoch']}" in stdout
