"""Sharded checkpoints (FSDP2 / DTensor) through torch.distributed.checkpoint.

Real multi-process runs: ``tests/sharded_worker.py`` under ``python -m torch.distributed.run``
(gloo, CPU) in a subprocess with a timeout, so a hang fails the test instead of stalling the
suite. FSDP2's ``fully_shard`` runs on CPU with gloo in torch 2.13, so these runs train a real
FSDP2 model. The single-process tests read the checkpoints those runs wrote.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_testing import REPO_ROOT, TESTS_DIR, run_bounded, torchrun
from hypothesis import given
from hypothesis import strategies as st
from nnh_testing import TinyNet, make_handler
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

import nnhandler.checkpoint.sharded as sharded_mod
from nnhandler import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointFormatError,
    ConfigurationError,
    NNHandler,
    read_checkpoint,
)
from nnhandler.checkpoint.dcp_state import merge_tensors, split_tensors
from nnhandler.checkpoint.discovery import list_checkpoints
from nnhandler.checkpoint.integrity import crc32
from nnhandler.checkpoint.removal import remove_stale_temp_files
from nnhandler.checkpoint.sharded import (
    MANIFEST_FILE,
    read_manifest,
    read_sharded_checkpoint,
    verify_sharded,
)
from nnhandler.cli import main as cli_main

WORKER = TESTS_DIR / "sharded_worker.py"
LAUNCH_TIMEOUT_S = 180
EPOCHS = 4  # must match tests/sharded_worker.py
SHARD_FILES = [".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json", "nnhandler.pth"]
# These tests open the 2-rank checkpoints in one process (consolidation, damage, kills): the
# world-size warning that brings is expected here and tested in test_distributed.py.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:checkpoint .* was written by 2 rank\(s\), this run has 1:RuntimeWarning")

distributed = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with the gloo backend is not available"),
]

def run_workers(scenario: str, workdir: Path, ranks: int, *extra: str) -> tuple[int, str]:
    """Run the worker on ``ranks`` processes; (exit status, output). A hang fails the test."""
    workdir.parent.mkdir(parents=True, exist_ok=True)
    return run_bounded(torchrun(ranks, WORKER, scenario, str(workdir), *extra), workdir.parent,
                       f"scenario {scenario!r}", LAUNCH_TIMEOUT_S)


def launch(scenario: str, workdir: Path, ranks: int, *extra: str) -> list[dict[str, Any]]:
    """Run a scenario that must succeed; the per-rank results, in rank order."""
    code, output = run_workers(scenario, workdir, ranks, *extra)
    assert code == 0, f"scenario {scenario!r} failed (exit {code}):\n{output[-8000:]}"
    results = [json.loads((workdir / f"result_rank{r}.json").read_text()) for r in range(ranks)]
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["world_size"] == ranks
    return results


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def temp_entries(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if ".tmp-" in name]


def flat_optimizer_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name, values in state["state"].items()
            for key, value in values.items()}


def assert_same_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """One 2-rank FSDP2 run of EPOCHS epochs with three auto-saves (see the worker)."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    workdir = tmp_path_factory.mktemp("fsdp") / "train"
    return workdir, launch("train", workdir, 2)


def reference(workdir: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = torch.load(workdir / "reference_rank0.pt", weights_only=True)
    return loaded


# -- the 2-rank FSDP2 run ----------------------------------------------------------------------
@pytest.mark.distributed
def test_fsdp_training_writes_sharded_autosaves(
    fsdp_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    workdir, (rank0, rank1) = fsdp_run
    for result in (rank0, rank1):
        assert result["sharded"] is True and result["parallelism"] == "fsdp"
        assert result["param_types"] == ["DTensor"]
    assert rank0["history"] == rank1["history"]
    assert rank0["history"]["epoch"] == EPOCHS and len(rank0["history"]["val_losses"]) == EPOCHS

    # interval=2 -> ep002, ep004; overwrite=True -> only the latest; a fixed name replaced
    ck = workdir / "ck"
    assert listing(ck) == ["ep002.dcp", "ep004.dcp", "last.dcp", "latest_ep004.dcp"]
    for name in listing(ck):
        assert listing(ck / name) == SHARD_FILES  # each rank its shard, rank 0 the rest
    epochs = {name: read_manifest(ck / name)["epoch"] for name in listing(ck)}
    assert epochs == {"ep002.dcp": 2, "ep004.dcp": 4, "last.dcp": 4, "latest_ep004.dcp": 4}
    assert not temp_entries(ck) and not temp_entries(workdir)

    final = read_sharded_checkpoint(ck / "ep004.dcp")
    assert final.meta["world_size"] == 2 and final.manifest["world_size"] == 2
    history = final.state["history"]
    assert history["train_losses"] == rank0["history"]["train_losses"]
    assert history["val_losses"] == rank0["history"]["val_losses"]
    rng = final.state["rng"]
    assert rng["world_size"] == 2
    assert not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])
    # the tensors live in the DCP files; the envelope keeps only the plain part
    assert final.state["model"] == {}
    assert set(final.state["optimizer"]) == {"param_groups"}
    latest = read_sharded_checkpoint(ck / "latest_ep004.dcp").state
    bookkeeping = next(v for k, v in latest.items() if k.endswith("latest_ep{epoch:03d}"))
    assert Path(bookkeeping["last_saved_path"]) == Path("ck/latest_ep004.dcp")
    assert bookkeeping["pending_removal"] == "ck/latest_ep003.dcp"  # removed after the commit
    assert not (ck / "latest_ep003.dcp").exists()


@pytest.mark.distributed
def test_save_and_load_round_trip_on_two_ranks(
    fsdp_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, results = fsdp_run
    for result in results:
        trip = result["round_trip"]
        assert trip["parallelism"] == "fsdp" and trip["sharded"] is True
        assert trip["shards_equal"] is True  # this rank's parameter and optimizer shards
        assert trip["full_params_equal"] is True
        assert trip["full_optimizer_equal"] is True
        assert trip["scheduler_equal"] is True
        assert trip["history"] == result["history"]
        assert len(trip["autosaves"]) == 3
        assert result["by_hand_files"] == SHARD_FILES


@pytest.mark.distributed
def test_sharded_model_errors_are_clear_on_every_rank(
    fsdp_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, results = fsdp_run
    for result in results:
        assert result["pth_name"]["type"] == "ConfigurationError"
        assert "'final.pth'" in result["pth_name"]["message"]
        assert "'.dcp'" in result["pth_name"]["message"]
        assert result["ema"]["type"] == "ConfigurationError"
        assert "ema_decay=0.9" in result["ema"]["message"]
        assert result["after_errors"] == 3.0  # the ranks are still in step
        assert result["leftovers"] == []


@pytest.mark.distributed
def test_resume_is_bit_exact_on_two_ranks(
    fsdp_run: tuple[Path, list[dict[str, Any]]], tmp_path: Path,
) -> None:
    reference_dir, reference_results = fsdp_run
    results = launch("resume", tmp_path / "resume", 2, str(reference_dir))
    for rank, result in enumerate(results):
        expected = reference_results[rank]["history"]
        assert result["loaded_epoch"] == 2
        assert result["loaded_params_equal_epoch2"] is True
        assert result["loaded_optimizer_equal_epoch2"] is True
        for how in ("load_latest", "resume_latest"):
            resumed = result[how]
            assert resumed["history"] == expected, how
            assert resumed["params_equal"] == {"3": True, "4": True}, how
            # the restored auto-saves keep their rules: interval, names, overwrite
            names = sorted({Path(p).parts[0] for p in resumed["files"]})
            assert names == ["ep002.dcp", "ep004.dcp", "last.dcp", "latest_ep004.dcp"], how
        assert result["load_latest"]["optimizer_equal"] == {"3": True, "4": True}


@pytest.mark.distributed
def test_load_on_three_ranks_reshards_with_a_warning(
    fsdp_run: tuple[Path, list[dict[str, Any]]], tmp_path: Path,
) -> None:
    reference_dir, _ = fsdp_run
    results = launch("reshard", tmp_path / "reshard", 3, str(reference_dir))
    assert [r["local_rows"] for r in results] == [3, 3, 2]  # 8 rows over 3 ranks
    for result in results:
        assert result["world_size_seen"] == 3 and result["sharded"] is True
        assert result["params_equal"] is True and result["optimizer_equal"] is True
        assert result["epoch"] == EPOCHS
        assert any("written by 2 rank(s), this run has 3" in w
                   and "cannot equal an uninterrupted one exactly" in w
                   for w in result["warnings"]), result["warnings"]
        assert result["after_epoch"] == EPOCHS + 1
        assert result["after_files"] == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                         "__2_0.distcp", "manifest.json", "nnhandler.pth"]


@pytest.mark.distributed
def test_load_in_one_process_gathers_the_shards(
    fsdp_run: tuple[Path, list[dict[str, Any]]], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    workdir, _ = fsdp_run
    path = workdir / "ck" / "ep004.dcp"
    with pytest.raises(ConfigurationError, match="parallelism='none'"):
        NNHandler.load(path, device="cpu", use_distributed=False)  # recorded: fsdp

    handler = NNHandler.load(path, device="cpu", use_distributed=False, parallelism="none")
    assert handler.parallelism == "none" and not handler.sharded_checkpoints
    expected = reference(workdir)
    assert_same_tensors(handler.module.state_dict(), expected["params"][EPOCHS])
    assert handler.optimizer is not None
    optimizer = flat_optimizer_state(get_optimizer_state_dict(handler.module, handler.optimizer))
    assert_same_tensors(optimizer, expected["optimizer"][EPOCHS])
    assert handler.epoch == EPOCHS and len(handler.train_losses) == EPOCHS
    assert "written by 2 rank(s), this run has 1" in caplog.text

    # it trains on as a plain model and writes plain checkpoints
    handler.set_train_loader(torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1)))
    handler.train(1, progress_bar=False)
    saved = handler.save(tmp_path / "one.pth")
    assert read_checkpoint(saved).epoch == EPOCHS + 1


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: _flip_byte(d / "__1_0.distcp"), "__1_0.distcp"),
        (lambda d: _flip_byte(d / "nnhandler.pth"), "nnhandler.pth"),
        (lambda d: (d / ".metadata").write_bytes((d / ".metadata").read_bytes()[:-10]),
         ".metadata"),
        (lambda d: (d / "__0_0.distcp").unlink(), "__0_0.distcp"),
        (lambda d: _flip_byte(d / MANIFEST_FILE), MANIFEST_FILE),
        (lambda d: (d / MANIFEST_FILE).unlink(), MANIFEST_FILE),
    ],
    ids=["flipped-shard", "flipped-envelope", "truncated-metadata", "missing-shard",
         "flipped-manifest", "missing-manifest"],
)
def test_damage_is_detected_naming_the_file(
    fsdp_run: tuple[Path, list[dict[str, Any]]], tmp_path: Path,
    damage: Any, named: str, capsys: pytest.CaptureFixture[str],
) -> None:
    workdir, _ = fsdp_run
    directory = _copy(workdir / "ck" / "ep004.dcp", tmp_path / "ck" / "ep004.dcp")
    damage(directory)
    with pytest.raises(CheckpointCorruptedError, match=named.replace(".", r"\.")):
        NNHandler.load(directory, device="cpu", use_distributed=False, parallelism="none")
    assert cli_main(["verify", str(directory), "--json"]) == 1
    (report,) = json.loads(capsys.readouterr().out)
    assert not report["ok"] and named in report["error"]
    # load_latest passes over it to the newest intact checkpoint, saying why
    _copy(workdir / "ck" / "ep002.dcp", tmp_path / "ck" / "ep002.dcp")
    older = NNHandler.load_latest(tmp_path / "ck", device="cpu", use_distributed=False,
                                  parallelism="none")
    assert older.epoch == 2


@pytest.mark.distributed
def test_cli_verifies_and_inspects_a_directory(
    fsdp_run: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str],
) -> None:
    workdir, _ = fsdp_run
    path = workdir / "ck" / "ep004.dcp"
    assert cli_main(["verify", str(path), str(workdir / "ck" / "ep002.dcp")]) == 0
    capsys.readouterr()
    assert cli_main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "sharded directory (5 files)"
    assert info["epoch"] == EPOCHS and info["world_size"] == 2
    assert info["config"]["parallelism"] == "fsdp"
    # TinyNet(hidden=8): 4 parameters, 8*4 + 8 + 8 + 1 = 49 floats
    assert info["components"]["model"] == {"tensors": 4, "bytes": 49 * 4}
    # Adam: step, exp_avg, exp_avg_sq per parameter
    assert info["components"]["optimizer"]["tensors"] == 12
    assert info["components"]["rng"]["tensors"] > 0
    ranked = [c.path.name for c in list_checkpoints(workdir / "ck")]
    assert set(ranked[:3]) == {"latest_ep004.dcp", "last.dcp", "ep004.dcp"}
    assert ranked[3] == "ep002.dcp"


@pytest.mark.distributed
def test_metadata_that_names_code_is_refused(
    fsdp_run: tuple[Path, list[dict[str, Any]]], tmp_path: Path,
) -> None:
    workdir, _ = fsdp_run
    directory = _copy(workdir / "ck" / "ep004.dcp", tmp_path / "evil.dcp")
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    (directory / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointCorruptedError, match=r"\.metadata"):
        NNHandler.load(directory, device="cpu", use_distributed=False, parallelism="none")
    with pytest.raises(CheckpointFormatError, match="refuses to unpickle"):
        NNHandler.load(directory, device="cpu", use_distributed=False, parallelism="none",
                       verify=False)
    assert not marker.exists()


@pytest.mark.distributed
def test_metadata_may_only_name_files_of_the_manifest(
    fsdp_run: tuple[Path, list[dict[str, Any]]], tmp_path: Path,
) -> None:
    workdir, _ = fsdp_run
    directory = _copy(workdir / "ck" / "ep004.dcp", tmp_path / "odd.dcp")
    body = read_manifest(directory)
    del body["files"]["__1_0.distcp"]
    text = json.dumps(body, sort_keys=True)
    (directory / MANIFEST_FILE).write_text(json.dumps({"body": text,
                                                       "crc32": crc32(text.encode())}))
    verify_sharded(directory)  # every listed file is intact
    with pytest.raises(CheckpointFormatError, match=r"'__1_0\.distcp'.*does not list"):
        NNHandler.load(directory, device="cpu", use_distributed=False, parallelism="none")


@pytest.mark.distributed
def test_failures_during_a_sharded_save_raise_everywhere_and_leave_nothing(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "errors"
    rank0, rank1 = launch("errors", workdir, 2)
    # rank 0 fails collecting the envelope after every rank wrote its shards
    assert rank0["envelope_failure"]["type"] == "RuntimeError"
    assert rank1["envelope_failure"]["is_checkpoint_error"]
    assert "rank 0" in rank1["envelope_failure"]["message"]
    assert "boom on rank 0" in rank1["envelope_failure"]["message"]
    # a disk error inside DCP on rank 1 reaches both ranks, naming rank, error and checkpoint
    for result in (rank0, rank1):
        failure = result["dcp_failure"]
        assert failure["type"] == "CheckpointError"
        assert "rank 1: OSError" in failure["message"]
        assert os.strerror(errno.ENOSPC) in failure["message"]
        assert "bad2.dcp" in failure["message"]
        assert result["after_envelope_failure"] == result["after_dcp_failure"] == 3.0
        # no directory under the final names and no temp directory left behind
        assert not [n for n in result["files_after_failures"] if "bad" in n or ".tmp-" in n]
        assert result["good_files"] == SHARD_FILES
        assert result["leftovers"] == []
        # a model that places its own DTensors is saved and loaded the same way
        own = result["own_dtensors"]
        assert own == {"sharded": True, "parallelism": "none", "equal": True, "table_rows": 3}
        assert result["own_dtensors_async"]["type"] == "ConfigurationError"
        assert "async_save=True cannot write a sharded" in result["own_dtensors_async"]["message"]
        assert result["own_dtensors_async_epoch"] == 0
        assert result["own_dtensors_ddp"]["type"] == "ConfigurationError"
        assert "DDP cannot wrap" in result["own_dtensors_ddp"]["message"]
        assert result["plain_into_fsdp"]["type"] == "CheckpointError"
        assert "unsharded model" in result["plain_into_fsdp"]["message"]
        assert result["units_match_nothing"]["type"] == "ConfigurationError"
        assert "Conv2d" in result["units_match_nothing"]["message"]


@pytest.mark.distributed
@pytest.mark.parametrize(("where", "victim"), [("dcp_write", 1), ("before_rename", 0)])
def test_a_kill_mid_save_leaves_no_directory_under_the_final_name(
    tmp_path: Path, where: str, victim: int,
) -> None:
    workdir = tmp_path / where
    code, output = run_workers("kill", workdir, 2, where)
    assert code != 0, output[-4000:]
    assert (workdir / f"killed_rank{victim}").read_text() == where  # killed where we meant
    ck = workdir / "ck"
    # epoch 1 was saved under both names; the epoch-2 save never appeared
    assert [n for n in listing(ck) if not n.startswith(".")] == ["ep001.dcp", "last.dcp"]
    assert verify_sharded(ck / "ep001.dcp")["epoch"] == 1
    assert verify_sharded(ck / "last.dcp")["epoch"] == 1
    if where == "before_rename":  # the complete temp directory waited for its rename
        (temp,) = temp_entries(ck)
        assert temp.startswith(".ep002.dcp.tmp-")
        assert read_manifest(ck / temp)["epoch"] == 2
    # the next start removes what the dead writer left, and resumes from epoch 1
    remove_stale_temp_files(ck)
    assert listing(ck) == ["ep001.dcp", "last.dcp"]
    resumed = NNHandler.load_latest(ck, device="cpu", use_distributed=False,
                                    parallelism="none")
    assert resumed.epoch == 1


@pytest.mark.distributed
def test_fsdp_example_trains_resumes_and_consolidates(tmp_path: Path) -> None:
    example = REPO_ROOT / "examples" / "fsdp_sharded.py"
    for epochs in ("2", "3"):  # the second run resumes from latest.dcp
        code, output = run_bounded(torchrun(2, example, "--epochs", epochs), tmp_path, "example",
                                   LAUNCH_TIMEOUT_S)
        assert code == 0, output[-8000:]
        assert f"world size 2, epoch {epochs}," in output
    out = tmp_path / "checkpoints" / "fsdp"
    assert listing(out) == ["latest.dcp", "net_ep002.dcp"]
    assert read_manifest(out / "latest.dcp")["epoch"] == 3
    code, output = run_bounded(
        [sys.executable, str(example), "--consolidate", str(out / "latest.dcp")], tmp_path,
        "consolidation", LAUNCH_TIMEOUT_S)
    assert code == 0, output[-8000:]
    plain = read_checkpoint(out / "latest.pth")
    assert plain.epoch == 3 and len(plain.state["history"]["train_losses"]) == 3
    assert plain.state["config"]["parallelism"] == "none"
    assert plain.state["model"]["blocks.0.layer.0.weight"].shape == (32, 32)


# -- single-process units ----------------------------------------------------------------------
leaves = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=3),
                   st.lists(st.integers(), max_size=3),
                   st.integers(0, 4).map(lambda n: torch.arange(float(n))))
trees = st.recursive(leaves, lambda inner: st.dictionaries(st.text(max_size=3), inner,
                                                           max_size=4), max_leaves=12)


@given(st.dictionaries(st.text(max_size=3), trees, max_size=4))
def test_split_and_merge_are_inverse(tree: dict[str, Any]) -> None:
    tensors, plain = split_tensors(tree)

    def check(value: Any, tensors_only: bool) -> None:
        if isinstance(value, dict):
            for item in value.values():
                check(item, tensors_only)
        else:
            assert isinstance(value, torch.Tensor) is tensors_only

    check(tensors, True)
    check(plain, False)
    merged = merge_tensors(tensors, plain)

    def same(a: Any, b: Any) -> None:
        if isinstance(a, torch.Tensor):
            assert a is b
        elif isinstance(a, dict):
            assert list(a) == list(b) or set(a) == set(b)
            for key in a:
                same(a[key], b[key])
        else:
            assert a == b

    same(tree, merged)


def test_split_refuses_tensors_inside_lists() -> None:
    with pytest.raises(CheckpointError, match=r"state\['a'\]\['b'\] holds tensors inside a list"):
        split_tensors({"a": {"b": [torch.zeros(1)]}})


def _fake_checkpoint(path: Path, marker: str) -> Path:
    path.mkdir()
    (path / MANIFEST_FILE).write_text("{}")
    (path / "data").write_text(marker)
    return path


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "move-aside"])
def test_install_replaces_an_existing_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool,
) -> None:
    if not exchange:
        monkeypatch.setattr(sharded_mod, "_rename_exchange", lambda first, second: False)
    final = _fake_checkpoint(tmp_path / "last.dcp", "old")
    temp = _fake_checkpoint(tmp_path / ".last.dcp.tmp-1-abcd", "new")
    sharded_mod._install(temp, final)
    assert (final / "data").read_text() == "new"
    assert listing(tmp_path) == ["last.dcp"]  # the old one is gone, nothing left aside


def test_stale_temp_directory_is_removed(tmp_path: Path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True, timeout=60)
    dead = int(finished.stdout)
    stale = tmp_path / f".ep002.dcp.tmp-{dead}-abcd0123"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "__0_0.distcp").write_bytes(b"x")
    alive = tmp_path / f".ep003.dcp.tmp-{os.getppid()}-abcd0123"
    alive.mkdir()
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert listing(tmp_path) == [alive.name]


def test_discovery_ignores_dcp_files_and_temp_directories(tmp_path: Path) -> None:
    (tmp_path / "stray.dcp").write_text("a file, not a checkpoint directory")
    (tmp_path / ".ep001.dcp.tmp-1-abcd").mkdir()
    (tmp_path / "empty.dcp").mkdir()
    candidates = list_checkpoints(tmp_path)
    assert [(c.path.name, c.record) for c in candidates] == [("empty.dcp", None)]
    assert "no manifest.json" in str(candidates[0].problem)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"parallelism": "FSDP"}, "'ddp', 'fsdp' or 'none'"),
        ({"parallelism": "ddp", "fsdp_units": [torch.nn.Linear]}, "apply only to 'fsdp'"),
        ({"parallelism": "fsdp", "fsdp_units": [int]}, "subclass of Module"),
        ({"parallelism": "fsdp"}, "needs torch.distributed"),
    ],
    ids=["unknown", "units-without-fsdp", "unit-not-a-module", "fsdp-in-one-process"],
)
def test_parallelism_is_validated(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NNHandler(TinyNet, device="cpu", use_distributed=False, **arguments)


def test_plain_model_refuses_a_dcp_name(tmp_path: Path) -> None:
    handler = make_handler()
    assert not handler.sharded_checkpoints and handler.parallelism == "ddp"
    with pytest.raises(ConfigurationError, match="no DTensor parameters"):
        handler.save(tmp_path / "x.dcp")
    assert listing(tmp_path) == []
