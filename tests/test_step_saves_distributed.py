"""Step and time triggers on real DDP ranks (torchrun, gloo, CPU; ``tests/steps_ddp_worker.py``):
every rank saves at the same steps, a mid-epoch checkpoint resumed on the same number of ranks
equals the uninterrupted run, the time trigger is decided by rank 0's clock alone, and FSDP2
writes sharded ``.dcp`` step checkpoints that resume exactly."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from dist_testing import DISTRIBUTED_MARKS, launch_scenario

pytestmark = DISTRIBUTED_MARKS

WORKER = Path(__file__).resolve().parent / "steps_ddp_worker.py"
LAUNCH_TIMEOUT_S = 300


@pytest.mark.parametrize("ranks", [2, 3], ids=["2-ranks", "3-ranks"])
def test_every_rank_saves_the_same_steps_and_a_step_checkpoint_resumes(
        tmp_path: Path, ranks: int) -> None:
    results = launch_scenario(WORKER, "steps", tmp_path / "run", ranks, LAUNCH_TIMEOUT_S)
    saved = [r["saved"] for r in results]
    assert all(s == saved[0] for s in saved)
    # 96 samples over the ranks, batches of 4, accumulation 2: steps per epoch
    batches = math.ceil(math.ceil(96 / ranks) / 4)
    steps = math.ceil(batches / 2)
    expected = sorted({*range(3, 2 * steps + 1, 3), steps, 2 * steps})
    assert [step for step, _ in saved[0]] == expected
    for result in results:
        resumed = result["resumed"]
        assert resumed and all(r["mid_epoch"] for r in resumed.values())
        for name, outcome in resumed.items():
            assert outcome["same_history"] or ranks > 2, name
            # from 3 ranks up a resume is exact only up to float rounding (DDP's buckets)
            assert outcome["equal"] if ranks == 2 else outcome["max_abs"] < 1e-5, (name, outcome)


@pytest.mark.parametrize("ranks", [2, 3], ids=["2-ranks", "3-ranks"])
def test_the_time_trigger_is_rank_zeros_and_every_rank_saves_at_the_same_step(
        tmp_path: Path, ranks: int) -> None:
    results = launch_scenario(WORKER, "time", tmp_path / "run", ranks, LAUNCH_TIMEOUT_S)
    saved = [r["saved"] for r in results]
    assert all(s == saved[0] for s in saved) and saved[0]
    steps = [step for step, _ in saved[0]]
    per_epoch = results[0]["steps_per_epoch"]
    # rank 0's clock passes 5 s at step 5; the pipelined agreement answers one step later
    assert steps[0] == 6
    for before, after in itertools.pairwise(steps):
        # 5 s of rank 0's batches, plus the step the agreement takes; an epoch's end agrees
        # at once (one blocking reduction)
        assert after - before == 6 or after % per_epoch == 0, steps
    for result in results:
        timing = result["per_step_s"]
        assert all(t > 0 for t in timing["with"] + timing["without"])


def test_fsdp2_writes_sharded_step_checkpoints_that_resume_exactly(tmp_path: Path) -> None:
    results = launch_scenario(WORKER, "sharded", tmp_path / "run", 2, LAUNCH_TIMEOUT_S)
    assert results[0]["saved"] == results[1]["saved"]
    assert results[0]["files"] and all(name.endswith(".dcp") for name in results[0]["files"])
    for result in results:
        for name, outcome in result["resumed"].items():
            assert outcome["mid_epoch"] and outcome["equal"] and outcome["same_history"], name
