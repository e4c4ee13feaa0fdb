"""``nnhandler list DIR``: one row per checkpoint with epoch, step, metrics, size, valid/corrupt,
the one ``load_latest`` picks and why the retention index keeps each; ``--json`` for scripts;
exit status 1 when a checkpoint is corrupt. Also the installed console script, once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dist_testing import child_environment
from nnh_testing import make_handler

from nnhandler import AutoSaveCallback, NNHandler
from nnhandler.checkpoint.index import INDEX_FILE
from nnhandler.cli import main

CK = Path("ck")
ROW_KEYS = {"name", "path", "epoch", "step", "batch", "time", "metrics", "size", "valid",
            "verified", "problem", "latest", "in_index", "superseded", "kept_by"}


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich reads the width from COLUMNS: wide enough that no cell of the table wraps."""
    monkeypatch.setenv("COLUMNS", "200")


def run_list(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what training printed before
    code = main(["list", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def json_rows(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, list[Any]]:
    code, out, _ = run_list(capsys, str(CK), "--json", *arguments)
    return code, json.loads(out)


def flip_a_bit(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture
def trained() -> NNHandler:
    """ck/: ep002, ep004, ep005 (keep_every=2 with keep_last=1), best_ep004 (and best_ep002
    if it was better: keep_best=1 on val_mae, saved every 2nd epoch) and a by-hand save at
    epoch 5; the index lists the auto-saves."""
    handler = make_handler(n=16)
    handler.auto_save(1, CK, name="ep{epoch:03d}", keep_last=1, keep_every=2)
    handler.add_callback(AutoSaveCallback(2, CK, name="best_ep{epoch:03d}", keep_best=1,
                                          monitor="val_mae", mode="min"))
    handler.train(epochs=5, seed=3, progress_bar=False)
    handler.save(CK / "by_hand.pth")
    return handler


def test_json_rows_have_stable_keys_and_the_facts(trained: NNHandler,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, rows = json_rows(capsys)
    assert code == 0
    assert all(set(row) == ROW_KEYS for row in rows)
    by_name = {row["name"]: row for row in rows}
    assert set(by_name) - {"best_ep002.pth"} == {"best_ep004.pth", "by_hand.pth", "ep002.pth",
                                                 "ep004.pth", "ep005.pth"}
    for row in rows:
        assert row["valid"] and row["verified"] and row["problem"] is None
        assert row["size"] == (CK / row["name"]).stat().st_size
    five = by_name["ep005.pth"]
    assert (five["epoch"], five["step"]) == (5, 10)
    logs = trained.history[-1]
    assert five["metrics"] == pytest.approx({"loss": logs["loss"], "val_loss": logs["val_loss"],
                                             "val_mae": logs["val_mae"]})
    assert five["kept_by"] == [{"callback": "autosave:ck/ep{epoch:03d}",
                                "reasons": ["latest 1/1"]}]
    assert by_name["ep002.pth"]["kept_by"][0]["reasons"] == ["every 2 epochs"]
    (best,) = by_name["best_ep004.pth"]["kept_by"]
    assert best["callback"] == "autosave:ck/best_ep{epoch:03d}"
    assert best["reasons"][0].startswith("best val_mae=") or best["reasons"] == ["newest"]
    assert by_name["by_hand.pth"]["kept_by"] == [] and not by_name["by_hand.pth"]["in_index"]
    # newest first, as load_latest ranks them; the indexed file wins the epoch-5 tie
    assert [row["epoch"] for row in rows] == sorted((row["epoch"] for row in rows),
                                                    reverse=True)
    assert [row["name"] for row in rows if row["latest"]] == ["ep005.pth"]


def test_the_marked_latest_is_what_load_latest_loads(trained: NNHandler,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("ep005.pth", "best_ep004.pth", "by_hand.pth"):
        flip_a_bit(CK / name)
    code, rows = json_rows(capsys)
    assert code == 1
    corrupt = sorted(row["name"] for row in rows if not row["valid"])
    assert corrupt == ["best_ep004.pth", "by_hand.pth", "ep005.pth"]
    assert all("corrupted" in row["problem"] for row in rows if not row["valid"])
    (latest,) = [row for row in rows if row["latest"]]
    assert latest["name"] == "ep004.pth"
    assert NNHandler.load_latest(CK, device="cpu").epoch == latest["epoch"] == 4


def test_no_verify_reads_only_the_records(trained: NNHandler,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    flip_a_bit(CK / "ep004.pth")  # content damaged, integrity record intact
    code, rows = json_rows(capsys, "--no-verify")
    assert code == 0
    assert all(row["valid"] and not row["verified"] for row in rows)
    code, rows = json_rows(capsys)
    assert code == 1
    assert [row["name"] for row in rows if not row["valid"]] == ["ep004.pth"]
    (CK / "ep002.pth").write_bytes(b"truncated")  # no record at all: corrupt either way
    code, rows = json_rows(capsys, "--no-verify")
    assert code == 1
    assert [row["name"] for row in rows if not row["valid"]] == ["ep002.pth"]


def test_the_table_for_humans(trained: NNHandler, capsys: pytest.CaptureFixture[str]) -> None:
    flip_a_bit(CK / "best_ep004.pth")
    code, out, _ = run_list(capsys, str(CK))
    assert code == 1
    for text in ("ep002.pth", "every 2 epochs", "latest 1/1", "not in index", "CORRUPT",
                 "valid", "val_mae", "load_latest picks", "best_ep004.pth"):
        assert text in out, text
    (line,) = [line for line in out.splitlines() if "ep005.pth" in line]
    assert "*" in line.split("ep005.pth")[0]


def test_a_folder_without_an_index(capsys: pytest.CaptureFixture[str]) -> None:
    handler = make_handler(n=16)
    handler.auto_save(1, CK, name="ep{epoch:03d}")
    handler.train(epochs=2, progress_bar=False)
    code, rows = json_rows(capsys)
    assert code == 0
    assert [(row["name"], row["latest"], row["kept_by"]) for row in rows] == [
        ("ep002.pth", True, []), ("ep001.pth", False, [])]
    code, out, _ = run_list(capsys, str(CK))
    assert code == 0 and "no retention index" in out and "not in index" in out


def test_a_corrupt_index_is_a_warning_on_stderr(trained: NNHandler,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (CK / INDEX_FILE).write_text("{broken")
    code, out, err = run_list(capsys, str(CK), "--json")
    assert code == 0
    assert "nnhandler-index.json" in err and "damaged" in err
    rows = json.loads(out)
    assert all(row["kept_by"] == [] for row in rows)
    assert [row["name"] for row in rows if row["latest"]] == ["ep005.pth"]  # the name decides


def test_an_empty_folder_and_a_missing_one(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert run_list(capsys, str(tmp_path / "empty"), "--json")[:2] == (0, "[]\n")
    code, out, _ = run_list(capsys, str(tmp_path / "empty"))
    assert code == 0 and "no checkpoints" in out
    code, _, err = run_list(capsys, str(tmp_path / "missing"))
    assert code == 1 and "is not a directory" in err


@pytest.mark.slow
def test_the_installed_console_script(trained: NNHandler) -> None:
    script = Path(sys.executable).parent / "nnhandler"
    if not script.exists():
        found = shutil.which("nnhandler")
        if found is None:
            pytest.skip("the nnhandler console script is not installed (pip install -e .)")
        script = Path(found)
    finished = subprocess.run([str(script), "list", str(CK), "--json"], capture_output=True,
                              text=True, timeout=120, env=child_environment(), check=False)
    assert finished.returncode == 0, finished.stderr
    rows = json.loads(finished.stdout)
    assert [row["name"] for row in rows if row["latest"]] == ["ep005.pth"]
    flip_a_bit(CK / "ep002.pth")
    finished = subprocess.run([str(script), "list", str(CK)], capture_output=True, text=True,
                              timeout=120, env=child_environment(), check=False)
    assert finished.returncode == 1
    assert "CORRUPT" in finished.stdout and "ep002.pth" in finished.stdout
