"""Hostile and odd checkpoint files, built with our own writer so that their CRCs are valid:
the checksum guards against accidents only, the schema and the reference rules against the rest.

Routes covered: functions named by a file (every argument route, in a child process that must
reach the line after ``load`` or report a CheckpointError), odd integrity records, meta,
configuration, manifests and future versions under ``load_latest``, ``train(resume="latest")``,
``nnhandler list``/``verify``/``inspect``, and a directory read while a job prunes it.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_testing import child_environment, communicate_bounded
from nnh_testing import make_handler

from nnhandler import (
    CheckpointError,
    CheckpointSchemaError,
    NNHandler,
    UnresolvableReferenceError,
)
from nnhandler.checkpoint.envelope import FORMAT_NAME, write_checkpoint, write_envelope
from nnhandler.checkpoint.integrity import MAGIC, TAG, crc32
from nnhandler.checkpoint.refs import REF_KEY
from nnhandler.cli import list_directory, main, verify_path

Edit = Callable[[dict[str, Any]], None]
CK = Path("ck")


def saved_state(*, epochs: int = 1, **settings: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, meta)`` of a real checkpoint of a small trained handler."""
    handler = make_handler(n=16)
    if epochs:
        handler.train(epochs, progress_bar=False, seed=0, **settings)
    handler.save("source.pth")
    envelope = torch.load("source.pth", weights_only=True)
    return envelope["state"], envelope["meta"]


def crafted(path: Path, edit: Edit, **settings: Any) -> Path:
    """A checkpoint at ``path`` whose envelope ``edit`` changed; its checksums are valid."""
    state, meta = saved_state(**settings)
    envelope = {"state": state, "meta": meta}
    edit(envelope)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(path, envelope["state"], envelope["meta"])
    return path


def ref(reference: str) -> dict[str, str]:
    return {REF_KEY: reference}


def config_of(envelope: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = envelope["state"]["config"]
    return config


# -- functions named by a file ------------------------------------------------------------------
def _scheduler_lambda(target: str) -> Edit:
    def edit(envelope: dict[str, Any]) -> None:
        config_of(envelope)["scheduler"] = {
            "class": "torch.optim.lr_scheduler:LambdaLR", "interval": "epoch",
            "kwargs": {"lr_lambda": ref(target)}}
    return edit


def _loader_argument(name: str, target: str) -> Edit:
    def edit(envelope: dict[str, Any]) -> None:
        config_of(envelope)["loaders"]["train"]["extra"][name] = ref(target)
    return edit


def _loss(spec: dict[str, Any]) -> Edit:
    def edit(envelope: dict[str, Any]) -> None:
        config_of(envelope)["loss_fn"] = spec
    return edit


def _metric(target: str) -> Edit:
    def edit(envelope: dict[str, Any]) -> None:
        config_of(envelope)["metrics"]["mae"] = {"kind": "function", "ref": target}
    return edit


def _model_kwarg(target: str) -> Edit:
    def edit(envelope: dict[str, Any]) -> None:
        config_of(envelope)["model_kwargs"]["hidden"] = ref(target)
    return edit


def _compile_backend(target: str) -> Edit:
    def edit(envelope: dict[str, Any]) -> None:
        config_of(envelope)["compile_model"] = {"backend": ref(target)}
    return edit


def _class(field: str, target: str) -> Edit:
    def edit(envelope: dict[str, Any]) -> None:
        config = config_of(envelope)
        if field == "model_class":
            config["model_class"] = target
        else:
            config[field]["class"] = target
    return edit


CALLABLE_ROUTES: dict[str, Edit] = {
    "lambdalr-os-exit": _scheduler_lambda("os:_exit"),
    "lambdalr-sigsegv": _scheduler_lambda("faulthandler:_sigsegv"),
    "lambdalr-python-function": _scheduler_lambda("nnh_testing:mae"),
    "collate-print": _loader_argument("collate_fn", "builtins:print"),
    "worker-init-os-exit": _loader_argument("worker_init_fn", "os:_exit"),
    "loss-builtin": _loss({"kind": "function", "ref": "os:_exit"}),
    "loss-untrusted-function": _loss({"kind": "function", "ref": "shutil:rmtree"}),
    "loss-module-kwarg-function": _loss({"kind": "module", "ref": "torch.nn.modules.loss:MSELoss",
                                         "kwargs": {"reduction": ref("builtins:print")},
                                         "state": {}}),
    "metric-exec": _metric("builtins:exec"),
    "metric-attribute-chain": _metric("nnh_testing:torch.save"),
    "model-kwarg-function": _model_kwarg("os:_exit"),
    "compile-backend": _compile_backend("builtins:print"),
    "model-class-attribute-chain": _class("model_class", "nnh_testing:torch.nn.Module"),
    "model-class-not-imported": _class("model_class", "antigravity:Fly"),
    "model-class-dunder": _class("model_class", "nnh_testing:TinyNet.__init__"),
    "optimizer-any-class": _class("optimizer", "collections:OrderedDict"),
    "scheduler-any-class": _class("scheduler", "collections:OrderedDict"),
}

_CHILD = """
import sys
import nnh_testing
from nnhandler import CheckpointError, NNHandler

for path in sys.argv[1:]:
    try:
        handler = NNHandler.load(path)
        nnh_testing.attach_loaders(handler, n=16)
        if handler.optimizer is None:
            handler.set_optimizer(nnh_testing.torch.optim.Adam, lr=0.1)  # as the warning says
        if handler.loss_fn is None:
            handler.set_loss_fn(nnh_testing.nn.MSELoss())
        handler.train(1, progress_bar=False)
        print("REACHED", path, flush=True)
    except CheckpointError as error:
        print("REFUSED", path, type(error).__name__, flush=True)
print("ALL DONE", "antigravity" in sys.modules, flush=True)
"""


@pytest.mark.slow
def test_no_function_named_by_a_file_is_ever_called(tmp_path: Path) -> None:
    paths = [crafted(tmp_path / f"{name}.pth", edit) for name, edit in CALLABLE_ROUTES.items()]
    process = subprocess.Popen([sys.executable, "-c", _CHILD, *map(str, paths)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=child_environment(), cwd=tmp_path)
    code, output = communicate_bounded(process, "load of crafted files", 240)
    assert code == 0, output  # os._exit(…) would end it early; a SIGSEGV gives -11
    lines = [line for line in output.splitlines() if line.startswith(("REACHED", "REFUSED"))]
    assert len(lines) == len(paths), output
    assert "ALL DONE False" in output, output  # the module the file named was never imported
    # builtins:print as collate_fn would print the batch's tensors
    assert "tensor(" not in output, output
    outcome = {Path(line.split()[1]).stem: line.split()[0] for line in lines}
    must_refuse = {"model-kwarg-function", "compile-backend", "model-class-attribute-chain",
                   "model-class-not-imported", "model-class-dunder"}
    assert {name for name, seen in outcome.items() if seen == "REFUSED"} == must_refuse


@pytest.mark.parametrize(("route", "message"), [
    ("lambdalr-os-exit", "scheduler not restored"),
    ("collate-print", "collate_fn=builtins:print is not restored"),
    ("loss-builtin", "loss function not restored"),
    ("loss-module-kwarg-function", "loss function not restored"),
    ("metric-exec", "metric 'mae' not restored"),
    ("optimizer-any-class", "optimizer not restored"),
], ids=["scheduler", "collate", "loss-function", "loss-kwarg", "metric", "optimizer"])
def test_an_argument_a_file_cannot_supply_is_named_in_a_warning(
        route: str, message: str, caplog: pytest.LogCaptureFixture) -> None:
    path = crafted(Path("ck.pth"), CALLABLE_ROUTES[route])
    NNHandler.load(path)
    assert any(message in record.getMessage() for record in caplog.records), caplog.text


def test_a_function_argument_the_caller_passes_again_is_used() -> None:
    handler = make_handler(n=16)
    handler.set_scheduler(torch.optim.lr_scheduler.LambdaLR, lr_lambda=_halving)
    handler.train(2, progress_bar=False, seed=0)
    handler.save("ck.pth")
    loaded = NNHandler.load("ck.pth")
    assert loaded.scheduler is None  # the file named the function: not taken from it
    loaded.set_scheduler(torch.optim.lr_scheduler.LambdaLR, lr_lambda=_halving)
    # the saved scheduler state waited and is restored now
    assert loaded.scheduler.state_dict()["last_epoch"] == handler.scheduler.state_dict()[
        "last_epoch"] == 2


def _halving(epoch: int) -> float:
    return 0.5 ** epoch


@pytest.mark.parametrize("route", ["model-kwarg-function", "compile-backend"])
def test_what_the_model_needs_from_a_function_is_asked_for_by_name(route: str) -> None:
    path = crafted(Path("ck.pth"), CALLABLE_ROUTES[route])
    argument = "model_kwargs=" if route.startswith("model") else "compile_model="
    with pytest.raises(CheckpointError, match=argument):
        NNHandler.load(path)
    if route.startswith("model"):
        assert NNHandler.load(path, model_kwargs={"hidden": 8}).epoch == 1
    else:
        assert NNHandler.load(path, compile_model=False).epoch == 1


def test_a_module_that_is_not_imported_is_named_and_never_imported() -> None:
    path = crafted(Path("ck.pth"), CALLABLE_ROUTES["model-class-not-imported"])
    with pytest.raises(UnresolvableReferenceError, match="'antigravity' is not imported"):
        NNHandler.load(path)
    assert "antigravity" not in sys.modules


# -- odd records ---------------------------------------------------------------------------------
def _replace_record(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the integrity record of ``path`` with ``change`` applied to its JSON; the
    record's own CRC and the file's covered size stay right (only the values are odd)."""
    data = path.read_bytes()
    json_length, _, tag = struct.unpack("<II4s", data[-12:])
    assert tag == TAG
    record_length = len(MAGIC) + json_length + 12
    body = data[: len(data) - record_length - 2]
    record = json.loads(data[len(data) - record_length + len(MAGIC): len(data) - 12])
    change(record)
    payload = json.dumps(record).encode()
    head = MAGIC + payload
    new_record = head + struct.pack("<II4s", len(payload), crc32(head), TAG)
    path.write_bytes(body + struct.pack("<H", len(new_record)) + new_record)


def _record_value(key: str, value: Any) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        crafted(path, lambda envelope: None)
        _replace_record(path, lambda record: record.__setitem__(key, value))
    return make


def _envelope_edit(edit: Edit) -> Callable[[Path], None]:
    return lambda path: crafted(path, edit)


def _future_version(path: Path) -> None:
    state, meta = saved_state()
    write_envelope(path, {"format": {"name": FORMAT_NAME, "version": 99}, "meta": meta,
                          "state": state})


def _record_disagrees(path: Path) -> None:
    """The record (used for ranking) claims another epoch than the envelope (used to load)."""
    crafted(path, lambda envelope: None)
    _replace_record(path, lambda record: record.__setitem__("epoch", 99))


def _foreign_zip(path: Path) -> None:
    """A torch file holding something else, given a valid integrity record of its own."""
    crafted(path, lambda envelope: None)
    record_source = path.read_bytes()
    json_length = struct.unpack("<I", record_source[-12:-8])[0]
    record = json.loads(record_source[-12 - json_length: -12])
    torch.save({"weights": torch.zeros(3)}, path)
    body = path.read_bytes()[:-2]  # torch.save writes an empty comment: length field last
    record["covered_size"] = len(body)
    record["crc32"] = crc32(body)
    payload = json.dumps(record).encode()
    head = MAGIC + payload
    new_record = head + struct.pack("<II4s", len(payload), crc32(head), TAG)
    path.write_bytes(body + struct.pack("<H", len(new_record)) + new_record)


def _meta(key: str, value: Any) -> Edit:
    def edit(envelope: dict[str, Any]) -> None:
        envelope["meta"][key] = value
    return edit


def _settings(key: str, value: Any) -> Edit:
    def edit(envelope: dict[str, Any]) -> None:
        config_of(envelope)["train_settings"][key] = value
    return edit


def _progress(key: str, value: Any) -> Edit:
    def edit(envelope: dict[str, Any]) -> None:
        envelope["state"]["progress"][key] = value
    return edit


ODD_FILES: dict[str, Callable[[Path], None]] = {
    "record-epoch-text": _record_value("epoch", "abc"),
    "record-epoch-null": _record_value("epoch", None),
    "record-epoch-list": _record_value("epoch", [1]),
    "record-crc-text": _record_value("crc32", "x"),
    "record-logs-list": _record_value("logs", [1, 2]),
    "future-format-version": _future_version,
    "record-disagrees-with-meta": _record_disagrees,
    "foreign-zip": _foreign_zip,
    "meta-world-size-text": _envelope_edit(_meta("world_size", "x")),
    "config-ema-text": _envelope_edit(_settings("ema_decay", "x")),
    "config-missing": _envelope_edit(lambda envelope: envelope["state"].pop("config")),
    "progress-epoch-text": _envelope_edit(_progress("epoch", "abc")),
    "reference-malformed": _envelope_edit(_class("model_class", "os")),
}


def odd_directory(case: str) -> tuple[Path, Path]:
    """``ck/`` with a good checkpoint of epoch 1 and an odd newer-looking ``ep099.pth``."""
    handler = make_handler(n=16)
    handler.auto_save(1, CK, name="ep{epoch:03d}")
    handler.train(1, progress_bar=False, seed=0)
    odd = CK / "ep099.pth"
    ODD_FILES[case](odd)
    return CK / "ep001.pth", odd


@pytest.mark.parametrize("case", list(ODD_FILES), ids=list(ODD_FILES))
def test_an_odd_newest_file_never_blocks_resume(case: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    good, odd = odd_directory(case)
    for verify in (True, False):
        by_name = {row["name"]: row for row in list_directory(CK, verify=verify)}
        assert by_name[good.name]["latest"] and by_name[good.name]["valid"], by_name
        assert not by_name[odd.name]["latest"], by_name
        if verify:
            assert not by_name[odd.name]["valid"] and by_name[odd.name]["problem"]

    loaded = NNHandler.load_latest(CK)
    assert loaded.epoch == 1
    assert any(str(odd) in record.getMessage() for record in caplog.records)

    fresh = make_handler(n=16)
    fresh.auto_save(1, CK, name="ep{epoch:03d}")
    fresh.train(until_epoch=2, resume="latest", progress_bar=False, seed=0)
    assert fresh.epoch == 2


@pytest.mark.parametrize("case", list(ODD_FILES), ids=list(ODD_FILES))
def test_the_cli_reports_an_odd_file_without_a_traceback(
        case: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    _, odd = odd_directory(case)
    for arguments in (["verify", str(odd)], ["inspect", str(odd)], ["list", str(CK)],
                      ["list", "--no-verify", str(CK)], ["verify", "--json", str(odd)]):
        capsys.readouterr()
        code = main(arguments)
        captured = capsys.readouterr()
        text = captured.out + captured.err
        assert "Traceback" not in text, (arguments, text)
        if arguments[0] == "verify":
            assert code == 1, (arguments, text)
    result = verify_path(str(odd))
    assert not result["ok"] and result["kind"] in ("corrupt", "invalid", "not-a-checkpoint")


def test_verify_reads_an_export_as_what_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    handler = make_handler(n=16)
    handler.train(1, progress_bar=False)
    exported = handler.export("weights.pt")
    assert verify_path(str(exported))["kind"] == "export"
    assert main(["verify", str(exported)]) == 0
    assert "NNHandler.export()" in capsys.readouterr().out
    torch.save(handler.module.state_dict(), "plain.pt")
    result = verify_path("plain.pt")
    assert result["kind"] == "not-a-checkpoint" and "no checksum" in result["error"]
    flipped = bytearray(exported.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    Path("flipped.pt").write_bytes(bytes(flipped))
    assert verify_path("flipped.pt")["kind"] == "corrupt"


def test_an_export_in_a_checkpoint_folder_is_never_a_checkpoint() -> None:
    handler = make_handler(n=16)
    handler.auto_save(1, CK, name="ep{epoch:03d}")
    handler.train(1, progress_bar=False)
    handler.export(CK / "zz_weights.pth")
    assert [row["name"] for row in list_directory(CK)] == ["ep001.pth"]
    assert NNHandler.load_latest(CK).epoch == 1


def test_a_crafted_sharded_manifest_without_epoch_is_skipped(
        caplog: pytest.LogCaptureFixture) -> None:
    handler = make_handler(n=16)
    handler.auto_save(1, CK, name="ep{epoch:03d}")
    handler.train(1, progress_bar=False)
    fake = CK / "ep099.dcp"
    fake.mkdir()
    text = json.dumps({"format": {"name": "nnhandler.sharded", "version": 1}, "step": 1,
                       "time": "x", "logs": {}, "world_size": 1, "algorithm": "crc32",
                       "files": {"nnhandler.pth": {"size": 1, "crc32": 0}}})
    (fake / "manifest.json").write_text(json.dumps({"body": text, "crc32": crc32(text.encode())}))
    assert NNHandler.load_latest(CK).epoch == 1
    assert any("manifest.epoch" in record.getMessage() for record in caplog.records)
    rows = {row["name"]: row for row in list_directory(CK)}
    assert not rows["ep099.dcp"]["valid"] and rows["ep001.pth"]["latest"]


def test_a_manifest_that_names_a_path_outside_its_directory_is_refused() -> None:
    fake = Path("x.dcp")
    fake.mkdir()
    text = json.dumps({"format": {"name": "nnhandler.sharded", "version": 1}, "epoch": 1,
                       "step": 1, "time": "x", "logs": {}, "world_size": 1,
                       "algorithm": "crc32",
                       "files": {"nnhandler.pth": {"size": 1, "crc32": 0},
                                 "../../etc/passwd": {"size": 1, "crc32": 0}}})
    (fake / "manifest.json").write_text(json.dumps({"body": text, "crc32": crc32(text.encode())}))
    from nnhandler.checkpoint.sharded import read_manifest

    with pytest.raises(CheckpointSchemaError, match="not a plain file name"):
        read_manifest(fake)


def test_schema_errors_name_the_file_and_the_field() -> None:
    path = crafted(Path("ck.pth"), _progress("epoch", "abc"))
    with pytest.raises(CheckpointSchemaError) as caught:
        NNHandler.load(path)
    assert caught.value.path == str(path)
    assert caught.value.field == "state['progress'].epoch"
    assert "'abc'" in str(caught.value)


def test_a_bad_state_changes_nothing_in_a_configured_handler() -> None:
    """resume_from checks every state before any is applied."""
    path = crafted(Path("ck.pth"), _progress("epoch", "abc"), epochs=2)
    handler = make_handler(n=16)
    handler.train(1, progress_bar=False, seed=0)
    before = {key: value.clone() for key, value in handler.module.state_dict().items()}
    with pytest.raises(CheckpointSchemaError):
        handler.resume_from(path)
    assert handler.epoch == 1
    for key, value in handler.module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_model_state_that_does_not_fit_loads_nothing() -> None:
    def wrong_shape(envelope: dict[str, Any]) -> None:
        envelope["state"]["model"]["net.3.weight"] = torch.zeros(2, 2)

    path = crafted(Path("ck.pth"), wrong_shape)
    handler = make_handler(n=16)
    before = {key: value.clone() for key, value in handler.module.state_dict().items()}
    with pytest.raises(CheckpointSchemaError, match=r"net\.3\.weight.*shape"):
        handler.resume_from(path)
    for key, value in handler.module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_listing_counts_one_checkpoint_in_the_singular(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    handler = make_handler(n=16)
    handler.auto_save(1, CK, name="ep{epoch:03d}")
    handler.train(1, progress_bar=False)
    capsys.readouterr()
    assert main(["list", str(CK)]) == 0
    out = capsys.readouterr().out
    assert "(1 checkpoint)" in out and "checkpoints)" not in out


# -- a directory read while a job prunes it ------------------------------------------------------
_PRUNING_JOB = """
import sys, time
import nnh_testing
from nnhandler import Callback

class Slow(Callback):
    def on_epoch_end(self, **kwargs):
        time.sleep(0.05)

handler = nnh_testing.make_handler(n=256, batch_size=4)
handler.add_callback(Slow())
handler.auto_save(1, sys.argv[1], name="ep{epoch:03d}", keep_last=1)
handler.train(int(sys.argv[2]), progress_bar=False, seed=0)
print("JOB DONE", flush=True)
"""


@pytest.mark.slow
def test_listing_and_loading_while_a_job_prunes_never_sees_a_false_corruption(
        tmp_path: Path) -> None:
    directory = tmp_path / "ck"
    epochs = 25
    job = subprocess.Popen([sys.executable, "-c", _PRUNING_JOB, str(directory), str(epochs)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=child_environment(), cwd=tmp_path)
    listings = loads = 0
    try:
        while job.poll() is None and listings < 400:
            rows = list_directory(directory)
            if not rows:  # the job is still starting: nothing saved yet
                time.sleep(0.02)
                continue
            listings += 1
            assert all(row["valid"] for row in rows), rows
            handler = NNHandler.load_latest(directory)
            loads += 1
            assert 1 <= handler.epoch <= epochs
    finally:
        code, output = communicate_bounded(job, "pruning job", 240)
    assert code == 0 and "JOB DONE" in output, output
    assert listings >= 3, listings
    assert [row["name"] for row in list_directory(directory)] == [f"ep{epochs:03d}.pth"]
