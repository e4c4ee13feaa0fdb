"""What every benchmark shares: interleaved timing, medians, the machine, result rows."""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

__all__ = ["Row", "fsynced", "interleaved_medians", "machine_details", "machine_line",
           "print_rows", "section_main", "timed"]


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
    #: a harder goal beside the target (same direction), reported in the verdict
    stretch: float | None = None

    @property
    def ratio(self) -> float:
        return self.ours_value / self.baseline_value if self.baseline_value else float("inf")

    def _meets(self, bound: float) -> bool:
        return self.ratio <= bound if self.direction == "max" else self.ratio >= bound

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        sign = "<=" if self.direction == "max" else ">="
        verdict = f"{'met' if self._meets(self.target) else 'MISSED'} ({sign} {self.target:g}x)"
        if self.stretch is not None:
            verdict += (f"; stretch {sign} {self.stretch:g}x "
                        f"{'met' if self._meets(self.stretch) else 'missed'}")
        return verdict


def timed(action: Callable[[], object]) -> float:
    """Seconds one call of ``action`` takes (garbage collected before, not during)."""
    gc.collect()
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def interleaved_medians(
    actions: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1,
    between: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Median seconds per action over ``rounds`` rounds; within a round the actions run one
    after another in a rotating order, so drift on a shared machine hits every action alike.
    ``between`` runs after every action, outside the timing (e.g. to remove written files)."""
    names = list(actions)
    for _ in range(warmup):
        for name in names:
            actions[name]()
            if between is not None:
                between()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timed(actions[name]))
            if between is not None:
                between()
    return {name: statistics.median(times) for name, times in samples.items()}


def fsynced(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(file)``, flush and fsync (no temp file, no rename)."""
    with open(path, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


def machine_line() -> str:
    cpus = os.cpu_count()
    return (f"{_cpu_model()}, {cpus} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}".strip()


def _memory() -> str:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _filesystem(directory: Path) -> str:
    """``type (device)`` of the filesystem holding ``directory`` (Linux ``findmnt``)."""
    try:
        found = subprocess.run(["findmnt", "-no", "FSTYPE,SOURCE", "-T", str(directory)],
                               capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    kind, _, source = found.stdout.strip().partition(" ")
    return f"{kind} ({source.strip()})" if kind else "unknown"


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release()["PRETTY_NAME"]
    except (OSError, KeyError):
        return platform.platform()


def _commit(where: Path) -> str:
    try:
        found = subprocess.run(["git", "-C", str(where), "describe", "--always", "--dirty"],
                               capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return found.stdout.strip()


def machine_details(directory: Path) -> list[str]:
    """Bullet lines describing the machine, the software and where files were written."""
    from nnhandler import __version__

    return [
        f"CPU: {_cpu_model()}, {os.cpu_count()} logical CPUs; RAM: {_memory()}",
        f"disk: {_filesystem(directory)} (benchmark files written under {directory})",
        f"OS: {_os_name()} (kernel {platform.release()})",
        f"python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), nnhandler {__version__} at commit "
        f"{_commit(Path(__file__).resolve().parent)}",
    ]


def section_main(doc: str, run: Callable[[int], list[Row]], default_rounds: int) -> None:
    """The command line of one benchmark module: ``--rounds``, then its rows with ratios."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=default_rounds)
    args = parser.parse_args()
    print(machine_line())
    print_rows(run(args.rounds))


def print_rows(rows: list[Row]) -> None:
    for row in rows:
        print(f"  {row.section:<8} {row.case:<62} {row.ratio:7.3f}x  {row.verdict}",
              flush=True)
