"""Worker for tests/test_custom_saver.py: examples/custom_saver.py's ``BestAndEveryN`` on 2
ranks (torchrun, gloo, CPU), synchronous and in the background.

    python -m torch.distributed.run --nproc_per_node=2 ... tests/custom_saver_worker.py SCENARIO DIR

Scenarios ``sync`` and ``background`` train 6 epochs and write ``result_rank<r>.json``: the
saver's state on each rank, the files each rank sees when ``train`` returns, and whether the
process group still works.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path
from typing import Any

faulthandler.dump_traceback_later(75, exit=True)  # well inside the test's 120 s limit

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_testing import run_worker  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from custom_saver import BestAndEveryN, build  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD_SIZE = int(os.environ["WORLD_SIZE"])


def _train(workdir: Path, background: bool) -> dict[str, Any]:
    handler = build(workdir / "saver", background)
    assert handler.distributed.enabled and handler.distributed.world_size == WORLD_SIZE
    handler.train(6, seed=0, progress_bar=False)  # 8 steps per epoch per rank
    saver = next(c for c in handler.callbacks if isinstance(c, BestAndEveryN))
    group = torch.ones(1)
    dist.all_reduce(group)
    return {"state": saver.state_dict(),
            "files": sorted(p.name for p in (workdir / "saver").iterdir()),
            "steps": handler.global_step, "group_still_works": group.item()}


SCENARIOS = {"sync": lambda workdir, extra: _train(workdir, False),
             "background": lambda workdir, extra: _train(workdir, True)}

if __name__ == "__main__":
    run_worker(SCENARIOS, RANK, WORLD_SIZE)
