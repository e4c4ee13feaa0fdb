"""What trains the model: the optimizer, the scheduler, the loss function and the metrics.

:class:`Optimization` owns them and what they were configured with (the values a checkpoint
records, and :meth:`Optimization.restore` re-creates them from); the handler's setters
(``set_optimizer``, ``set_scheduler``, ``set_loss_fn``, ``add_metric``) delegate here.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Final

import torch
from torch import nn

from .checkpoint.content import ConfigRecord
from .checkpoint.refs import encode_value, resolve_class
from .components import ComponentState
from .components.callables import build_callable, describe_callable
from .errors import ConfigurationError, UnresolvableReferenceError
from .recorded import (
    encode_arguments,
    maybe_reference,
    require_reference,
    restorable_arguments,
    same_setting,
    signature_defaults,
    to_device,
)
from .state import StateRegistry

__all__ = ["Optimization", "warn"]

SCHEDULER_INTERVALS: Final = ("epoch", "step")
SCHEDULER_BASES: Final = (torch.optim.lr_scheduler.LRScheduler,
                          torch.optim.lr_scheduler.ReduceLROnPlateau)
Metric = Callable[[Any, Any], Any]
LossFunction = Callable[[Any, Any], torch.Tensor]


def warn(logger: logging.Logger, message: str, stacklevel: int = 4) -> None:
    """A warning in the log and as a Python warning (catchable, e.g. in tests), attributed to
    the user's call (``stacklevel`` counts the frames between it and this function)."""
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


class Optimization:
    """The optimizer, scheduler, loss function and metrics of one handler, and their
    configuration. The optimizer and scheduler join ``registry`` (``"optimizer"``,
    ``"scheduler"``) when they are first set."""

    def __init__(self, module: nn.Module, registry: StateRegistry, device: torch.device,
                 logger: logging.Logger) -> None:
        self.module, self.registry, self.device, self.logger = module, registry, device, logger
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_spec: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None
        self.scheduler: Any = None
        self.scheduler_spec: tuple[type[Any], dict[str, Any], str] | None = None
        self.loss_fn: LossFunction | None = None
        self.metrics: dict[str, Metric] = {}

    @property
    def scheduler_interval(self) -> str:
        return self.scheduler_spec[2] if self.scheduler_spec else "epoch"

    # -- setters (see NNHandler's) -------------------------------------------------------------
    def set_optimizer(self, optimizer_class: type[torch.optim.Optimizer],
                      kwargs: dict[str, Any]) -> None:
        if not (inspect.isclass(optimizer_class)
                and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(
                f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}"
            )
        encode_arguments(kwargs, f"{optimizer_class.__qualname__} argument")
        optimizer = optimizer_class(self.module.parameters(), **kwargs)
        dropped = [what for what in (self.restored_description("optimizer"),
                                     self.restored_description("scheduler")) if what]
        if dropped:
            warn(self.logger,
                 f"set_optimizer({optimizer_class.__qualname__}) replaces the optimizer restored "
                 f"from the checkpoint: {' and '.join(dropped)} are dropped (the scheduler is "
                 "re-created on the new optimizer). To keep them, do not call set_optimizer "
                 "after load/resume_from: the optimizer is restored as it was; to start it "
                 "fresh on purpose, load with skip_optimizer=True (and skip_scheduler=True)")
        self.optimizer = optimizer
        self.optimizer_spec = (optimizer_class, dict(kwargs))
        self.mark_fresh("optimizer")
        if "optimizer" not in self.registry:
            self.registry.register(ComponentState("optimizer", lambda: self.optimizer))
        if self.scheduler_spec is not None:
            scheduler_class, scheduler_kwargs, interval = self.scheduler_spec
            self.create_scheduler(scheduler_class, interval, scheduler_kwargs)

    def set_scheduler(self, scheduler_class: type[Any], interval: str,
                      kwargs: dict[str, Any]) -> None:
        if self.optimizer is None:
            raise ConfigurationError("set_optimizer must be called before set_scheduler")
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
        if not (inspect.isclass(scheduler_class) and issubclass(scheduler_class, SCHEDULER_BASES)):
            raise TypeError(
                f"scheduler_class must be a torch.optim.lr_scheduler.LRScheduler subclass, "
                f"got {scheduler_class!r}"
            )
        if interval not in SCHEDULER_INTERVALS:
            raise ConfigurationError(f"interval={interval!r}: use 'epoch' or 'step'")
        if interval == "step" and issubclass(scheduler_class, plateau):
            raise ConfigurationError("ReduceLROnPlateau needs val_loss: use interval='epoch'")
        encode_arguments(kwargs, f"{scheduler_class.__qualname__} argument")
        dropped = self.restored_description("scheduler")
        self.create_scheduler(scheduler_class, interval, kwargs)
        if dropped:
            warn(self.logger,
                 f"set_scheduler({scheduler_class.__qualname__}) replaces the scheduler restored "
                 f"from the checkpoint: {dropped} is dropped. To keep it, do not call "
                 "set_scheduler after load/resume_from: the scheduler is restored as it was; to "
                 "start it fresh on purpose, load with skip_scheduler=True")

    def create_scheduler(self, scheduler_class: type[Any], interval: str,
                         kwargs: Mapping[str, Any]) -> None:
        self.scheduler = scheduler_class(self.optimizer, **kwargs)
        self.scheduler_spec = (scheduler_class, dict(kwargs), interval)
        self.mark_fresh("scheduler")
        if "scheduler" not in self.registry:
            self.registry.register(ComponentState("scheduler", lambda: self.scheduler))

    def set_loss_fn(self, loss_fn: LossFunction | type[nn.Module], kwargs: dict[str, Any]) -> None:
        if inspect.isclass(loss_fn):
            if not issubclass(loss_fn, nn.Module):
                raise TypeError(f"loss class must be an nn.Module subclass, got {loss_fn!r}")
            loss_fn = loss_fn(**kwargs).to(self.device)
        elif kwargs:
            raise TypeError("keyword arguments are only accepted with a loss class")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        self.loss_fn = loss_fn
        self.warn_if_unrecordable(loss_fn, "loss function", "set_loss_fn")

    def add_metric(self, name: str, metric: Metric) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigurationError(f"metric name {name!r} must be a Python identifier")
        if name == "loss" or name.startswith("val_") or name == "epoch":
            raise ConfigurationError(f"metric name {name!r} is reserved")
        if not callable(metric):
            raise TypeError(f"metric {name!r} must be callable, got {metric!r}")
        self.metrics[name] = metric
        self.warn_if_unrecordable(metric, f"metric {name!r}", "add_metric")

    def warn_if_unrecordable(self, obj: Any, what: str, setter: str) -> None:
        spec, reason = describe_callable(obj, what)
        if spec is None:
            self.logger.warning("%s cannot be recorded in checkpoints (%s); after load(), call "
                                "%s again", what, reason, setter)

    # -- what a restore replaces -------------------------------------------------------------
    def restored_description(self, key: str) -> str | None:
        """What replacing the optimizer/scheduler would drop, if a checkpoint restored it."""
        provider = self.registry.get(key)
        if not (isinstance(provider, ComponentState) and provider.restored):
            return None
        if key == "optimizer" and self.optimizer is not None:
            tracked = len(self.optimizer.state)
            return (f"its state (moments, step counts: {tracked} parameter tensor(s)) and "
                    "its hyper-parameters from the file")
        if key == "scheduler" and self.scheduler is not None:
            position = getattr(self.scheduler, "last_epoch", None)
            return (f"the scheduler's state ({type(self.scheduler).__qualname__}"
                    + (f", last_epoch={position}" if position is not None else "") + ")")
        return None

    def mark_fresh(self, key: str) -> None:
        provider = self.registry.get(key)
        if isinstance(provider, ComponentState):
            provider.restored = False

    def replaced_settings(self, recorded: Any) -> list[str]:
        """``"name before -> after"`` for each optimizer hyper-parameter that the checkpoint's
        run configured differently from this handler (the values ``set_optimizer`` got, or the
        class's defaults). Configured values, not the current ones: a scheduler moves ``lr``
        (and some ``momentum``) during a run, which a resume must continue, not report."""
        if self.optimizer is None or self.optimizer_spec is None:
            return []
        if not isinstance(recorded, Mapping) or not isinstance(recorded.get("kwargs"), Mapping):
            return []
        optimizer_class, ours = self.optimizer_spec
        theirs = recorded["kwargs"]
        notes = []
        reference = maybe_reference(optimizer_class)
        if isinstance(recorded.get("class"), str) and recorded["class"] != reference:
            notes.append(f"optimizer class {reference} -> {recorded['class']}")
        configured = self.optimizer.defaults  # set_optimizer's values over the class defaults
        class_defaults = signature_defaults(optimizer_class)
        for name in sorted(set(ours) | set(theirs)):
            if name not in configured:
                continue
            before = configured[name]
            after = theirs[name] if name in theirs else class_defaults.get(name, before)
            if not same_setting(before, after):
                notes.append(f"{name} {before!r} -> {after!r}")
        return notes

    # -- the checkpoint's record ---------------------------------------------------------------
    def records(self) -> dict[str, Any]:
        """The configuration entries a checkpoint records of these components."""
        optimizer = scheduler = None
        if self.optimizer_spec is not None:
            cls, kwargs = self.optimizer_spec
            optimizer = {"class": maybe_reference(cls), "kwargs": encode_value(kwargs, "opt")}
        if self.scheduler_spec is not None:
            cls, kwargs, interval = self.scheduler_spec
            scheduler = {"class": maybe_reference(cls),
                         "kwargs": encode_value(kwargs, "scheduler"), "interval": interval}
        return {
            "optimizer": optimizer,
            "scheduler": scheduler,
            "loss_fn": describe_callable(self.loss_fn, "loss")[0] if self.loss_fn else None,
            "metrics": {name: describe_callable(fn, name)[0] for name, fn in self.metrics.items()},
        }

    def restore(self, config: ConfigRecord) -> None:
        """Re-create optimizer, scheduler, loss and metrics from the (validated) configuration.
        What cannot come back (a class that does not resolve, a function-valued argument) is a
        warning that says which setter to call; the component's saved state then waits
        (pending) and is restored when the setter registers it."""
        if config.optimizer is not None:
            try:
                opt_cls = resolve_class(require_reference(config.optimizer.cls, "optimizer"),
                                        torch.optim.Optimizer)
                self.set_optimizer(opt_cls, restorable_arguments(config.optimizer.kwargs, opt_cls))
            except UnresolvableReferenceError as error:
                self.logger.warning("optimizer not restored (%s); call set_optimizer: its saved "
                                    "state is restored then", error)
        if config.scheduler is not None and self.optimizer is not None:
            try:
                sched_cls: type[Any] = resolve_class(
                    require_reference(config.scheduler.cls, "scheduler"), SCHEDULER_BASES)
                sched_kwargs = restorable_arguments(config.scheduler.kwargs, sched_cls)
                self.set_scheduler(sched_cls, config.scheduler.interval, sched_kwargs)
            except UnresolvableReferenceError as error:
                self.logger.warning("scheduler not restored (%s); call set_scheduler: its saved "
                                    "state is restored then", error)
        trusted = frozenset({"__main__", "torch.nn.functional",
                             type(self.module).__module__.split(".", 1)[0]})
        if config.loss_fn is not None:
            try:
                self.loss_fn = to_device(build_callable(config.loss_fn, trusted), self.device)
            except UnresolvableReferenceError as error:
                self.logger.warning("loss function not restored (%s); call set_loss_fn", error)
        for name, spec in config.metrics.items():
            if spec is None:
                self.logger.warning("metric %r was not recordable; call add_metric again", name)
                continue
            try:
                self.metrics[name] = to_device(build_callable(spec, trusted), self.device)
            except UnresolvableReferenceError as error:
                self.logger.warning("metric %r not restored (%s); call add_metric", name, error)
