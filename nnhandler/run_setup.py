"""The set-up of one ``train`` call: its settings (the handler's defaults under the call's
explicit changes), the warning when a resumed call changes what the checkpoint recorded, the
check that an interrupted epoch can be continued, the random streams (seeded or continued) and
the AMP grad scaler and EMA model the settings ask for."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, Final

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from .components import ComponentState, EpochPosition, PartialEpoch, Progress, seed_everything
from .components.position import dataset_size, learning_rates_of
from .config import TrainSettings, validate_call
from .distributed import DistributedContext
from .errors import ConfigurationError
from .samplers import loader_length
from .state import StateRegistry

__all__ = ["UNSET", "AmpAndEma", "Unset", "partial_epoch_changes", "prepare_random_streams",
           "resume_change_warning", "settings_with"]


class Unset:
    """Marks an argument that was not passed (where ``None`` is a meaningful value)."""

    def __repr__(self) -> str:
        return "<handler default>"


UNSET: Final = Unset()


def settings_with(settings: TrainSettings, changes: Mapping[str, Any], *,
                  sharded: bool) -> TrainSettings:
    """``settings`` with a call's explicit ``changes`` (checked); ``sharded``: the model holds
    DTensor parameters."""
    merged = validate_call(TrainSettings, "train", {**settings.model_dump(), **changes})
    if merged.ema_decay > 0 and sharded:
        raise ConfigurationError(f"ema_decay={merged.ema_decay} is not supported for a "
                                 "model with DTensor parameters (FSDP2); use ema_decay=0")
    return merged


def partial_epoch_changes(partial: PartialEpoch, loader: DataLoader[Any], *,
                          progress: Progress, world_size: int, settings: TrainSettings,
                          metric_names: Sequence[str], dataset: Any,
                          optimizer: torch.optim.Optimizer) -> list[str]:
    """A partial epoch (from an emergency checkpoint) must be continued exactly as it
    started: same world size, batch size, accumulation and metrics (checked on ``loader``,
    built for the check alone: its length and batch size do not depend on the seed). Returns
    what differs without preventing the continuation (dataset length, learning rates)."""
    batches = loader_length(loader)
    partial.check_resumable(
        completed_epochs=progress.epoch, world_size=world_size,
        batch_size=loader.batch_size, accumulation=settings.gradient_accumulation_steps,
        metric_names=list(metric_names), batches=batches)
    return partial.changes(samples=dataset_size(dataset), batches_per_epoch=batches,
                           learning_rates=learning_rates_of(optimizer))


def resume_change_warning(position: EpochPosition, recorded: TrainSettings,
                          changes: Mapping[str, Any], partial_changes: list[str]) -> str | None:
    """A call that resumes a checkpoint (the first after a restore, or one that continues
    an interrupted epoch) and changes what the checkpoint recorded gets one warning, this
    one: the run cannot equal an uninterrupted one. ``seed`` has its own warning."""
    partial = position.partial
    if not (position.restored or partial is not None):
        return None
    notes = [f"{name} {getattr(recorded, name)!r} -> {value!r} (leave {name} unset: it "
             "defaults to the recorded value)"
             for name, value in changes.items()
             if name != "seed" and getattr(recorded, name) != value]
    notes += partial_changes
    if not notes:
        return None
    if partial is not None:
        what = (f"continues epoch {partial.epoch} of an emergency checkpoint (after its "
                f"batch {partial.batches}) with")
    else:
        what = "resumes a checkpoint with"
    return (f"train: this call {what} other settings than the checkpoint recorded: "
            f"{'; '.join(notes)}. The resumed run will not equal an uninterrupted one")


def prepare_random_streams(progress: Progress, seed: int | Unset | None,
                           settings_seed: int | None, context: DistributedContext,
                           logger: logging.Logger) -> int:
    """The run's seed: the current run's (continued), or ``settings_seed`` (the call's,
    drawn once when ``None``) with every random stream seeded and, for a fresh run, a new
    lineage."""
    current = progress.run_seed
    # a checkpoint written before any training has no run seed: nothing to continue,
    # so the first call after loading it starts a fresh run
    continuing = current is not None
    if continuing and (seed is UNSET or seed is None or seed == current):
        assert current is not None
        return current
    if continuing:
        logger.warning(
            "train(seed=%s) differs from this run's seed %s: re-seeding every random "
            "stream (a resumed run will not equal the uninterrupted one)", seed, current)
    new_seed = settings_seed
    if new_seed is None:
        new_seed = context.broadcast_object(secrets.randbits(63))
    seed_everything(new_seed)
    progress.run_seed = new_seed
    if not continuing:  # a re-seeded run stays the lineage that wrote its files
        progress.run_id = context.broadcast_object(secrets.token_hex(8))
    return new_seed


class AmpAndEma:
    """The AMP grad scaler (CUDA fp16) and the EMA model of a handler, created when the
    settings (or a checkpoint's states) ask for them; each joins ``registry``
    (``"grad_scaler"``, ``"ema"``)."""

    def __init__(self, module: nn.Module, registry: StateRegistry) -> None:
        self.module, self.registry = module, registry
        self.scaler: torch.amp.GradScaler | None = None
        self.ema: AveragedModel | None = None
        self.ema_state: ComponentState | None = None

    def prepare(self, settings: TrainSettings, device: torch.device) -> None:
        """Create, update or drop the scaler and EMA for a call's ``settings``."""
        if settings.use_amp and device.type == "cuda" and self.scaler is None:
            self.create_scaler()
        if settings.ema_decay > 0:
            if self.ema is None:
                self.create_ema(settings.ema_decay)
            else:
                self.ema.multi_avg_fn = get_ema_multi_avg_fn(settings.ema_decay)  # type: ignore[no-untyped-call]
        elif self.ema is not None and self.ema_state is not None:
            self.registry.unregister(self.ema_state)
            self.ema = self.ema_state = None

    def create_scaler(self) -> None:
        self.scaler = torch.amp.GradScaler("cuda")
        if "grad_scaler" not in self.registry:
            self.registry.register(ComponentState("grad_scaler", lambda: self.scaler))

    def create_ema(self, decay: float) -> None:
        self.ema = AveragedModel(self.module,
                                 multi_avg_fn=get_ema_multi_avg_fn(decay),  # type: ignore[no-untyped-call]
                                 use_buffers=True)
        if self.ema_state is None:
            self.ema_state = ComponentState("ema", lambda: self.ema)
            self.registry.register(self.ema_state)
