"""Fault injection: SIGKILL real training processes at random moments, many during writes.

    python benchmarks/fault_injection.py [--kills 60] [--seed 0] [--width 640] [--json out.json]

For each ``overwrite`` mode a campaign runs in its own directory. Every round forks a training
process that builds a handler, auto-saves every epoch (a model of some MB, so one save takes
tens of milliseconds) and resumes with ``train(until_epoch=..., resume="latest")``; the driver
kills it with SIGKILL either at a random moment after its start or a random fraction of a save
after it announced a save. After every kill a forked checker looks at the directory:

* the newest valid checkpoint (``find_latest_valid``) loads with ``NNHandler.load_latest`` and
  verifies, and its epoch is at least the newest save the killed process reported complete;
* every visible ``*.pth`` verifies; no temp file is named like a checkpoint or listed by
  ``list_checkpoints``;
* with ``overwrite=True`` at least one valid checkpoint exists once the first save completed;
* temp files the kill left behind are gone once the next process has started training
  (``on_train_begin`` removes stale temp files); a final, uninterrupted run must finish.

Only forked children ever run torch: the driver imports torch (the expensive part of a
process start) and forks, so a round costs a fork, not an interpreter start. Each child runs
with one thread. Every wait is bounded, so a hang is reported as a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import select
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: children stay 1-thread

import torch
import torch._dynamo  # imported lazily by optimizers: 1 s per child otherwise
from torch import nn
from torch.utils.data import TensorDataset

from nnhandler import Callback, NNHandler
from nnhandler.checkpoint.discovery import find_latest_valid, list_checkpoints
from nnhandler.checkpoint.integrity import verify_file
from nnhandler.checkpoint.writer import TEMP_INFIX, is_temp_file
from nnhandler.errors import CheckpointError

__all__ = ["CampaignConfig", "FaultNet", "ModeReport", "format_table", "main", "run_campaign"]

NAME_TEMPLATE = "fi_ep{epoch:05d}"
FOREVER = 10**6  # until_epoch of a process that is meant to be killed


class FaultNet(nn.Module):
    """``depth`` square Linear layers: width 640, depth 4 is 1.6 M parameters (6.6 MB; with
    Adam's moments a checkpoint is about 20 MB)."""

    def __init__(self, width: int = 640, depth: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


@dataclass(frozen=True)
class CampaignConfig:
    kills: int = 30  # per overwrite mode
    seed: int = 0
    width: int = 640
    depth: int = 4
    write_share: float = 0.5  # share of kills aimed at a save in progress
    #: "random moment" kills land uniformly in [0, span] after start, where span is this or,
    #: on a slower (loaded) machine, twice the median time processes took to their first
    #: completed save, so that the campaign keeps the same share of kills after a save
    random_span_s: float = 0.6
    keep: int = 3  # overwrite=False: older valid checkpoints pruned after each check
    child_timeout_s: float = 120.0  # bound on every wait for a child


@dataclass
class KillRecord:
    index: int
    strategy: str
    pid: int
    alive_s: float
    saves_by_process: int
    newest_completed_before: int | None
    latest_epoch: int | None
    valid_files: int
    temp_left: list[str]
    during_write: bool
    loaded_verified: bool
    problems: list[str] = field(default_factory=list)


@dataclass
class ModeReport:
    overwrite: bool
    kills: int = 0
    during_write: int = 0
    in_replace_window: int = 0  # overwrite=True: killed between the rename and the removal
    before_first_save: int = 0
    loaded_verified: int = 0
    lost_saves: int = 0
    temp_left: int = 0
    temp_cleaned: int = 0
    temp_mistaken: int = 0
    invalid_visible: int = 0
    min_valid_after_first_save: int | None = None
    max_pth_files: int = 0
    saves_completed: int = 0
    median_save_ms: float | None = None
    checkpoint_mb: float | None = None
    final_run_ok: bool = False
    files_after_final_run: int | None = None
    final_epoch: int | None = None
    wall_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    records: list[KillRecord] = field(default_factory=list)


# -- children (everything below runs only after a fork) ------------------------------------------
class _Reporter(Callback):
    """Tells the driver, through a pipe, when a save starts and when one is complete."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _send(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def on_train_begin(self, start_epoch: int, **kwargs: Any) -> None:
        self._send(f"B {start_epoch}")

    def on_epoch_end(self, epoch: int, **kwargs: Any) -> None:  # runs before the auto-save
        self._send(f"S {epoch}")

    def on_checkpoint_saved(self, epoch: int, path: Any, **kwargs: Any) -> None:
        self._send(f"C {epoch} {Path(path).name}")


def _child_setup(log_path: Path) -> None:
    torch.set_num_threads(1)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _train_child(config: CampaignConfig, directory: Path, overwrite: bool, until_epoch: int,
                 fd: int) -> None:
    torch.manual_seed(config.seed)
    handler = NNHandler(FaultNet, device="cpu", width=config.width, depth=config.depth,
                        log_file=directory.parent / "nnhandler.log")
    handler.set_optimizer(torch.optim.Adam, lr=1e-4)
    handler.set_loss_fn(nn.MSELoss)
    generator = torch.Generator().manual_seed(config.seed)
    data = TensorDataset(torch.randn(16, config.width, generator=generator),
                         torch.randn(16, config.width, generator=generator))
    handler.set_train_loader(data, batch_size=16, shuffle=True)
    handler.add_callback(_Reporter(fd))
    handler.auto_save(interval=1, save_path=directory, name=NAME_TEMPLATE, overwrite=overwrite)
    handler.train(until_epoch=until_epoch, resume="latest", seed=config.seed, progress_bar=False)


def inspect_directory(directory: Path, config: CampaignConfig) -> dict[str, Any]:
    """What a user would find after a crash (run in a forked child; returns plain data)."""
    names = sorted(os.listdir(directory))
    temps = [n for n in names if is_temp_file(directory / n)]
    pth = [n for n in names if n.endswith(".pth")]
    result: dict[str, Any] = {
        "temps": temps,
        "pth": pth,
        # a temp file must never look like a checkpoint, nor be offered as one
        "temp_named_pth": [n for n in pth if is_temp_file(directory / n) or TEMP_INFIX in n],
        "temp_listed": [c.path.name for c in list_checkpoints(directory)
                        if c.path.name in temps or TEMP_INFIX in c.path.name],
        "valid": {},
        "invalid": {},
        "latest": None,
        "latest_epoch": None,
        "loaded_epoch": None,
        "load_error": None,
    }
    for name in pth:
        try:
            result["valid"][name] = verify_file(directory / name).epoch
        except (CheckpointError, OSError) as error:
            result["invalid"][name] = str(error)
    latest = find_latest_valid(directory, logging.getLogger("fault_injection"))
    if latest is not None:
        result["latest"] = latest.name
        result["latest_epoch"] = verify_file(latest).epoch
        try:
            handler = NNHandler.load_latest(directory, device="cpu", model_class=FaultNet,
                                            verify=True)
            result["loaded_epoch"] = handler.epoch
        except Exception as error:  # reported, never raised: the driver records it
            result["load_error"] = f"{type(error).__name__}: {error}"
    return result


def _check_child(directory: Path, config: CampaignConfig, fd: int) -> None:
    os.write(fd, json.dumps(inspect_directory(directory, config)).encode())


# -- driver ---------------------------------------------------------------------------------------
def _fork(target: Callable[[int], None], log_path: Path) -> tuple[int, int]:
    """Fork a child running ``target(write_fd)``; returns (pid, read_fd)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_fd)
            _child_setup(log_path)
            target(write_fd)
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    return pid, read_fd


def _read_all(read_fd: int, deadline: float) -> bytes | None:
    """Everything until EOF, or ``None`` at the deadline."""
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([read_fd], [], [], remaining)
        if ready:
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def _wait(pid: int, deadline: float) -> int | None:
    """The child's wait status, or ``None`` (after killing it) at the deadline."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.005)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _writer_pid(name: str) -> int | None:
    try:
        return int(name.rsplit(TEMP_INFIX, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return None


class _Campaign:
    def __init__(self, config: CampaignConfig, root: Path, overwrite: bool,
                 rng: random.Random) -> None:
        self.config = config
        self.overwrite = overwrite
        self.rng = rng
        self.directory = root / f"overwrite_{overwrite}"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.logs = root / f"logs_overwrite_{overwrite}"
        self.logs.mkdir(exist_ok=True)
        self.report = ModeReport(overwrite=overwrite)
        self.newest_completed: int | None = None
        self.pending_stale: set[str] = set()
        self.save_durations: list[float] = []
        self.first_save_after: list[float] = []  # seconds from a process's start

    def fail(self, message: str) -> None:
        self.report.failures.append(f"overwrite={self.overwrite}: {message}")

    # one process: start, watch its messages, kill it (or let it finish)
    def run_process(self, index: int, strategy: str, until_epoch: int,
                    kill: bool) -> tuple[int, float, int, int | None]:
        """Returns (pid, seconds alive, saves it completed, wait status or None)."""
        log_path = self.logs / f"train_{index:03d}.log"
        started = time.monotonic()
        pid, read_fd = _fork(
            lambda fd: _train_child(self.config, self.directory, self.overwrite, until_epoch, fd),
            log_path,
        )
        hard_deadline = started + self.config.child_timeout_s
        kill_at: float | None = None
        if kill and strategy == "random":
            span = self.config.random_span_s
            if self.first_save_after:
                span = max(span, 2 * statistics.median(self.first_save_after))
            kill_at = started + self.rng.uniform(0.0, span)
        target_saves = self.rng.randint(1, 3) if index > 0 else 2
        est_save = statistics.median(self.save_durations) if self.save_durations else 0.03
        buffer = b""
        saves_started = 0
        saves = 0
        save_started_at = 0.0
        first_s_seen = False
        eof = False
        status: int | None = None
        try:
            while not eof:
                now = time.monotonic()
                if kill_at is not None and now >= kill_at:
                    break
                if now >= hard_deadline:
                    self.fail(f"process {index} made no progress within "
                              f"{self.config.child_timeout_s} s; log:\n{_tail(log_path)}")
                    break
                timeout = (kill_at if kill_at is not None else hard_deadline) - now
                ready, _, _ = select.select([read_fd], [], [], max(0.0, timeout))
                if not ready:
                    continue
                chunk = os.read(read_fd, 1 << 16)
                if not chunk:
                    eof = True
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    kind, _, rest = line.decode().partition(" ")
                    if kind == "S":
                        saves_started += 1
                        save_started_at = time.monotonic()
                        if not first_s_seen:
                            first_s_seen = True
                            self.check_stale_cleaned(pid)
                        if kill and strategy == "write" and saves_started == target_saves:
                            kill_at = save_started_at + self.rng.uniform(0.0, 1.5 * est_save)
                    elif kind == "C":
                        saves += 1
                        if saves == 1:
                            self.first_save_after.append(time.monotonic() - started)
                        self.save_durations.append(time.monotonic() - save_started_at)
                        epoch = int(rest.split(" ", 1)[0])
                        self.newest_completed = max(self.newest_completed or 0, epoch)
            if kill and not eof:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            status = _wait(pid, time.monotonic() + self.config.child_timeout_s)
            alive = time.monotonic() - started
            # messages written before the kill are still in the pipe
            rest_data = _read_all(read_fd, time.monotonic() + self.config.child_timeout_s)
            for text in (buffer + (rest_data or b"")).decode().splitlines():
                kind, _, rest = text.partition(" ")
                if kind == "C":
                    saves += 1
                    epoch = int(rest.split(" ", 1)[0])
                    self.newest_completed = max(self.newest_completed or 0, epoch)
                elif kind == "S" and not first_s_seen:
                    first_s_seen = True  # too late to look: the next start is checked instead
        finally:
            os.close(read_fd)
        if kill and eof:
            self.fail(f"process {index} ended by itself before the kill (status {status}); "
                      f"log:\n{_tail(log_path)}")
        return pid, alive, saves, status

    def check_stale_cleaned(self, pid: int) -> None:
        """Called once a process has finished ``on_train_begin``: no temp file of a dead
        writer may be left."""
        for name in os.listdir(self.directory):
            if TEMP_INFIX in name and _writer_pid(name) != pid:
                self.fail(f"stale temp file {name} survived the start of process {pid}")
        gone = {n for n in self.pending_stale if not (self.directory / n).exists()}
        self.report.temp_cleaned += len(gone)
        self.pending_stale -= gone

    def check(self, index: int) -> dict[str, Any] | None:
        pid, read_fd = _fork(lambda fd: _check_child(self.directory, self.config, fd),
                             self.logs / f"check_{index:03d}.log")
        deadline = time.monotonic() + self.config.child_timeout_s
        try:
            data = _read_all(read_fd, deadline)
        finally:
            os.close(read_fd)
        status = _wait(pid, deadline)
        if data is None or status is None or not os.WIFEXITED(status) or os.WEXITSTATUS(status):
            self.fail(f"checker after kill {index} failed (status {status}); log:\n"
                      f"{_tail(self.logs / f'check_{index:03d}.log')}")
            return None
        result: dict[str, Any] = json.loads(data)
        return result

    def judge(self, record: KillRecord, found: dict[str, Any]) -> None:
        report = self.report
        problems = record.problems
        if found["temp_named_pth"] or found["temp_listed"]:
            report.temp_mistaken += len(found["temp_named_pth"]) + len(found["temp_listed"])
            problems.append(f"temp file taken for a checkpoint: {found['temp_named_pth']} "
                            f"{found['temp_listed']}")
        if found["invalid"]:
            report.invalid_visible += len(found["invalid"])
            problems.append(f"visible .pth that does not verify: {found['invalid']}")
        valid = found["valid"]
        record.valid_files = len(valid)
        report.max_pth_files = max(report.max_pth_files, len(found["pth"]))
        latest_epoch = found["latest_epoch"]
        record.latest_epoch = latest_epoch
        expected = record.newest_completed_before
        if expected is None and latest_epoch is None:
            report.before_first_save += 1
        elif latest_epoch is None:
            problems.append(f"no valid checkpoint although epoch {expected} was saved")
        else:
            if found["loaded_epoch"] == latest_epoch and found["load_error"] is None:
                record.loaded_verified = True
                report.loaded_verified += 1
            else:
                problems.append(f"newest checkpoint {found['latest']} did not load: "
                                f"{found['load_error'] or found['loaded_epoch']}")
            if latest_epoch != max(valid.values()):
                problems.append(f"find_latest_valid chose epoch {latest_epoch}, newest valid "
                                f"is {max(valid.values())}")
            if expected is not None and latest_epoch < expected:
                report.lost_saves += 1
                problems.append(f"lost a completed save: newest valid epoch {latest_epoch} < "
                                f"{expected} reported complete")
            if expected is not None and latest_epoch > expected + 1:
                problems.append(f"epoch {latest_epoch} on disk, only {expected} was saved")
        if expected is not None or latest_epoch is not None:
            current = report.min_valid_after_first_save
            report.min_valid_after_first_save = (len(valid) if current is None
                                                 else min(current, len(valid)))
            if not valid:
                problems.append("no valid checkpoint left after the first save completed")
        if self.overwrite and len(valid) > 1:
            report.in_replace_window += 1
        left = [n for n in found["temps"] if _writer_pid(n) == record.pid]
        record.temp_left = left
        record.during_write = bool(left)
        report.during_write += bool(left)
        report.temp_left += len(left)
        self.pending_stale.update(left)
        for problem in problems:
            self.fail(f"kill {record.index} ({record.strategy}): {problem}")

    def prune(self, found: dict[str, Any]) -> None:
        """overwrite=False keeps every file: drop old ones (as a retention policy would)."""
        if self.overwrite:
            return
        ranked = sorted(found["valid"].items(), key=lambda item: item[1], reverse=True)
        for name, _ in ranked[self.config.keep:]:
            (self.directory / name).unlink(missing_ok=True)

    def run(self) -> ModeReport:
        started = time.monotonic()
        for index in range(self.config.kills):
            strategy = ("write" if index == 0 or self.rng.random() < self.config.write_share
                        else "random")
            pid, alive, saves, _ = self.run_process(index, strategy, FOREVER, kill=True)
            self.report.kills += 1
            self.report.saves_completed += saves
            record = KillRecord(
                index=index, strategy=strategy, pid=pid, alive_s=round(alive, 3),
                saves_by_process=saves,
                newest_completed_before=self.newest_completed, latest_epoch=None,
                valid_files=0, temp_left=[], during_write=False, loaded_verified=False,
            )
            found = self.check(index)
            if found is not None:
                self.judge(record, found)
                self.prune(found)
            self.report.records.append(record)
        self.final_run()
        if self.save_durations:
            self.report.median_save_ms = round(1000 * statistics.median(self.save_durations), 1)
        self.report.wall_s = round(time.monotonic() - started, 1)
        return self.report

    def final_run(self) -> None:
        """An uninterrupted resume of two epochs must finish, clean up and save."""
        before = self.newest_completed or 0
        found_before = self.check(10_000)
        start = (found_before or {}).get("latest_epoch") or 0
        _, _, _, status = self.run_process(10_001, "none", start + 2, kill=False)
        if status is None or not os.WIFEXITED(status) or os.WEXITSTATUS(status):
            self.fail(f"final resumed run failed (status {status}); log:\n"
                      f"{_tail(self.logs / 'train_10001.log')}")
            return
        found = self.check(10_002)
        if found is None:
            return
        self.report.final_epoch = found["latest_epoch"]
        if found["temps"]:
            self.fail(f"temp files left after a clean run: {found['temps']}")
        if self.pending_stale:
            self.fail(f"stale temp files never cleaned: {sorted(self.pending_stale)}")
        if found["latest_epoch"] == start + 2 == found["loaded_epoch"]:
            self.report.final_run_ok = True
        else:
            self.fail(f"final run: expected epoch {start + 2}, found {found['latest_epoch']} "
                      f"(loaded {found['loaded_epoch']}, {found['load_error']})")
        if start < before:
            self.fail(f"final run resumed from epoch {start} < {before}")
        self.report.files_after_final_run = len(found["pth"])
        if self.overwrite and len(found["pth"]) != 1:
            self.fail(f"overwrite=True should keep only the latest auto-save, found "
                      f"{found['pth']} (a file whose removal a kill interrupted stayed behind)")
        latest = found["latest"]
        if latest is not None:
            self.report.checkpoint_mb = round((self.directory / latest).stat().st_size / 1e6, 1)


def run_campaign(config: CampaignConfig, root: Path,
                 modes: tuple[bool, ...] = (False, True)) -> list[ModeReport]:
    """Run one campaign per ``overwrite`` mode under ``root``; returns their reports."""
    rng = random.Random(config.seed)
    return [_Campaign(config, root, overwrite, rng).run() for overwrite in modes]


FIGURES: tuple[tuple[str, str], ...] = (
    ("kills", "kills (SIGKILL)"),
    ("during_write", "kills that left a temp file (landed during a write)"),
    ("in_replace_window", "kills between rename and removal of the previous file"),
    ("before_first_save", "kills before any save had completed"),
    ("loaded_verified", "after a kill: newest checkpoint loaded + verified"),
    ("lost_saves", "after a kill: completed save lost"),
    ("invalid_visible", "visible .pth files that did not verify"),
    ("temp_mistaken", "temp files mistaken for checkpoints"),
    ("temp_left", "temp files left by kills"),
    ("temp_cleaned", "... removed at the next start"),
    ("min_valid_after_first_save", "fewest valid checkpoints after a kill"),
    ("max_pth_files", "most .pth files seen at once"),
    ("saves_completed", "saves completed"),
    ("median_save_ms", "median save duration (ms, as seen by the driver)"),
    ("checkpoint_mb", "checkpoint size (MB)"),
    ("final_run_ok", "uninterrupted resume at the end finished"),
    ("files_after_final_run", ".pth files after it"),
    ("wall_s", "wall time (s)"),
)


def format_table(reports: list[ModeReport]) -> str:
    header = ["figure", *[f"overwrite={r.overwrite}" for r in reports]]
    rows = [[label, *[str(getattr(r, key)) for r in reports]] for key, label in FIGURES]
    rows.append(["failures", *[str(len(r.failures)) for r in reports]])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=60, help="total, split over both modes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--write-share", type=float, default=0.5)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (kept)")
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    args = parser.parse_args(argv)
    config = CampaignConfig(kills=max(1, (args.kills + 1) // 2), seed=args.seed,
                            width=args.width, depth=args.depth, write_share=args.write_share)
    with contextlib.ExitStack() as stack:
        root = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        reports = run_campaign(config, root)
    print(f"fault injection: {sum(r.kills for r in reports)} kills, seed {config.seed}, "
          f"FaultNet(width={config.width}, depth={config.depth}), Adam, auto-save every epoch")
    print(format_table(reports))
    failures = [f for r in reports for f in r.failures]
    for failure in failures:
        print("FAILURE:", failure)
    if args.json is not None:
        args.json.write_text(json.dumps({"config": asdict(config),
                                         "reports": [asdict(r) for r in reports]}, indent=1))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
