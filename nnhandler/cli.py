"""The ``nnhandler`` command: list, verify and inspect checkpoints.

    nnhandler list DIR [--json] [--no-verify]  every checkpoint in DIR: epoch, step, metrics,
                                    size, valid/corrupt, the one load_latest picks, and why
                                    the retention index keeps each; exit 1 if any is corrupt
    nnhandler verify PATH...        exit status 0 only when every file verifies and would load
                                    (an export() weights file is recognised as such)
    nnhandler inspect PATH [--json] epoch, logs, components (tensors, bytes), versions, config

PATH may be a checkpoint file (``.pth``) or a sharded checkpoint directory (``.dcp``); DIR and
PATH may be URLs (``s3://bucket/run``, configured by the environment: docs/object-storage.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from .checkpoint import Checkpoint
from .checkpoint.discovery import (
    check_candidate,
    first_valid,
    list_checkpoints,
    read_index_or_warn,
    vanished,
)
from .checkpoint.index import INDEX_FILE, IndexSection
from .checkpoint.integrity import read_integrity_record, verify_file
from .checkpoint.sharded import (
    ShardedCheckpoint,
    checkpoint_size,
    describe_sharded,
    read_any_checkpoint,
)
from .checkpoint.storage import is_url
from .errors import CheckpointCorruptedError, CheckpointError

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
    partial = (checkpoint.state.get("position") or {}).get("partial")
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
        # an emergency checkpoint from inside an epoch: where a resumed run continues
        "mid_epoch": None if partial is None else {
            "epoch": partial["epoch"], "batches_done": partial["batches"],
            "reason": partial["reason"],
            "pending_gradients": partial["pending_grads"] is not None},
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
    if info["mid_epoch"] is not None:
        mid = info["mid_epoch"]
        pending = ", pending gradients" if mid["pending_gradients"] else ""
        summary.add_row("mid-epoch", f"epoch {mid['epoch']} after {mid['batches_done']} "
                        f"batches ({mid['reason']}{pending})")
    for name, value in info["config"].items():
        summary.add_row(f"config.{name}", str(value))
    console.print(summary)
    components = Table(title="components")
    for column in ("state key", "tensors", "bytes"):
        components.add_column(column, justify="left" if column == "state key" else "right")
    for key, stats in info["components"].items():
        components.add_row(key, str(stats["tensors"]), f"{stats['bytes']:,}")
    console.print(components)


#: ``verify`` statuses: what the file is and whether it passed
_VERIFY_LABELS = {
    "checkpoint": "[green]OK[/green]      ",
    "export": "[green]OK[/green]      ",
    "corrupt": "[red]CORRUPT[/red] ",
    "invalid": "[red]INVALID[/red] ",
    "not-a-checkpoint": "[yellow]NOT NNH[/yellow] ",
    "missing": "[red]MISSING[/red] ",
}


def verify_path(path: str) -> dict[str, Any]:
    """What ``nnhandler verify`` reports for one path, JSON-ready: ``path``, ``ok``, ``kind``
    (``checkpoint``, ``export`` — weights written by ``NNHandler.export`` —, ``corrupt``,
    ``invalid`` — checksums match but it would not load —, ``not-a-checkpoint`` — e.g. a plain
    ``torch.save`` file, which carries no checksum —, ``missing``) and ``epoch`` or
    ``error``. Never raises for a bad file."""
    if is_url(path):  # object storage (docs/object-storage.md): a complete copy, checked here
        from .remote_cli import verify_url

        return verify_url(path, verify_path)
    target = Path(path)
    try:
        if not os.path.lexists(target):
            return {"path": path, "ok": False, "kind": "missing",
                    "error": "no such file or directory"}
        if target.is_file():
            try:
                record = read_integrity_record(target)
            except CheckpointCorruptedError as error:
                plain = _plain_torch_file(target)
                if plain is None:
                    raise
                return {"path": path, "ok": False, "kind": "not-a-checkpoint",
                        "error": f"{plain}: not an nnhandler checkpoint and it carries no "
                                 f"checksum, so it cannot be verified ({error})"}
            if record.get("kind") == "export":
                verify_file(target)
                return {"path": path, "ok": True, "kind": "export",
                        "detail": "model weights written by NNHandler.export(); CRC-32 matches"}
        record = check_candidate(target)
        return {"path": path, "ok": True, "kind": "checkpoint", "epoch": record["epoch"]}
    except CheckpointCorruptedError as error:
        return {"path": path, "ok": False, "kind": "corrupt", "error": str(error)}
    except (CheckpointError, OSError) as error:
        return {"path": path, "ok": False, "kind": "invalid", "error": str(error)}
    except Exception as error:  # a file that breaks a reader in a way nobody foresaw
        return {"path": path, "ok": False, "kind": "invalid",
                "error": f"cannot read it ({type(error).__name__}: {error})"}


def _plain_torch_file(path: Path) -> str | None:
    """A description when ``path`` looks like a file of plain ``torch.save`` (a zip with a
    ``data.pkl`` record), else ``None``. Nothing is unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    if any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        return "a plain PyTorch file (torch.save, or export() of nnhandler before 0.2)"
    return None


def _verify(paths: Sequence[str], console: Console, as_json: bool) -> int:
    results = [verify_path(path) for path in paths]
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            label = _VERIFY_LABELS[result["kind"]]
            if result["kind"] == "checkpoint":
                console.print(f"{label}{result['path']} (epoch {result['epoch']})")
            elif result["kind"] == "export":
                console.print(f"{label}{result['path']} ({result['detail']})")
            else:
                console.print(f"{label}{result['path']}: {result['error']}")
    return 0 if all(result["ok"] for result in results) else 1


#: log keys shown for every checkpoint by ``list`` (plus each monitored key of the index)
LIST_METRICS = ("loss", "val_loss")


def list_directory(directory: str | Path, *, verify: bool = True,
                   logger: logging.Logger | None = None) -> list[dict[str, Any]]:
    """One JSON-ready row per checkpoint in ``directory``, in the order ``load_latest`` ranks
    them (newest first): ``name``, ``path``, ``epoch``, ``step``, ``time``, ``metrics``
    (``loss``, ``val_loss`` and every key a retention rule monitors, where recorded),
    ``size`` (bytes; a sharded directory's files summed), ``valid``, ``verified`` (whether
    the whole content was checked; without ``verify`` only the integrity record is read),
    ``problem``, ``latest`` (the one ``load_latest`` picks), ``in_index``, ``superseded``
    (the index records it for removal) and ``kept_by`` (``[{"callback": state_key,
    "reasons": [...]}]`` from the retention index)."""
    directory = Path(directory)
    index: Mapping[str, IndexSection] = read_index_or_warn(
        directory, logger or logging.getLogger("nnhandler.cli")) or {}
    monitors = [str(section.rules["monitor"]) for section in index.values()
                if section.rules.get("monitor")]
    keys = list(dict.fromkeys([*LIST_METRICS, *monitors]))
    rows = []
    candidates = list_checkpoints(directory, index)
    for candidate in candidates:
        record, problem = candidate.record, candidate.problem
        if record is not None and verify:
            try:
                record = check_candidate(candidate.path)
            except (CheckpointError, OSError) as error:
                if vanished(candidate.path, error):
                    continue  # removed while we read it (another job's retention)
                problem = str(error)
        try:
            size: int | None = checkpoint_size(candidate.path)
        except OSError:
            size = None
        logs: dict[str, Any] = (record.get("logs") if record is not None else None) or {}
        name = candidate.path.name
        rows.append({
            "name": name,
            "path": str(candidate.path),
            "epoch": None if record is None else record.get("epoch"),
            "step": None if record is None else record.get("step"),
            "time": None if record is None else record.get("time"),
            "metrics": {key: logs[key] for key in keys if key in logs},
            "size": size,
            "valid": record is not None and problem is None,
            "verified": verify and record is not None,
            "problem": problem,
            "latest": False,
            "in_index": candidate.indexed,
            "superseded": candidate.superseded,
            "kept_by": [{"callback": key, "reasons": list(entry.reasons)}
                        for key, section in sorted(index.items())
                        for entry in section.checkpoints if entry.name == name],
        })
    # the one load_latest picks: ranked as it ranks them, the first that would load (with
    # --no-verify this checks candidates until one passes, exactly as load_latest does)
    if verify:
        chosen = next((row["path"] for row in rows if row["valid"]), None)
    else:
        pick = first_valid(candidates)
        chosen = None if pick is None else str(pick.path)
    for row in rows:
        row["latest"] = row["path"] == chosen
    return rows


def _kept_text(row: Mapping[str, Any]) -> str:
    if row["kept_by"]:  # one reason a line
        return "\n".join(reason for kept in row["kept_by"]
                         for reason in kept["reasons"] or [kept["callback"]])
    if row["superseded"]:
        return "superseded: removal pending"
    return "not in index"


def _size_text(size: int | None) -> str:
    if size is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _print_listing(console: Console, directory: str, rows: list[dict[str, Any]],
                   verify: bool) -> None:
    if not rows:
        console.print(f"no checkpoints in {directory}")
        return
    keys = list(dict.fromkeys(key for row in rows for key in row["metrics"]))
    count = f"{len(rows)} checkpoint" + ("" if len(rows) == 1 else "s")
    table = Table(title=f"{directory}  ({count})", box=box.SIMPLE_HEAD,
                  caption="* = the one load_latest picks" + ("" if verify else
                          "; --no-verify: only integrity records were read"))
    table.add_column("", justify="center", no_wrap=True)
    table.add_column("name", no_wrap=True, min_width=max(len(row["name"]) for row in rows))
    for column in ("epoch", "step", *keys, "size"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("kept because", ratio=1)
    for row in rows:
        if not row["valid"]:
            status = "[red]CORRUPT[/red]"
        elif row["verified"]:
            status = "[green]valid[/green]"
        else:
            status = "record ok"
        metrics = [f"{row['metrics'][key]:.4g}" if isinstance(row["metrics"].get(key), float)
                   else str(row["metrics"].get(key, "")) for key in keys]
        table.add_row("*" if row["latest"] else "", row["name"],
                      "" if row["epoch"] is None else str(row["epoch"]),
                      "" if row["step"] is None else str(row["step"]), *metrics,
                      _size_text(row["size"]), status, _kept_text(row))
    console.print(table)
    for row in rows:
        if row["problem"]:
            console.print(f"[red]{row['name']}[/red]: {row['problem']}")


def _list(directory: str, console: Console, as_json: bool, verify: bool) -> int:
    remote = is_url(directory)  # object storage (docs/object-storage.md)
    if not remote and not Path(directory).is_dir():
        Console(stderr=True).print(f"[red]error:[/red] {directory!r} is not a directory")
        return 1
    errors = Console(stderr=True)
    logger = logging.getLogger("nnhandler.cli")
    handler = _ConsoleWarnings(errors)
    logger.addHandler(handler)
    try:
        if remote:
            from .remote_cli import list_url

            rows = list_url(directory, verify=verify, keys=LIST_METRICS, logger=logger)
        else:
            rows = list_directory(directory, verify=verify, logger=logger)
    except (CheckpointError, OSError, ValueError) as error:  # a store that cannot be reached
        Console(stderr=True).print(f"[red]error:[/red] {error}")
        return 1
    finally:
        logger.removeHandler(handler)
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        if not remote and not (Path(directory) / INDEX_FILE).exists():
            console.print(f"(no retention index {INDEX_FILE} in {directory})")
        _print_listing(console, directory, rows, verify)
    return 0 if all(row["valid"] for row in rows) else 1


class _ConsoleWarnings(logging.Handler):
    """Warnings while listing (an unreadable index) go to stderr, so ``--json`` stays clean."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {record.getMessage()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnhandler",
                                     description="List, verify and inspect checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser(
        "list", help="every checkpoint in a directory: epoch, metrics, size, valid/corrupt, "
                     "the latest, why each is kept; exit 1 if any is corrupt")
    listing.add_argument("directory")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--no-verify", action="store_true",
                         help="read only each checkpoint's integrity record (fast)")
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
    if args.command == "list":
        return _list(args.directory, console, args.json, verify=not args.no_verify)
    if args.command == "verify":
        return _verify(args.paths, console, args.json)
    try:
        checkpoint = read_any_checkpoint(args.path, map_location="cpu",
                                         verify=not args.no_verify)
        info = describe(checkpoint)
    except (CheckpointError, OSError) as error:
        Console(stderr=True).print(f"[red]error:[/red] {error}")
        return 1
    except Exception as error:  # never a traceback for a bad file
        Console(stderr=True).print(f"[red]error:[/red] cannot inspect {args.path!r}: "
                                   f"{type(error).__name__}: {error}")
        return 1
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_inspection(console, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
