"""Worker script for tests/test_distributed.py, launched under torchrun (2 ranks, gloo, CPU).

    python -m torch.distributed.run --nproc_per_node=2 ... tests/ddp_worker.py SCENARIO DIR [REF]

Each scenario works inside DIR (its working directory) and writes ``result_rank<r>.json`` (and,
where tensors matter, ``*_rank<r>.pt``) for the test to assert on. Scenarios:

* ``train``  — a fresh 2-rank run with auto-save every epoch; records who wrote checkpoints,
  the history, every epoch's parameters and every batch (loss, size, sample identities).
* ``resume`` — the process group is created by ``NNHandler.load`` itself; loads REF's epoch-2
  checkpoint, checks the weights, resumes to epoch 4 and records the result.
* ``errors`` — failures on rank 0 during a save (a raising state provider by hand and during
  auto-save, an unwritable save path) must raise on both ranks.
* ``callbacks`` — EarlyStopping, LearningRateMonitor, CSVLogger and (when installed)
  TensorBoardLogger with auto-save every epoch, then export and plots, then every rank loads
  the epoch-2 checkpoint with fresh loggers and trains again.

A watchdog dumps every thread's stack and exits if a scenario hangs, so the test sees a
failure with a traceback instead of a silent timeout.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

faulthandler.dump_traceback_later(75, exit=True)  # well inside the test's 120 s limit

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from nnh_testing import TinyNet, mae, regression_dataset  # noqa: E402
from torch import nn  # noqa: E402

import nnhandler.checkpoint as checkpoint_pkg  # noqa: E402
import nnhandler.checkpoint.envelope as envelope_mod  # noqa: E402
import nnhandler.handler as handler_mod  # noqa: E402
from nnhandler import (  # noqa: E402
    AutoSaveCallback,
    Callback,
    CheckpointError,
    CSVLogger,
    EarlyStopping,
    LearningRateMonitor,
    NNHandler,
    TensorBoardLogger,
    read_checkpoint,
)

RANK = int(os.environ["RANK"])
WORLD_SIZE = int(os.environ["WORLD_SIZE"])

TRAIN_N = 60  # 30 samples per rank -> batches of 8, 8, 8, 6 (uneven, so weighting matters)
VAL_N = 31  # ShardSampler: 16 samples on rank 0, 15 on rank 1
BATCH = 8
SEED = 7
EPOCHS = 4
ACCUMULATION = 3

# -- who writes checkpoints: every reference to the writer is wrapped --------------------------
WRITES: list[dict[str, Any]] = []
_original_write = envelope_mod.write_checkpoint


def _recording_write(path: Path, state: dict[str, Any], meta: dict[str, Any]) -> int:
    rank = dist.get_rank() if dist.is_initialized() else -1
    WRITES.append({"rank": rank, "env_rank": RANK, "path": str(path)})
    return _original_write(path, state, meta)


envelope_mod.write_checkpoint = _recording_write
checkpoint_pkg.write_checkpoint = _recording_write
handler_mod.write_checkpoint = _recording_write  # type: ignore[attr-defined]

# -- who deletes superseded "latest_*" auto-saves (Path.unlink goes through os.unlink) --------
UNLINKS: list[dict[str, Any]] = []
_original_unlink = os.unlink
_original_remove = os.remove


def _recording_unlink(original: Any) -> Any:
    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.path.basename(os.fspath(path)).startswith("latest"):
            rank = dist.get_rank() if dist.is_initialized() else -1
            UNLINKS.append({"rank": rank, "path": os.fspath(path)})
        original(path, *args, **kwargs)
    return unlink


os.unlink = _recording_unlink(_original_unlink)
os.remove = _recording_unlink(_original_remove)


# -- helpers -----------------------------------------------------------------------------------
class Recorder(Callback):
    """Every batch's loss and size, the samples each rank saw, and each epoch's weights."""

    def __init__(self) -> None:
        self.train_batches: dict[int, list[list[float]]] = {}
        self.val_batches: dict[int, list[list[float]]] = {}
        self.train_samples: dict[int, list[float]] = {}
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_begin(self, epoch: int, **kwargs: Any) -> None:
        # rank 1's random streams drift away from rank 0's, so a resume that restored the wrong
        # rank's streams (or only rank 0's) changes rank 1's dropout masks and the result
        if dist.get_rank() == 1:
            torch.rand(epoch)

    def on_train_batch_end(self, epoch: int, batch: Any, loss: torch.Tensor,
                           **kwargs: Any) -> None:
        inputs, target = batch
        self.train_batches.setdefault(epoch, []).append([float(loss), int(target.shape[0])])
        # the first feature identifies a sample (a continuous random value)
        self.train_samples.setdefault(epoch, []).extend(inputs[:, 0].tolist())

    def on_validation_batch_end(self, handler: NNHandler, epoch: int, batch: Any,
                                loss: torch.Tensor, **kwargs: Any) -> None:
        inputs, target = batch
        model = handler.module
        with torch.no_grad():
            metric = mae(model(inputs), target)
        self.val_batches.setdefault(epoch, []).append(
            [float(loss), int(target.shape[0]), float(metric)])

    def on_epoch_end(self, handler: NNHandler, epoch: int, **kwargs: Any) -> None:
        self.snapshots[epoch] = {k: v.detach().clone()
                                 for k, v in handler.module.state_dict().items()}


class FailingState(Callback):
    """A state provider whose ``state_dict`` raises on rank 0 only (while armed)."""

    state_key = "failing_state"

    def __init__(self) -> None:
        self.armed = False

    def state_dict(self) -> dict[str, Any]:
        if self.armed and dist.get_rank() == 0:
            raise RuntimeError("boom on rank 0")
        return {"ok": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def attach_loaders(handler: NNHandler) -> None:
    handler.set_train_loader(regression_dataset(TRAIN_N), batch_size=BATCH, shuffle=True)
    handler.set_val_loader(regression_dataset(VAL_N, seed=1), batch_size=BATCH)


def new_handler() -> NNHandler:
    torch.manual_seed(0)
    handler = NNHandler(TinyNet, device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
                        log_file=f"nnhandler_rank{RANK}.log")
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)
    handler.set_loss_fn(nn.MSELoss)
    handler.add_metric("mae", mae)
    attach_loaders(handler)
    return handler


def history_of(handler: NNHandler) -> dict[str, Any]:
    history = {
        "train_losses": handler.train_losses,
        "val_losses": handler.val_losses,
        "train_metrics": handler.train_metrics_history,
        "val_metrics": handler.val_metrics_history,
        "epoch": handler.epoch,
        "global_step": handler.global_step,
        "run_seed": handler.progress.run_seed,
    }
    copied: dict[str, Any] = json.loads(json.dumps(history))
    return copied  # a copy: the handler keeps appending to its lists


def context_of(handler: NNHandler) -> dict[str, Any]:
    ctx = handler.distributed
    return {"enabled": ctx.enabled, "rank": ctx.rank, "world_size": ctx.world_size,
            "device": str(handler.device),
            "model_is_ddp": isinstance(handler.model, nn.parallel.DistributedDataParallel)}


def error_record(error: BaseException) -> dict[str, Any]:
    return {"type": type(error).__name__,
            "is_checkpoint_error": isinstance(error, CheckpointError),
            "message": str(error),
            "traceback": traceback.format_exc()}


def group_still_works() -> float:
    """A collective after an error: proves the ranks are still in step."""
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return float(value.item())


def list_tree(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# -- scenarios ---------------------------------------------------------------------------------
def scenario_train(workdir: Path) -> dict[str, Any]:
    initialised_before = dist.is_initialized()
    handler = new_handler()  # NNHandler(...) creates the process group from torchrun's variables
    recorder = Recorder()
    handler.add_callback(recorder)
    handler.auto_save(1, "ck", name="ep{epoch:03d}")
    # a second auto-save keeping only the latest file: only rank 0 may delete the previous one
    handler.add_callback(AutoSaveCallback(1, "ck", name="latest_ep{epoch:03d}", overwrite=True))
    # accumulation over 3 of the 4 batches per rank: DDP's no_sync path and a short last group
    logs = handler.train(EPOCHS, seed=SEED, gradient_accumulation_steps=ACCUMULATION,
                         progress_bar=False)
    dist.barrier()  # every rank lists the directory after all saves
    torch.save(recorder.snapshots, workdir / f"snapshots_rank{RANK}.pt")
    return {
        "initialised_before_handler": initialised_before,
        "context": context_of(handler),
        "writes": WRITES,
        "unlinks": UNLINKS,
        "history": history_of(handler),
        "last_logs": logs,
        "train_batches": recorder.train_batches,
        "val_batches": recorder.val_batches,
        "train_samples": recorder.train_samples,
        "files": list_tree(workdir / "ck"),
    }


def scenario_resume(workdir: Path, ref: Path) -> dict[str, Any]:
    initialised_before = dist.is_initialized()
    handler = NNHandler.load(ref / "ck" / "ep002.pth", device=None,
                             logger_mode=NNHandler.LoggingMode.FILE,
                             log_file=f"nnhandler_rank{RANK}.log")
    reference = torch.load(ref / f"snapshots_rank{RANK}.pt", weights_only=True)
    loaded = {k: v.detach().clone() for k, v in handler.module.state_dict().items()}
    in_file = read_checkpoint(ref / "ck" / "ep002.pth").state["model"]
    autosave = handler.auto_save_callback
    result: dict[str, Any] = {
        "initialised_before_load": initialised_before,
        "initialised_after_load": dist.is_initialized(),
        "context": context_of(handler),
        "loaded_equals_file": all(torch.equal(loaded[k], in_file[k]) for k in in_file)
        and loaded.keys() == in_file.keys(),
        "loaded_equals_epoch2": all(torch.equal(loaded[k], reference[2][k]) for k in loaded),
        "history_after_load": history_of(handler),
        "autosave_restored": None if autosave is None else repr(autosave),
    }
    attach_loaders(handler)
    recorder = Recorder()
    handler.add_callback(recorder)
    logs = handler.train(until_epoch=EPOCHS, seed=SEED, progress_bar=False)
    dist.barrier()
    torch.save(recorder.snapshots, workdir / f"snapshots_rank{RANK}.pt")
    result.update({
        "writes": WRITES,
        "unlinks": UNLINKS,
        "history": history_of(handler),
        "last_logs": logs,
        "files": list_tree(workdir / "ck") if (workdir / "ck").exists() else [],
    })
    return result


def scenario_errors(workdir: Path) -> dict[str, Any]:
    handler = new_handler()
    failing = FailingState()
    handler.add_callback(failing)
    result: dict[str, Any] = {"context": context_of(handler)}

    # 1. a hand-made save whose state provider raises on rank 0 only
    failing.armed = True
    try:
        handler.save("by_hand.pth")
        result["save_by_hand"] = {"type": None}
    except Exception as error:
        result["save_by_hand"] = error_record(error)
    result["after_save_by_hand"] = group_still_works()

    # 2. the same failure inside an auto-save during train(), with on_save_error="raise"
    handler.auto_save(1, "auto", name="ep{epoch:03d}", on_save_error="raise")
    try:
        handler.train(2, seed=SEED, progress_bar=False)
        result["autosave_in_train"] = {"type": None}
    except Exception as error:
        result["autosave_in_train"] = error_record(error)
    result["epoch_after_failed_autosave"] = handler.epoch
    autosave = handler.auto_save_callback
    assert autosave is not None
    result["autosave_bookkeeping_after_failure"] = [autosave.save_count,
                                                    autosave.last_saved_path]
    result["after_autosave_in_train"] = group_still_works()

    # 2b. the default policy "warn": every rank logs, keeps training and counts the failure
    handler.auto_save(1, "auto", name="ep{epoch:03d}", on_save_error="warn")
    epoch_before = handler.epoch
    handler.train(2, seed=SEED, progress_bar=False)
    result["warn_policy"] = {"epochs_run": handler.epoch - epoch_before,
                             "failed_saves": handler.auto_save_callback.failed_saves}
    result["after_warn_policy"] = group_still_works()
    failing.armed = False
    handler.auto_save(None)

    # 3. a save path that rank 0 cannot create (its parent is a regular file)
    if RANK == 0:
        (workdir / "blocker").write_text("not a directory")
    dist.barrier()
    try:
        handler.save(Path("blocker") / "sub" / "x.pth")
        result["unwritable_path"] = {"type": None}
    except Exception as error:
        result["unwritable_path"] = error_record(error)
    result["after_unwritable_path"] = group_still_works()

    # 4. and a save that works afterwards: the handler is still usable on both ranks
    handler.save("fine.pth")
    dist.barrier()

    # 5. seed=None: the drawn seed must be the same on every rank (rank 0's, broadcast)
    fresh = new_handler()
    fresh.train(1, seed=None, progress_bar=False)
    result["drawn_seed"] = fresh.progress.run_seed
    result["writes"] = WRITES
    result["files"] = list_tree(workdir)
    return result


def epoch_loggers() -> list[Any]:
    found: list[Any] = [LearningRateMonitor(), CSVLogger("train.csv")]
    if importlib.util.find_spec("tensorboard") is not None:
        found.append(TensorBoardLogger("tb"))
    return found


def scenario_callbacks(workdir: Path) -> dict[str, Any]:
    handler = new_handler()
    stopping = EarlyStopping(patience=2, min_delta=1e9)  # stops after epoch 3
    handler.add_callback(stopping)
    for callback in epoch_loggers():
        handler.add_callback(callback)
    handler.auto_save(1, "ck", name="ep{epoch}")
    handler.train(10, seed=SEED, progress_bar=False)
    first_history = [dict(entry) for entry in handler.history]
    exported = handler.export("export/weights.pt")
    plots = []
    if importlib.util.find_spec("matplotlib") is not None:
        plots = [str(handler.plot_losses("plots/loss.png")),
                 str(handler.plot_metrics("plots/metrics.png"))]
    dist.barrier()
    weights_match = all(torch.equal(v, handler.module.state_dict()[k])
                        for k, v in torch.load(exported, weights_only=True).items())
    rows_after_first = Path("train.csv").read_text().splitlines()

    resumed = NNHandler.load("ck/ep2.pth", logger_mode=NNHandler.LoggingMode.FILE,
                             log_file=f"nnhandler_rank{RANK}.log",
                             callbacks=[EarlyStopping(patience=2, min_delta=1e9),
                                        *epoch_loggers()])
    attach_loaders(resumed)
    resumed.train(until_epoch=10, seed=SEED, progress_bar=False)
    dist.barrier()
    tensorboard = Path("tb")
    return {
        "context": context_of(handler),
        "stopped_epoch": stopping.stopped_epoch,
        "epoch": handler.epoch,
        "history": first_history,
        "resumed_epoch": resumed.epoch,
        "resumed_history": resumed.history,
        "weights_match": weights_match,
        "exported": str(exported),
        "plots": plots,
        "rows_after_first": rows_after_first,
        "rows_after_resume": Path("train.csv").read_text().splitlines(),
        "tensorboard_files": sorted(p.name for p in tensorboard.iterdir())
        if tensorboard.exists() else None,
    }


def main() -> None:
    scenario, workdir = sys.argv[1], Path(sys.argv[2]).resolve()
    ref = Path(sys.argv[3]).resolve() if len(sys.argv) > 3 else None
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    try:
        if scenario == "train":
            result = scenario_train(workdir)
        elif scenario == "resume":
            assert ref is not None
            result = scenario_resume(workdir, ref)
        elif scenario == "errors":
            result = scenario_errors(workdir)
        elif scenario == "callbacks":
            result = scenario_callbacks(workdir)
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
        result.update({"rank": RANK, "world_size": WORLD_SIZE})
        (workdir / f"result_rank{RANK}.json").write_text(json.dumps(result, indent=1))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
