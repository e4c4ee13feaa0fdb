"""The training and validation loop. It knows nothing of saving: it only fires events."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from .components import EpochPosition, History, PartialEpoch, Progress
from .components.position import dataset_size, learning_rates_of
from .config import TrainSettings
from .distributed import DistributedContext, all_gather_objects
from .events import Event, EventDispatcher, note_failure
from .logging import TrainingProgress
from .samplers import (
    EpochDistributedSampler,
    EpochShuffleSampler,
    ShardSampler,
    batches_from,
    loader_batch_size,
    loader_length,
)

__all__ = ["EpochDistributedSampler", "EpochShuffleSampler", "FailurePoint", "LoopParts",
           "MidEpoch", "ShardSampler", "StopWatch", "TrainingLoop", "loader_length",
           "move_to_device"]

Metric = Callable[[Any, Any], Any]
#: one reusable do-nothing context (nullcontext is reentrant), so batches allocate none
_NO_CONTEXT = contextlib.nullcontext()


def _no_context() -> contextlib.nullcontext[None]:
    return _NO_CONTEXT


def move_to_device(data: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors inside (nested) tuples, lists and dicts moved to ``device``."""
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=non_blocking)
    if isinstance(data, (list, tuple)):
        return type(data)([move_to_device(x, device, non_blocking) for x in data])
    if isinstance(data, Mapping):
        return {k: move_to_device(v, device, non_blocking) for k, v in data.items()}
    return data


def _forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def _batch_size(target: Any) -> int:
    if isinstance(target, torch.Tensor):
        return int(target.shape[0]) if target.dim() > 0 else 1
    return len(target)


def _split(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise TypeError(
            "each batch must be a pair (inputs, targets); got "
            f"{type(batch).__qualname__} {batch!r:.60}"
        )
    return batch[0], batch[1]


@dataclass
class LoopParts:
    """Everything one ``train`` call works with."""

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scheduler_interval: str
    loss_fn: Callable[[Any, Any], torch.Tensor]
    metrics: Mapping[str, Metric]
    train_loader: DataLoader[Any]
    val_loader: DataLoader[Any] | None
    scaler: torch.amp.GradScaler | None
    ema: AveragedModel | None
    device: torch.device
    context: DistributedContext
    dispatcher: EventDispatcher
    history: History
    progress: Progress
    settings: TrainSettings
    handler: Any
    #: sets the handler's stop request (to rank 0's under DDP, see ``_agree_on_stop``)
    set_stop: Callable[[bool], None]
    #: the model's forward is a collective (FSDP2): every rank must run as many validation
    #: forward passes as the busiest one
    lockstep_validation: bool = False
    #: the partial epoch to continue, and where a stop inside an epoch is recorded
    position: EpochPosition | None = None
    #: asked after every optimizer step whether to stop there (``save_on_signal``)
    stop_watch: StopWatch | None = None
    #: remember where an exception escaped an epoch (``save_on_exception``)
    record_failures: bool = False


class StopWatch(Protocol):
    """Decides whether training stops now; every rank must get the same answer at the same
    point (see :mod:`nnhandler.preemption`)."""

    def at_step(self) -> bool:
        """After an optimizer step (may answer for an earlier step under DDP)."""

    def at_sync_point(self) -> bool:
        """At the end of an epoch's batches and after its end: answers for everything so far."""


#: FailurePoint.stage: between batches (after one completed, in its on_train_batch_end hooks)
BETWEEN_BATCHES = "between batches"
#: fetching a batch, its on_train_batch_begin hooks, forward pass and loss (no gradient yet)
BEFORE_BACKWARD = "before backward"
BACKWARD = "backward"  # the backward pass (and metrics of a batch without optimizer step)
#: optimizer, EMA and per-step scheduler updates, and the metrics of the batch that stepped
OPTIMIZER_STEP = "optimizer step"
VALIDATION = "validation"  # every training batch of the epoch done


@dataclass(frozen=True)
class FailurePoint:
    """Where an exception escaped an epoch: ``done`` batches of ``epoch`` had completed and the
    failure came in ``stage`` (one of the constants above) of the next one."""

    epoch: int
    done: int
    stage: str
    totals: _Totals
    accumulation: int
    batch_size: int | None
    #: batches in the epoch (None: the loader has no length)
    batches: int | None
    #: the torch random stream where the epoch's state is consistent (validation: before it)
    torch_random_state: torch.Tensor | None = None
    #: the training dataset's length (None: it has none)
    samples: int | None = None
    #: the optimizer's learning rate per param group
    learning_rates: tuple[float, ...] | None = None


class _Totals:
    """Sample-weighted sums of loss and metrics for one pass, kept on the device until the end
    of the epoch so that no batch forces a host sync for bookkeeping. A batch allocates
    nothing here: each value is cast into a float64 scratch scalar (``copy_``) and added in
    place (``add_`` with the batch size as ``alpha``)."""

    __slots__ = ("_scratch", "count", "loss", "metric_sums", "metric_tensors", "names")

    def __init__(self, names: Sequence[str], device: torch.device) -> None:
        self.names = names
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self._scratch = torch.zeros((), dtype=torch.float64, device=device)
        self.metric_sums = [0.0 for _ in names]
        self.metric_tensors = [torch.zeros((), dtype=torch.float64, device=device)
                               for _ in names]
        self.count = 0

    def add(self, loss: torch.Tensor, size: int, values: Sequence[Any]) -> None:
        scratch = self._scratch
        self.loss.add_(scratch.copy_(loss.detach()), alpha=size)
        self.count += size
        for i, value in enumerate(values):
            if isinstance(value, torch.Tensor):
                self.metric_tensors[i].add_(scratch.copy_(value.detach()), alpha=size)
            else:
                self.metric_sums[i] += float(value) * size

    def export(self) -> dict[str, Any]:
        """The exact running sums as checkpoint data (CPU tensors, floats, an int)."""
        return {"loss": self.loss.detach().cpu().clone(), "count": self.count,
                "metric_sums": list(self.metric_sums),
                "metric_tensors": [t.detach().cpu().clone() for t in self.metric_tensors]}

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Continue from sums written by :meth:`export`."""
        self.loss.copy_(saved["loss"])
        self.count = int(saved["count"])
        self.metric_sums = [float(x) for x in saved["metric_sums"]]
        for mine, theirs in zip(self.metric_tensors, saved["metric_tensors"], strict=True):
            mine.copy_(theirs)

    def packed(self) -> torch.Tensor:
        device = self.loss.device
        extra = torch.tensor(
            [float(self.count), *self.metric_sums], dtype=torch.float64, device=device
        )
        if self.metric_tensors:
            extra[1:] += torch.stack(self.metric_tensors)
        return torch.cat([self.loss.reshape(1), extra])


def _averages(packed: Sequence[float], names: Sequence[str], prefix: str) -> dict[str, float]:
    loss_sum, count, *metric_sums = packed
    if count == 0:
        return {}
    logs = {f"{prefix}loss": loss_sum / count}
    logs.update({f"{prefix}{name}": s / count for name, s in zip(names, metric_sums, strict=True)})
    return logs


class MidEpoch:
    """Where the epoch stands after one of its optimizer steps: the ``mid_epoch`` argument of
    ``on_train_step_end``, and the one door through which a callback writes a checkpoint
    inside an epoch.

    ``epoch`` is the epoch in progress (absolute, 1-based), ``batches`` how many of its batches
    are done (the one that just stepped included), ``epoch_batches`` its length (``None`` when
    the loader has none), ``step`` the absolute optimizer step (``handler.global_step``).

    A mid-epoch save goes through :meth:`recorded`, which records the partial epoch as an
    emergency checkpoint does (state key ``"position"``, reason ``"step"``): one mid-epoch
    resume path. Under DDP :meth:`logs` and :meth:`recorded` are collectives that every rank
    must call at the same step. One object serves the whole epoch (``batches`` and ``step``
    are updated before each event): keep what you need of it, not the object.
    """

    __slots__ = ("_loop", "_totals", "batches", "epoch", "epoch_batches", "step")

    def __init__(self, loop: TrainingLoop, epoch: int, epoch_batches: int | None,
                 totals: _Totals) -> None:
        self._loop = loop
        self._totals = totals
        self.epoch = epoch
        self.epoch_batches = epoch_batches
        self.batches = 0
        self.step = 0

    @property
    def last(self) -> bool:
        """Whether this is the epoch's last batch (never when its length is unknown)."""
        return self.epoch_batches is not None and self.batches >= self.epoch_batches

    def logs(self) -> dict[str, Any]:
        """The epoch so far: ``epoch`` (in progress), ``batch`` (batches done), ``step`` and
        the per-sample running means of ``loss`` and each metric over the batches done,
        summed over every rank like the epoch logs (a collective). No ``val_*`` key: the
        epoch has not validated; no key that callbacks add at the epoch's end."""
        loop = self._loop
        reduced = loop.p.context.all_reduce_sum(self._totals.packed()).tolist()
        logs: dict[str, Any] = {"epoch": self.epoch, "batch": self.batches, "step": self.step}
        logs.update(_averages(reduced, loop.metric_names, ""))
        return logs

    @contextlib.contextmanager
    def recorded(self) -> Iterator[dict[str, Any]]:
        """Inside the block the state records this partial epoch (every rank's running sums:
        a collective), so a checkpoint written there resumes from the next batch; yields
        :meth:`logs`. The record is cleared when the block ends, however it ends."""
        loop = self._loop
        position = loop.p.position
        if position is None:
            raise RuntimeError("this training loop keeps no epoch position: it cannot record "
                               "a partial epoch")
        position.partial = loop.partial_epoch(self.epoch, self.batches, self._totals, "step",
                                              self.epoch_batches)
        try:
            yield self.logs()
        finally:
            position.partial = None


class TrainingLoop:
    """Runs epochs ``start+1 .. end`` of one ``train`` call over :class:`LoopParts`."""

    def __init__(self, parts: LoopParts, show_progress: bool) -> None:
        self.p = parts
        self.show_progress = show_progress and parts.context.is_main
        self.metric_names = list(parts.metrics)
        self.autocast: Callable[[], Any]
        if not parts.settings.use_amp:
            self.autocast = _no_context  # entering a disabled torch.autocast still costs
        elif parts.device.type == "cuda":
            self.autocast = lambda: torch.autocast("cuda", dtype=torch.float16)
        else:
            self.autocast = lambda: torch.autocast(parts.device.type, dtype=torch.bfloat16)
        self.non_blocking = parts.device.type == "cuda"
        #: where the stop watch stopped the loop: ``(epoch in progress, batches of it done)``
        self.stopped_at: tuple[int, int] | None = None
        #: where an exception escaped an epoch (with ``record_failures``)
        self.failure: FailurePoint | None = None

    def run(self, start_epoch: int, end_epoch: int) -> dict[str, Any]:
        """Train epochs ``start_epoch+1 .. end_epoch``; returns the last completed epoch's logs.

        An epoch that an emergency checkpoint interrupted (``parts.position``) continues from
        its next batch. When the stop watch says so, the loop stops after an optimizer step
        (recording the partial epoch in ``parts.position``) or after an epoch; ``stopped_at``
        is then ``(epoch in progress, batches of it done)`` — ``(E + 1, 0)`` after epoch E.
        """
        p = self.p
        logs: dict[str, Any] = {}
        self.stopped_at = self.failure = None
        with TrainingProgress(self.show_progress, start_epoch, end_epoch) as bar:
            for epoch in range(start_epoch + 1, end_epoch + 1):
                p.dispatcher.fire(Event.EPOCH_BEGIN, handler=p.handler, epoch=epoch)
                trained = self._train_epoch(epoch, bar)
                if trained is None:  # stopped inside the epoch
                    break
                train_totals, done = trained
                val_totals = None
                if p.val_loader is not None and epoch % p.settings.validate_every == 0:
                    # the validation loader draws a random number when it starts: a checkpoint
                    # of a failed validation must hold the streams from before, to draw it again
                    before = torch.get_rng_state() if p.record_failures else None
                    try:
                        val_totals = self._validate(epoch)
                    except BaseException:
                        self._record_failure(epoch, done, VALIDATION, train_totals, done,
                                             before)
                        raise
                logs = self._epoch_logs(epoch, train_totals, val_totals)
                if val_totals is not None:
                    val_logs = {k: v for k, v in logs.items() if k.startswith("val_")}
                    p.dispatcher.fire(Event.VALIDATION_END, handler=p.handler, epoch=epoch,
                                      logs=val_logs)
                self._step_scheduler_per_epoch(logs)
                p.progress.epoch = epoch
                p.history.record(logs, self.metric_names)
                p.dispatcher.fire(Event.EPOCH_END,
                                  before_writers=functools.partial(self._before_writers, logs),
                                  handler=p.handler, epoch=epoch, logs=logs)
                if p.position is not None:
                    p.position.continuing_epoch = None
                bar.end_epoch(_status(logs))
                if p.handler.stop_requested:
                    break
                if p.stop_watch is not None and p.stop_watch.at_sync_point():
                    self.stopped_at = (epoch + 1, 0)
                    break
        return logs

    def _before_writers(self, logs: dict[str, Any]) -> None:
        """After the ordinary epoch-end callbacks, before the checkpoint writers: keys those
        callbacks added to the logs (``lr`` …) join the history, then the ranks agree on
        stopping."""
        self.p.history.update_last(logs)
        self._agree_on_stop()

    def _agree_on_stop(self) -> None:
        """Under DDP rank 0 decides whether training stops, so every rank saves (or not) and
        leaves the loop together even if a callback asked on one rank only."""
        if self.p.context.enabled:
            self.p.set_stop(self.p.context.broadcast_object(self.p.handler.stop_requested))

    def _train_epoch(self, epoch: int,
                     bar: TrainingProgress) -> tuple[_Totals, int] | None:
        """The epoch's training batches: ``(totals, batches done)``, or ``None`` when the stop
        watch stopped the epoch (its position is then recorded)."""
        p = self.p
        loader = p.train_loader
        set_epoch = getattr(loader.sampler, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        p.model.train()
        totals = _Totals(self.metric_names, p.device)
        accumulation = p.settings.gradient_accumulation_steps
        batches = loader_length(loader)
        partial = p.position.take(epoch) if p.position is not None else None
        start = 0 if partial is None else self._continue(partial, totals)
        bar.start_epoch(epoch, batches, done=start)
        fire_begin = p.dispatcher.has_listeners(Event.TRAIN_BATCH_BEGIN)
        fire_end = p.dispatcher.has_listeners(Event.TRAIN_BATCH_END)
        # called directly: a dispatch per step costs more than a small model's step can spare
        step_hooks = p.dispatcher.hooks(Event.TRAIN_STEP_END)
        mid = MidEpoch(self, epoch, batches, totals) if step_hooks else None
        clip = p.settings.gradient_clipping_norm
        is_ddp = isinstance(p.model, nn.parallel.DistributedDataParallel)
        stop_now = p.stop_watch.at_step if p.stop_watch is not None else None
        done, stage = start, BEFORE_BACKWARD  # where an exception would find the epoch
        try:
            for index, batch in enumerate(batches_from(loader, start), start):
                if fire_begin:
                    p.dispatcher.fire(Event.TRAIN_BATCH_BEGIN, handler=p.handler, epoch=epoch,
                                      batch_idx=index, batch=batch)
                inputs, target = _split(move_to_device(batch, p.device, self.non_blocking))
                group_start = index - index % accumulation
                group_size = accumulation if batches is None else min(accumulation,
                                                                      batches - group_start)
                steps_now = (index + 1 - group_start) == group_size
                sync = (_NO_CONTEXT if steps_now or not is_ddp
                        else cast(nn.parallel.DistributedDataParallel, p.model).no_sync())
                with sync:
                    with self.autocast():
                        output = _forward(p.model, inputs)
                        loss: torch.Tensor = p.loss_fn(output, target)
                    scaled = loss / group_size if group_size > 1 else loss
                    if p.scaler is not None:
                        scaled = p.scaler.scale(scaled)
                    stage = BACKWARD
                    scaled.backward()  # type: ignore[no-untyped-call]
                if steps_now:
                    stage = OPTIMIZER_STEP
                    self._optimizer_step(clip)
                totals.add(loss, _batch_size(target), self._metric_values(output, target))
                done, stage = index + 1, BETWEEN_BATCHES
                if fire_end:
                    p.dispatcher.fire(Event.TRAIN_BATCH_END, handler=p.handler, epoch=epoch,
                                      batch_idx=index, batch=batch, loss=loss.detach())
                bar.advance_batch()
                if steps_now and mid is not None:
                    mid.batches = done
                    mid.step = step = p.progress.step
                    for hook in step_hooks:
                        try:
                            hook(handler=p.handler, epoch=epoch, step=step, mid_epoch=mid)
                        except BaseException as error:
                            note_failure(error, getattr(hook, "__self__", hook),
                                         Event.TRAIN_STEP_END)
                            raise
                if steps_now and stop_now is not None and stop_now():
                    self._stop_inside(epoch, done, totals, batches)
                    return None
                stage = BEFORE_BACKWARD
        except BaseException:
            self._record_failure(epoch, done, stage, totals, batches)
            raise
        if p.stop_watch is not None and p.stop_watch.at_sync_point():
            self._stop_inside(epoch, done, totals, batches)
            return None
        return totals, done

    def _continue(self, partial: PartialEpoch, totals: _Totals) -> int:
        """Take up ``partial``: its sums and pending gradients; returns the batches it did."""
        totals.restore(partial.totals[self.p.context.rank])
        partial.restore_pending_grads(self.p.module)
        return partial.batches

    def _stop_inside(self, epoch: int, done: int, totals: _Totals, batches: int | None) -> None:
        """Record the partial epoch so that a checkpoint written now continues it exactly."""
        p = self.p
        assert p.position is not None
        p.position.partial = self.partial_epoch(epoch, done, totals, "signal", batches)
        self.stopped_at = (epoch, done)

    def partial_epoch(self, epoch: int, done: int, totals: _Totals, reason: str,
                      batches: int | None) -> PartialEpoch:
        """Epoch ``epoch`` (``batches`` long) after ``done`` batches and an optimizer step
        (a collective: every rank's sums)."""
        p = self.p
        return PartialEpoch(
            epoch=epoch, batches=done, batch_size=loader_batch_size(p.train_loader),
            accumulation=p.settings.gradient_accumulation_steps,
            metric_names=tuple(self.metric_names),
            totals=tuple(all_gather_objects(p.context, totals.export())),
            pending_grads=None, reason=reason, samples=dataset_size(p.train_loader.dataset),
            batches_per_epoch=batches,
            learning_rates=learning_rates_of(p.optimizer))

    def _record_failure(self, epoch: int, done: int, stage: str, totals: _Totals,
                        batches: int | None, torch_random_state: torch.Tensor | None = None
                        ) -> None:
        if self.p.record_failures and self.failure is None:
            self.failure = FailurePoint(epoch, done, stage, totals,
                                        self.p.settings.gradient_accumulation_steps,
                                        self.p.train_loader.batch_size, batches,
                                        torch_random_state,
                                        samples=dataset_size(self.p.train_loader.dataset),
                                        learning_rates=learning_rates_of(self.p.optimizer))

    def _optimizer_step(self, clip: float | None) -> None:
        p = self.p
        if p.scaler is not None:
            if clip is not None:
                p.scaler.unscale_(p.optimizer)
                nn.utils.clip_grad_norm_(p.module.parameters(), clip)
            p.scaler.step(p.optimizer)
            p.scaler.update()
        else:
            if clip is not None:
                nn.utils.clip_grad_norm_(p.module.parameters(), clip)
            p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
        p.progress.step += 1
        if p.ema is not None:
            p.ema.update_parameters(p.module)
        if p.scheduler is not None and p.scheduler_interval == "step":
            p.scheduler.step()

    def _metric_values(self, output: Any, target: Any) -> Sequence[Any]:
        if not self.metric_names:
            return ()
        with torch.no_grad():
            return [metric(output, target) for metric in self.p.metrics.values()]

    def _validate(self, epoch: int) -> _Totals:
        p = self.p
        p.dispatcher.fire(Event.VALIDATION_BEGIN, handler=p.handler, epoch=epoch)
        model = p.ema.module if p.ema is not None else p.module
        was_training = model.training
        model.eval()
        totals = _Totals(self.metric_names, p.device)
        fire_begin = p.dispatcher.has_listeners(Event.VALIDATION_BATCH_BEGIN)
        fire_end = p.dispatcher.has_listeners(Event.VALIDATION_BATCH_END)
        assert p.val_loader is not None
        inputs: Any = None
        batches = 0
        most = self._most_validation_batches() if p.lockstep_validation else 0
        with torch.no_grad():
            for index, batch in enumerate(p.val_loader):
                if fire_begin:
                    p.dispatcher.fire(Event.VALIDATION_BATCH_BEGIN, handler=p.handler,
                                      epoch=epoch, batch_idx=index, batch=batch)
                inputs, target = _split(move_to_device(batch, p.device, self.non_blocking))
                with self.autocast():
                    output = _forward(model, inputs)
                    loss = p.loss_fn(output, target)
                totals.add(loss, _batch_size(target), self._metric_values(output, target))
                batches += 1
                if fire_end:
                    p.dispatcher.fire(Event.VALIDATION_BATCH_END, handler=p.handler,
                                      epoch=epoch, batch_idx=index, batch=batch,
                                      loss=loss.detach())
            if batches < most:
                self._extra_forwards(model, most - batches, inputs)
        model.train(was_training)
        return totals

    def _most_validation_batches(self) -> int:
        """The most validation batches any rank has (a collective, before any forward pass):
        the validation shards differ by up to one sample, and a sharded model's forward is a
        collective that every rank must join the same number of times."""
        assert self.p.val_loader is not None
        most = torch.tensor(len(self.p.val_loader), device=self.p.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most)

    def _extra_forwards(self, model: nn.Module, count: int, inputs: Any) -> None:
        """``count`` forward passes whose results are discarded and never counted, so that this
        rank joins as many of the sharded model's collectives as the busiest rank."""
        p = self.p
        if inputs is None:  # this rank's shard is empty: any sample will do
            assert p.val_loader is not None
            sample = p.val_loader.collate_fn([p.val_loader.dataset[0]])
            inputs, _ = _split(move_to_device(sample, p.device, self.non_blocking))
        for _ in range(count):
            with self.autocast():
                _forward(model, inputs)

    def _epoch_logs(self, epoch: int, train: _Totals, val: _Totals | None) -> dict[str, Any]:
        packs = [train.packed()] + ([val.packed()] if val is not None else [])
        reduced = self.p.context.all_reduce_sum(torch.cat(packs)).tolist()  # one host sync
        width = 2 + len(self.metric_names)
        logs: dict[str, Any] = {"epoch": epoch}
        logs.update(_averages(reduced[:width], self.metric_names, ""))
        if val is not None:
            logs.update(_averages(reduced[width:], self.metric_names, "val_"))
        if "loss" not in logs:
            raise ValueError(f"epoch {epoch}: the training loader yielded no batches")
        self._warn_if_not_finite(epoch, logs)
        return logs

    def _warn_if_not_finite(self, epoch: int, logs: Mapping[str, Any]) -> None:
        """A NaN/inf loss is not an error: it is summed across ranks like any other value (so
        every rank sees it and the collectives stay in step), training goes on identically on
        every rank, and rank 0 says so once. A callback may stop the run with
        ``request_stop()``."""
        bad = {k: v for k, v in logs.items()
               if k != "epoch" and isinstance(v, float) and not math.isfinite(v)}
        if bad and self.p.context.is_main:
            self.p.handler.logger.warning(
                "epoch %d: %s not finite%s; training continues (call handler.request_stop() "
                "from a callback's on_epoch_end to stop)",
                epoch, ", ".join(f"{k}={v}" for k, v in bad.items()),
                " (summed over all ranks: one rank's NaN reaches every rank)"
                if self.p.context.enabled else "",
            )

    def _step_scheduler_per_epoch(self, logs: Mapping[str, Any]) -> None:
        p = self.p
        if p.scheduler is None or p.scheduler_interval != "epoch":
            return
        if isinstance(p.scheduler, ReduceLROnPlateau):
            if "val_loss" in logs:  # plateau schedulers wait for an epoch that validates
                p.scheduler.step(logs["val_loss"])
        else:
            p.scheduler.step()


def _status(logs: Mapping[str, Any]) -> str:
    return "  ".join(
        f"{k}={v:.4g}" for k, v in logs.items()
        if k != "epoch" and isinstance(v, float)
    )
