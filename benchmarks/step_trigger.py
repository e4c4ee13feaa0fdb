"""Step-trigger cost: the per-step check of ``auto_save(every_n_steps=...)`` (and of
``every_seconds``) against the same run without a step trigger.

Both runs train the tiny MLP of :mod:`.loop_overhead` (a step of about a hundred microseconds:
the worst case) through ``NNHandler.train`` with the same auto-saver, whose epoch schedule
never fires; the measured runs add a step or time trigger that never fires either, so every
optimizer step pays the event and the schedule's check and nothing else. Rounds alternate
which run goes first; the table shows medians.

    python -m benchmarks.step_trigger [--rounds 11]
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._common import Row, interleaved_medians, section_main
from .loop_overhead import CASES, TinyMLP, with_handler

__all__ = ["run"]

NEVER = 10**9


def _with_autosave(case: dict[str, Any], directory: Path, **options: Any) -> Callable[[], object]:
    return with_handler(case, directory, callbacks=0, configure=lambda handler: handler.auto_save(
        NEVER, directory / "ck", **options))


def run(rounds: int = 11) -> list[Row]:
    (name, case), = [(n, c) for n, c in CASES.items() if c["model"] is TinyMLP]
    with tempfile.TemporaryDirectory() as directory:
        medians = interleaved_medians({
            "epochs only": _with_autosave(case, Path(directory)),
            "every_n_steps": _with_autosave(case, Path(directory), every_n_steps=NEVER),
            "every_seconds": _with_autosave(case, Path(directory), every_seconds=float(NEVER)),
        }, rounds)
    return [Row("steps", f"{name}, every_n_steps check per step", "interval only",
                medians["epochs only"], medians["every_n_steps"], target=1.01),
            Row("steps", f"{name}, every_seconds check per step", "interval only",
                medians["epochs only"], medians["every_seconds"], target=1.01)]


def main() -> None:
    section_main(__doc__, run, default_rounds=11)


if __name__ == "__main__":
    main()
