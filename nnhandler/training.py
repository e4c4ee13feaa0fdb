"""The ``train`` calls of one handler, and what they leave behind.

:class:`Training` owns the run's status (the training defaults of the last call, the stop
request, the last completed epoch's logs, the preemption report) and does one call: check
that the handler can train, merge the settings, resume if asked, prepare the random streams,
AMP and EMA, build the loop's parts, and run the loop between ``TRAIN_BEGIN`` and
``TRAIN_END`` (``EXCEPTION`` when it fails) under the emergency savers' watch.
:meth:`NNHandler.train <nnhandler.NNHandler.train>` validates the call's arguments and hands it
here; the per-epoch and per-batch work is :mod:`nnhandler.loop`'s.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .components import EpochPosition
from .config import TrainCall, TrainSettings
from .errors import ConfigurationError
from .events import Event, EventDispatcher
from .loop import LoopParts, TrainingLoop
from .optimization import Optimization, warn
from .preemption import PreemptionGuard, PreemptionReport, watched_signals
from .restore import latest_checkpoint
from .run_setup import (
    UNSET,
    AmpAndEma,
    partial_epoch_changes,
    prepare_random_streams,
    resume_change_warning,
    settings_with,
)

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from .handler import NNHandler

__all__ = ["Training"]


class Training:
    """One handler's ``train`` calls (see the module docstring).

    Reads the handler only through its public members; the components it works with beyond
    them (optimization, AMP/EMA, the epoch position, the dispatcher) are the handler's own,
    passed in.
    """

    def __init__(self, handler: NNHandler, *, optimization: Optimization, amp_ema: AmpAndEma,
                 position: EpochPosition, dispatcher: EventDispatcher,
                 settings: TrainSettings | None = None) -> None:
        self.handler = handler
        self.optimization = optimization
        self.amp_ema = amp_ema
        self.position = position
        self.dispatcher = dispatcher
        #: the training defaults: the settings of the last call (restored by ``load``; before
        #: the first call, the constructor's ``seed``)
        self.settings = settings if settings is not None else TrainSettings()
        #: the checkpoint ``load`` built the handler from (``None``: built by the constructor)
        self.loaded_from: str | None = None
        #: why a component that the loaded checkpoint's run had did not come back
        #: (``"optimizer"``, ``"loss_fn"``): said again when ``train`` misses it
        self.unrestored: dict[str, str] = {}
        self.stop_requested = False
        #: the logs of the last completed epoch
        self.last_logs: dict[str, Any] = {}
        #: what the last call did when a signal stopped it
        self.preemption: PreemptionReport | None = None

    def set_stop(self, value: bool) -> None:
        self.stop_requested = value

    def train(self, call: TrainCall, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Run one validated call (``changes``: the settings it passes explicitly)."""
        handler, position = self.handler, self.position
        self.check_trainable()
        sharded = handler.sharded_checkpoints
        settings = settings_with(self.settings, changes, sharded=sharded)
        if call.resume is not None:
            self.resume(call.resume)
            # the restored defaults under the call's
            settings = settings_with(self.settings, changes, sharded=sharded)
        target = self.target_epoch(call.epochs, call.until_epoch)
        start = handler.progress.epoch
        guard, partial_changes = None, []
        if target > start:
            partial_changes = self.check_partial_epoch(settings)
            guard = PreemptionGuard.for_train(handler, position)
        # from here on the call changes the handler
        message = resume_change_warning(position, self.settings, changes, partial_changes)
        if message is not None:
            warn(handler.logger, message)
        self.preemption = None
        self.settings = settings
        position.restored = False
        if target <= start:
            handler.logger.info("already at epoch %d (target %d): nothing to train", start,
                                target)
            return dict(self.last_logs)
        run_seed = prepare_random_streams(handler.progress, changes.get("seed", UNSET),
                                          settings.seed, handler.distributed, handler.logger)
        self.amp_ema.prepare(settings, handler.device)
        parts = self.loop_parts(settings, run_seed, guard)
        self.stop_requested = False
        partial = position.partial
        position.continuing_epoch = None if partial is None else partial.epoch
        handler.logger.info("training epochs %d..%d on %s (world size %d)%s", start + 1, target,
                            handler.device, handler.distributed.world_size,
                            "" if partial is None else
                            f"; epoch {partial.epoch} continues after its batch "
                            f"{partial.batches}")
        return self.run(TrainingLoop(parts, call.progress_bar), guard, start, target)

    def build_loader(self, which: str, seed: int) -> DataLoader[Any] | None:
        handler = self.handler
        return handler.loaders.build(which, seed, handler.distributed, handler.device.type,
                                     watched_signals(handler.callbacks))

    def loop_parts(self, settings: TrainSettings, run_seed: int,
                   guard: PreemptionGuard | None) -> LoopParts:
        """What the training loop of one call works with."""
        handler, optimization = self.handler, self.optimization
        assert optimization.optimizer is not None and optimization.loss_fn is not None
        train_loader = self.build_loader("train", run_seed)
        assert train_loader is not None
        return LoopParts(
            model=handler.model, module=handler.module, optimizer=optimization.optimizer,
            scheduler=optimization.scheduler, scheduler_interval=optimization.scheduler_interval,
            loss_fn=optimization.loss_fn, metrics=dict(optimization.metrics),
            train_loader=train_loader, val_loader=self.build_loader("val", run_seed),
            scaler=self.amp_ema.scaler, ema=self.amp_ema.ema,
            device=handler.device, context=handler.distributed, dispatcher=self.dispatcher,
            history=handler.history_state, progress=handler.progress, settings=settings,
            handler=handler, set_stop=self.set_stop,
            lockstep_validation=handler.distributed.enabled and handler.sharded_checkpoints,
            position=self.position,
            stop_watch=guard.stop_watch if guard is not None else None,
            record_failures=guard is not None and guard.records_failures,
        )

    def run(self, loop: TrainingLoop, guard: PreemptionGuard | None, start: int,
            target: int) -> dict[str, Any]:
        """Run ``loop`` from ``start`` to ``target`` between ``TRAIN_BEGIN`` and ``TRAIN_END``
        (``EXCEPTION`` instead when it fails), under the emergency savers' watch."""
        handler, fire = self.handler, self.dispatcher.fire
        with guard.watching() if guard is not None else contextlib.nullcontext():
            try:
                fire(Event.TRAIN_BEGIN, handler=handler, start_epoch=start, end_epoch=target)
                logs = loop.run(start, target)
                if loop.stopped_at is not None:
                    assert guard is not None
                    self.preemption = guard.after_stop(loop.stopped_at)
                if logs:
                    self.last_logs = logs
                logs = dict(self.last_logs)
                fire(Event.TRAIN_END, handler=handler, logs=logs)
            except BaseException as error:
                if guard is not None:
                    guard.after_exception(error, loop.failure)
                fire(Event.EXCEPTION, handler=handler, exception=error)
                raise
            finally:
                self.position.continuing_epoch = None
        return logs

    def check_trainable(self) -> None:
        """One error that lists every piece a ``train`` call lacks, each with the call that
        supplies it (and, after ``load``, why the checkpoint did not bring it back)."""
        optimization = self.optimization
        loaded = self.loaded_from is not None
        data_calls = ("NNHandler.load(path, train_data=dataset) or " if loaded else "") + \
            "handler.set_train_loader(dataset, batch_size=...)"
        data_note = (" (datasets are never in a checkpoint; the loader arguments it recorded "
                     "apply)") if loaded else ""
        missing = [f"{what}: {calls}{note}" for what, calls, note, absent in (
            ("an optimizer (set_optimizer)", "handler.set_optimizer(torch.optim.Adam, lr=...)",
             self.unrestored.get("optimizer", ""), optimization.optimizer is None),
            ("a loss function (set_loss_fn)", "handler.set_loss_fn(loss)",
             self.unrestored.get("loss_fn", ""), optimization.loss_fn is None),
            ("a training dataset (set_train_loader)", data_calls, data_note,
             "train" not in self.handler.loaders),
        ) if absent]
        if missing:
            source = f" (loaded from {self.loaded_from!r})" if loaded else ""
            raise ConfigurationError(f"cannot train without{source}:\n"
                                     + "\n".join(f"  - {item}" for item in missing))

    def check_partial_epoch(self, settings: TrainSettings) -> list[str]:
        """Check that the partial epoch (of an emergency checkpoint) can be continued, before
        the call changes anything (see :func:`~nnhandler.run_setup.partial_epoch_changes`);
        returns what differs without preventing it, for the warning."""
        handler, partial = self.handler, self.position.partial
        if partial is None:
            return []
        loader = self.build_loader("train", handler.progress.run_seed or 0)
        spec = handler.loaders.spec("train")
        optimizer = self.optimization.optimizer
        assert loader is not None and spec is not None and optimizer is not None
        return partial_epoch_changes(
            partial, loader, progress=handler.progress,
            world_size=handler.distributed.world_size, settings=settings,
            metric_names=list(self.optimization.metrics), dataset=spec.dataset,
            optimizer=optimizer)

    def resume(self, resume: str | os.PathLike[str]) -> None:
        """``train(resume=...)``: restore ``resume`` (a path) or, for ``"latest"``, the newest
        valid checkpoint of the auto-save directory if there is one."""
        handler = self.handler
        if resume != "latest":
            handler.resume_from(resume)
            return
        saver = handler.auto_save_callback
        if saver is None:
            raise ConfigurationError("train(resume='latest') looks in the auto-save directory; "
                                     "call auto_save(...) first or pass resume=<path>")
        directory = saver.config.save_path
        options = saver.config.save_path_options  # a URL save_path's
        if saver.config.mirror is not None:  # the newer of save_path's and the mirror's
            from .callbacks.autosave_mirror import latest_with_mirror

            latest, options = latest_with_mirror(saver.config, handler.distributed,
                                                 handler.logger)
        else:
            latest = latest_checkpoint(directory, handler.distributed, handler.logger, options)
        if latest is None:
            handler.logger.info("resume='latest': no valid checkpoint in %s; starting fresh",
                                directory)
            return
        handler.resume_from(latest, verify=False,  # verified while choosing it
                            storage_options=options)

    def target_epoch(self, epochs: int | None, until_epoch: int | None) -> int:
        """The absolute epoch a call trains to (its arguments checked by :class:`TrainCall`)."""
        if epochs is not None:
            return self.handler.progress.epoch + epochs
        assert until_epoch is not None
        return until_epoch

