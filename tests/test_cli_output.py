"""The ``nnhandler`` command for a newcomer (issue 13, items 3, 5 and 7): ``verify`` and ``list``
start without torch, ``python -m nnhandler`` works, and ``list``/``inspect``/``verify`` keep the
marker and the key columns at 80 columns and when piped (nothing cut, no ``…``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dist_testing import child_environment
from nnh_testing import make_handler

import nnhandler
from nnhandler.cli import main

CK = Path("ck")
#: the rows of the fixture's listing: name -> (epoch, step)
ROWS = {"ep004.pth": ("4", "8"), "ep003.pth": ("3", "6"), "ep002.pth": ("2", "4"),
        "a_checkpoint_saved_by_hand_with_a_long_name.pth": ("1", "2")}
LATEST = "ep004.pth"


@pytest.fixture
def listing(tmp_path: Path) -> Path:
    """ck/: ep002..ep004 (keep_last=3, so the index gives reasons) and a long-named save of
    epoch 1 by hand; metrics loss, val_loss, val_mae."""
    handler = make_handler(n=16)
    handler.train(epochs=1, seed=1, progress_bar=False)
    handler.save(CK / "a_checkpoint_saved_by_hand_with_a_long_name.pth")
    handler.auto_save(1, CK, name="ep{epoch:03d}", keep_last=3)
    handler.train(epochs=3, progress_bar=False)
    return tmp_path / CK


def run_cli(*arguments: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    """``python -m nnhandler ARGUMENTS`` with its output piped (not a terminal)."""
    env = {**child_environment(), "COLUMNS": str(columns), "TTY_COMPATIBLE": "0"}
    env.pop("FORCE_COLOR", None)
    return subprocess.run([sys.executable, "-m", "nnhandler", *arguments], capture_output=True,
                          text=True, timeout=120, env=env, check=False)


def at_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                  columns: int, *arguments: str) -> tuple[int, str]:
    """``nnhandler ARGUMENTS`` in this process, its console told it is a terminal of
    ``columns`` (rich reads ``TTY_COMPATIBLE`` and ``COLUMNS``), without colours."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setenv("NO_COLOR", "1")
    capsys.readouterr()
    code = main(list(arguments))
    return code, ANSI.sub("", capsys.readouterr().out)  # the styles (bold, dim) NO_COLOR keeps


def piped(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
          *arguments: str) -> tuple[int, str]:
    """``nnhandler ARGUMENTS`` in this process, its output captured (not a terminal)."""
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    monkeypatch.setenv("COLUMNS", "80")
    capsys.readouterr()
    code = main(list(arguments))
    return code, capsys.readouterr().out


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# -- start-up: no torch for verify and list -------------------------------------------------------
PROBE = """
import json, sys
from nnhandler.cli import main
codes = [main(arguments) for arguments in json.loads(sys.argv[1])]
heavy = sorted(m for m in ("torch", "numpy") if m in sys.modules)
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_verify_and_list_never_import_torch(listing: Path) -> None:
    """verify (plain and --json) and list (verified, --no-verify, --json) in one process: none
    of them imports torch (nor numpy)."""
    commands = [["verify", str(listing / "ep004.pth"), str(listing / "ep003.pth")],
                ["verify", "--json", str(listing / "ep004.pth")], ["list", str(listing)],
                ["list", "--no-verify", str(listing)], ["list", "--json", str(listing)]]
    finished = subprocess.run([sys.executable, "-c", PROBE, json.dumps(commands)],
                              capture_output=True, text=True, timeout=120,
                              env=child_environment(), check=False)
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0] * len(commands), "heavy": []}


def test_importing_the_package_imports_no_torch_until_a_name_needs_it() -> None:
    """``import nnhandler`` and its torch-free names (errors, LoggingMode) leave torch out;
    the other names import it when first used (the next test)."""
    script = ("import sys, nnhandler\n"
              "from nnhandler import CheckpointError, LoggingMode, __version__\n"
              "print('torch' in sys.modules, CheckpointError.__name__, LoggingMode.FILE.value)\n")
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=120, env=child_environment(), check=False)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.split() == ["False", "CheckpointError", "file"]


def test_every_public_name_resolves_and_is_listed() -> None:
    for name in nnhandler.__all__:
        assert getattr(nnhandler, name) is not None, name
    assert set(nnhandler.__all__) <= set(dir(nnhandler))
    assert nnhandler.NNHandler is __import__("nnhandler.handler").handler.NNHandler
    with pytest.raises(AttributeError, match="'nnhandler' has no attribute 'NNHandlr'"):
        _ = nnhandler.NNHandlr  # type: ignore[attr-defined]


def test_python_dash_m_nnhandler_runs_the_command(listing: Path) -> None:
    finished = run_cli("verify", str(listing / "ep004.pth"))
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith("OK") and "(epoch 4)" in finished.stdout
    assert run_cli("--help").stdout.startswith("usage: nnhandler")
    broken = listing / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    assert run_cli("verify", str(broken)).returncode == 1


# -- list ------------------------------------------------------------------------------------------
def row_of(output: str, name: str) -> str:
    (line,) = [line for line in output.splitlines() if re.search(rf"(^|\s){name}(\s|$)", line)]
    return line


def assert_key_columns(output: str, shown_at: int | None) -> None:
    """Every row with its name, epoch, step and status; the marker on the latest only; the
    legend; nothing cut; at a terminal, no line wider than it."""
    assert "…" not in output
    for name, (epoch, step) in ROWS.items():
        cells = row_of(output, name).split()
        marker, rest = (cells[0], cells[1:]) if cells[0] == "*" else ("", cells)
        assert (marker == "*") == (name == LATEST), cells
        assert rest[:3] == [name, epoch, step], cells
        assert "valid" in rest, cells
    assert "* = the one load_latest picks" in output
    if shown_at is not None:
        assert max(len(line) for line in output.splitlines()) <= shown_at


def test_list_piped_prints_every_column_in_full(listing: Path) -> None:
    finished = run_cli("list", str(listing))
    assert finished.returncode == 0, finished.stderr
    assert_key_columns(finished.stdout, shown_at=None)
    header = row_of(finished.stdout, "name")
    assert header.split() == ["name", "epoch", "step", "loss", "val_loss", "size", "status",
                              "kept", "because"]
    assert "latest 1/3" in row_of(finished.stdout, LATEST)
    by_hand = "a_checkpoint_saved_by_hand_with_a_long_name.pth"
    assert row_of(finished.stdout, by_hand).endswith("not in index")


@pytest.mark.parametrize("columns", [80, 100, 200], ids=["80-columns", "100-columns",
                                                         "200-columns"])
def test_list_at_a_narrow_terminal_drops_low_value_columns_first(
        listing: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        columns: int) -> None:
    code, out = at_a_terminal(monkeypatch, capsys, columns, "list", str(listing))
    assert code == 0
    assert_key_columns(out, shown_at=columns)
    hidden = re.search(r"not shown at (\d+) columns: ([\w ,]+?) \(", " ".join(out.split()))
    if columns == 200:
        assert hidden is None
    else:
        assert hidden is not None and hidden.group(1) == str(columns)
        assert hidden.group(2).split(", ")[0] == "size"  # the first to go


def test_list_narrower_than_its_key_columns_prints_plain_lines(
        listing: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out = at_a_terminal(monkeypatch, capsys, 30, "list", str(listing))
    assert code == 0
    assert_key_columns(out, shown_at=None)  # the terminal wraps the long lines; none is cut


# -- inspect and verify ---------------------------------------------------------------------------
INSPECT_FIELDS = ("epoch", "step", "logs.loss", "logs.val_mae", "config.model_class",
                  "nnh_testing:TinyNet", "config.train_settings", "'seed': 1", "components",
                  "model", "optimizer", "rng")


def test_inspect_piped_is_plain_and_complete(listing: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out = piped(monkeypatch, capsys, "inspect", str(listing / "ep004.pth"))
    assert code == 0
    assert "…" not in out and "│" not in out
    for field in INSPECT_FIELDS:
        assert field in out, field
    assert row_of(out, "epoch").split() == ["epoch", "4"]


def test_inspect_at_80_columns_wraps_long_values_and_cuts_none(
        listing: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out = at_a_terminal(monkeypatch, capsys, 80, "inspect", str(listing / "ep004.pth"))
    assert code == 0 and "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    unwrapped = " ".join(out.split())
    for field in INSPECT_FIELDS:
        assert field in unwrapped, field


@pytest.mark.parametrize("where", ["piped", "terminal-80"], ids=["piped", "terminal-80"])
def test_verify_prints_each_path_whole_on_its_line(
        listing: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        where: str) -> None:
    long_path = listing / "a_checkpoint_saved_by_hand_with_a_long_name.pth"
    broken = listing / "broken_checkpoint_with_a_name_long_enough_to_pass_80_columns.pth"
    data = bytearray(long_path.read_bytes())
    data[len(data) // 2] ^= 0x10
    broken.write_bytes(bytes(data))
    arguments = ("verify", str(long_path), str(broken))
    if where == "piped":
        code, out = piped(monkeypatch, capsys, *arguments)
    else:
        code, out = at_a_terminal(monkeypatch, capsys, 80, *arguments)
    assert code == 1
    first, second = out.splitlines()  # one line each: the terminal wraps them, not we
    assert first == f"OK      {long_path} (epoch 1)"
    assert second.startswith(f"CORRUPT {broken}: ") and "…" not in second
