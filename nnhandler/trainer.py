"""``Trainer``: what a callback may read of, and request from, the handler that calls it.

Every hook receives the handler as ``handler=``; typing that argument as :class:`Trainer`
(rather than :class:`~nnhandler.NNHandler`) keeps a callback to this documented surface, which
:class:`~nnhandler.NNHandler` satisfies (checked by mypy and, being ``runtime_checkable``, by
``isinstance``). Savers write through :attr:`Trainer.checkpoints` (see
:mod:`nnhandler.checkpointing`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .callbacks.base import Callback
    from .checkpointing import Checkpointer
    from .components import Progress
    from .config import TrainSettings
    from .data import Loaders
    from .distributed import DistributedContext
    from .state import StateRegistry

__all__ = ["Trainer"]


@runtime_checkable
class Trainer(Protocol):
    """The handler as callbacks see it.

    Reading: the absolute :attr:`epoch` (completed epochs, across resumes), :attr:`global_step`
    (optimizer steps), :attr:`last_logs` (the last completed epoch's logs), :attr:`history`
    (every epoch's logs), the :attr:`progress` record (seed and lineage of the run), the
    :attr:`state_registry` (every state provider by key: what a checkpoint holds), the
    :attr:`distributed` context (rank, world size, collectives), the :attr:`logger`, the
    registered :attr:`callbacks`, the model (:attr:`module`, unwrapped), :attr:`optimizer`,
    :attr:`metrics`, the :attr:`loaders` set (``"val" in handler.loaders``) and the training
    :attr:`settings` (``validate_every`` …, those of the running call); whether the state
    lies inside an epoch (:attr:`stopped_mid_epoch`, after an emergency checkpoint) or an
    interrupted epoch is being continued (:attr:`resumed_mid_epoch`), and whether checkpoints
    are sharded directories (:attr:`sharded_checkpoints`).

    Requesting: :meth:`request_stop` (honoured at the end of the epoch; under DDP rank 0's
    request decides) and checkpoints, through :attr:`checkpoints`.
    """

    @property
    def epoch(self) -> int: ...

    @property
    def global_step(self) -> int: ...

    @property
    def last_logs(self) -> dict[str, Any]: ...

    @property
    def history(self) -> list[dict[str, Any]]: ...

    @property
    def progress(self) -> Progress: ...

    @property
    def stop_requested(self) -> bool: ...

    def request_stop(self) -> None: ...

    @property
    def state_registry(self) -> StateRegistry: ...

    @property
    def checkpoints(self) -> Checkpointer: ...

    @property
    def distributed(self) -> DistributedContext: ...

    @property
    def logger(self) -> logging.Logger: ...

    @property
    def callbacks(self) -> tuple[Callback, ...]: ...

    @property
    def module(self) -> nn.Module: ...

    @property
    def optimizer(self) -> torch.optim.Optimizer | None: ...

    @property
    def metrics(self) -> dict[str, Any]: ...

    @property
    def loaders(self) -> Loaders: ...

    @property
    def settings(self) -> TrainSettings: ...

    @property
    def stopped_mid_epoch(self) -> bool: ...

    @property
    def resumed_mid_epoch(self) -> bool: ...

    @property
    def sharded_checkpoints(self) -> bool: ...
