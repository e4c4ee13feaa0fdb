"""Worker script for tests/test_sharded_checkpoint.py, launched under torchrun (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node=N tests/sharded_worker.py SCENARIO DIR [ARG]

Each scenario works inside DIR (its working directory) and writes ``result_rank<r>.json`` (and,
where tensors matter, ``*_rank<r>.pt``) for the test to assert on. Scenarios:

* ``train``   — 2 ranks, FSDP2 (``parallelism="fsdp"``): three auto-saves (every 2nd epoch,
  latest-only with ``overwrite``, and a fixed name replaced every epoch), the full parameters
  and optimizer state after every epoch, a save/load round trip by hand, and the errors of a
  ``.pth`` name and of EMA.
* ``resume``  — 2 ranks: REF's epoch-2 directory resumed by ``load_latest`` and by
  ``train(resume="latest")`` on a handler built by the script, each to epoch 4.
* ``reshard`` — 3 ranks: REF's epoch-4 checkpoint (written by 2 ranks) loaded, checked against
  the full tensors the 2-rank run recorded, trained one more epoch and saved again.
* ``errors``  — 2 ranks: a failure on rank 0 after the shards are written, a disk error inside
  DCP on rank 1, a model that holds its own DTensors, a plain checkpoint into an FSDP model.
* ``kill``    — 2 ranks: one rank is SIGKILLed in the middle of the epoch-2 save (at the point
  named by REF: ``dcp_write`` on rank 1 or ``before_rename`` on rank 0).

A watchdog dumps every thread's stack and exits if a scenario hangs, so the test sees a
failure with a traceback instead of a silent timeout.
"""

from __future__ import annotations

import errno
import faulthandler
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

faulthandler.dump_traceback_later(150, exit=True)  # inside the test's limit

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_testing import (  # noqa: E402
    FailingState,
    attempt,
    group_still_works,
    history_of,
    run_worker,
)
from nnh_testing import TinyNet, mae, regression_dataset  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.filesystem import FileSystemWriter  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor  # noqa: E402

import nnhandler.checkpoint.sharded as sharded_mod  # noqa: E402
from nnhandler import AutoSaveCallback, Callback, NNHandler  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD_SIZE = int(os.environ["WORLD_SIZE"])

TRAIN_N = 60
VAL_N = 17  # rank 0 validates 9 samples (2 batches), rank 1 8 (1 batch): forwards must match
BATCH = 8
SEED = 7
EPOCHS = 4


# -- helpers -----------------------------------------------------------------------------------
def full(value: Any) -> Any:
    """A DTensor gathered into a plain tensor (collective); other values unchanged."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_model(handler: NNHandler) -> dict[str, torch.Tensor]:
    return {k: full(v).detach().clone() for k, v in handler.module.state_dict().items()}


def full_optimizer(handler: NNHandler) -> dict[str, torch.Tensor]:
    """The whole optimizer state, flattened to ``"<param>.<name>"`` (collective)."""
    assert handler.optimizer is not None
    state = get_optimizer_state_dict(handler.module, handler.optimizer,
                                     options=StateDictOptions(full_state_dict=True))
    return {f"{name}.{key}": value.detach().clone()
            for name, values in state["state"].items() for key, value in values.items()}


def local_shards(handler: NNHandler) -> dict[str, torch.Tensor]:
    """This rank's own shards of the parameters and the optimizer state (no collective)."""
    assert handler.optimizer is not None
    shards = {f"param:{k}": v.to_local().detach().clone() if isinstance(v, DTensor) else v
              for k, v in handler.module.state_dict().items()}
    names = {id(p): n for n, p in handler.module.named_parameters()}
    for parameter, values in handler.optimizer.state.items():
        for key, value in values.items():
            local = value.to_local() if isinstance(value, DTensor) else value
            shards[f"optim:{names[id(parameter)]}.{key}"] = local.detach().clone()
    return shards


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Recorder(Callback):
    """The full parameters and optimizer state after every epoch (on every rank)."""

    def __init__(self) -> None:
        self.params: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_begin(self, epoch: int, **kwargs: Any) -> None:
        # rank 1's random streams drift away from rank 0's, so a resume that restored the wrong
        # rank's streams changes rank 1's dropout masks and the result
        if dist.get_rank() == 1:
            torch.rand(epoch)

    def on_epoch_end(self, handler: NNHandler, epoch: int, **kwargs: Any) -> None:
        self.params[epoch] = full_model(handler)
        self.optimizer[epoch] = full_optimizer(handler)


class DTensorNet(nn.Module):
    """A model that places its own DTensors (no FSDP): a row-sharded table and a replicated
    bias, the layout of tensor parallelism."""

    def __init__(self) -> None:
        super().__init__()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        self.table = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]))
        self.bias = nn.Parameter(distribute_tensor(torch.randn(6), mesh, [Replicate()]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.table.full_tensor().T + self.bias.full_tensor()


class WarningLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def attach_loaders(handler: NNHandler) -> None:
    handler.set_train_loader(regression_dataset(TRAIN_N), batch_size=BATCH, shuffle=True)
    handler.set_val_loader(regression_dataset(VAL_N, seed=1), batch_size=BATCH)


def new_handler(**arguments: Any) -> NNHandler:
    torch.manual_seed(0)
    handler = NNHandler(TinyNet, device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
                        log_file=f"nnhandler_rank{RANK}.log", parallelism="fsdp",
                        fsdp_units=[nn.Linear], **arguments)
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)
    handler.set_loss_fn(nn.MSELoss)
    handler.add_metric("mae", mae)
    attach_loaders(handler)
    return handler


def add_autosaves(handler: NNHandler) -> None:
    handler.auto_save(2, "ck", name="ep{epoch:03d}")
    handler.add_callback(AutoSaveCallback(1, "ck", name="latest_ep{epoch:03d}", overwrite=True))
    handler.add_callback(AutoSaveCallback(1, "ck", name="last", overwrite=True))


def list_tree(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# -- scenarios ---------------------------------------------------------------------------------
def scenario_train(workdir: Path) -> dict[str, Any]:
    handler = new_handler()
    recorder = Recorder()
    handler.add_callback(recorder)
    add_autosaves(handler)
    logs = handler.train(EPOCHS, seed=SEED, gradient_accumulation_steps=2,
                         gradient_clipping_norm=1.0, progress_bar=False)
    dist.barrier()
    torch.save({"params": recorder.params, "optimizer": recorder.optimizer},
               workdir / f"reference_rank{RANK}.pt")
    result: dict[str, Any] = {
        "sharded": handler.sharded_checkpoints,
        "parallelism": handler.parallelism,
        "history": history_of(handler),
        "last_logs": logs,
        "files": list_tree(workdir / "ck"),
        "param_types": sorted({type(p).__name__ for p in handler.module.parameters()}),
    }

    # a round trip by hand: the same shards, optimizer state and history on every rank
    saved_shards = local_shards(handler)
    saved_scheduler = handler.scheduler.state_dict()
    handler.save("by_hand.dcp")
    loaded = NNHandler.load("by_hand.dcp", logger_mode=NNHandler.LoggingMode.FILE,
                            log_file=f"nnhandler_rank{RANK}.log")
    result["round_trip"] = {
        "parallelism": loaded.parallelism,
        "sharded": loaded.sharded_checkpoints,
        "shards_equal": same(local_shards(loaded), saved_shards),
        "full_params_equal": same(full_model(loaded), recorder.params[EPOCHS]),
        "full_optimizer_equal": same(full_optimizer(loaded), recorder.optimizer[EPOCHS]),
        "history": history_of(loaded),
        "scheduler_equal": loaded.scheduler.state_dict() == saved_scheduler,
        "autosaves": sorted(repr(c) for c in loaded.callbacks
                            if isinstance(c, AutoSaveCallback)),
    }
    dist.barrier()
    result["by_hand_files"] = sorted(os.listdir("by_hand.dcp"))

    # clear errors on every rank: a '.pth' name for a sharded model, EMA with FSDP2
    result["pth_name"] = attempt(lambda: handler.save("final.pth"))
    result["ema"] = attempt(lambda: handler.train(1, ema_decay=0.9, progress_bar=False))
    result["after_errors"] = group_still_works()
    result["leftovers"] = [name for name in os.listdir(".") if ".tmp-" in name]
    return result


def _resume_reference(ref: Path, target: Path) -> None:
    if RANK == 0:
        target.mkdir()
        shutil.copytree(ref / "ck" / "ep002.dcp", target / "ep002.dcp")
    dist.barrier()


def scenario_resume(workdir: Path, ref: Path) -> dict[str, Any]:
    reference = torch.load(ref / f"reference_rank{RANK}.pt", weights_only=True)
    result: dict[str, Any] = {}

    # a) NNHandler.load_latest: picks ep002.dcp; its auto-saves come back with it
    _resume_reference(ref, workdir / "ck")
    handler = NNHandler.load_latest("ck", logger_mode=NNHandler.LoggingMode.FILE,
                                    log_file=f"nnhandler_rank{RANK}.log")
    result["loaded_epoch"] = handler.epoch
    result["loaded_params_equal_epoch2"] = same(full_model(handler), reference["params"][2])
    result["loaded_optimizer_equal_epoch2"] = same(full_optimizer(handler),
                                                   reference["optimizer"][2])
    attach_loaders(handler)
    handler.add_metric("mae", mae)  # a test-module function is not restored by import path
    recorder = Recorder()
    handler.add_callback(recorder)
    handler.train(until_epoch=EPOCHS, seed=SEED, progress_bar=False)
    dist.barrier()
    result["load_latest"] = {
        "history": history_of(handler),
        "params_equal": {e: same(recorder.params[e], reference["params"][e]) for e in (3, 4)},
        "optimizer_equal": {e: same(recorder.optimizer[e], reference["optimizer"][e])
                            for e in (3, 4)},
        "files": list_tree(workdir / "ck"),
    }

    # b) a restartable script: it builds its handler and calls train(resume="latest")
    os.chdir(workdir / "script")
    _resume_reference(ref, workdir / "script" / "ck")
    script = new_handler()
    add_autosaves(script)
    recorder = Recorder()
    script.add_callback(recorder)
    script.train(until_epoch=EPOCHS, resume="latest", seed=SEED, progress_bar=False)
    dist.barrier()
    result["resume_latest"] = {
        "history": history_of(script),
        "params_equal": {e: same(recorder.params[e], reference["params"][e]) for e in (3, 4)},
        "files": list_tree(workdir / "script" / "ck"),
    }
    return result


def scenario_reshard(workdir: Path, ref: Path) -> dict[str, Any]:
    reference = torch.load(ref / "reference_rank0.pt", weights_only=True)
    warnings_seen = WarningLog()
    logging.getLogger("nnhandler").addHandler(warnings_seen)
    logging.captureWarnings(True)  # the world-size RuntimeWarning reaches every rank this way
    logging.getLogger("py.warnings").addHandler(warnings_seen)
    handler = NNHandler.load(ref / "ck" / "ep004.dcp", logger_mode=NNHandler.LoggingMode.FILE,
                             log_file=f"nnhandler_rank{RANK}.log")
    result: dict[str, Any] = {
        "world_size_seen": handler.distributed.world_size,
        "sharded": handler.sharded_checkpoints,
        "local_rows": handler.module.state_dict()["net.0.weight"].to_local().shape[0],
        "params_equal": same(full_model(handler), reference["params"][EPOCHS]),
        "optimizer_equal": same(full_optimizer(handler), reference["optimizer"][EPOCHS]),
        "epoch": handler.epoch,
        "warnings": warnings_seen.messages,
    }
    attach_loaders(handler)
    handler.auto_save(None)
    handler.train(1, progress_bar=False)
    handler.save(workdir / "after.dcp")
    result["after_epoch"] = handler.epoch
    result["after_files"] = sorted(os.listdir(workdir / "after.dcp"))
    return result


def scenario_errors(workdir: Path) -> dict[str, Any]:
    handler = new_handler()
    failing = FailingState()
    handler.add_callback(failing)
    handler.train(1, seed=SEED, progress_bar=False)
    result: dict[str, Any] = {}

    # 1. rank 0 fails after every rank has written its shards (collecting the envelope)
    failing.armed = True
    result["envelope_failure"] = attempt(lambda: handler.save("bad.dcp"))
    failing.armed = False
    result["after_envelope_failure"] = group_still_works()

    # 2. a disk error inside DCP on rank 1 while it writes its shard
    original = FileSystemWriter.write_data

    def failing_write(self: FileSystemWriter, *args: Any, **kwargs: Any) -> Any:
        if dist.get_rank() == 1:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return original(self, *args, **kwargs)

    FileSystemWriter.write_data = failing_write  # type: ignore[method-assign]
    result["dcp_failure"] = attempt(lambda: handler.save("bad2.dcp"))
    FileSystemWriter.write_data = original  # type: ignore[method-assign]
    result["after_dcp_failure"] = group_still_works()
    dist.barrier()
    result["files_after_failures"] = sorted(os.listdir("."))

    # 3. the handler still saves afterwards
    handler.save("good.dcp")
    dist.barrier()
    result["good_files"] = sorted(os.listdir("good.dcp"))

    # 4. a model that places its own DTensors (parallelism="none"): sharded format too
    torch.manual_seed(3)
    own = NNHandler(DTensorNet, device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
                    log_file=f"nnhandler_rank{RANK}.log", parallelism="none")
    own.set_optimizer(torch.optim.SGD, lr=0.1, momentum=0.9)
    assert own.optimizer is not None
    for parameter in own.module.parameters():  # one step, so momentum buffers exist
        parameter.grad = torch.ones_like(parameter)
    own.optimizer.step()
    saved = local_shards(own)
    own.save("own.dcp")
    back = NNHandler.load("own.dcp", model_class=DTensorNet,
                          logger_mode=NNHandler.LoggingMode.FILE,
                          log_file=f"nnhandler_rank{RANK}.log")
    result["own_dtensors"] = {
        "sharded": own.sharded_checkpoints,
        "parallelism": back.parallelism,
        "equal": same(local_shards(back), saved),
        "table_rows": saved["param:table"].shape[0],
    }
    # the background writer cannot write shards: refused before any epoch runs
    own.set_loss_fn(nn.MSELoss)
    attach_loaders(own)
    own.auto_save(1, "async_ck", async_save=True)
    result["own_dtensors_async"] = attempt(lambda: own.train(1, progress_bar=False))
    result["own_dtensors_async_epoch"] = own.epoch
    # DDP cannot wrap such a model: a clear error, not a silent wrong wrapping
    result["own_dtensors_ddp"] = attempt(lambda: NNHandler(
        DTensorNet, device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
        log_file=f"nnhandler_rank{RANK}.log"))

    # 5. a plain (unsharded) checkpoint cannot be loaded into an FSDP2 model
    plain = NNHandler(TinyNet, device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
                      log_file=f"nnhandler_rank{RANK}.log")
    plain.save("plain.pth")
    result["plain_into_fsdp"] = attempt(lambda: NNHandler.load(
        "plain.pth", parallelism="fsdp", logger_mode=NNHandler.LoggingMode.FILE,
        log_file=f"nnhandler_rank{RANK}.log"))
    # 6. fsdp_units that match no submodule would shard nothing per unit: a clear error
    result["units_match_nothing"] = attempt(lambda: NNHandler(
        TinyNet, device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
        log_file=f"nnhandler_rank{RANK}.log", parallelism="fsdp", fsdp_units=[nn.Conv2d]))
    result["leftovers"] = [name for name in os.listdir(".") if ".tmp-" in name]
    return result


def scenario_kill(workdir: Path, where: str) -> dict[str, Any]:
    handler = new_handler()
    handler.auto_save(1, "ck", name="ep{epoch:03d}")
    handler.add_callback(AutoSaveCallback(1, "ck", name="last", overwrite=True))
    saves = {"count": 0}

    def die() -> None:
        (workdir / f"killed_rank{RANK}").write_text(where)
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "dcp_write":
        original_write = FileSystemWriter.write_data

        def write_then_die(self: FileSystemWriter, *args: Any, **kwargs: Any) -> Any:
            saves["count"] += 1
            if saves["count"] == 3 and RANK == 1:  # ep001, last (epoch 1), then ep002
                die()
            return original_write(self, *args, **kwargs)

        FileSystemWriter.write_data = write_then_die  # type: ignore[method-assign]
    else:
        original_install = sharded_mod._install

        def install_then_die(temp: Path, final: Path) -> None:
            saves["count"] += 1
            if saves["count"] == 3 and RANK == 0:
                die()
            original_install(temp, final)

        sharded_mod._install = install_then_die
    handler.train(EPOCHS, seed=SEED, progress_bar=False)
    return {"unreachable": True}


def main() -> None:
    def prepare(workdir: Path) -> None:
        (workdir / "script").mkdir(exist_ok=True)
        dist.init_process_group("gloo")  # the handlers join it (creating one is tested elsewhere)

    run_worker({
        "train": lambda workdir, _: scenario_train(workdir),
        "resume": lambda workdir, extra: scenario_resume(workdir, Path(extra[0]).resolve()),
        "reshard": lambda workdir, extra: scenario_reshard(workdir, Path(extra[0]).resolve()),
        "errors": lambda workdir, _: scenario_errors(workdir),
        "kill": lambda workdir, extra: scenario_kill(workdir, extra[0]),
    }, RANK, WORLD_SIZE, before=prepare)



if __name__ == "__main__":
    main()
