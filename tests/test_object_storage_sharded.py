"""Sharded (``.dcp``) checkpoints in object storage (nnhandler/checkpoint/remote_sharded.py).

Two real FSDP2 ranks (torchrun, gloo, CPU) write to moto's S3 server and resume exactly from
it; one rank's store stops answering during a save and both ranks raise within the bounded
retries; a damaged shard on S3 is found and ``load_latest`` passes it by; the CLI reads the
prefix. In one process, ``memory://``: a plain model's state through the same writer and
reader (DCP without a process group), the generation scheme of an overwrite, prefixes
without a manifest, damage, and retention's removals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from dist_testing import launch_scenario
from fsspec.implementations.memory import MemoryFileSystem
from nnh_testing import TinyNet
from s3_testing import s3_filesystem
from torch import nn
from torch.utils.data import TensorDataset

from nnhandler import CheckpointCorruptedError, ConfigurationError, NNHandler
from nnhandler.checkpoint.dcp_state import ShardedComponents
from nnhandler.checkpoint.discovery import find_latest_valid
from nnhandler.checkpoint.remote_checkpoints import list_remote_checkpoints
from nnhandler.checkpoint.remote_sharded import remote_manifest, write_remote_sharded
from nnhandler.checkpoint.sharded import MANIFEST_FILE, SHARDED_KEYS
from nnhandler.checkpoint.storage import URL, store_for
from nnhandler.checkpoint.store_files import StoreRemovalGuard, prepare_store_directory
from nnhandler.cli import main as cli_main
from nnhandler.distributed import DistributedContext

WORKER = Path(__file__).resolve().parent / "remote_sharded_worker.py"
LAUNCH_TIMEOUT_S = 240
EPOCHS = 4  # tests/sharded_worker.py

# the 2-rank checkpoints are opened in one process here: the world-size warning is expected
pytestmark = pytest.mark.filterwarnings(
    r"ignore:checkpoint .* was written by 2 rank\(s\), this run has 1:RuntimeWarning")


# -- one process, memory:// --------------------------------------------------------------------
@pytest.fixture
def memory_prefix() -> Iterator[str]:
    """A fresh ``memory://`` prefix (removed afterwards)."""
    fs = fsspec.filesystem("memory")
    prefix = f"/dcp-{id(fs)}-{torch.randint(0, 10**9, ()).item()}"
    try:
        yield f"memory:/{prefix}"
    finally:
        if fs.exists(prefix):
            fs.rm(prefix, recursive=True)


def trained(epochs: int = 2) -> NNHandler:
    torch.manual_seed(0)
    handler = NNHandler(nn.Linear, device="cpu", in_features=4, out_features=1)
    handler.set_optimizer(torch.optim.Adam, lr=0.1)
    handler.set_loss_fn(nn.MSELoss)
    handler.set_train_loader(TensorDataset(torch.randn(32, 4), torch.randn(32, 1)),
                             batch_size=8)
    handler.train(epochs, seed=3, progress_bar=False)
    return handler


def write_sharded(handler: NNHandler, url: str) -> int:
    """The model's and optimizer's tensors through DCP (one process: no group), the rest in
    the envelope: what every rank of an FSDP2 run writes, here with whole tensors."""
    return write_remote_sharded(
        URL(url), DistributedContext.single(), ShardedComponents(handler.module,
                                                                 handler.optimizer),
        lambda: (handler.state_registry.collect(exclude=SHARDED_KEYS),
                 handler.checkpoints.meta(handler.last_logs)))


def objects(url: str) -> list[str]:
    fs = fsspec.filesystem("memory")
    key = fs._strip_protocol(url)
    return sorted("/".join("g-*" if p.startswith("g-") else p for p in path[len(key) + 1:]
                           .split("/")) for path in fs.find(key))


def test_a_sharded_checkpoint_round_trips_through_memory(memory_prefix: str) -> None:
    handler = trained()
    size = write_sharded(handler, f"{memory_prefix}/ep002.dcp")
    assert objects(memory_prefix) == ["ep002.dcp/g-*/.metadata", "ep002.dcp/g-*/__0_0.distcp",
                                      "ep002.dcp/g-*/nnhandler.pth", "ep002.dcp/manifest.json"]
    assert size > 0
    loaded = NNHandler.load(f"{memory_prefix}/ep002.dcp", device="cpu")
    assert loaded.epoch == 2 and loaded.train_losses == handler.train_losses
    for a, b in zip(loaded.module.state_dict().values(), handler.module.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert loaded.optimizer is not None and handler.optimizer is not None
    assert torch.equal(loaded.optimizer.state_dict()["state"][0]["exp_avg"],
                       handler.optimizer.state_dict()["state"][0]["exp_avg"])
    assert NNHandler.load_latest(memory_prefix, device="cpu").epoch == 2


def test_an_overwrite_keeps_the_old_checkpoint_until_the_new_manifest(
        memory_prefix: str) -> None:
    handler = trained()
    url = f"{memory_prefix}/last.dcp"
    write_sharded(handler, url)
    store = store_for(URL(url))
    first = remote_manifest(store, URL(url))["generation"]
    handler.train(1, progress_bar=False)
    write_sharded(handler, url)
    second = remote_manifest(store, URL(url))
    assert second["generation"] != first and second["epoch"] == 3
    # the old generation went once the new manifest was in place; nothing else is left
    listed = fsspec.filesystem("memory").ls(fsspec.filesystem("memory")._strip_protocol(url),
                                            detail=False)
    assert sorted(p.rsplit("/", 1)[-1] for p in listed) == sorted(
        [MANIFEST_FILE, second["generation"]])
    assert NNHandler.load(url, device="cpu").epoch == 3


class LandedThenFailedMemory(MemoryFileSystem):
    """``memory://`` whose PUT of a manifest stores it and then fails, as a request whose
    answer timed out after the store took it."""

    protocol = "landedmemory"

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> None:
        super().pipe_file(path, value, *args, **kwargs)
        if path.endswith(f"/{MANIFEST_FILE}"):
            raise TimeoutError(f"no answer for the PUT of {path}")


fsspec.register_implementation("landedmemory", LandedThenFailedMemory, clobber=True)


def test_a_manifest_put_that_failed_here_but_landed_removes_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNHANDLER_REMOTE_RETRIES", "0")
    handler = trained()
    prefix = f"landedmemory://dcp-landed-{torch.randint(0, 10**9, ()).item()}"
    url = f"{prefix}/last.dcp"
    fs = fsspec.filesystem("landedmemory")
    try:
        with pytest.raises(OSError, match="no answer"):
            write_sharded(handler, url)
        # the store holds the manifest: the generation it names must still be complete
        loaded = NNHandler.load(url, device="cpu")
        assert loaded.epoch == 2
        for a, b in zip(loaded.module.state_dict().values(),
                        handler.module.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    finally:
        key = fs._strip_protocol(prefix)
        if fs.exists(key):
            fs.rm(key, recursive=True)


def test_a_prefix_without_manifest_is_no_checkpoint(
        memory_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    handler = trained()
    write_sharded(handler, f"{memory_prefix}/ep002.dcp")
    handler.train(1, progress_bar=False)
    write_sharded(handler, f"{memory_prefix}/ep003.dcp")
    fs = fsspec.filesystem("memory")
    newest = fs._strip_protocol(f"{memory_prefix}/ep003.dcp")
    fs.rm(f"{newest}/{MANIFEST_FILE}")  # what an upload interrupted before its manifest leaves
    directory = URL(memory_prefix)
    store = store_for(directory)
    (valid, incomplete) = list_remote_checkpoints(store, directory)  # readable ones first
    assert valid.path.name == "ep002.dcp" and valid.record is not None
    assert incomplete.path.name == "ep003.dcp" and incomplete.record is None
    assert "no manifest.json" in str(incomplete.problem)
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        assert find_latest_valid(memory_prefix, logging.getLogger("nnhandler")) == \
            f"{memory_prefix}/ep002.dcp"
        assert NNHandler.load_latest(memory_prefix, device="cpu").epoch == 2
        with pytest.raises(CheckpointCorruptedError, match=r"no manifest\.json"):
            NNHandler.load(f"{memory_prefix}/ep003.dcp", device="cpu")
        # an auto-saver's start names it; its next save of that name takes its place
        prepare_store_directory(store, directory, ("ep{epoch:03d}",),
                                logging.getLogger("nnhandler"))
    assert "ep003.dcp holds the files of an interrupted sharded save" in caplog.text
    handler.train(1, progress_bar=False)
    write_sharded(handler, f"{memory_prefix}/ep003.dcp")
    generation = remote_manifest(store, URL(f"{memory_prefix}/ep003.dcp"))["generation"]
    assert sorted(path.rsplit("/", 1)[-1] for path in fs.ls(newest, detail=False)) == sorted(
        [MANIFEST_FILE, generation])  # the interrupted save's files are gone
    assert NNHandler.load_latest(memory_prefix, device="cpu").epoch == 4


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_a_damaged_shard_is_corrupted_and_load_latest_falls_back(
        memory_prefix: str, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    handler = trained()
    write_sharded(handler, f"{memory_prefix}/ep002.dcp")
    handler.train(1, progress_bar=False)
    url = f"{memory_prefix}/ep003.dcp"
    write_sharded(handler, url)
    store = store_for(URL(url))
    shard = URL(url) / remote_manifest(store, URL(url))["generation"] / "__0_0.distcp"
    fs = fsspec.filesystem("memory")
    data = bytearray(fs.cat_file(shard.key))
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        fs.pipe_file(shard.key, bytes(data))
    elif damage == "truncate":
        fs.pipe_file(shard.key, bytes(data[:-7]))
    else:
        fs.rm(shard.key)
    with pytest.raises(CheckpointCorruptedError, match=r"__0_0\.distcp"):
        NNHandler.load(url, device="cpu")
    assert NNHandler.load_latest(memory_prefix, device="cpu").epoch == 2
    capsys.readouterr()
    assert cli_main(["verify", url, "--json"]) == 1
    (report,) = json.loads(capsys.readouterr().out)
    assert report["kind"] == "corrupt" and "__0_0.distcp" in report["error"]
    assert str(shard) in report["error"]  # the URL, never the staging copy


def test_retention_removes_an_own_prefix_manifest_first_and_refuses_others(
        memory_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    handler = trained()
    write_sharded(handler, f"{memory_prefix}/ep002.dcp")
    directory = URL(memory_prefix)
    store = store_for(directory)
    lineage = handler.progress.lineage
    other = StoreRemovalGuard(directory, "ep{epoch:03d}", "another-run",
                              logging.getLogger("nnhandler"), store=store)
    assert other.remove("ep002.dcp", what="retention", in_directory=True).name == "REFUSED"
    assert NNHandler.load_latest(memory_prefix, device="cpu").epoch == 2
    foreign = StoreRemovalGuard(directory, "other{epoch:03d}", lineage,
                                logging.getLogger("nnhandler"), store=store)
    assert foreign.remove("ep002.dcp", what="retention", in_directory=True).name == "REFUSED"
    own = StoreRemovalGuard(directory, "ep{epoch:03d}", lineage,
                            logging.getLogger("nnhandler"), store=store)
    assert own.remove("ep002.dcp", what="retention", in_directory=True).name == "REMOVED"
    assert objects(memory_prefix) == []


def test_a_target_that_is_not_a_sharded_checkpoint_is_refused(memory_prefix: str) -> None:
    handler = trained()
    fs = fsspec.filesystem("memory")
    fs.pipe_file(fs._strip_protocol(f"{memory_prefix}/object.dcp"), b"data")
    fs.pipe_file(fs._strip_protocol(f"{memory_prefix}/folder.dcp/notes.txt"), b"mine")
    with pytest.raises(ConfigurationError, match="is an object"):
        write_sharded(handler, f"{memory_prefix}/object.dcp")
    with pytest.raises(ConfigurationError, match="not an nnhandler sharded checkpoint"):
        write_sharded(handler, f"{memory_prefix}/folder.dcp")
    with pytest.raises(ConfigurationError, match=r"'\.dcp'"):
        write_sharded(handler, f"{memory_prefix}/plain.pth")
    with pytest.raises(ConfigurationError, match=r"no DTensor parameters; use '\.pth'"):
        handler.save(f"{memory_prefix}/plain.dcp")
    assert objects(memory_prefix) == ["folder.dcp/notes.txt", "object.dcp"]


# -- two FSDP2 ranks on S3 ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_two_fsdp_ranks_write_to_s3_and_resume_exactly(
        s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    url = f"s3://{s3_bucket}/fsdp"
    monkeypatch.setenv("NNH_TEST_URL", url)
    rank0, rank1 = launch_scenario(WORKER, "train", tmp_path / "train", 2, LAUNCH_TIMEOUT_S)
    assert rank0["sharded"] and rank0["history"] == rank1["history"]
    layout = [".metadata", "__0_0.distcp", "__1_0.distcp", "nnhandler.pth"]
    assert rank0["objects"] == [
        *(f"{name}/{part}" for name in ("ep002.dcp", "ep004.dcp", "last.dcp")
          for part in [*(f"g-*/{f}" for f in layout), MANIFEST_FILE])]
    for result in (rank0, rank1):
        loaded = result["loaded"]
        assert loaded["epoch"] == 2 and loaded["sharded"]
        assert loaded["params_equal_epoch2"] and loaded["optimizer_equal_epoch2"]
        assert loaded["params_equal"] == {"3": True, "4": True}
        assert loaded["optimizer_equal"] == {"3": True, "4": True}
        assert loaded["history"]["train_losses"] == rank0["history"]["train_losses"]
        assert result["resume_latest"]["epoch"] == EPOCHS + 1
        assert result["resume_latest"]["train_losses"][:EPOCHS] == \
            rank0["history"]["train_losses"]
        assert result["by_hand_shards_equal"]
    # overwrites retired their old generations: one per prefix
    assert rank0["objects_after"] == sorted(
        f"{name}/{part}" for name in ("by_hand.dcp", "ep002.dcp", "ep004.dcp", "last.dcp")
        for part in [*(f"g-*/{f}" for f in layout), MANIFEST_FILE])

    # the CLI on the prefix
    assert cli_main(["list", url, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["name"]: row["epoch"] for row in rows} == {
        "by_hand.dcp": 5, "last.dcp": 5, "ep004.dcp": 4, "ep002.dcp": 2}
    assert all(row["valid"] for row in rows) and sum(row["latest"] for row in rows) == 1
    assert cli_main(["verify", f"{url}/ep004.dcp", f"{url}/ep002.dcp"]) == 0
    capsys.readouterr()
    assert cli_main(["inspect", f"{url}/ep004.dcp", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "sharded directory (5 files)" and info["world_size"] == 2
    assert info["components"]["model"] == {"tensors": 4, "bytes": 49 * 4}

    # a damaged shard of the newest: CheckpointCorruptedError, load_latest falls back
    fs = s3_filesystem()
    for name in ("by_hand.dcp", "last.dcp"):
        fs.rm(f"{s3_bucket}/fsdp/{name}", recursive=True)
    (shard,) = [p for p in fs.find(f"{s3_bucket}/fsdp/ep004.dcp") if p.endswith("__1_0.distcp")]
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(shard, bytes(data))
    with pytest.raises(CheckpointCorruptedError, match=r"__1_0\.distcp"):
        NNHandler.load(f"{url}/ep004.dcp", device="cpu", use_distributed=False,
                       parallelism="none", model_class=TinyNet)
    older = NNHandler.load_latest(url, device="cpu", use_distributed=False, parallelism="none",
                                  model_class=TinyNet)
    assert older.epoch == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_whose_upload_fails_fails_every_rank_and_publishes_nothing(
        s3_bucket: str, silent_endpoint: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NNH_TEST_URL", f"s3://{s3_bucket}/broken")
    monkeypatch.setenv("NNH_SILENT_ENDPOINT", silent_endpoint)
    results: list[dict[str, Any]] = launch_scenario(WORKER, "upload_failure",
                                                    tmp_path / "failure", 2, LAUNCH_TIMEOUT_S)
    rank0, rank1 = results
    assert rank1["error"]["type"] == "RemoteStorageError"
    assert "2 attempt" in rank1["error"]["message"] and "broken.dcp" in rank1["error"]["message"]
    assert rank0["error"]["type"] == "RemoteStorageError"
    assert "rank 1" in rank0["error"]["message"]
    for result in results:
        assert result["after_error"] == 3.0
        assert result["knew_after_s"] < 30  # two attempts of 1 s, a backoff, the staging
    assert rank0["objects_after_failure"] == []  # nothing published, the generation removed
    assert [name for name in rank0["objects_after_good"] if name.endswith(MANIFEST_FILE)] == [
        f"good.dcp/{MANIFEST_FILE}"]
    with capsys.disabled():
        print("\nrank 1's store stopped answering during a sharded save: every rank knew "
              "after " + ", ".join(f"rank {r['rank']}: {r['knew_after_s']:.2f} s"
                                   for r in results) + " (timeout 1 s, 1 retry)")
