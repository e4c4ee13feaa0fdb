"""Everyday callbacks, export and plots on two real DDP ranks (torchrun, gloo, CPU): every rank
stops at the same epoch, only rank 0 writes the CSV, TensorBoard events, export and plots, and a
resume on both ranks leaves one CSV row per epoch."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from test_distributed import launch, pytestmark  # noqa: F401  (markers and skip)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    workdir = tmp_path_factory.mktemp("ddp_extras") / "callbacks"
    workdir.mkdir()
    return workdir, launch("callbacks", workdir)


def epochs_of(lines: list[str]) -> list[int]:
    return [int(row["epoch"]) for row in csv.DictReader(io.StringIO("\n".join(lines)))]


def test_every_rank_stops_at_the_same_epoch_with_the_same_logs(
    run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, (rank0, rank1) = run
    assert rank0["stopped_epoch"] == rank1["stopped_epoch"] == rank0["epoch"] == 3
    assert rank0["history"] == rank1["history"]
    assert [entry["lr"] for entry in rank0["history"]] == [0.01, 0.01, 0.005]  # StepLR(2, 0.5)


def test_only_rank_zero_writes_csv_rows_and_tensorboard_events(
    run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, (rank0, _) = run
    assert epochs_of(rank0["rows_after_first"]) == [1, 2, 3]  # no row twice
    rows = list(csv.DictReader(io.StringIO("\n".join(rank0["rows_after_first"]))))
    assert [float(row["loss"]) for row in rows] == [entry["loss"] for entry in rank0["history"]]
    if rank0["tensorboard_files"] is not None:
        # one writer per train call (the first run, the resumed one), both on rank 0
        assert len(rank0["tensorboard_files"]) == 2
        assert all(name.startswith("events.out.tfevents") for name in rank0["tensorboard_files"])


def test_export_and_plots_on_rank_zero(run: tuple[Path, list[dict[str, Any]]]) -> None:
    workdir, (rank0, rank1) = run
    assert rank0["weights_match"] and rank1["weights_match"]
    assert rank0["exported"] == rank1["exported"] == "export/weights.pt"
    exported = torch.load(workdir / "export" / "weights.pt", weights_only=True)
    assert set(exported) == {"net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias"}
    for plot in rank0["plots"]:
        assert (workdir / plot).read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in (workdir / "export").iterdir()) == ["weights.pt"]


def test_a_resume_on_both_ranks_keeps_one_row_per_epoch(
    run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, (rank0, rank1) = run
    assert rank0["resumed_epoch"] == rank1["resumed_epoch"] == 3  # stops at the same epoch again
    assert epochs_of(rank0["rows_after_resume"]) == [1, 2, 3]
    assert rank0["rows_after_resume"][:3] == rank0["rows_after_first"][:3]
    assert rank0["resumed_history"] == rank0["history"]  # and the resume is exact


def test_load_with_data_and_seeded_construction_on_two_ranks(
    run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, (rank0, rank1) = run
    assert rank0["with_data_epoch"] == rank1["with_data_epoch"] == 4
    assert len(rank0["with_data_losses"]) == 4
    assert rank0["with_data_losses"] == rank1["with_data_losses"]  # reduced across ranks
    # each rank seeded its global stream differently; NNHandler(seed=21) built the same model
    assert rank0["seeded_weights"] == rank1["seeded_weights"]
