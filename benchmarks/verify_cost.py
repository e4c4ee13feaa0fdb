"""Cost of verifying a checkpoint's CRC-32 on load, as a ratio of plain ``torch.load``.

    python benchmarks/verify_cost.py [--mb 128] [--rounds 7]

The same >= 100 MB checkpoint is read in interleaved rounds by plain
``torch.load(weights_only=True)``, by ``nnhandler.read_checkpoint(verify=True)`` and by
``read_checkpoint(verify=False)``; medians and ratios are printed. The file sits in the page
cache after the first round (as it does right after training), so this measures CPU cost, not
the disk.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nnhandler.checkpoint import read_checkpoint
from nnhandler.checkpoint.envelope import build_meta, write_checkpoint


def make_state(megabytes: int) -> dict[str, torch.Tensor]:
    """Some hundreds of tensors totalling ``megabytes`` (float32), like a mid-size model."""
    per_tensor = 1 << 18  # 1 MiB of float32
    count = max(1, megabytes * (1 << 20) // (per_tensor * 4))
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per_tensor, generator=generator)
            for i in range(count)}


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "bench.pth"
        state = {"model": make_state(args.mb)}
        size = write_checkpoint(path, state, build_meta(epoch=1, step=1, logs={}, world_size=1))
        del state
        runs: dict[str, list[float]] = {"torch.load": [], "verify=True": [], "verify=False": []}
        actions: dict[str, Callable[[], object]] = {
            "torch.load": lambda: torch.load(path, weights_only=True),
            "verify=True": lambda: read_checkpoint(path, verify=True),
            "verify=False": lambda: read_checkpoint(path, verify=False),
        }
        for _ in actions:  # warm the page cache and the allocator
            for action in actions.values():
                action()
        for round_index in range(args.rounds):
            order = list(actions)[round_index % 3:] + list(actions)[:round_index % 3]
            for name in order:
                runs[name].append(timed(actions[name]))
    base = statistics.median(runs["torch.load"])
    print(f"machine: {platform.machine()}, {platform.processor() or '?'}; torch "
          f"{torch.__version__}; python {platform.python_version()}; 1 thread")
    print(f"checkpoint: {size / 1e6:.1f} MB, {args.rounds} interleaved rounds, medians")
    print(f"{'reader':<16}{'median s':>10}{'ratio':>8}")
    for name, times in runs.items():
        median = statistics.median(times)
        print(f"{name:<16}{median:>10.4f}{median / base:>8.2f}x")


if __name__ == "__main__":
    main()
