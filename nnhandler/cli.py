"""The ``nnhandler`` command: verify and inspect checkpoints.

    nnhandler verify PATH...        exit status 0 only when every file verifies
    nnhandler inspect PATH [--json] epoch, logs, components (tensors, bytes), versions, config

PATH may be a checkpoint file (``.pth``) or a sharded checkpoint directory (``.dcp``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from .checkpoint import Checkpoint
from .checkpoint.sharded import ShardedCheckpoint, describe_sharded, read_any_checkpoint
from .errors import CheckpointError

__all__ = ["main"]


def _tensor_stats(value: Any) -> tuple[int, int]:
    """Number of tensors and their bytes inside a nested state."""
    if isinstance(value, torch.Tensor):
        return 1, value.numel() * value.element_size()
    items: Any = ()
    if isinstance(value, dict):
        items = value.values()
    elif isinstance(value, (list, tuple)):
        items = value
    count = size = 0
    for item in items:
        c, s = _tensor_stats(item)
        count, size = count + c, size + s
    return count, size


def describe(checkpoint: Checkpoint) -> dict[str, Any]:
    """A JSON-ready summary of a checkpoint."""
    components = {}
    for key, value in checkpoint.state.items():
        count, size = _tensor_stats(value)
        components[key] = {"tensors": count, "bytes": size}
    if isinstance(checkpoint, ShardedCheckpoint):  # model/optimizer tensors: the DCP files
        for key, stats in describe_sharded(checkpoint).items():
            entry = components.setdefault(key, {"tensors": 0, "bytes": 0})
            entry["tensors"] += stats["tensors"]
            entry["bytes"] += stats["bytes"]
    config = checkpoint.state.get("config", {})
    return {
        "path": str(checkpoint.path),
        "layout": (f"sharded directory ({len(checkpoint.files) + 1} files)"  # + manifest
                   if isinstance(checkpoint, ShardedCheckpoint) else "single file"),
        "format_version": checkpoint.format_version,
        "epoch": checkpoint.epoch,
        "step": checkpoint.meta.get("step"),
        "time": checkpoint.meta.get("time"),
        "world_size": checkpoint.meta.get("world_size"),
        "versions": checkpoint.meta.get("versions", {}),
        "logs": checkpoint.meta.get("logs", {}),
        "components": components,
        "config": {
            "model_class": config.get("model_class"),
            "optimizer": (config.get("optimizer") or {}).get("class"),
            "scheduler": (config.get("scheduler") or {}).get("class"),
            "train_settings": config.get("train_settings"),
            "parallelism": config.get("parallelism", "ddp"),
        },
    }


def _print_inspection(console: Console, info: dict[str, Any]) -> None:
    summary = Table(title=info["path"], show_header=False)
    for key in ("layout", "format_version", "epoch", "step", "time", "world_size"):
        summary.add_row(key, str(info[key]))
    for name, version in info["versions"].items():
        summary.add_row(f"{name} version", str(version))
    for name, value in info["logs"].items():
        summary.add_row(f"logs.{name}", f"{value:.6g}" if isinstance(value, float) else str(value))
    for name, value in info["config"].items():
        summary.add_row(f"config.{name}", str(value))
    console.print(summary)
    components = Table(title="components")
    for column in ("state key", "tensors", "bytes"):
        components.add_column(column, justify="left" if column == "state key" else "right")
    for key, stats in info["components"].items():
        components.add_row(key, str(stats["tensors"]), f"{stats['bytes']:,}")
    console.print(components)


def _verify(paths: Sequence[str], console: Console, as_json: bool) -> int:
    results = []
    for path in paths:
        try:
            checkpoint = read_any_checkpoint(path, map_location="cpu", verify=True)
            results.append({"path": path, "ok": True, "epoch": checkpoint.epoch})
        except CheckpointError as error:
            results.append({"path": path, "ok": False, "error": str(error)})
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            if result["ok"]:
                console.print(f"[green]OK[/green]       {result['path']} (epoch {result['epoch']})")
            else:
                console.print(f"[red]CORRUPT[/red]  {result['path']}: {result['error']}")
    return 0 if all(result["ok"] for result in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnhandler",
                                     description="Verify and inspect checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify",
                                 help="check checksums and format; exit 1 if any fails")
    verify.add_argument("paths", nargs="+")
    verify.add_argument("--json", action="store_true")
    inspect = commands.add_parser("inspect", help="show a checkpoint's content")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--no-verify", action="store_true", help="skip the checksum check")
    args = parser.parse_args(argv)
    console = Console()
    if args.command == "verify":
        return _verify(args.paths, console, args.json)
    try:
        checkpoint = read_any_checkpoint(args.path, map_location="cpu",
                                         verify=not args.no_verify)
    except CheckpointError as error:
        Console(stderr=True).print(f"[red]error:[/red] {error}")
        return 1
    info = describe(checkpoint)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_inspection(console, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
