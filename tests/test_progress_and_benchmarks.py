"""The progress bar hands batches to rich in bunches but never loses one, and every benchmark
section runs end to end (one round; the figures themselves are not judged here)."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from nnh_testing import make_handler
from rich.console import Console

import benchmarks.__main__ as benchmarks_main
from benchmarks import (
    end_to_end,
    load_cost,
    loop_overhead,
    remote_upload,
    save_cost,
    save_memory,
    step_trigger,
)
from benchmarks._common import Row
from nnhandler.logging import TrainingProgress


def terminal(width: int = 80) -> tuple[Console, io.StringIO]:
    screen = io.StringIO()
    return Console(file=screen, width=width, force_terminal=True, color_system=None), screen


@pytest.mark.parametrize("batches", [1, 7, 1000])
def test_every_batch_reaches_the_bar_by_the_end_of_the_epoch(batches: int) -> None:
    with TrainingProgress(True, start_epoch=0, end_epoch=2, console=terminal()[0]) as bar:
        for epoch in (1, 2):
            bar.start_epoch(epoch, batches)
            for _ in range(batches):
                bar.advance_batch()
            bar.end_epoch("")
            assert bar._progress is not None and bar._batches is not None
            task = next(t for t in bar._progress.tasks if t.id == bar._batches)
            assert task.completed == batches
        assert bar._epochs is not None
        epochs = next(t for t in bar._progress.tasks if t.id == bar._epochs)
        assert epochs.completed == 2


def test_a_disabled_bar_does_nothing() -> None:
    with TrainingProgress(False, start_epoch=0, end_epoch=1) as bar:
        bar.start_epoch(1, 3)
        bar.advance_batch()
        bar.end_epoch("")
        assert bar._progress is None


STATUS = "loss=0.1234  val_loss=0.2345  mae=0.3456  val_mae=0.4567  lr=0.001"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def final_frame(screen: str) -> list[str]:
    """What a terminal shows at the end: each line as its last redraw left it."""
    lines = []
    for line in ANSI.sub("", screen).split("\n"):
        lines.append(line.split("\r")[-1].rstrip())
    return [line for line in lines if line]


def run_epochs(bar: TrainingProgress, epochs: range, batches: int) -> None:
    for epoch in epochs:
        bar.start_epoch(epoch, batches)
        for _ in range(batches):
            bar.advance_batch()
        bar.end_epoch(STATUS)


@pytest.mark.parametrize("width", [80, 140], ids=["80-columns", "140-columns"])
def test_the_live_bar_fits_the_terminal_with_its_counters_whole(width: int) -> None:
    console, screen = terminal(width)
    with TrainingProgress(True, start_epoch=2, end_epoch=10, console=console) as bar:
        run_epochs(bar, range(3, 5), batches=100)
    epoch_row, batch_row = final_frame(screen.getvalue())[-2:]
    assert max(len(epoch_row), len(batch_row)) <= width
    assert epoch_row.split()[:2] == ["epoch", "4/10"] and "loss=0.1234" in epoch_row
    assert batch_row.split()[:2] == ["batch", "100/100"]
    assert re.search(r"\d:\d\d:\d\d", epoch_row) and re.search(r"\d:\d\d:\d\d", batch_row)
    if width >= 140:
        assert STATUS in epoch_row  # room for all of it
    else:
        assert epoch_row.endswith("…")  # only the status gives way


def test_not_at_a_terminal_each_epoch_is_one_plain_line() -> None:
    screen = io.StringIO()
    console = Console(file=screen, width=80, force_terminal=False)
    with TrainingProgress(True, start_epoch=0, end_epoch=3, console=console) as bar:
        run_epochs(bar, range(1, 4), batches=7)
    lines = screen.getvalue().splitlines()
    assert "\x1b" not in screen.getvalue() and len(lines) == 3
    for epoch, line in enumerate(lines, start=1):
        assert line.startswith(f"epoch {epoch}/3  7 batches  {STATUS}  "), line
        assert re.search(r"elapsed \d:\d\d:\d\d  eta \d:\d\d:\d\d$", line), line


def test_training_piped_logs_its_epochs_as_lines(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    handler = make_handler(n=16)
    handler.train(epochs=2, progress_bar=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if re.match(r"epoch \d/2  ", line)]
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all("loss=" in line and "batches" in line for line in lines)
    assert "━" not in err


def check_rows(rows: list[Row]) -> None:
    assert rows
    for row in rows:
        assert row.baseline_value > 0 and row.ours_value >= 0
        assert math.isfinite(row.ratio)
        assert row.verdict == "" or row.verdict.startswith(("met", "MISSED"))


#: each section at a tiny size (the sizes of a real run are the modules' defaults)
TINY_SECTIONS: dict[str, Callable[[Path], list[Row]]] = {
    "loop": lambda _: loop_overhead.run(rounds=1),
    "steps": lambda _: step_trigger.run(rounds=1),
    "load": lambda _: load_cost.run(rounds=1),
    "save": lambda where: save_cost.run_save(rounds=1, sizes=(0.25,), counts=(3, 40),
                                             directory=where),
    "async": lambda where: save_cost.run_async(rounds=1, sizes=(0.25,), counts=(3, 40),
                                               directory=where),
    "e2e": lambda where: end_to_end.run(rounds=1, epochs=2, epoch_seconds=0.02,
                                        directory=where, shapes=(
        end_to_end.Shape("tiny MLP", end_to_end.WideMLP, 16, {"width": 16, "hidden": 32}),
        end_to_end.Shape("many tensors", loop_overhead.ManyLayers, 8,
                         {"width": 8, "layers": 20}, threads=1))),
    "memory": lambda where: save_memory.run(megabytes=2, counts=(20,), directory=where),
    "remote": lambda where: remote_upload.run(rounds=1, megabytes=2, directory=where),
}


@pytest.mark.slow
@pytest.mark.parametrize("section", list(TINY_SECTIONS))
def test_benchmark_section_runs(section: str, tmp_path: Path) -> None:
    rows = TINY_SECTIONS[section](tmp_path)
    check_rows(rows)
    assert {row.section for row in rows} <= {section, "loop overhead"}
    if section != "loop":
        assert not [path for path in tmp_path.rglob("*") if path.is_file()
                    and path.suffix in (".pth", ".bin")]  # benchmark files are removed


#: sections with a test file of their own
TESTED_ELSEWHERE = {"peers": "tests/test_peers_benchmark.py"}


def test_every_section_of_the_command_is_tested() -> None:
    assert set(TINY_SECTIONS) | set(TESTED_ELSEWHERE) == set(benchmarks_main.SECTIONS)


def test_the_async_verdict_reports_the_stretch_goal() -> None:
    row = Row("async", "case", "torch.save", 1.0, 0.08, target=0.10, stretch=0.06)
    assert row.verdict == "met (<= 0.1x); stretch <= 0.06x missed"
    throughput = Row("save", "case", "raw", 100.0, 70.0, unit="MB/s", target=0.8,
                     direction="min")
    assert throughput.verdict == "MISSED (>= 0.8x)"


def test_results_replace_only_the_generated_block(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    benchmarks_main.write_results(results, "table one")
    assert results.read_text().count("table one") == 1
    text = results.read_text() + "\n## Analysis\n\nwritten by hand\n"
    results.write_text("# Results\n\n" + text)
    benchmarks_main.write_results(results, "table two")
    updated = results.read_text()
    assert "table one" not in updated and updated.count("table two") == 1
    assert updated.startswith("# Results\n\n" + benchmarks_main.BEGIN)
    assert updated.endswith("## Analysis\n\nwritten by hand\n")
    unmarked = tmp_path / "notes.md"
    unmarked.write_text("notes\n")
    benchmarks_main.write_results(unmarked, "table")
    assert unmarked.read_text().endswith("\n\nnotes\n") and "table" in unmarked.read_text()


def test_the_table_has_one_line_per_row() -> None:
    rows = [Row("save", "10 MB", "torch.save", 2.0, 1.0, target=1.0),
            Row("memory", "200 MB", "state size", 200.0, 210.0, unit="MB", target=1.1)]
    table = benchmarks_main.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "| 0.500x | met (<= 1x) |" in lines[2] and "| 1.050x | met (<= 1.1x) |" in lines[3]
