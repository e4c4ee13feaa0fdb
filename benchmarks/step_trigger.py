"""Step-trigger cost: the per-step check of ``auto_save(every_n_steps=...)`` (and of
``every_seconds``) against the same run without a step trigger.

Both runs train the tiny MLP of :mod:`.loop_overhead` (a step of about a hundred microseconds:
the worst case) through ``NNHandler.train`` with the same auto-saver, whose epoch schedule
never fires; the measured runs add a step or time trigger that never fires either, so every
optimizer step pays the event and the schedule's check and nothing else. Rounds alternate
which run goes first; the table shows medians. On a busy machine two identical runs differ by
about 1 %, more than the check costs, so a second row times the check itself (the hooks the
loop calls after each optimizer step, called as the loop calls them) against the measured step.

    python -m benchmarks.step_trigger [--rounds 11]
"""

from __future__ import annotations

import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from nnhandler import NNHandler
from nnhandler.events import Event, EventDispatcher
from nnhandler.loop import MidEpoch, TrainingLoop

from ._common import Row, interleaved_medians, section_main
from .loop_overhead import CASES, TinyMLP, with_handler

__all__ = ["run"]

NEVER = 10**9


def _with_autosave(case: dict[str, Any], directory: Path, **options: Any) -> Callable[[], object]:
    return with_handler(case, directory, callbacks=0, configure=lambda handler: handler.auto_save(
        NEVER, directory / "ck", **options))


def check_seconds(handler: NNHandler, number: int = 100_000) -> float:
    """Seconds per optimizer step of what the loop does for the per-step event of
    ``handler``'s auto-saver: its hooks called with the event's arguments."""
    callback = handler.auto_save_callback
    assert callback is not None
    hooks = EventDispatcher([callback]).hooks(Event.TRAIN_STEP_END)
    mid = MidEpoch(cast(TrainingLoop, None), 1, 128, cast(Any, None))

    def step() -> None:
        mid.batches = mid.step = 5
        for hook in hooks:
            hook(handler=handler, epoch=1, step=5, mid_epoch=mid)

    return min(timeit.repeat(step, number=number, repeat=5)) / number


def run(rounds: int = 11) -> list[Row]:
    (name, case), = [(n, c) for n, c in CASES.items() if c["model"] is TinyMLP]
    steps = case["epochs"] * -(-case["samples"] // case["batch"])
    with tempfile.TemporaryDirectory() as directory:
        probes = {}
        for option in ("every_n_steps", "every_seconds"):
            with_handler(case, Path(directory), callbacks=0, configure=lambda h, o=option: (
                h.auto_save(NEVER, Path(directory) / "ck", **{o: NEVER}),
                probes.__setitem__(o, h)))
        isolated = {option: check_seconds(handler) for option, handler in probes.items()}
        medians = interleaved_medians({
            "epochs only": _with_autosave(case, Path(directory)),
            "every_n_steps": _with_autosave(case, Path(directory), every_n_steps=NEVER),
            "every_seconds": _with_autosave(case, Path(directory), every_seconds=float(NEVER)),
        }, rounds)
    step = medians["epochs only"] / steps
    rows = []
    for option in ("every_n_steps", "every_seconds"):
        rows.append(Row("steps", f"{name}, {option}: run", "interval only",
                        medians["epochs only"], medians[option], target=1.01))
        rows.append(Row("steps", f"{name}, {option}: check per step, timed alone",
                        "the step", step * 1e6, (step + isolated[option]) * 1e6, unit="us",
                        target=1.01))
    return rows


def main() -> None:
    section_main(__doc__, run, default_rounds=11)


if __name__ == "__main__":
    main()
