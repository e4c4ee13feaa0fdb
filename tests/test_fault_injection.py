"""Crash safety under SIGKILL: real training processes killed at random moments, many of them
in the middle of a checkpoint write (``benchmarks/fault_injection.py`` runs the campaign and
prints its figures; this test runs it in a subprocess bounded by a timeout and checks them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from nnh_testing import checkpoint_files, make_handler

from nnhandler import NNHandler
from nnhandler.checkpoint.removal import RemovalGuard

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fault_injection.py"
KILLS = 52  # 26 per overwrite mode
HANG_GUARD_S = 600  # a hang fails the test; the campaign itself takes well under a minute
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="the campaign forks workers")


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, dict[str, Any]]:
    work = tmp_path_factory.mktemp("fault_injection")
    report = work / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--kills", str(KILLS), "--seed", "20240607",
         "--dir", str(work / "runs"), "--json", str(report)],
        cwd=work, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, check=False,
    )
    print(completed.stdout)  # the table of figures, shown with -s or on failure
    assert report.exists(), f"no report (exit {completed.returncode}):\n{completed.stdout}\n" \
                            f"{completed.stderr[-4000:]}"
    data = json.loads(report.read_text())
    failures = [f for r in data["reports"] for f in r["failures"]]
    assert failures == [], "\n".join(failures)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return {r["overwrite"]: r for r in data["reports"]}


@pytest.mark.slow
@needs_fork
def test_at_least_50_kills_in_both_modes_many_during_writes(
    campaign: dict[bool, dict[str, Any]],
) -> None:
    assert set(campaign) == {False, True}
    assert sum(r["kills"] for r in campaign.values()) >= 50
    for report in campaign.values():
        assert report["kills"] == KILLS // 2
        strategies = [k["strategy"] for k in report["records"]]
        assert strategies.count("random") >= 3 and strategies.count("write") >= 3
        assert report["saves_completed"] >= report["kills"]
    # a kill that leaves a temp file of the killed writer landed during a write
    assert sum(r["during_write"] for r in campaign.values()) >= 5
    assert all(r["during_write"] >= 1 for r in campaign.values())
    assert sum(r["temp_left"] for r in campaign.values()) >= 5


@pytest.mark.slow
@needs_fork
def test_newest_complete_checkpoint_loads_and_verifies_after_every_kill(
    campaign: dict[bool, dict[str, Any]],
) -> None:
    for report in campaign.values():
        assert report["before_first_save"] == 0  # the first kill waits for a completed save
        assert report["loaded_verified"] == report["kills"]
        assert report["lost_saves"] == 0
        assert report["invalid_visible"] == 0
        for kill in report["records"]:
            assert kill["loaded_verified"], kill
            assert kill["latest_epoch"] >= kill["newest_completed_before"], kill
            assert kill["latest_epoch"] <= kill["newest_completed_before"] + 1, kill
            assert kill["problems"] == [], kill


@pytest.mark.slow
@needs_fork
def test_temp_files_are_never_checkpoints_and_are_cleaned_at_the_next_start(
    campaign: dict[bool, dict[str, Any]],
) -> None:
    for report in campaign.values():
        assert report["temp_mistaken"] == 0
        assert report["temp_cleaned"] == report["temp_left"]
        assert report["final_run_ok"]
        for kill in report["records"]:
            assert all(not name.endswith(".pth") for name in kill["temp_left"]), kill


@pytest.mark.slow
@needs_fork
def test_overwrite_true_always_keeps_a_valid_checkpoint(
    campaign: dict[bool, dict[str, Any]],
) -> None:
    report = campaign[True]
    assert report["min_valid_after_first_save"] >= 1
    assert all(kill["valid_files"] >= 1 for kill in report["records"])
    assert report["max_pth_files"] <= 2  # the new file, and the previous one until removed
    assert report["files_after_final_run"] == 1


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_overwrite_crash_between_write_and_removal_is_finished_by_the_resumed_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler = make_handler()
    handler.auto_save(interval=1, save_path="ck", name="ep{epoch:03d}", overwrite=True)
    handler.train(epochs=1, seed=0, progress_bar=False)

    def killed(*args: Any, **kwargs: Any) -> None:
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(RemovalGuard, "remove", killed)  # killed before the old file goes
        with pytest.raises(_Killed):
            handler.train(epochs=1, progress_bar=False)
    assert checkpoint_files(Path("ck")) == ["ep001.pth", "ep002.pth"]

    resumed = make_handler()
    resumed.auto_save(interval=1, save_path="ck", name="ep{epoch:03d}", overwrite=True)
    resumed.train(until_epoch=3, resume="latest", seed=0, progress_bar=False)
    assert checkpoint_files(Path("ck")) == ["ep003.pth"]
    assert NNHandler.load_latest("ck").epoch == 3
