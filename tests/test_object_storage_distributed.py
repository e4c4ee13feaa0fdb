"""Auto-save to S3 on two real DDP ranks (torchrun, gloo, CPU; moto's S3 server): rank 0
uploads while the other waits, retention and ``train(resume="latest")`` work on the URL, and
a store that stops answering fails on every rank within the bounded retries, never as a hang;
under ``on_save_error="warn"`` both ranks train on. The same for ``auto_save(mirror=...)``: each
checkpoint uploaded once (by rank 0), the same retention on both sides (after rank 0's folder
is lost too), a failed upload raised on both ranks or, under ``"warn"``, training going on.

Launched like tests/test_retention_distributed.py: ``tests/remote_ddp_worker.py`` under
``python -m torch.distributed.run`` in a subprocess with a timeout that fails instead of hanging.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from dist_testing import DISTRIBUTED_MARKS, launch_scenario

pytestmark = [*DISTRIBUTED_MARKS, pytest.mark.slow]

WORKER = Path(__file__).resolve().parent / "remote_ddp_worker.py"
WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 180


def test_two_ranks_auto_save_to_s3_and_resume_latest(
        s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNH_TEST_URL", f"s3://{s3_bucket}/ddp")
    rank0, rank1 = launch_scenario(WORKER, "train", tmp_path / "train", WORLD_SIZE,
                                   LAUNCH_TIMEOUT_S)
    assert rank0["first"] == rank1["first"] and rank0["resumed"] == rank1["resumed"]
    assert rank0["failed"] == rank1["failed"] == [0, 0]
    assert rank0["files_first"] == ["async_ep003.pth", "ep002.pth", "ep003.pth",
                                    "nnhandler-index.json"]
    assert rank0["files_resumed"] == ["async_ep003.pth", "ep003.pth", "ep004.pth",
                                      "nnhandler-index.json"]
    first, resumed = rank0["first"], rank0["resumed"]
    assert resumed["epoch"] == 4 and resumed["train_losses"][:3] == first["train_losses"]


def test_a_store_that_stops_answering_fails_on_every_rank_within_seconds(
        silent_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NNH_SILENT_ENDPOINT", silent_endpoint)
    results: list[dict[str, Any]] = launch_scenario(WORKER, "failure", tmp_path / "failure",
                                                    WORLD_SIZE, LAUNCH_TIMEOUT_S)
    for result in results:
        # rank 0's error on every rank: two attempts of 1 s and one backoff (<= 0.5 s)
        assert "s3://stuck/ep001.pth" in result["error"] and "2 attempt" in result["error"]
        assert result["epoch"] == 3 and result["failed_saves"] == 2
    with capsys.disabled():
        print("\nstore stopped answering: every rank knew after "
              + ", ".join(f"rank {r['rank']}: {r['knew_after_s']:.2f} s" for r in results)
              + " (timeout 1 s, 1 retry)")


def test_two_ranks_mirror_every_checkpoint_once_with_the_same_retention(
        s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNH_TEST_URL", f"s3://{s3_bucket}/mirror")
    rank0, rank1 = launch_scenario(WORKER, "mirror", tmp_path / "mirror", WORLD_SIZE,
                                   LAUNCH_TIMEOUT_S)
    assert rank0["first"] == rank1["first"] and rank0["resumed"] == rank1["resumed"]
    assert (rank0["uploads"], rank1["uploads"]) == (3, 0)  # rank 0 uploads, once each
    assert (rank0["uploads_resumed"], rank1["uploads_resumed"]) == (1, 0)
    assert rank0["failed"] == rank1["failed"] == 0
    kept = ["ep002.pth", "ep003.pth", "nnhandler-index.json"]
    assert rank0["local_first"] == rank0["mirror_first"] == kept and rank0["same_bytes"]
    # rank 0's folder was lost: resumed from the mirror, which keeps what the folder would
    assert rank0["local_resumed"] == ["ep004.pth", "nnhandler-index.json"]
    assert rank0["mirror_resumed"] == ["ep003.pth", "ep004.pth", "nnhandler-index.json"]
    first, resumed = rank0["first"], rank0["resumed"]
    assert resumed["epoch"] == 4 and resumed["train_losses"][:3] == first["train_losses"]


def test_a_failed_mirror_upload_under_raise_reaches_both_ranks(
        s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    tag = secrets.token_hex(4)
    monkeypatch.setenv("NNH_TEST_TAG", tag)
    rank0, rank1 = launch_scenario(WORKER, "mirror_raise", tmp_path / "raise", WORLD_SIZE,
                                   LAUNCH_TIMEOUT_S)
    assert rank0["mirrored_first"] == ["ep001.pth"]
    assert rank0["error"].startswith(f"RemoteStorageError: mirror: the upload to 's3://nnh-ddp-"
                                     f"gone-{tag}/run/ep002.pth' failed: FileNotFoundError")
    assert rank1["error"].startswith("CheckpointError: rank 0 failed:")
    assert "ep002.pth" in rank1["error"]
    # at epoch 3's save or the end of train, on both ranks at the same point
    assert rank0["epoch"] == rank1["epoch"] and rank0["epoch"] in (2, 3)
    assert rank0["still_in_step"] == rank1["still_in_step"] == 3.0
    assert "ep002.pth" in rank0["local"]  # the local checkpoint stands
    with capsys.disabled():
        print("\nmirror upload failed (bucket removed before train(2)): every rank knew after "
              + ", ".join(f"rank {r['rank']}: {r['knew_after_s']:.2f} s (epoch {r['epoch']})"
                          for r in (rank0, rank1)))


def test_a_mirror_that_stops_answering_under_warn_lets_both_ranks_train_on(
        silent_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NNH_SILENT_ENDPOINT", silent_endpoint)
    rank0, rank1 = launch_scenario(WORKER, "mirror_warn", tmp_path / "warn", WORLD_SIZE,
                                   LAUNCH_TIMEOUT_S)
    for result in (rank0, rank1):
        assert result["epoch"] == 3 and result["failed_saves"] == 0
        assert result["still_in_step"] == 3.0
    assert (rank0["reported"], rank1["reported"]) == (3, 0)  # rank 0's uploads, logged there
    assert rank0["local"] == ["ep002.pth", "ep003.pth", "nnhandler-index.json"]
    with capsys.disabled():
        print("\nmirror stopped answering under warn (timeout 1 s, no retry): train(3) took "
              + ", ".join(f"rank {r['rank']}: {r['took_s']:.2f} s" for r in (rank0, rank1)))
