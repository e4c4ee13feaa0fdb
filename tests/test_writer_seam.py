"""The format seam (issue 12, item 7): two writers behind ``CheckpointIO``, one reader.

The fast writer and the torch.save writer both produce files that ``read_checkpoint``,
``verify_file``, the zip-layout check and ``torch.load(weights_only=True)`` accept — from a
synchronous save, from a snapshot (async), and as a sharded checkpoint's envelope file; bit
flips in torch.save-written files are detected; the fast writer's self-check passes on this
torch, and where it cannot (a torch private gone) nnhandler warns once and saves with
torch.save; ``NNHANDLER_WRITER`` chooses a writer and refuses anything else.
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_testing import REPO_ROOT, TESTS_DIR, child_environment, run_bounded, torchrun
from hypothesis import given, settings
from hypothesis import strategies as st
from nnh_testing import make_handler
from torch import nn

from nnhandler import CheckpointCorruptedError, ConfigurationError, NNHandler, read_checkpoint
from nnhandler.checkpoint.envelope import build_meta, envelope_of, write_checkpoint, write_envelope
from nnhandler.checkpoint.integrity import read_integrity_record, verify_file
from nnhandler.checkpoint.io import (
    FAST_WRITER,
    TORCH_SAVE_WRITER,
    WRITER_CHOICES,
    WRITER_ENV,
    CheckpointIO,
    checkpoint_io,
    fast_writer_self_check,
    first_difference,
    representative_state,
    writer_choice,
)
from nnhandler.checkpoint.packing import split_packs
from nnhandler.checkpoint.sharded import read_sharded_checkpoint, verify_sharded
from nnhandler.checkpoint.snapshot import StagingBuffers
from nnhandler.checkpoint.ziplayout import check_zip_layout

META = build_meta(epoch=4, step=9, logs={"loss": 0.5}, world_size=1)
WRITERS = [FAST_WRITER, TORCH_SAVE_WRITER]
WRITER_IDS = [writer.name for writer in WRITERS]
#: the zip64 end-of-central-directory signature: torch.save's zip writer always ends a file with
#: zip64 end records, the fast writer only where sizes or counts need them (never in a small file)
ZIP64_END = b"PK\x06\x06"
SUBPROCESS_TIMEOUT_S = 240


def checkpoint_state() -> dict[str, Any]:
    """The self-check's representative state without what a checkpoint cannot hold as
    state (parameters are stored as plain tensors by state dicts)."""
    state = representative_state()
    del state["parameter"]
    return {"model": state, "optimizer": {"state": {0: {"step": torch.tensor(3.0)}},
                                          "param_groups": [{"lr": 0.1, "params": [0]}]}}


def torch_saved(value: Any) -> Any:
    """``value`` as ``torch.save`` then ``torch.load(weights_only=True)`` give it back."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


def assert_accepted(path: Path, state: dict[str, Any]) -> None:
    """Every check of the reader passes and the file holds what torch.save would give."""
    record = verify_file(path)
    assert record["epoch"] == META["epoch"] and record["logs"] == META["logs"]
    check_zip_layout(path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.epoch == META["epoch"]
    loaded = split_packs(torch.load(path, weights_only=True))  # as nnhandler's reader does
    assert first_difference(torch_saved(envelope_of(state, META)), loaded) == ""


def written_by_torch_save(path: Path) -> bool:
    covered = int(read_integrity_record(path)["covered_size"])
    return ZIP64_END in path.read_bytes()[max(0, covered - 200):covered]


# -- both writers, one reader ------------------------------------------------------------------
@pytest.mark.parametrize("writer", WRITERS, ids=WRITER_IDS)
def test_a_synchronous_save_of_either_writer_is_accepted_by_the_reader(
        tmp_path: Path, writer: CheckpointIO) -> None:
    state = checkpoint_state()
    path = tmp_path / "ck.pth"
    size = write_checkpoint(path, state, META, io=writer)
    assert size == path.stat().st_size
    assert_accepted(path, state)
    assert written_by_torch_save(path) is (writer is TORCH_SAVE_WRITER)


@pytest.mark.parametrize("writer", WRITERS, ids=WRITER_IDS)
def test_a_snapshot_written_by_either_writer_is_accepted_by_the_reader(
        tmp_path: Path, writer: CheckpointIO) -> None:
    state = checkpoint_state()
    staging = StagingBuffers()
    for round_ in range(2):  # the second snapshot reuses the plan and the arena
        state["model"]["base"].add_(1.0)
        snapshot = staging.take(envelope_of(state, META), io=writer)
        assert snapshot.io is writer
        state["model"]["base"].add_(100.0)  # changed after the snapshot: not in the file
        state["model"]["base"].sub_(100.0)
        path = tmp_path / f"async{round_}.pth"
        write_envelope(path, snapshot.value, snapshot.records, io=snapshot.io)
        assert_accepted(path, state)
        assert written_by_torch_save(path) is (writer is TORCH_SAVE_WRITER)


def test_a_torch_save_snapshot_holds_real_tensors_over_the_staging_memory() -> None:
    base = torch.arange(8.0)
    state = {"a": base, "b": base[2:5], "c": nn.Parameter(torch.ones(2), requires_grad=False)}
    snapshot = StagingBuffers().take(state, io=TORCH_SAVE_WRITER)
    copied = snapshot.value
    assert type(copied["a"]) is torch.Tensor and type(copied["c"]) is nn.Parameter
    assert copied["a"].untyped_storage().data_ptr() == copied["b"].untyped_storage().data_ptr()
    assert copied["a"].untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    arena = snapshot.arena
    assert arena.data_ptr() <= copied["a"].data_ptr() < arena.data_ptr() + arena.numel()
    base.zero_()  # the snapshot is a copy
    assert torch.equal(copied["a"], torch.arange(8.0))
    assert copied["b"].storage_offset() == 2 and not copied["c"].requires_grad


def test_one_staging_area_serves_both_writers_in_turn(tmp_path: Path) -> None:
    state = checkpoint_state()
    staging = StagingBuffers()
    for index, writer in enumerate([FAST_WRITER, TORCH_SAVE_WRITER, FAST_WRITER]):
        snapshot = staging.take(envelope_of(state, META), io=writer)
        path = tmp_path / f"{index}.pth"
        write_envelope(path, snapshot.value, snapshot.records, io=snapshot.io)
        assert_accepted(path, state)
        assert written_by_torch_save(path) is (writer is TORCH_SAVE_WRITER)


@pytest.mark.parametrize("writer", ["fast", "torch"])
def test_handler_saves_sync_and_async_with_the_writer_the_variable_names(
        monkeypatch: pytest.MonkeyPatch, writer: str) -> None:
    monkeypatch.setenv(WRITER_ENV, writer)
    handler = make_handler()
    handler.auto_save(1, "ck", name="ep{epoch:02d}", async_save=True)
    handler.train(2, seed=0, progress_bar=False)
    manual = handler.save("manual.pth")
    for path in (Path("ck/ep01.pth"), Path("ck/ep02.pth"), manual):
        verify_file(path)
        assert written_by_torch_save(path) is (writer == "torch")
    resumed = NNHandler.load("ck/ep02.pth", logger_mode="file")
    assert resumed.train_losses == handler.train_losses
    for name, value in handler.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], value), name


# -- integrity of torch.save-written files -----------------------------------------------------
@pytest.fixture(scope="module")
def torch_saved_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("plain") / "ck.pth"
    write_checkpoint(path, checkpoint_state(), META, io=TORCH_SAVE_WRITER)
    return path.read_bytes()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@settings(max_examples=60)
@given(bit=st.integers(min_value=0))
def test_any_bit_flip_in_a_torch_save_written_file_is_detected(
        tmp_path: Path, torch_saved_file: bytes, bit: int) -> None:
    damaged = bytearray(torch_saved_file)
    bit %= len(damaged) * 8
    damaged[bit // 8] ^= 1 << (bit % 8)
    path = tmp_path / "flipped.pth"
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointCorruptedError, match=r"flipped\.pth"):
        read_checkpoint(path)


def test_a_sweep_of_flips_and_truncations_of_a_torch_save_written_file_is_detected(
        tmp_path: Path, torch_saved_file: bytes) -> None:
    rng = random.Random(12)
    path = tmp_path / "damaged.pth"
    for bit in [*range(0, 8 * 64, 7), *rng.sample(range(len(torch_saved_file) * 8), 150)]:
        damaged = bytearray(torch_saved_file)
        damaged[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointCorruptedError):
            verify_file(path)
    for length in rng.sample(range(len(torch_saved_file)), 50):
        path.write_bytes(torch_saved_file[:length])
        with pytest.raises(CheckpointCorruptedError):
            read_checkpoint(path)


# -- the self-check ----------------------------------------------------------------------------
def test_the_fast_writer_passes_its_self_check_on_this_torch() -> None:
    check = fast_writer_self_check()
    assert (check.passed, check.reason) == (True, "")
    assert check.torch_version == str(torch.__version__)
    assert fast_writer_self_check() is check  # cached for the process


def _tensor_pair(change: str) -> tuple[Any, Any]:
    base = torch.arange(6.0)
    if change == "dtype":
        return {"t": base}, {"t": base.double()}
    if change == "stride":
        return {"t": base.reshape(2, 3)}, {"t": base.reshape(3, 2).t()}
    if change == "offset":
        return {"t": base[1:3]}, {"t": base[1:3].clone()}
    if change == "bytes":
        return {"t": base}, {"t": base + 1}
    if change == "requires_grad":
        return {"t": base}, {"t": base.clone().requires_grad_()}
    if change == "type":
        return {"t": nn.Parameter(base)}, {"t": base.clone()}
    if change == "sharing":
        return {"a": base[:3], "b": base[3:]}, {"a": base.clone()[:3], "b": base.clone()[3:]}
    if change == "key order":
        return {"a": 1, "b": 2}, {"b": 2, "a": 1}
    if change == "metadata":
        first: OrderedDict[str, Any] = OrderedDict(w=base)
        second: OrderedDict[str, Any] = OrderedDict(w=base)
        first._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
        second._metadata = {"": {"version": 2}}  # type: ignore[attr-defined]
        return first, second
    if change == "float bits":
        return {"x": 0.0}, {"x": -0.0}
    if change == "container":
        return {"x": [1, 2]}, {"x": (1, 2)}
    raise AssertionError(change)


@pytest.mark.parametrize(("change", "named"), [
    ("dtype", "state['t'] has dtype torch.float64"),
    ("stride", "state['t'] has stride"),
    ("offset", "state['t'] has storage offset 0, expected 1"),
    ("bytes", "state['t']'s storage holds other bytes"),
    ("requires_grad", "state['t'] has requires_grad True"),
    ("type", "state['t'] is a Tensor, expected a Parameter"),
    ("sharing", "storage sharing differs around state['a']"),
    ("key order", "state has keys ['b', 'a'], expected ['a', 'b']"),
    ("metadata", "state.__dict__['_metadata']['']['version'] is 2, expected 1"),
    ("float bits", "state['x'] is -0.0, expected 0.0"),
    ("container", "state['x'] is a tuple, expected a list"),
], ids=lambda value: value if len(value) < 14 else "")
def test_the_self_check_comparison_names_the_first_difference(change: str, named: str) -> None:
    expected, actual = _tensor_pair(change)
    assert first_difference(expected, expected) == ""
    difference = first_difference(expected, actual)
    assert difference.startswith(named), difference


def test_the_self_check_comparison_finds_nothing_between_torch_save_and_the_fast_writer(
        tmp_path: Path) -> None:
    state = representative_state()
    path = tmp_path / "fast.pth"
    FAST_WRITER.write(path, state, {"kind": "export"}, pack=True)
    loaded = split_packs(torch.load(path, weights_only=True))
    assert first_difference(torch_saved(state), loaded) == ""


def _run_python(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S, cwd=Path.cwd(),
                          env=env if env is not None else child_environment(), check=False)


def test_import_nnhandler_touches_no_torch_private() -> None:
    result = _run_python("""
        import sys
        import torch, torch._utils, torch.storage
        for name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter"):
            delattr(torch._utils, name)
        del torch.storage._dtype_to_storage_type_map
        import nnhandler
        from nnhandler import NNHandler, AutoSaveCallback
        print("imported", "nnhandler.checkpoint.pickling" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["imported", "False"]


FALLBACK_SCRIPT = """
    import json, warnings
    from pathlib import Path
    import torch, torch._utils, torch._weights_only_unpickler
    # torch.load's allowlist of rebuild functions is built once: built now, it outlives the
    # deletion, so only nnhandler's fast writer (which imports the function) sees it gone
    torch._weights_only_unpickler._get_allowed_globals()
    del torch._utils._rebuild_tensor_v3
    from nnhandler import NNHandler
    from nnhandler.checkpoint.integrity import read_integrity_record, verify_file
    from nnhandler.checkpoint.io import WriterFallbackWarning, checkpoint_io
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from nnh_testing import make_handler  # its skip marks ask for the writer: a first use
        handler = make_handler()
        handler.auto_save(1, "ck", name="ep{epoch:02d}", async_save=True)
        handler.train(2, seed=0, progress_bar=False)
        handler.save("manual.pth")
        handler.save("manual2.pth")
        writer = checkpoint_io().name
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, WriterFallbackWarning)]
    files = {}
    for path in ("ck/ep01.pth", "ck/ep02.pth", "manual.pth", "manual2.pth"):
        verify_file(path)
        covered = int(read_integrity_record(Path(path))["covered_size"])
        files[path] = b"PK\\x06\\x06" in Path(path).read_bytes()[covered - 200:covered]
    resumed = NNHandler.load("ck/ep02.pth", logger_mode="file")
    print(json.dumps({"fallbacks": fallbacks, "writer": writer, "torch_save_files": files,
                      "same_losses": resumed.train_losses == handler.train_losses}))
"""


@pytest.mark.slow
def test_a_fast_writer_broken_by_torch_falls_back_to_torch_save_with_one_warning() -> None:
    result = _run_python(FALLBACK_SCRIPT, {**child_environment(), WRITER_ENV: "auto"})
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["writer"] == "torch" and report["same_losses"] is True
    assert all(report["torch_save_files"].values()), report["torch_save_files"]
    (warning,) = report["fallbacks"]
    assert "_rebuild_tensor_v3" in warning and f"torch {torch.__version__}" in warning
    assert "written with torch.save instead" in warning


@pytest.mark.slow
def test_forcing_the_fast_writer_skips_the_self_check() -> None:
    env = {**child_environment(), WRITER_ENV: "fast"}
    result = _run_python("""
        import nnhandler.checkpoint.io as cio
        print(cio.checkpoint_io().name, cio._CHECKED)
    """, env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["fast", "None"]


# -- NNHANDLER_WRITER --------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "writer"), [
    (None, "fast"), ("", "fast"), ("auto", "fast"), ("fast", "fast"), ("torch", "torch"),
], ids=["unset", "empty", "auto", "fast", "torch"])
def test_the_variable_chooses_the_writer(monkeypatch: pytest.MonkeyPatch, value: str | None,
                                         writer: str) -> None:
    if value is None:
        monkeypatch.delenv(WRITER_ENV, raising=False)
    else:
        monkeypatch.setenv(WRITER_ENV, value)
    assert checkpoint_io().name == writer  # auto: the self-check passes on this torch
    assert writer_choice() == (value or "auto")


@pytest.mark.parametrize("value", ["Torch", "pickle", "1", " fast"],
                         ids=["capitalised", "unknown", "number", "leading-space"])
def test_any_other_value_is_a_configuration_error_naming_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str) -> None:
    monkeypatch.setenv(WRITER_ENV, value)
    choices = ", ".join(repr(choice) for choice in WRITER_CHOICES)
    with pytest.raises(ConfigurationError, match=f"NNHANDLER_WRITER={value!r}.*{choices}"):
        checkpoint_io()
    with pytest.raises(ConfigurationError, match="NNHANDLER_WRITER"):
        write_checkpoint(tmp_path / "ck.pth", {"w": torch.ones(1)}, META)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_writer_argument_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="checkpoint writer 'zip' is not one of"):
        checkpoint_io("zip")


# -- a sharded checkpoint's envelope file, written by torch.save on two ranks ------------------
@pytest.mark.distributed
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available")
def test_a_sharded_checkpoint_written_with_torch_save_on_two_ranks_reads_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WRITER_ENV, "torch")
    workdir = tmp_path / "train"
    code, output = run_bounded(torchrun(2, TESTS_DIR / "sharded_worker.py", "train",
                                        str(workdir)), tmp_path, "sharded train",
                               SUBPROCESS_TIMEOUT_S)
    assert code == 0, output[-8000:]
    directory = workdir / "ck" / "ep004.dcp"
    envelope = directory / "nnhandler.pth"
    assert written_by_torch_save(envelope)
    verify_sharded(directory)
    checkpoint = read_sharded_checkpoint(directory)
    assert checkpoint.meta["epoch"] == 4 and checkpoint.meta["world_size"] == 2
    assert REPO_ROOT.is_dir()
