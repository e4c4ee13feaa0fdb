"""Where training stands inside an epoch (state key ``"position"``).

An emergency checkpoint (see :mod:`nnhandler.preemption`) is written in the middle of an epoch.
To continue that epoch exactly it records, besides the usual components, the epoch in
progress, how many of its batches ran, every rank's partial epoch sums (loss, sample count,
metric sums — the exact float64 values the loop keeps) and, when the stop fell inside a
gradient-accumulation group, the gradients accumulated so far. A checkpoint written at an epoch
boundary records no partial epoch (``{"partial": None}``); files from before this state existed
have no ``position`` at all, which means the same. A checkpoint an auto-saver writes by
steps or time (``every_n_steps``, ``every_seconds``) inside an epoch records the same, with
reason ``"step"`` (see :class:`nnhandler.loop.MidEpoch`): there is one mid-epoch resume path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import ConfigDict, Field, field_validator, model_validator
from torch import nn

from ..checkpoint.schema import Schema, validate
from ..errors import CheckpointError, ConfigurationError

__all__ = ["EpochPosition", "PartialEpoch", "dataset_size", "learning_rates_of",
           "pending_grads_of"]

#: ``PartialEpoch.reason`` values
REASONS = ("signal", "exception", "step")
_WHERE = "state['position']"


class _TensorSchema(Schema):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid",
                              arbitrary_types_allowed=True)


def _scalar_float64(value: Any) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() != 0 or value.dtype != torch.float64:
        raise ValueError("must be a 0-dimensional float64 tensor (a running sum)")
    return value


class _RankTotalsSchema(_TensorSchema):
    """One rank's running sums of the interrupted epoch (see ``loop._Totals.export``)."""

    loss: Any
    count: Annotated[int, Field(ge=0)]
    metric_sums: list[float]
    metric_tensors: list[Any]

    @field_validator("loss")
    @classmethod
    def _loss_rule(cls, value: Any) -> Any:
        return _scalar_float64(value)

    @field_validator("metric_tensors")
    @classmethod
    def _metric_tensors_rule(cls, value: list[Any]) -> list[Any]:
        for item in value:
            _scalar_float64(item)
        return value


class _PartialEpochSchema(_TensorSchema):
    """What :meth:`PartialEpoch.to_state` writes; the last three fields are absent from
    files written before they were recorded."""

    epoch: Annotated[int, Field(ge=1)]
    batches: Annotated[int, Field(ge=0)]
    batch_size: Annotated[int, Field(ge=1)]
    accumulation: Annotated[int, Field(ge=1)]
    metric_names: list[str]
    totals: Annotated[list[_RankTotalsSchema], Field(min_length=1)]
    pending_grads: dict[str, Any] | None
    reason: Literal["signal", "exception", "step"]
    samples: Annotated[int, Field(ge=0)] | None = None
    batches_per_epoch: Annotated[int, Field(ge=0)] | None = None
    learning_rates: list[float] | None = None

    @field_validator("pending_grads")
    @classmethod
    def _grads_rule(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for name, grad in (value or {}).items():
            if not isinstance(grad, torch.Tensor):
                raise ValueError(f"gradient of {name!r} must be a tensor")
        return value

    @model_validator(mode="after")
    def _totals_match_metrics(self) -> _PartialEpochSchema:
        count = len(self.metric_names)
        for rank, totals in enumerate(self.totals):
            if len(totals.metric_sums) != count or len(totals.metric_tensors) != count:
                raise ValueError(f"totals[{rank}] holds sums for {len(totals.metric_sums)} / "
                                 f"{len(totals.metric_tensors)} metric(s), the epoch has "
                                 f"{count} ({self.metric_names})")
        return self


class _PositionSchema(_TensorSchema):
    partial: _PartialEpochSchema | None


@dataclass(frozen=True)
class PartialEpoch:
    """An epoch that stopped after ``batches`` of its batches.

    ``totals`` holds one entry per rank (rank order): ``{"loss": float64 tensor, "count": int,
    "metric_sums": [float], "metric_tensors": [float64 tensor]}``, the loop's running sums.
    ``pending_grads`` (parameter name -> gradient) is set only when the stop fell inside an
    accumulation group (single process only: under DDP a stop always waits for the group's
    optimizer step).

    ``samples`` (the training dataset's length), ``batches_per_epoch`` and ``learning_rates``
    (per param group) describe the run at the stop, so that a resumed run that differs can
    say so; ``None`` where unknown (files written before they were recorded, a dataset
    without a length).
    """

    epoch: int
    batches: int
    batch_size: int
    accumulation: int
    metric_names: tuple[str, ...]
    totals: tuple[dict[str, Any], ...]
    pending_grads: dict[str, torch.Tensor] | None
    reason: str
    samples: int | None = None
    batches_per_epoch: int | None = None
    learning_rates: tuple[float, ...] | None = None

    def to_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "batch_size": self.batch_size,
            "accumulation": self.accumulation,
            "metric_names": list(self.metric_names),
            "totals": [dict(rank) for rank in self.totals],
            "pending_grads": None if self.pending_grads is None else dict(self.pending_grads),
            "reason": self.reason,
            "samples": self.samples,
            "batches_per_epoch": self.batches_per_epoch,
            "learning_rates": (None if self.learning_rates is None
                               else list(self.learning_rates)),
        }

    @classmethod
    def from_state(cls, state: Any, *, where: str = f"{_WHERE}.partial") -> PartialEpoch:
        """The partial epoch :meth:`to_state` wrote; anything off its schema (a wrong type,
        an unknown ``reason``, totals that do not fit the metrics) is a
        :class:`~nnhandler.CheckpointSchemaError` naming the field."""
        return cls._of(validate(_PartialEpochSchema, state, where=where))

    @classmethod
    def _of(cls, checked: _PartialEpochSchema) -> PartialEpoch:
        return cls(
            epoch=checked.epoch,
            batches=checked.batches,
            batch_size=checked.batch_size,
            accumulation=checked.accumulation,
            metric_names=tuple(checked.metric_names),
            totals=tuple(rank.model_dump() for rank in checked.totals),
            pending_grads=None if checked.pending_grads is None else dict(checked.pending_grads),
            reason=checked.reason,
            samples=checked.samples,
            batches_per_epoch=checked.batches_per_epoch,
            learning_rates=(None if checked.learning_rates is None
                            else tuple(checked.learning_rates)),
        )

    def changes(self, *, samples: int | None, batches_per_epoch: int | None,
                learning_rates: Sequence[float] | None) -> list[str]:
        """What differs in a run about to continue this epoch from the run that stopped it
        (nothing for values this file did not record): the dataset's length, the batches per
        epoch, the learning rates. Each entry says old -> new and how to keep the old."""
        notes = []
        if (self.samples is not None and samples is not None
                and self.samples != samples):
            notes.append(f"the training dataset has {samples} samples, it had {self.samples} "
                         "(train on the dataset the epoch started with)")
        elif (self.batches_per_epoch is not None and batches_per_epoch is not None
              and self.batches_per_epoch != batches_per_epoch):
            notes.append(f"an epoch has {batches_per_epoch} batches, it had "
                         f"{self.batches_per_epoch} (use the dataset and loader arguments the "
                         "epoch started with)")
        if (self.learning_rates is not None and learning_rates is not None
                and tuple(self.learning_rates) != tuple(learning_rates)):
            notes.append(f"learning rate(s) {list(learning_rates)}, they were "
                         f"{list(self.learning_rates)} (the optimizer is restored as it was: "
                         "do not call set_optimizer/set_scheduler or change its param groups "
                         "after loading)")
        return notes

    def check_resumable(self, *, completed_epochs: int, world_size: int, batch_size: int | None,
                        accumulation: int, metric_names: Sequence[str],
                        batches: int | None) -> None:
        """Raise unless a run with these settings can continue this epoch exactly."""
        where = f"the checkpoint stopped in epoch {self.epoch} after {self.batches} batch(es)"
        if self.epoch != completed_epochs + 1:
            raise CheckpointError(f"{where}, but its progress records {completed_epochs} "
                                  "completed epoch(s): the file is inconsistent")
        if len(self.totals) != world_size:
            raise ConfigurationError(
                f"{where} on {len(self.totals)} rank(s); this run has {world_size}. A partial "
                "epoch continues only at the world size that started it (each rank resumes "
                "its own shard of the data): resume with the same number of processes, or "
                "from the last end-of-epoch checkpoint")
        if batch_size != self.batch_size:
            raise ConfigurationError(
                f"{where} with batch_size={self.batch_size}; the training loader now has "
                f"batch_size={batch_size}: the rest of the epoch would not be the same batches")
        if accumulation != self.accumulation:
            raise ConfigurationError(
                f"{where} with gradient_accumulation_steps={self.accumulation}; this call "
                f"uses {accumulation}: pass gradient_accumulation_steps={self.accumulation} "
                "(or leave it unset) to continue the epoch")
        if tuple(metric_names) != self.metric_names:
            raise ConfigurationError(
                f"{where} with metrics {list(self.metric_names)}; the handler now has "
                f"{list(metric_names)}: the epoch's partial sums cannot be continued")
        if batches is not None and self.batches > batches:
            raise ConfigurationError(
                f"{where}, but the training loader has only {batches} batch(es) per epoch: "
                "the dataset or its loader arguments changed")

    def restore_pending_grads(self, module: nn.Module) -> None:
        """Put the accumulated gradients back into ``module``'s parameters (or clear them)."""
        grads = self.pending_grads or {}
        named = dict(module.named_parameters())
        unknown = sorted(set(grads) - set(named))
        if unknown:
            raise CheckpointError(f"position: pending gradients for unknown parameters {unknown}")
        for name, parameter in named.items():
            saved = grads.get(name)
            parameter.grad = (None if saved is None
                              else saved.to(parameter.device, parameter.dtype, copy=True))


def dataset_size(dataset: Any) -> int | None:
    """``len(dataset)``, or ``None`` for a dataset without a length."""
    try:
        return len(dataset)
    except TypeError:
        return None


def learning_rates_of(optimizer: torch.optim.Optimizer) -> tuple[float, ...]:
    """The learning rate of each of ``optimizer``'s param groups (tensors as floats)."""
    return tuple(float(group["lr"]) for group in optimizer.param_groups)


def pending_grads_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """The gradients ``module``'s parameters hold now (copies), by parameter name."""
    return {name: parameter.grad.detach().clone()
            for name, parameter in module.named_parameters() if parameter.grad is not None}


class EpochPosition:
    """The state provider ``"position"``: the partial epoch an emergency checkpoint stopped
    in, or none.

    The training loop sets :attr:`partial` when it stops inside an epoch and takes it back
    (:meth:`take`) when the next ``train`` call continues that epoch; :attr:`continuing_epoch`
    is the epoch being continued, from the start of that call until the epoch ends.
    """

    state_key = "position"

    def __init__(self) -> None:
        self.partial: PartialEpoch | None = None
        self.continuing_epoch: int | None = None
        #: True from a restore (load, resume_from) until the next ``train`` call begins: that
        #: call resumes the checkpoint, whose training settings it should keep
        self.restored = False

    def take(self, epoch: int) -> PartialEpoch | None:
        """The partial epoch to continue as epoch ``epoch`` starts its batches (then cleared)."""
        partial = self.partial
        if partial is None or partial.epoch != epoch:
            return None
        self.partial = None
        return partial

    def state_dict(self) -> dict[str, Any]:
        return {"partial": None if self.partial is None else self.partial.to_state()}

    @staticmethod
    def check_state(state: Any) -> None:
        """Validate a checkpoint's position before any state is applied."""
        validate(_PositionSchema, state, where=_WHERE)

    def load_state_dict(self, state: Any) -> None:
        """Take a checkpoint's position (validated against its schema: a
        :class:`~nnhandler.CheckpointSchemaError` naming the field when it does not fit).
        Marks the handler as :attr:`restored` until its next ``train`` call begins."""
        checked = validate(_PositionSchema, state, where=_WHERE)
        self.partial = None if checked.partial is None else PartialEpoch._of(checked.partial)
        self.continuing_epoch = None
        self.restored = True
