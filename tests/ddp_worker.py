"""Worker script for tests/test_distributed.py, launched under torchrun (2 or 3 ranks, gloo,
CPU) or, for the ``slurm`` scenario, as plain processes carrying SLURM's variables.

    python -m torch.distributed.run --nproc_per_node=N ... tests/ddp_worker.py SCENARIO DIR [REF..]

Each scenario works inside DIR (its working directory) and writes ``result_rank<r>.json`` (and,
where tensors matter, ``*_rank<r>.pt``) for the test to assert on. Scenarios:

* ``train``  — a fresh run with auto-save every epoch; records who wrote checkpoints, the
  history, every epoch's parameters and every batch (loss, size, sample identities).
* ``resume`` — the process group is created by ``NNHandler.load`` itself; loads REF's epoch-2
  checkpoint (written at the same world size), checks the weights, resumes to epoch 4. With a
  second reference (a run at another world size) it then loads that run's epoch-2 checkpoint
  in DIR/cross and trains on: allowed, with a warning, each rank taking saved rank r % N's
  random streams.
* ``errors`` — ``use_distributed=False`` under torchrun; failures on rank 0 during a save (a
  raising state provider by hand and during auto-save, a full disk under both save-error
  policies, an unwritable save path) must raise on every rank, and the ranks stay in step.
* ``nan``    — the loss is NaN on rank 1 only, at one batch: the collectives stay in step,
  every rank sees NaN in the epoch loss, training continues or stops identically everywhere.
* ``slurm``  — started without torchrun, from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS and
  SLURM_JOB_NODELIST (MASTER_ADDR derived from it): a short training run with auto-save.
* ``callbacks`` — EarlyStopping, LearningRateMonitor, CSVLogger and (when installed)
  TensorBoardLogger with auto-save every epoch, then export and plots, then every rank loads
  the epoch-2 checkpoint with fresh loggers and trains again.

A watchdog dumps every thread's stack and exits if a scenario hangs, so the test sees a
failure with a traceback instead of a silent timeout.
"""

from __future__ import annotations

import errno
import faulthandler
import importlib.util
import math
import os
import time
import warnings
from pathlib import Path
from typing import IO, Any

faulthandler.dump_traceback_later(100, exit=True)  # well inside the test's 150 s limit

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dist_testing import (  # noqa: E402
    FailingState,
    error_record,
    group_still_works,
    history_of,
    run_worker,
)
from nnh_testing import TinyNet, mae, regression_dataset  # noqa: E402
from torch import nn  # noqa: E402

import nnhandler.checkpoint as checkpoint_pkg  # noqa: E402
import nnhandler.checkpoint.envelope as envelope_mod  # noqa: E402
import nnhandler.checkpoint.writer as writer_mod  # noqa: E402
import nnhandler.checkpointing as checkpointing_mod  # noqa: E402
from nnhandler import (  # noqa: E402
    AutoSaveCallback,
    Callback,
    CSVLogger,
    EarlyStopping,
    LearningRateMonitor,
    NNHandler,
    TensorBoardLogger,
    read_checkpoint,
)

# torchrun sets RANK/WORLD_SIZE; the slurm scenario has only SLURM's variables until NNHandler
# sets up the process group
RANK = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "-1")))
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))

# divisible by neither 2 nor 3: DistributedSampler pads the shards to 31 (2 ranks: batches of
# 8, 8, 8, 7) or 21 samples (3 ranks: 8, 8, 5) by repeating samples
TRAIN_N = 61
VAL_N = 31  # ShardSampler, no padding: 16 + 15 samples on 2 ranks, 11 + 10 + 10 on 3
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
checkpointing_mod.write_checkpoint = _recording_write

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


# -- a full disk on rank 0: the checkpoint writer's temp file fails after 4 KiB ---------------
class _FullFile:
    LIMIT = 4096

    def __init__(self, file: IO[bytes]) -> None:
        self._file, self._written = file, 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._written + len(view) > self.LIMIT:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._written += len(view)
        return self._file.write(view)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


class DiskFull:
    """While ``armed``, every checkpoint temp file rank 0 opens runs out of space."""

    def __init__(self) -> None:
        self.armed = False

    def open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        real = open(file, mode, *args, **kwargs)  # noqa: SIM115 - returned to the writer
        return _FullFile(real) if self.armed and dist.get_rank() == 0 else real


DISK = DiskFull()
writer_mod.open = DISK.open  # type: ignore[attr-defined]  # shadows the builtin in the writer


# -- helpers -----------------------------------------------------------------------------------
class Recorder(Callback):
    """Every batch's loss and size, the samples each rank saw, and each epoch's weights."""

    def __init__(self) -> None:
        self.train_batches: dict[int, list[list[float]]] = {}
        self.val_batches: dict[int, list[list[float]]] = {}
        self.train_samples: dict[int, list[float]] = {}
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_begin(self, epoch: int, **kwargs: Any) -> None:
        # rank r's random streams drift away from the others' (r draws per epoch), so a resume
        # that restored the wrong rank's streams (or only rank 0's) changes that rank's dropout
        # masks and the result
        torch.rand(epoch * dist.get_rank())

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


def attach_loaders(handler: NNHandler) -> None:
    handler.set_train_loader(regression_dataset(TRAIN_N), batch_size=BATCH, shuffle=True)
    handler.set_val_loader(regression_dataset(VAL_N, seed=1), batch_size=BATCH)


def new_handler(**arguments: Any) -> NNHandler:
    torch.manual_seed(0)
    handler = NNHandler(TinyNet, device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
                        log_file=f"nnhandler_rank{RANK}.log", **arguments)
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)
    handler.set_loss_fn(nn.MSELoss)
    handler.add_metric("mae", mae)
    attach_loaders(handler)
    return handler


def context_of(handler: NNHandler) -> dict[str, Any]:
    ctx = handler.distributed
    return {"enabled": ctx.enabled, "rank": ctx.rank, "local_rank": ctx.local_rank,
            "world_size": ctx.world_size, "device": str(handler.device),
            "model_is_ddp": isinstance(handler.model, nn.parallel.DistributedDataParallel)}


def list_tree(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def timed_error(action: Any) -> dict[str, Any]:
    """Run ``action``; the error it raised (or ``{"type": None}``) and how long it took."""
    started = time.perf_counter()
    try:
        action()
        record: dict[str, Any] = {"type": None}
    except Exception as error:
        record = error_record(error)
    record["seconds"] = time.perf_counter() - started
    return record


def weights_of(handler: NNHandler) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in handler.module.state_dict().items()}


#: the NaN scenario: set for the one (rank 1) batch whose loss is NaN
POISON = {"active": False}


def poisoned_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.mse_loss(output, target)
    return loss * float("nan") if POISON["active"] else loss


class PoisonOnRankOne(Callback):
    """Makes the training loss NaN on rank 1 only, at batch ``batch`` of epoch ``epoch``."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)

    def on_train_batch_begin(self, epoch: int, batch_idx: int, **kwargs: Any) -> None:
        POISON["active"] = dist.get_rank() == 1 and (epoch, batch_idx) == self.at

    def on_train_batch_end(self, **kwargs: Any) -> None:
        POISON["active"] = False


class StopOnNonFiniteLoss(Callback):
    """Stops when the epoch loss (the same on every rank) is not finite."""

    def on_epoch_end(self, handler: NNHandler, logs: dict[str, Any], **kwargs: Any) -> None:
        if not math.isfinite(logs["loss"]):
            handler.request_stop()


class StopOnRankOneOnly(Callback):
    """Asks for a stop on rank 1 alone at ``epoch``: rank 0 decides, so nothing stops."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, handler: NNHandler, epoch: int, **kwargs: Any) -> None:
        if epoch == self.epoch and dist.get_rank() == 1:
            handler.request_stop()


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


def scenario_resume(workdir: Path, ref: Path, cross_ref: Path | None) -> dict[str, Any]:
    initialised_before = dist.is_initialized()
    handler = NNHandler.load(ref / "ck" / "ep002.pth", device=None,
                             logger_mode=NNHandler.LoggingMode.FILE,
                             log_file=f"nnhandler_rank{RANK}.log")
    reference = torch.load(ref / f"snapshots_rank{RANK}.pt", weights_only=True)
    loaded = weights_of(handler)
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
        "writes": list(WRITES),
        "unlinks": list(UNLINKS),
        "history": history_of(handler),
        "last_logs": logs,
        "files": list_tree(workdir / "ck") if (workdir / "ck").exists() else [],
    })
    if cross_ref is not None:
        result["cross"] = resume_at_another_world_size(workdir / "cross", cross_ref)
    return result


def resume_at_another_world_size(directory: Path, ref: Path) -> dict[str, Any]:
    """Load a checkpoint written at another world size and train on (in ``directory``)."""
    directory.mkdir(exist_ok=True)
    os.chdir(directory)  # the restored auto-saves write to "ck" relative to it
    WRITES.clear()
    source = ref / "ck" / "ep002.pth"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handler = NNHandler.load(source, logger_mode=NNHandler.LoggingMode.FILE,
                                 log_file=f"nnhandler_rank{RANK}.log")
    rng = read_checkpoint(source).state["rng"]
    streams = [torch.equal(torch.get_rng_state(), saved["torch"]) for saved in rng["ranks"]]
    attach_loaders(handler)
    logs = handler.train(until_epoch=EPOCHS, seed=SEED, progress_bar=False)
    dist.barrier()
    torch.save(weights_of(handler), directory / f"final_rank{RANK}.pt")
    written = read_checkpoint(directory / "ck" / f"ep{EPOCHS:03d}.pth")
    return {
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "saved_world_size": rng["world_size"],
        "torch_stream_equals_saved_rank": streams,
        "history": history_of(handler),
        "last_logs": logs,
        "writes": paths_of(WRITES),
        "new_meta_world_size": written.meta["world_size"],
        "new_rng_world_size": written.state["rng"]["world_size"],
    }


def paths_of(records: list[dict[str, Any]]) -> list[str]:
    return [os.path.relpath(r["path"]) for r in records]


def scenario_errors(workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}

    # 0. use_distributed=False under torchrun's variables: one process on its own, no group
    solo = new_handler(use_distributed=False)
    solo.train(1, seed=SEED, progress_bar=False)
    solo.save(f"solo_rank{RANK}.pth")
    result["solo"] = {
        "group_initialised": dist.is_initialized(),
        "enabled": solo.distributed.enabled,
        "rank": solo.distributed.rank,
        "world_size": solo.distributed.world_size,
        "model_is_ddp": isinstance(solo.model, nn.parallel.DistributedDataParallel),
        "writes": paths_of(WRITES),
        "meta_world_size": read_checkpoint(f"solo_rank{RANK}.pth").meta["world_size"],
    }
    WRITES.clear()

    handler = new_handler()
    failing = FailingState()
    handler.add_callback(failing)
    result["context"] = context_of(handler)

    # 1. a hand-made save whose state provider raises on rank 0 only
    failing.armed = True
    result["save_by_hand"] = timed_error(lambda: handler.save("by_hand.pth"))
    result["after_save_by_hand"] = group_still_works()

    # 2. the same failure inside an auto-save during train(), with on_save_error="raise"
    handler.auto_save(1, "auto", name="ep{epoch:03d}", on_save_error="raise")
    result["autosave_in_train"] = timed_error(
        lambda: handler.train(2, seed=SEED, progress_bar=False))
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
                             "failed_saves": autosave.failed_saves}
    result["after_warn_policy"] = group_still_works()
    failing.armed = False

    # 2c. rank 0's disk is full during an auto-save, on_save_error="raise"
    DISK.armed = True
    handler.auto_save(1, "auto_disk", name="ep{epoch:03d}", on_save_error="raise")
    epoch_before = handler.epoch
    result["disk_full_raise"] = timed_error(
        lambda: handler.train(2, seed=SEED, progress_bar=False))
    result["disk_full_raise"]["epochs_run"] = handler.epoch - epoch_before
    result["after_disk_full_raise"] = group_still_works()

    # 2d. the same under "warn": both epochs run on every rank, both saves fail everywhere
    failed_before = autosave.failed_saves
    handler.auto_save(1, "auto_disk", name="ep{epoch:03d}", on_save_error="warn")
    epoch_before = handler.epoch
    handler.train(2, seed=SEED, progress_bar=False)
    result["disk_full_warn"] = {"epochs_run": handler.epoch - epoch_before,
                                "failed_saves": autosave.failed_saves - failed_before}
    result["after_disk_full_warn"] = group_still_works()
    DISK.armed = False
    handler.auto_save(None)
    result["disk_full_attempts"] = paths_of(WRITES)  # the writes that hit the full disk
    WRITES.clear()

    # 3. a save path that rank 0 cannot create (its parent is a regular file)
    if RANK == 0:
        (workdir / "blocker").write_text("not a directory")
    dist.barrier()
    result["unwritable_path"] = timed_error(
        lambda: handler.save(Path("blocker") / "sub" / "x.pth"))
    result["after_unwritable_path"] = group_still_works()

    # 4. and a save that works afterwards: the handler is still usable on every rank
    handler.save("fine.pth")
    dist.barrier()

    # 4b. load_latest whose choice fails on rank 0 (storage options for a local folder): the
    # error reaches every rank instead of leaving them in the broadcast of the choice
    result["load_latest_bad_options"] = timed_error(lambda: NNHandler.load_latest(
        "auto", storage_options={"anon": True}))
    result["after_load_latest_bad_options"] = group_still_works()

    # 5. seed=None: the drawn seed must be the same on every rank (rank 0's, broadcast)
    fresh = new_handler()
    fresh.train(1, seed=None, progress_bar=False)
    result["drawn_seed"] = fresh.progress.run_seed
    result["writes"] = WRITES
    result["files"] = list_tree(workdir)
    return result


def scenario_nan(workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    # A. NaN on rank 1 at batch 1 of epoch 2; nobody stops: 3 epochs on every rank
    handler = new_handler()
    handler.set_loss_fn(poisoned_mse)
    recorder = Recorder()
    handler.add_callback(PoisonOnRankOne(epoch=2, batch=1))
    handler.add_callback(recorder)
    handler.auto_save(1, "nan_ck", name="ep{epoch:03d}_loss{loss:.3f}")
    logs = handler.train(3, seed=SEED, progress_bar=False)
    dist.barrier()
    torch.save(recorder.snapshots, workdir / f"snapshots_rank{RANK}.pt")
    result["context"] = context_of(handler)
    result["continue"] = {
        "history": history_of(handler),
        "last_logs": logs,
        "train_batches": recorder.train_batches,
        "files": list_tree(workdir / "nan_ck"),
        "writes": paths_of(WRITES),
        "after": group_still_works(),
    }
    WRITES.clear()

    # B. the same NaN at batch 0 of epoch 2 with a callback that stops on a non-finite epoch
    # loss (every rank sees it), and a stop asked for by rank 1 alone at epoch 1 (ignored)
    stopping = new_handler()
    stopping.set_loss_fn(poisoned_mse)
    for callback in (PoisonOnRankOne(epoch=2, batch=0), StopOnNonFiniteLoss(),
                     StopOnRankOneOnly(epoch=1)):
        stopping.add_callback(callback)
    stopping.auto_save(-1, "stop_ck", name="last_ep{epoch:03d}")
    stopping.train(4, seed=SEED, progress_bar=False)
    dist.barrier()
    result["stop"] = {
        "epoch": stopping.epoch,
        "train_losses": stopping.train_losses,
        "files": list_tree(workdir / "stop_ck"),
        "writes": paths_of(WRITES),
        "after": group_still_works(),
    }
    return result


def scenario_slurm(workdir: Path) -> dict[str, Any]:
    initialised_before = dist.is_initialized()
    handler = new_handler()  # from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS alone
    handler.auto_save(1, "ck", name="ep{epoch:03d}")
    handler.train(2, seed=SEED, progress_bar=False)
    dist.barrier()
    return {
        "initialised_before_handler": initialised_before,
        "context": context_of(handler),
        "master": [os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")],
        "history": history_of(handler),
        "writes": paths_of(WRITES),
        "files": list_tree(workdir / "ck"),
    }


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
    # load(..., train_data=, val_data=) on every rank, then train on from epoch 2
    with_data = NNHandler.load("ck/ep2.pth", logger_mode=NNHandler.LoggingMode.FILE,
                               log_file=f"nnhandler_rank{RANK}.log", skip_callbacks=True,
                               train_data=regression_dataset(64),
                               val_data=regression_dataset(32, seed=1))
    with_data.train(until_epoch=4, seed=SEED, progress_bar=False)
    # NNHandler(seed=) alone (no DDP broadcast to even the weights out): the same on each rank
    torch.manual_seed(RANK)
    seeded = NNHandler(TinyNet, device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
                       log_file=f"nnhandler_rank{RANK}.log", use_distributed=False, seed=21)
    seeded_weights = [p.detach().tolist() for p in seeded.module.parameters()]
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
        "with_data_epoch": with_data.epoch,
        "with_data_losses": with_data.val_losses,
        "seeded_weights": seeded_weights,
        "rows_after_first": rows_after_first,
        "rows_after_resume": Path("train.csv").read_text().splitlines(),
        "tensorboard_files": sorted(p.name for p in tensorboard.iterdir())
        if tensorboard.exists() else None,
    }


def main() -> None:
    def resume(workdir: Path, extra: list[str]) -> dict[str, Any]:
        refs = [Path(arg).resolve() for arg in extra]
        return scenario_resume(workdir, refs[0], refs[1] if len(refs) > 1 else None)

    run_worker({
        "train": lambda workdir, _: scenario_train(workdir),
        "resume": resume,
        "errors": lambda workdir, _: scenario_errors(workdir),
        "nan": lambda workdir, _: scenario_nan(workdir),
        "slurm": lambda workdir, _: scenario_slurm(workdir),
        "callbacks": lambda workdir, _: scenario_callbacks(workdir),
    }, RANK, WORLD_SIZE)



if __name__ == "__main__":
    main()
