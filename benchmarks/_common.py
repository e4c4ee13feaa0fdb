"""What every benchmark shares: interleaved timing, medians, the machine line, result rows."""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

__all__ = ["Row", "interleaved_medians", "machine_line", "section_main", "timed"]


@dataclass(frozen=True)
class Row:
    """One line of the results table: ``ours / baseline`` against a target ratio."""

    section: str
    case: str
    baseline: str
    baseline_value: float
    ours_value: float
    unit: str = "s"
    target: float | None = None
    #: "max": the ratio must not exceed the target; "min": it must reach it
    direction: str = "max"

    @property
    def ratio(self) -> float:
        return self.ours_value / self.baseline_value if self.baseline_value else float("inf")

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        met = self.ratio <= self.target if self.direction == "max" else self.ratio >= self.target
        sign = "<=" if self.direction == "max" else ">="
        return f"{'met' if met else 'MISSED'} ({sign} {self.target:g}x)"


def timed(action: Callable[[], object]) -> float:
    """Seconds one call of ``action`` takes (garbage collected before, not during)."""
    gc.collect()
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def interleaved_medians(
    actions: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per action over ``rounds`` rounds; within a round the actions run one
    after another in a rotating order, so drift on a shared machine hits every action alike."""
    names = list(actions)
    for _ in range(warmup):
        for name in names:
            actions[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timed(actions[name]))
    return {name: statistics.median(times) for name, times in samples.items()}


def machine_line() -> str:
    cpus = os.cpu_count()
    return (f"{platform.machine()} {platform.processor() or ''}".strip()
            + f", {cpus} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"python {platform.python_version()}, {platform.system()} {platform.release()}")


def section_main(doc: str, run: Callable[[int], list[Row]], default_rounds: int) -> None:
    """The command line of one benchmark module: ``--rounds``, then its rows with ratios."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=default_rounds)
    args = parser.parse_args()
    print(machine_line())
    for row in run(args.rounds):
        print(f"{row.case:<62} {row.ratio:6.3f}x  {row.verdict}")
