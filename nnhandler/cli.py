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
import io
import json
import logging
import os
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .checkpoint.discovery import (
    check_candidate,
    first_valid,
    list_checkpoints,
    read_index_or_warn,
    vanished,
)
from .checkpoint.format import Checkpoint
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
    """Number of tensors and their bytes inside a nested state (``inspect`` has read the
    checkpoint with torch, so importing it here costs nothing more)."""
    import torch

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
    summary: list[tuple[str, str]] = [(key, str(info[key])) for key in (
        "layout", "format_version", "epoch", "step", "time", "world_size")]
    summary += [(f"{name} version", str(version)) for name, version in info["versions"].items()]
    summary += [(f"logs.{name}", f"{value:.6g}" if isinstance(value, float) else str(value))
                for name, value in info["logs"].items()]
    if info["mid_epoch"] is not None:
        mid = info["mid_epoch"]
        pending = ", pending gradients" if mid["pending_gradients"] else ""
        summary.append(("mid-epoch", f"epoch {mid['epoch']} after {mid['batches_done']} "
                                     f"batches ({mid['reason']}{pending})"))
    summary += [(f"config.{name}", str(value)) for name, value in info["config"].items()]
    components = [(key, str(stats["tensors"]), f"{stats['bytes']:,}")
                  for key, stats in info["components"].items()]
    if not console.is_terminal:  # piped: plain aligned text, nothing cut or wrapped
        console.out(info["path"], highlight=False)
        console.out(plain_table(("", ""), summary, header=False), highlight=False)
        console.out("\ncomponents", highlight=False)
        console.out(plain_table(("state key", "tensors", "bytes"), components), highlight=False)
        return
    table = Table(title=escape(info["path"]), show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # long values wrap; none is cut
    for key, value in summary:
        table.add_row(escape(key), escape(value))
    console.print(table)
    parts = Table(title="components")
    parts.add_column("state key", overflow="fold")
    for column in ("tensors", "bytes"):
        parts.add_column(column, justify="right", no_wrap=True)
    for key, count, size in components:
        parts.add_row(escape(key), count, size)
    console.print(parts)


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *,
                header: bool = True) -> str:
    """``rows`` as text columns separated by two spaces, each as wide as its widest cell: what
    ``nnhandler`` prints when its output is not a terminal (nothing is cut or wrapped)."""
    lines = [tuple(headers), *rows] if header else list(rows)
    if not lines:
        return ""
    widths = [max(len(line[column]) for line in lines) for column in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)
                               ).rstrip() for line in lines)


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
        for result in results:  # one line each, never wrapped here (a terminal wraps it)
            label, path = _VERIFY_LABELS[result["kind"]], escape(result["path"])
            if result["kind"] == "checkpoint":
                text = f"{label}{path} (epoch {result['epoch']})"
            elif result["kind"] == "export":
                text = f"{label}{path} ({escape(result['detail'])})"
            else:
                text = f"{label}{path}: {escape(result['error'])}"
            console.print(text, soft_wrap=True, highlight=False)
    return 0 if all(result["ok"] for result in results) else 1


#: log keys shown for every checkpoint by ``list`` (plus each monitored key of the index)
LIST_METRICS = ("loss", "val_loss")


def list_directory(directory: str | Path, *, verify: bool = True,
                   logger: logging.Logger | None = None) -> list[dict[str, Any]]:
    """One JSON-ready row per checkpoint in ``directory``, in the order ``load_latest`` ranks
    them (newest first): ``name``, ``path``, ``epoch``, ``step``, ``batch`` (a checkpoint
    written inside an epoch by ``every_n_steps``/``every_seconds``: the batches done of the
    epoch after ``epoch``; ``None`` at an epoch's end), ``time``, ``metrics``
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
            "batch": logs.get("batch") if type(logs.get("batch")) is int else None,
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


#: ``list`` columns that stay at any width; the others go, in :data:`_DROP_ORDER`, when the
#: table does not fit the terminal (named under the table; ``--json`` has everything)
_KEY_COLUMNS = ("", "name", "epoch", "step", "batch", "status")
_KEPT = "kept because"


def _listing_cells(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, str]]:
    """Each row's cells as plain text, by column name."""
    cells = []
    for row in rows:
        if not row["valid"]:
            status = "CORRUPT"
        elif row["verified"]:
            status = "valid"
        else:
            status = "record ok"
        metrics = {key: f"{row['metrics'][key]:.4g}" if isinstance(row["metrics"].get(key), float)
                   else str(row["metrics"].get(key, "")) for key in keys}
        cells.append({"": "*" if row["latest"] else "", "name": row["name"],
                      "epoch": "" if row["epoch"] is None else str(row["epoch"]),
                      "step": "" if row["step"] is None else str(row["step"]),
                      "batch": "" if row["batch"] is None else str(row["batch"]), **metrics,
                      "size": _size_text(row["size"]), "status": status,
                      _KEPT: _kept_text(row)})
    return cells


def _print_listing(console: Console, directory: str, rows: list[dict[str, Any]],
                   verify: bool) -> None:
    if not rows:
        console.print(f"no checkpoints in {escape(directory)}", soft_wrap=True)
        return
    keys = list(dict.fromkeys(key for row in rows for key in row["metrics"]))
    count = f"{len(rows)} checkpoint" + ("" if len(rows) == 1 else "s")
    legend = "* = the one load_latest picks" + (
        "" if verify else "; --no-verify: only integrity records were read")
    # batches done in the epoch: only mid-epoch (step / time / emergency) checkpoints have one
    batch = ["batch"] if any(row["batch"] is not None for row in rows) else []
    columns = ["", "name", "epoch", "step", *batch, *keys, "size", "status", _KEPT]
    cells = _listing_cells(rows, keys)
    if console.is_terminal:
        _print_listing_table(console, f"{directory}  ({count})", columns, keys, cells, legend)
    else:  # piped: every column in full, one line per checkpoint (reasons joined)
        console.out(f"{directory}  ({count})", highlight=False)
        console.out(plain_table(columns, [[row[column].replace("\n", "; ") for column in columns]
                                          for row in cells]), highlight=False)
        console.out(legend, highlight=False)
    for row in rows:
        if row["problem"]:
            console.print(f"[red]{escape(row['name'])}[/red]: {escape(row['problem'])}",
                          soft_wrap=True, highlight=False)


def _print_listing_table(console: Console, title: str, columns: list[str], keys: list[str],
                         cells: list[dict[str, str]], legend: str) -> None:
    """The rich table at a terminal, as wide as the terminal: where the full table does not fit,
    the size goes first, then the retention reasons, then the metrics from the right; the
    marker, name, epoch, step and status always stay, and the caption names what went."""
    drop_order = ["size", _KEPT, *reversed(keys)]
    shown = list(columns)
    dropped: list[str] = []
    while True:
        caption = legend + (f"\nnot shown at {console.width} columns: {', '.join(dropped)} "
                            "(a wider terminal, or --json)" if dropped else "")
        table = _listing_table(title, shown, cells, caption)
        if _natural_width(table) <= console.width:
            console.print(table)
            return
        if not drop_order:
            break
        dropped.append(drop_order.pop(0))
        shown.remove(dropped[-1])
    # narrower than the key columns themselves: plain lines, which the terminal wraps
    console.out(title, highlight=False)
    console.out(plain_table(shown, [[row[column] for column in shown] for row in cells]),
                highlight=False)
    console.out(caption, highlight=False)


def _listing_table(title: str, columns: list[str], cells: list[dict[str, str]],
                   caption: str) -> Table:
    table = Table(title=escape(title), box=box.SIMPLE_HEAD, caption=caption)
    for column in columns:
        if column == "name":  # too long for the terminal even alone: it folds, never is cut
            table.add_column(column, overflow="fold")
            continue
        table.add_column(column, no_wrap=True, justify="left" if column in (
            "status", _KEPT) else "center" if column == "" else "right")
    styles = {"CORRUPT": "[red]CORRUPT[/red]", "valid": "[green]valid[/green]"}
    for row in cells:
        table.add_row(*(styles.get(row[column], row[column]) if column == "status"
                        else escape(row[column]) for column in columns))
    return table


def _natural_width(table: Table) -> int:
    """How wide ``table`` is with nothing wrapped or cut (its caption and title may wrap):
    rendered on a console too wide to constrain it."""
    probe = Console(width=100_000, file=io.StringIO(), color_system=None)
    table.title, title = None, table.title
    table.caption, caption = None, table.caption
    try:
        with probe.capture() as captured:
            probe.print(table)
    finally:
        table.title, table.caption = title, caption
    return max(cell_len(line.rstrip()) for line in captured.get().splitlines())


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
                                   f"{type(error).__name__}: {error}", soft_wrap=True)
        return 1
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_inspection(console, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
