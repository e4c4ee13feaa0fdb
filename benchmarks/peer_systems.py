"""The contenders of the peers section: each system trains, saves and resumes the same model on
the same data its own idiomatic way.

Every contender owns a copy of :class:`PeerModel` with the same initial weights and plain SGD
(no momentum: the optimizer holds no tensors, so the state is the model's 32 tensors), and
offers what the section times:

* ``save(target)``: the work one save costs the training thread — for a synchronous saver the
  whole save, for an asynchronous one the call that hands the state to its writer; ``settle()``
  waits for a background write (outside the timing);
* ``train(epochs)``: a short training run with the system's own checkpointing saving after every
  epoch, prepared by ``prepare_run`` (outside the timing: a Lightning ``Trainer``, an Ignite
  engine are built there) and ending when its last checkpoint is written;
* ``load(checkpoint)``: what resuming costs — the system's own call that brings a checkpoint
  back into the live model and optimizer.

The peer libraries are optional (``pip install 'nnhandler[bench]'``); they are imported only
when their contender is built.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nnhandler import AutoSaveCallback, NNHandler

from ._common import fsynced

__all__ = ["EXTRA", "LAYERS", "Accelerate", "Contender", "DistributedCheckpoint", "HandWritten",
           "Ignite", "Lightning", "NNHandlerContender", "PeerModel", "Workload", "missing"]

#: how to install every peer at once (the optional extra of pyproject.toml)
EXTRA = "pip install 'nnhandler[bench]'"
#: square linear layers of the model: a weight and a bias each, 32 tensors in all
LAYERS = 16
LEARNING_RATE = 1e-4


class PeerModel(nn.Module):
    """``LAYERS`` linear layers ``width -> width`` with ReLUs between them."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(LAYERS):
            layers.append(nn.Linear(width, width))
            if index < LAYERS - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.net(x)
        return output


def width_for(megabytes: float) -> int:
    """The width whose ``LAYERS * (width**2 + width)`` float32 values come closest to
    ``megabytes`` MiB (at least 2)."""
    per_layer = megabytes * (1 << 20) / 4 / LAYERS
    return max(2, round((-1 + math.sqrt(1 + 4 * per_layer)) / 2))


@dataclass(frozen=True)
class Workload:
    """What every contender shares: the model's size, its initial weights, the data."""

    width: int
    batch: int
    dataset: TensorDataset
    initial: dict[str, torch.Tensor]

    @classmethod
    def make(cls, megabytes: float, batches: int, batch: int) -> Workload:
        width = width_for(megabytes)
        torch.manual_seed(0)
        initial = {key: value.clone() for key, value in PeerModel(width).state_dict().items()}
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batches * batch, width, generator=generator)
        return cls(width, batch, TensorDataset(x, x), initial)

    @property
    def batches(self) -> int:
        return len(self.dataset) // self.batch

    @property
    def state_megabytes(self) -> float:
        return sum(t.numel() * t.element_size() for t in self.initial.values()) / 1e6

    def model(self) -> PeerModel:
        model = PeerModel(self.width)
        model.load_state_dict(self.initial)
        return model

    def loader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return DataLoader(self.dataset, batch_size=self.batch, shuffle=False)


def missing(module: str) -> bool:
    """Whether the top-level ``module`` cannot be imported here."""
    return importlib.util.find_spec(module) is None


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any,
                 backward: Callable[[torch.Tensor], object]) -> float:
    """One epoch of the hand-written loop: the epoch loss stays on the device until the end."""
    total = torch.zeros(())
    for x, y in loader:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        backward(loss)
        optimizer.step()
        total += loss.detach()
    return float(total)


def _backward(loss: torch.Tensor) -> None:
    loss.backward()  # type: ignore[no-untyped-call]


class Contender(ABC):
    """One system's set-up; ``directory`` is its own (``saves/`` and ``run/`` below it)."""

    #: the name in the rows (``system`` plus the saver used)
    name = ""
    #: the system, for the rows of loading and of the bit flips (one per system)
    system = ""
    #: how ``load`` resumes, in the load row
    resume = ""

    def __init__(self, work: Workload, directory: Path) -> None:
        self.work = work
        self.directory = directory
        self.saves = directory / "saves"
        self.run_directory = directory / "run"
        self.saves.mkdir(parents=True, exist_ok=True)
        self.run_directory.mkdir(parents=True, exist_ok=True)
        self.counter = 0
        #: ``os.fsync``/``os.fdatasync`` calls of one save and its background write (probed)
        self.fsync_calls: int | None = None

    @property
    @abstractmethod
    def model(self) -> nn.Module:
        """The live model (its state is what a save writes and a load restores)."""

    @property
    def fsync(self) -> str:
        if self.fsync_calls is None:
            return "fsync not probed"
        return "fsync" if self.fsync_calls else "no fsync"

    def fresh(self) -> Path:
        """A new name under ``saves/`` (without suffix: each system adds its own)."""
        self.counter += 1
        return self.saves / f"save{self.counter:05d}"

    @abstractmethod
    def save(self, target: Path) -> Path:
        """Save the state under ``target`` (the system's suffix added); the checkpoint's path."""

    def settle(self) -> None:  # noqa: B027 - a synchronous saver has nothing to wait for
        """Wait for a background write in flight (nothing for a synchronous saver)."""

    def prepare_run(self, epochs: int) -> None:  # noqa: B027 - most need nothing built
        """Outside the timing: build what the next ``train(epochs)`` needs."""

    @abstractmethod
    def train(self, epochs: int) -> None:
        """Train ``epochs`` epochs, saving after each, until the last checkpoint is written."""

    @abstractmethod
    def load(self, checkpoint: Path) -> None:
        """Resume the live model and optimizer from ``checkpoint``."""

    def loads(self) -> dict[str, Callable[[Path], None]]:
        """The load rows of this system: how it resumes -> the call."""
        return {self.resume: self.load}

    def clear(self) -> None:
        """Outside the timing: remove every checkpoint written, drop the gradients."""
        for folder in (self.saves, self.run_directory):
            for path in folder.iterdir():
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        self.model.zero_grad(set_to_none=True)


class HandWritten(Contender):
    """The baseline: a plain PyTorch loop, ``torch.save`` of the state dicts + flush + fsync
    after every epoch (``saving=False``: the same loop without saving)."""

    system = "torch.save / torch.load by hand"
    resume = "torch.load + load_state_dict"

    def __init__(self, work: Workload, directory: Path, saving: bool = True) -> None:
        super().__init__(work, directory)
        self.saving = saving
        self.name = ("hand-written loop + torch.save + fsync" if saving
                     else "hand-written loop without saving")
        self._model = work.model()
        self.optimizer = torch.optim.SGD(self._model.parameters(), lr=LEARNING_RATE)
        self.loader = work.loader()
        self.epoch = 0

    @property
    def model(self) -> nn.Module:
        return self._model

    def save(self, target: Path) -> Path:
        path = target.with_suffix(".pth")
        state = {"model": self._model.state_dict(), "optimizer": self.optimizer.state_dict()}
        fsynced(path, lambda file: torch.save(state, file))
        return path

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            _train_epoch(self._model, self.optimizer, self.loader, _backward)
            self.epoch += 1
            if self.saving:
                self.save(self.run_directory / f"ep{self.epoch:05d}")

    def load(self, checkpoint: Path) -> None:
        state = torch.load(checkpoint, weights_only=True)
        self._model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class NNHandlerContender(Contender):
    """``NNHandler`` with ``auto_save(1, async_save=...)``; one save is ``handler.save``
    (synchronous) or ``AutoSaveCallback(async_save=True).save_now`` (asynchronous); resuming
    is ``handler.resume_from`` (with and without ``verify``)."""

    system = "nnhandler"

    def __init__(self, work: Workload, directory: Path, async_save: bool) -> None:
        super().__init__(work, directory)
        self.async_save = async_save
        self.name = f"nnhandler {'async' if async_save else 'sync'} auto-save"
        self.handler = NNHandler(PeerModel, device="cpu", logger_mode="file",
                                 log_file=directory / "nnhandler.log", use_distributed=False,
                                 width=work.width)
        self.handler.module.load_state_dict(work.initial)
        self.handler.set_optimizer(torch.optim.SGD, lr=LEARNING_RATE)
        self.handler.set_loss_fn(nn.MSELoss)
        self.handler.set_train_loader(work.dataset, batch_size=work.batch, shuffle=False)
        self.handler.auto_save(1, self.run_directory, name="ep{epoch:05d}",
                               async_save=async_save)
        self.writer: AutoSaveCallback | None = None
        if async_save:
            self.writer = AutoSaveCallback(None, self.saves, name="save{epoch:05d}",
                                           async_save=True)
            self.handler.add_callback(self.writer)

    @property
    def model(self) -> nn.Module:
        return self.handler.module

    def save(self, target: Path) -> Path:
        if self.writer is None:
            return self.handler.save(target.with_suffix(".pth"))
        self.counter += 1
        path = self.writer.save_now(self.handler, self.counter, {})
        if not isinstance(path, Path):
            raise RuntimeError(f"nnhandler's asynchronous save returned {path!r}, not a path")
        return path

    def settle(self) -> None:
        if self.writer is not None:
            self.writer.flush(self.handler)

    def train(self, epochs: int) -> None:
        self.handler.train(epochs, progress_bar=False)

    def load(self, checkpoint: Path) -> None:
        self.handler.resume_from(checkpoint)

    def loads(self) -> dict[str, Callable[[Path], None]]:
        return {"resume_from": self.load,
                "resume_from(verify=False)": lambda checkpoint: self.handler.resume_from(
                    checkpoint, verify=False)}


def _lightning_module(work: Workload) -> Any:
    import lightning.pytorch as lightning

    class PeerLightningModule(lightning.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = work.model()

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor],
                          batch_index: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LEARNING_RATE)

    return PeerLightningModule()


class Lightning(Contender):
    """A ``Trainer`` with ``ModelCheckpoint(every_n_epochs=1, save_top_k=-1)``, optionally the
    ``AsyncCheckpointIO`` plugin; one save is ``trainer.save_checkpoint`` (the call
    ``ModelCheckpoint`` makes); resuming is what ``fit(ckpt_path=...)`` does for the state:
    ``strategy.load_checkpoint`` then ``load_model_state_dict`` / ``load_optimizer_state_dict``."""

    system = "Lightning"
    resume = "strategy.load_checkpoint + load_model/optimizer_state_dict"
    module_name = "lightning"

    def __init__(self, work: Workload, directory: Path, async_io: bool) -> None:
        super().__init__(work, directory)
        self.async_io = async_io
        self.name = "Lightning ModelCheckpoint" + (" + AsyncCheckpointIO" if async_io else "")
        self.module = _lightning_module(work)
        self.trainer: Any = None
        self.runs = 0

    @property
    def model(self) -> nn.Module:
        net: nn.Module = self.module.net
        return net

    def prepare_run(self, epochs: int) -> None:
        import lightning.pytorch as lightning
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.plugins.io import AsyncCheckpointIO

        self.runs += 1
        checkpoint = ModelCheckpoint(dirpath=self.run_directory,
                                     filename=f"run{self.runs}-{{epoch}}", every_n_epochs=1,
                                     save_top_k=-1)
        self.trainer = lightning.Trainer(
            max_epochs=epochs, callbacks=[checkpoint],
            plugins=[AsyncCheckpointIO()] if self.async_io else [], accelerator="cpu",
            devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0)

    def train(self, epochs: int) -> None:
        self.trainer.fit(self.module, train_dataloaders=self.work.loader())

    def save(self, target: Path) -> Path:
        path = target.with_suffix(".ckpt")
        self.trainer.save_checkpoint(path)
        return path

    def settle(self) -> None:
        if self.async_io:
            self.trainer.strategy.checkpoint_io.teardown()  # waits; the next save restarts it

    def load(self, checkpoint: Path) -> None:
        strategy = self.trainer.strategy
        state = strategy.load_checkpoint(checkpoint)
        strategy.load_model_state_dict(state)
        strategy.load_optimizer_state_dict(state)


class Accelerate(Contender):
    """A hand-written loop through ``Accelerator.prepare`` / ``accelerator.backward``, and
    ``accelerator.save_state(folder)`` after every epoch; resuming is ``load_state``."""

    system = "Accelerate"
    name = "Accelerate save_state"
    resume = "accelerator.load_state"
    module_name = "accelerate"

    def __init__(self, work: Workload, directory: Path) -> None:
        super().__init__(work, directory)
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=True)
        model = work.model()
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        self.prepared, self.optimizer, self.loader = self.accelerator.prepare(
            model, optimizer, work.loader())
        self._model: nn.Module = self.accelerator.unwrap_model(self.prepared)
        self.epoch = 0

    @property
    def model(self) -> nn.Module:
        return self._model

    def save(self, target: Path) -> Path:
        self.accelerator.save_state(target)
        return target

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            _train_epoch(self.prepared, self.optimizer, self.loader, self.accelerator.backward)
            self.epoch += 1
            self.accelerator.save_state(self.run_directory / f"ep{self.epoch:05d}")

    def load(self, checkpoint: Path) -> None:
        self.accelerator.load_state(checkpoint)


class Ignite(Contender):
    """``create_supervised_trainer`` with a ``Checkpoint(DiskSaver)`` handler on
    ``EPOCH_COMPLETED``; one save is a call of such a handler; resuming is
    ``Checkpoint.load_objects``."""

    system = "Ignite"
    name = "Ignite Checkpoint + DiskSaver"
    resume = "Checkpoint.load_objects"
    module_name = "ignite"

    def __init__(self, work: Workload, directory: Path) -> None:
        super().__init__(work, directory)
        from ignite.handlers import Checkpoint, DiskSaver

        self._model = work.model()
        self.optimizer = torch.optim.SGD(self._model.parameters(), lr=LEARNING_RATE)
        self.objects = {"model": self._model, "optimizer": self.optimizer}
        self.engine: Any = None
        self.runs = 0
        self.handler = Checkpoint(self.objects, DiskSaver(str(self.saves), require_empty=False),
                                  n_saved=None,
                                  global_step_transform=lambda *_: self.counter)

    @property
    def model(self) -> nn.Module:
        return self._model

    def prepare_run(self, epochs: int) -> None:
        from ignite.engine import Events, create_supervised_trainer
        from ignite.handlers import Checkpoint, DiskSaver

        self.runs += 1
        self.engine = create_supervised_trainer(self._model, self.optimizer, nn.MSELoss())
        self.engine.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint(
            self.objects, DiskSaver(str(self.run_directory), require_empty=False),
            filename_prefix=f"run{self.runs}", n_saved=None))

    def train(self, epochs: int) -> None:
        self.engine.run(self.work.loader(), max_epochs=epochs)

    def save(self, target: Path) -> Path:
        self.counter += 1  # the handler names its file after the counter
        self.handler(self.engine)
        return Path(self.handler.last_checkpoint)

    def load(self, checkpoint: Path) -> None:
        from ignite.handlers import Checkpoint

        Checkpoint.load_objects(to_load=self.objects, checkpoint=str(checkpoint))


class DistributedCheckpoint(Contender):
    """``torch.distributed.checkpoint``: a hand-written loop and ``dcp.save`` (or
    ``dcp.async_save``, waiting for the previous one first, as its documentation does) of the
    model's and optimizer's state dicts after every epoch; resuming is ``dcp.load`` into the
    live state dicts, then ``load_state_dict``."""

    system = "torch DCP"
    resume = "dcp.load + load_state_dict"

    def __init__(self, work: Workload, directory: Path, async_save: bool) -> None:
        super().__init__(work, directory)
        self.async_save = async_save
        self.name = "torch DCP " + ("async_save" if async_save else "save")
        self._model = work.model()
        self.optimizer = torch.optim.SGD(self._model.parameters(), lr=LEARNING_RATE)
        self.loader = work.loader()
        self.pending: Any = None
        self.epoch = 0

    @property
    def model(self) -> nn.Module:
        return self._model

    def _state(self) -> dict[str, Any]:
        return {"model": self._model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def save(self, target: Path) -> Path:
        import torch.distributed.checkpoint as dcp

        if self.async_save:
            self.settle()
            self.pending = dcp.async_save(self._state(), checkpoint_id=target)
        else:
            dcp.save(self._state(), checkpoint_id=target)
        return target

    def settle(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def train(self, epochs: int) -> None:
        for _ in range(epochs):
            _train_epoch(self._model, self.optimizer, self.loader, _backward)
            self.epoch += 1
            self.save(self.run_directory / f"ep{self.epoch:05d}")
        self.settle()

    def load(self, checkpoint: Path) -> None:
        import torch.distributed.checkpoint as dcp

        state = self._state()
        dcp.load(state, checkpoint_id=checkpoint)
        self._model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
