"""Peak memory of a save beyond the live state, as a multiple of the state's size.

    python -m benchmarks.save_memory [--megabytes 200] [--counts 300,5000] [--dir DIR]

Each case runs in a fresh process: it builds a model whose parameters are the state (as in
:mod:`.save_cost`, plain SGD), then measures the resident set before the save, resets the peak
(``/proc/self/clear_refs``; elsewhere the peak since the process started is used, which the
state's construction may already have set) and reads the peak (``VmHWM``) once the save is
durable. Cases: ``NNHandler.save`` (synchronous); the first asynchronous auto-save, which
allocates the staging arena — about the state's size in host memory, by design, kept for the
next saves; a later asynchronous auto-save, which reuses it; and ``torch.save`` + fsync of the
same state dicts, the baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import torch

from nnhandler import AutoSaveCallback, NNHandler

from ._common import Row, fsynced, machine_line, print_rows
from .save_cost import LARGE_COUNT, SMALL_COUNT, Blob, bench_directory

__all__ = ["CASES", "run"]

CASES: Final = ("handler.save", "async first save", "async later save", "torch.save")
_CHILD_TIMEOUT: Final = 600


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the peak resident set to the current one (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _peak_bytes() -> int:
    peak = _status_kib("VmHWM")
    if peak is not None:
        return peak * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _resident_bytes() -> int:
    resident = _status_kib("VmRSS")
    return resident * 1024 if resident is not None else _peak_bytes()


def measure(case: str, megabytes: float, count: int, directory: Path) -> dict[str, float]:
    """In this process: the extra peak memory of one save of ``case``, and the state size."""
    torch.manual_seed(0)
    handler = NNHandler(Blob, device="cpu", megabytes=megabytes, count=count,
                        logger_mode="file", log_file=directory / "bench.log",
                        use_distributed=False)
    handler.set_optimizer(torch.optim.SGD, lr=0.1)
    callback = AutoSaveCallback(None, directory, name="async_{epoch}", async_save=True)
    handler.add_callback(callback)
    optimizer = handler.optimizer
    assert optimizer is not None
    state = sum(p.numel() * p.element_size() for p in handler.module.parameters())

    def save() -> None:
        if case == "handler.save":
            handler.save(directory / "sync.pth")
        elif case == "torch.save":
            fsynced(directory / "torch.pth", lambda file: torch.save(
                {"model": handler.module.state_dict(), "optimizer": optimizer.state_dict()},
                file))
        else:
            callback.save_now(handler, 2, {})
            callback.flush(handler)

    if case == "async later save":
        callback.save_now(handler, 1, {})
        callback.flush(handler)
    elif case not in CASES:
        raise ValueError(f"unknown case {case!r}; expected one of {CASES}")
    gc.collect()
    before = _resident_bytes()
    reset = _reset_peak()
    save()
    peak = _peak_bytes()
    return {"extra": max(0, peak - before), "state": state, "reset": reset}


def _child(case: str, megabytes: float, count: int, directory: Path) -> dict[str, float]:
    root = Path(__file__).resolve().parent.parent
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(root), *filter(None, [environment.get("PYTHONPATH")])])
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.save_memory", "--child", case,
         "--megabytes", str(megabytes), "--counts", str(count), "--dir", str(directory)],
        capture_output=True, text=True, timeout=_CHILD_TIMEOUT, cwd=root, env=environment,
        check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory benchmark child {case!r} failed:\n{done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(megabytes: float = 200, counts: Sequence[int] = (LARGE_COUNT, SMALL_COUNT),
        directory: Path | None = None) -> list[Row]:
    rows = []
    with bench_directory(directory) as where:
        for count in counts:
            for case in CASES:
                case_directory = where / f"{count}-{case.replace(' ', '-')}"
                case_directory.mkdir(parents=True, exist_ok=True)
                result = _child(case, megabytes, count, case_directory)
                shutil.rmtree(case_directory, ignore_errors=True)
                state = result["state"] / 1e6
                note = "" if result["reset"] else " (peak since start)"
                rows.append(Row(
                    "memory", f"{megabytes:g} MB x {count} tensors: {case}{note}",
                    "state size", state, result["extra"] / 1e6, unit="MB",
                    target=None if case == "torch.save" else 1.1))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=200)
    parser.add_argument("--counts", default=f"{LARGE_COUNT},{SMALL_COUNT}")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    counts = [int(count) for count in args.counts.split(",")]
    if args.child is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        print(json.dumps(measure(args.child, args.megabytes, counts[0], args.dir)))
        return
    print(machine_line())
    print_rows(run(args.megabytes, counts, args.dir))


if __name__ == "__main__":
    main()
