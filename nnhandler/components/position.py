"""Where training stands inside an epoch (state key ``"position"``).

An emergency checkpoint (see :mod:`nnhandler.preemption`) is written in the middle of an epoch.
To continue that epoch exactly it records, besides the usual components, the epoch in
progress, how many of its batches ran, every rank's partial epoch sums (loss, sample count,
metric sums — the exact float64 values the loop keeps) and, when the stop fell inside a
gradient-accumulation group, the gradients accumulated so far. A checkpoint written at an epoch
boundary records no partial epoch (``{"partial": None}``); files from before this state existed
have no ``position`` at all, which means the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigurationError

__all__ = ["EpochPosition", "PartialEpoch", "pending_grads_of"]

#: ``PartialEpoch.reason`` values
REASONS = ("signal", "exception")


@dataclass(frozen=True)
class PartialEpoch:
    """An epoch that stopped after ``batches`` of its batches.

    ``totals`` holds one entry per rank (rank order): ``{"loss": float64 tensor, "count": int,
    "metric_sums": [float], "metric_tensors": [float64 tensor]}``, the loop's running sums.
    ``pending_grads`` (parameter name -> gradient) is set only when the stop fell inside an
    accumulation group (single process only: under DDP a stop always waits for the group's
    optimizer step).
    """

    epoch: int
    batches: int
    batch_size: int
    accumulation: int
    metric_names: tuple[str, ...]
    totals: tuple[dict[str, Any], ...]
    pending_grads: dict[str, torch.Tensor] | None
    reason: str

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
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PartialEpoch:
        reason = str(state["reason"])
        if reason not in REASONS:
            raise CheckpointError(f"position: unknown stop reason {reason!r}")
        grads = state["pending_grads"]
        return cls(
            epoch=int(state["epoch"]),
            batches=int(state["batches"]),
            batch_size=int(state["batch_size"]),
            accumulation=int(state["accumulation"]),
            metric_names=tuple(str(name) for name in state["metric_names"]),
            totals=tuple(dict(rank) for rank in state["totals"]),
            pending_grads=None if grads is None else {str(k): v for k, v in grads.items()},
            reason=reason,
        )

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

    def take(self, epoch: int) -> PartialEpoch | None:
        """The partial epoch to continue as epoch ``epoch`` starts its batches (then cleared)."""
        partial = self.partial
        if partial is None or partial.epoch != epoch:
            return None
        self.partial = None
        return partial

    def state_dict(self) -> dict[str, Any]:
        return {"partial": None if self.partial is None else self.partial.to_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        partial = state.get("partial")
        self.partial = None if partial is None else PartialEpoch.from_state(partial)
        self.continuing_epoch = None
