"""A saver of your own, written against nnhandler's public API only (no private member).

``BestAndEveryN`` keeps, in a folder of its own:

* ``best.safetensors`` — the model's weights whenever the monitored value improves (the
  `safetensors` format, ``pip install nnhandler[safetensors]``), written atomically on rank 0;
* ``step000040.pth`` … — a complete checkpoint every N optimizer steps, through the
  checkpointing seam ``handler.checkpoints`` (synchronously, or in the background with
  :class:`nnhandler.BackgroundSave` when ``background=True``);
* ``preempted_ep…_b….pth`` — an emergency checkpoint when SIGTERM stops training (it is an
  :class:`nnhandler.EmergencySaver`), from which a resumed run continues the epoch exactly.

It is a state provider: its own bookkeeping (best value, its epoch, how many saves) is in every
checkpoint, and :func:`nnhandler.register_provider_factory` lets ``NNHandler.load`` bring it
back from a file; passing ``callbacks=[BestAndEveryN(...)]`` to ``load`` gives a new
configuration the restored bookkeeping instead.

    python examples/custom_saver.py --out /tmp/saver [--background]
"""

from __future__ import annotations

import argparse
import math
import os
import signal
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn
from torch.utils.data import TensorDataset

from nnhandler import (
    BackgroundSave,
    Callback,
    CheckpointSchemaError,
    Emergency,
    MissingDependencyError,
    NNHandler,
    Trainer,
    register_provider_factory,
)

KEY_PREFIX = "best_and_every_n"


class SaverState(BaseModel):
    """What the saver keeps in every checkpoint. A file is untrusted data: it is validated
    before it is used (strict types, no unknown fields)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    folder: str
    every_n_steps: int = Field(ge=1)
    monitor: str
    background: bool
    best: float | None = None
    best_epoch: int | None = None
    step_saves: int = Field(default=0, ge=0)


class BestAndEveryN(Callback):
    """Best weights as safetensors plus a full checkpoint every ``every_n_steps`` optimizer
    steps, into ``folder``; an emergency checkpoint there on SIGTERM."""

    is_checkpoint_writer = True  # runs after the other callbacks of an event: final state

    def __init__(self, folder: str | os.PathLike[str], every_n_steps: int = 40,
                 monitor: str = "val_loss", background: bool = False) -> None:
        self.settings = SaverState(folder=os.fspath(folder), every_n_steps=every_n_steps,
                                   monitor=monitor, background=background)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.step_saves = 0
        self._last_saved_step = -1
        self._background = BackgroundSave()

    @property
    def folder(self) -> Path:
        return Path(self.settings.folder)

    # -- StateProvider ----------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return f"{KEY_PREFIX}:{self.settings.folder}"

    def state_dict(self) -> dict[str, Any]:
        return {**self.settings.model_dump(), "best": self.best, "best_epoch": self.best_epoch,
                "step_saves": self.step_saves}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restored = self.validated(state)
        self.best, self.best_epoch = restored.best, restored.best_epoch
        self.step_saves = restored.step_saves

    @staticmethod
    def validated(state: Any) -> SaverState:
        try:
            return SaverState.model_validate(state)
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(map(str, first["loc"]))
            raise CheckpointSchemaError(f"{KEY_PREFIX} state: {field}: {first['msg']}",
                                        field=field) from None

    @classmethod
    def from_state(cls, state_key: str, state: Any) -> BestAndEveryN:
        """The provider factory: a saver configured as the file records it."""
        recorded = cls.validated(state)
        return cls(recorded.folder, recorded.every_n_steps, recorded.monitor,
                   recorded.background)

    # -- hooks ------------------------------------------------------------------------------
    def on_train_batch_end(self, handler: Trainer, **kwargs: Any) -> None:
        step = handler.global_step
        if step % self.settings.every_n_steps or step == self._last_saved_step:
            return  # not a multiple (or the same optimizer step: gradient accumulation)
        self._last_saved_step = step
        self.step_saves += 1  # before the state is collected: the file knows itself
        path = self.folder / f"step{step:06d}.pth"
        if self.settings.background:
            self._settle(handler, wait=True)  # at most one write in flight
            self._background.start(handler, path, handler.epoch, handler.last_logs)
        else:
            handler.checkpoints.save(path)

    def on_epoch_end(self, handler: Trainer, epoch: int, logs: dict[str, Any],
                     **kwargs: Any) -> None:
        self._settle(handler, wait=False)
        value = logs.get(self.settings.monitor)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        if self.best is not None and value >= self.best:
            return
        self.best, self.best_epoch = float(value), epoch
        if handler.distributed.is_main:  # the same decision on every rank: logs are reduced
            write_safetensors(handler.module, self.folder / "best.safetensors")

    def on_train_end(self, handler: Trainer, **kwargs: Any) -> None:
        self._settle(handler, wait=True)
        self._background.release()

    def on_exception(self, handler: Trainer, exception: BaseException, **kwargs: Any) -> None:
        outcome = self._background.wait_locally()  # no collective: other ranks may be anywhere
        if outcome is not None and outcome.error is not None:
            exception.add_note(f"{self.folder}: background save failed too: {outcome.error}")

    def _settle(self, handler: Trainer, *, wait: bool) -> None:
        saved = self._background.settle(handler, wait=wait)
        if saved is not None:
            handler.checkpoints.announce(saved)

    # -- EmergencySaver ---------------------------------------------------------------------
    @property
    def emergency_signals(self) -> tuple[signal.Signals, ...]:
        return (signal.SIGTERM,)

    @property
    def saves_on_exception(self) -> bool:
        return False

    @property
    def emergency_directory(self) -> Path:
        return self.folder

    def flush(self, trainer: Trainer) -> None:
        self._settle(trainer, wait=True)

    def save_emergency(self, trainer: Trainer, emergency: Emergency) -> Path | None:
        return trainer.checkpoints.save(self.folder / emergency.file_name).path


register_provider_factory(KEY_PREFIX, BestAndEveryN.from_state)


def write_safetensors(module: nn.Module, path: Path) -> None:
    """``module``'s weights as a safetensors file, atomically (temp file, fsync, rename)."""
    try:
        import safetensors.torch as safetensors_torch
    except ImportError as error:
        raise MissingDependencyError("best.safetensors needs safetensors: pip install "
                                     "nnhandler[safetensors]") from error
    tensors = {name: tensor.detach().to("cpu").contiguous().clone()
               for name, tensor in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        safetensors_torch.save_file(tensors, str(temp))
        with open(temp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


class Regressor(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def dataset(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


def build(out: Path, background: bool) -> NNHandler:
    torch.manual_seed(0)
    handler = NNHandler(Regressor, device="cpu", hidden=16)
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_loss_fn(nn.MSELoss)
    handler.set_train_loader(dataset(256, seed=0), batch_size=16, shuffle=True)
    handler.set_val_loader(dataset(64, seed=1), batch_size=64)
    handler.add_callback(BestAndEveryN(out, every_n_steps=40, background=background))
    return handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("checkpoints/custom_saver"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--background", action="store_true")
    args = parser.parse_args()

    handler = build(args.out, args.background)
    handler.train(args.epochs, seed=0)  # 16 steps per epoch: full checkpoints at 40, 80 …
    saved = sorted(p.name for p in args.out.glob("step*.pth"))
    print("step checkpoints:", ", ".join(saved))
    print("best.safetensors:", (args.out / "best.safetensors").is_file())

    # the saver comes back with the file: its factory re-creates it from its recorded state
    resumed = NNHandler.load(args.out / saved[-1], device="cpu")
    savers = [c for c in resumed.callbacks if isinstance(c, BestAndEveryN)]
    print(f"restored saver: best {savers[0].best:.4f} at epoch {savers[0].best_epoch}, "
          f"{savers[0].step_saves} step saves")


if __name__ == "__main__":
    main()
