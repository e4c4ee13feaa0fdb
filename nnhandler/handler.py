"""``NNHandler``: configuration setters, save/load, the auto-save convenience and ``train``."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import secrets
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset

from .callbacks import AutoSaveCallback, Callback
from .callbacks.autosave_options import AutoSaveOptions, auto_save_config
from .checkpoint import Checkpoint
from .checkpoint.content import ConfigRecord, check_config
from .checkpoint.discovery import find_latest_valid
from .checkpoint.refs import (
    NotReferenceableError,
    decode_arguments,
    encode_value,
    resolve_class,
)
from .checkpoint.schema import relocate
from .checkpoint.sharded import (
    SHARDED_KEYS,
    ShardedCheckpoint,
    load_sharded_state,
    read_any_checkpoint,
)
from .checkpointing import Checkpointer
from .components import (
    ComponentState,
    EpochPosition,
    History,
    ModelState,
    Progress,
    RNGState,
    seed_everything,
)
from .components.callables import build_callable, describe_callable
from .components.position import dataset_size, learning_rates_of
from .config import (
    LoadOptions,
    ParallelConfig,
    Parallelism,
    ResumeCall,
    TrainCall,
    TrainSettings,
    validate_call,
)
from .data import Loaders
from .devices import parse_device, resolve_device
from .distributed import DistributedContext
from .errors import (
    CheckpointError,
    CheckpointSchemaError,
    ConfigurationError,
    NoCheckpointFoundError,
    UnresolvableReferenceError,
)
from .events import Event, EventDispatcher, validate_hooks
from .logging import LoggingMode as _LoggingMode
from .logging import make_logger
from .loop import LoopParts, TrainingLoop
from .plugins import PluginRegistry, discover_plugins, in_process_factories
from .preemption import PreemptionGuard, PreemptionReport, watched_signals
from .recorded import (
    encode_arguments,
    maybe_reference,
    require_passed,
    require_reference,
    resolve_fsdp_units,
    resolve_model_class,
    restorable_arguments,
    same_setting,
    signature_defaults,
    to_device,
)
from .samplers import loader_length
from .sharding import apply_fsdp, has_dtensor_parameters
from .state import RestoreResult, StateProvider, StateRegistry

if TYPE_CHECKING:  # DCP is imported only when a sharded checkpoint is written or loaded
    from typing_extensions import Unpack

    from .checkpoint.dcp_state import ShardedComponents

__all__ = ["NNHandler"]


class _Unset:
    """Marks an argument that was not passed (where ``None`` is a meaningful value)."""

    def __repr__(self) -> str:
        return "<handler default>"


UNSET: Final = _Unset()
_LOGGER: Final = logging.getLogger("nnhandler")
_SCHEDULER_INTERVALS: Final = ("epoch", "step")
#: load_latest: how often a chosen file may vanish (another job pruning) before it gives up
_CHOICES_BEFORE_GIVING_UP: Final = 5
_SCHEDULER_BASES: Final = (torch.optim.lr_scheduler.LRScheduler,
                           torch.optim.lr_scheduler.ReduceLROnPlateau)
#: State keys of the handler's own components; everything else belongs to callbacks/plugins.
_CORE_KEYS: Final = frozenset({"model", "optimizer", "scheduler", "grad_scaler", "ema",
                               "history", "progress", "rng", "config", "position"})
#: core keys a checkpoint may lack without a warning (files written before they existed)
_OPTIONAL_KEYS: Final = frozenset({"position"})


class _ConfigState:
    """The handler's configuration as a state provider (``"config"``).

    :meth:`NNHandler.load` builds a handler from it; restoring it into a live handler applies
    what can change without rebuilding: the training defaults and remembered loader arguments.
    """

    state_key = "config"

    def __init__(self, handler: NNHandler) -> None:
        self._handler = handler

    def state_dict(self) -> dict[str, Any]:
        return self._handler._config_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._handler._apply_settings_state(check_config(state, "<restored state>"))


class NNHandler:
    """Train a model with automatic, crash-safe checkpointing.

    Args:
        model_class: an ``nn.Module`` subclass; the handler constructs it.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``, or ``None`` (each rank's
            own GPU where there is one, else CPU).
        logger_mode: :class:`NNHandler.LoggingMode` ``CONSOLE`` (rich), ``FILE`` or ``BOTH``.
        log_file: the log file for ``FILE``/``BOTH``.
        use_distributed: ``None`` auto-detects torchrun/SLURM or an existing process group;
            ``False`` forces one process; ``True`` demands distribution.
        model_kwargs: arguments of ``model_class`` whose names clash with the handler's own.
        compile_model: wrap the model with ``torch.compile`` (``True`` or a dict of options).
        parallelism: ``"ddp"`` (default): ``DistributedDataParallel`` when distributed.
            ``"fsdp"``: shard the model with FSDP2 (``fully_shard``) over every rank; needs a
            process group. ``"none"``: use the model as constructed (one that places its own
            DTensors, or one process reading a sharded checkpoint).
        fsdp_units: with ``"fsdp"``, submodule classes that each become their own FSDP unit
            (e.g. the transformer block class); the root module is always one.
        **kwargs: further arguments of ``model_class``.

    Everything that has state (model, optimizer, scheduler, grad scaler, EMA, history, random
    streams, configuration and every stateful callback) goes into each checkpoint;
    :meth:`load` restores it. A model with DTensor parameters (FSDP2) is saved as a sharded
    checkpoint directory (``NAME.dcp``) through ``torch.distributed.checkpoint``.
    """

    LoggingMode: ClassVar[type[_LoggingMode]] = _LoggingMode

    def __init__(
        self,
        model_class: type[nn.Module],
        device: str | torch.device | None = None,
        logger_mode: _LoggingMode | str = _LoggingMode.CONSOLE,
        *,
        log_file: str | os.PathLike[str] = "nnhandler.log",
        use_distributed: bool | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        compile_model: bool | Mapping[str, Any] = False,
        parallelism: Parallelism = "ddp",
        fsdp_units: Iterable[type[nn.Module]] = (),
        **kwargs: Any,
    ) -> None:
        if not (inspect.isclass(model_class) and issubclass(model_class, nn.Module)):
            raise TypeError(f"model_class must be an nn.Module subclass, got {model_class!r}")
        if use_distributed not in (None, True, False):
            raise TypeError(f"use_distributed must be None, True or False, got {use_distributed!r}")
        self._parallel = ParallelConfig(parallelism=parallelism, fsdp_units=tuple(fsdp_units))
        self.distributed = DistributedContext.setup(use_distributed, parse_device(device))
        self.device = resolve_device(device, self.distributed)
        self.logger = make_logger(logger_mode, log_file, self.distributed.is_main)
        self._model_class = model_class
        clash = set(kwargs) & set(model_kwargs or {})
        if clash:
            raise ConfigurationError(f"model argument(s) {sorted(clash)} given twice")
        self._model_kwargs: dict[str, Any] = {**(model_kwargs or {}), **kwargs}
        self._compile = compile_model
        module = model_class(**self._model_kwargs).to(self.device)
        if self._parallel.parallelism == "fsdp":
            module = apply_fsdp(module, self._parallel.fsdp_units, self.device, self.distributed)
        self._module: nn.Module = module
        model: nn.Module = module
        if compile_model:
            options = dict(compile_model) if isinstance(compile_model, Mapping) else {}
            model = torch.compile(model, **options)  # type: ignore[assignment]
        if self.distributed.enabled and self._parallel.parallelism == "ddp":
            if has_dtensor_parameters(module):
                raise ConfigurationError(
                    f"{model_class.__qualname__} holds DTensor parameters, which DDP cannot "
                    "wrap: pass parallelism='none' (the model distributes itself) or 'fsdp'")
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self._model = model

        self._optimizer: torch.optim.Optimizer | None = None
        self._optimizer_spec: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None
        self._scheduler: Any = None
        self._scheduler_spec: tuple[type[Any], dict[str, Any], str] | None = None
        self._loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
        self._metrics: dict[str, Callable[[Any, Any], Any]] = {}
        self._loaders = Loaders(self.logger)
        self._settings = TrainSettings()
        self._scaler: torch.amp.GradScaler | None = None
        self._ema: AveragedModel | None = None
        self._ema_state: ComponentState | None = None
        self._autosave: AutoSaveCallback | None = None
        self._callbacks: list[Callback] = []
        self._dispatcher = EventDispatcher()
        self._stop_requested = False
        self._last_logs: dict[str, Any] = {}
        self._preemption: PreemptionReport | None = None
        self._preemption_group: Any = None  # the gloo group of the ranks' stop flags

        self.history_state = History()
        self.progress = Progress()
        self._position = EpochPosition()
        self._rng = RNGState(self.distributed)
        self._registry = StateRegistry()
        self._model_state = ModelState(lambda: self._module)
        for provider in (self._model_state, self.history_state, self.progress, self._position,
                         self._rng, _ConfigState(self)):
            self._registry.register(provider)
        self._checkpoints = Checkpointer(
            self, rng_gathered=self._rng.gathered, dispatcher=self._dispatcher,
            sharded_components=functools.partial(self._sharded_components, with_optimizer=True))
        self._model_kwargs_unstored = self._check_model_kwargs()

    # ------------------------------------------------------------------ components -----------
    @property
    def model(self) -> nn.Module:
        """The model as trained (possibly DDP- or ``torch.compile``-wrapped)."""
        return self._model

    @property
    def module(self) -> nn.Module:
        """The unwrapped ``nn.Module`` holding the raw training weights (never the EMA ones).

        With ``parallelism="fsdp"`` it is the FSDP2-sharded module itself (its parameters are
        DTensors; ``parameter.full_tensor()`` gathers one).
        """
        return self._module

    @property
    def parallelism(self) -> Parallelism:
        """``"ddp"``, ``"fsdp"`` or ``"none"`` as configured (see the constructor)."""
        return self._parallel.parallelism

    @property
    def sharded_checkpoints(self) -> bool:
        """True when the model holds DTensor parameters (FSDP2 or a model that places its own
        DTensors): checkpoints are then ``.dcp`` directories written by every rank through
        ``torch.distributed.checkpoint``."""
        return has_dtensor_parameters(self._module)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimizer

    @property
    def scheduler(self) -> Any:
        return self._scheduler

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The AMP grad scaler (CUDA fp16 only; bf16 autocast on CPU needs none)."""
        return self._scaler

    @property
    def ema_model(self) -> AveragedModel | None:
        """The EMA model (``torch.optim.swa_utils.AveragedModel``) when ``ema_decay > 0``."""
        return self._ema

    @property
    def loss_fn(self) -> Callable[[Any, Any], torch.Tensor] | None:
        return self._loss_fn

    @property
    def metrics(self) -> dict[str, Callable[[Any, Any], Any]]:
        return dict(self._metrics)

    @property
    def loaders(self) -> Loaders:
        """The datasets and DataLoader arguments set with :meth:`set_train_loader` /
        :meth:`set_val_loader` (``loaders.spec("train")``), and the arguments remembered from
        a loaded checkpoint (``loaders.remembered``)."""
        return self._loaders

    @property
    def callbacks(self) -> tuple[Callback, ...]:
        return tuple(self._callbacks)

    @property
    def auto_save_callback(self) -> AutoSaveCallback | None:
        """The callback configured by :meth:`auto_save` (``None`` before)."""
        return self._autosave

    @property
    def settings(self) -> TrainSettings:
        """Training defaults: the settings of the last ``train`` call (restored by ``load``)."""
        return self._settings

    # ------------------------------------------------------------------ history --------------
    @property
    def train_losses(self) -> list[float]:
        return self.history_state.train_losses

    @property
    def val_losses(self) -> list[float]:
        """One entry per epoch that validated."""
        return self.history_state.val_losses

    @property
    def train_metrics_history(self) -> dict[str, list[float]]:
        return self.history_state.train_metrics

    @property
    def val_metrics_history(self) -> dict[str, list[float]]:
        return self.history_state.val_metrics

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every epoch's log dict (with its ``epoch`` number), oldest first."""
        return self.history_state.epoch_logs

    @property
    def epoch(self) -> int:
        """Number of completed epochs (absolute, across resumes)."""
        return self.progress.epoch

    @property
    def global_step(self) -> int:
        return self.progress.step

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    @property
    def last_logs(self) -> dict[str, Any]:
        """The logs of the last completed epoch (a copy; restored by :meth:`load`): what
        :meth:`save` records when it is given none."""
        return dict(self._last_logs)

    @property
    def checkpoints(self) -> Checkpointer:
        """The checkpointing seam (:class:`~nnhandler.checkpointing.Checkpointer`): how any
        callback writes the complete training state, as :meth:`save` and the auto-saver do."""
        return self._checkpoints

    @property
    def preempted(self) -> bool:
        """True after a ``train`` call that stopped on a signal (``save_on_signal``): its
        emergency checkpoint is durable and ``train`` returned normally. A script exits with a
        non-zero status then, so that its scheduler requeues the job. Reset by the next call.
        """
        return self._preemption is not None

    @property
    def preemption(self) -> PreemptionReport | None:
        """What the last ``train`` call did when a signal stopped it (signal, where it stopped,
        the checkpoints to resume from); ``None`` when it was not preempted."""
        return self._preemption

    @property
    def stopped_mid_epoch(self) -> bool:
        """True while the state lies inside an epoch: after a stop on a signal or an
        exception with an emergency checkpoint, until a ``train`` call continues that epoch.
        :meth:`save` then writes a checkpoint that continues the epoch too."""
        return self._position.partial is not None

    @property
    def resumed_mid_epoch(self) -> bool:
        """True while an epoch that an emergency checkpoint interrupted is being continued
        (from ``on_train_begin`` to that epoch's ``on_epoch_end``). ``on_epoch_begin`` fires
        again for it: a callback that records something there can check this to keep what it
        recorded before the interruption (its state came back with the checkpoint)."""
        return self._position.continuing_epoch is not None

    def request_stop(self) -> None:
        """Stop training after the current epoch (callable from any callback hook).

        Under DDP the request of rank 0 decides for every rank.
        """
        self._stop_requested = True

    def _set_stop(self, value: bool) -> None:
        self._stop_requested = value

    # ------------------------------------------------------------------ setters --------------
    def set_optimizer(self, optimizer_class: type[torch.optim.Optimizer], **kwargs: Any) -> None:
        """Create ``optimizer_class(model parameters, **kwargs)``; replaces any previous one
        (and re-creates the scheduler on it).

        After :meth:`load` / :meth:`resume_from` restored the optimizer, replacing it drops its
        state (moments, step counts) and the scheduler's, with a warning: the restored
        optimizer needs no new call, and ``load(..., skip_optimizer=True)`` starts it fresh
        on purpose.
        """
        if not (inspect.isclass(optimizer_class)
                and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(
                f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}"
            )
        encode_arguments(kwargs, f"{optimizer_class.__qualname__} argument")
        optimizer = optimizer_class(self._module.parameters(), **kwargs)
        dropped = [what for what in (self._restored_description("optimizer"),
                                     self._restored_description("scheduler")) if what]
        if dropped:
            self._warn(
                f"set_optimizer({optimizer_class.__qualname__}) replaces the optimizer restored "
                f"from the checkpoint: {' and '.join(dropped)} are dropped (the scheduler is "
                "re-created on the new optimizer). To keep them, do not call set_optimizer "
                "after load/resume_from: the optimizer is restored as it was; to start it "
                "fresh on purpose, load with skip_optimizer=True (and skip_scheduler=True)")
        self._optimizer = optimizer
        self._optimizer_spec = (optimizer_class, dict(kwargs))
        self._mark_fresh("optimizer")
        if "optimizer" not in self._registry:
            self._registry.register(ComponentState("optimizer", lambda: self._optimizer))
        if self._scheduler_spec is not None:
            scheduler_class, scheduler_kwargs, interval = self._scheduler_spec
            self._create_scheduler(scheduler_class, interval, scheduler_kwargs)

    def set_scheduler(self, scheduler_class: type[Any], interval: str = "epoch",
                      **kwargs: Any) -> None:
        """Create ``scheduler_class(optimizer, **kwargs)``.

        ``interval="epoch"`` steps once per epoch (``ReduceLROnPlateau`` with the epoch's
        ``val_loss``, on epochs that validate); ``"step"`` once per optimizer step. Replacing
        a scheduler that :meth:`load` / :meth:`resume_from` restored drops its state, with a
        warning (``load(..., skip_scheduler=True)`` starts it fresh on purpose).
        """
        if self._optimizer is None:
            raise ConfigurationError("set_optimizer must be called before set_scheduler")
        base = torch.optim.lr_scheduler.LRScheduler
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
        if not (inspect.isclass(scheduler_class) and issubclass(scheduler_class, (base, plateau))):
            raise TypeError(
                f"scheduler_class must be a torch.optim.lr_scheduler.LRScheduler subclass, "
                f"got {scheduler_class!r}"
            )
        if interval not in _SCHEDULER_INTERVALS:
            raise ConfigurationError(f"interval={interval!r}: use 'epoch' or 'step'")
        if interval == "step" and issubclass(scheduler_class, plateau):
            raise ConfigurationError("ReduceLROnPlateau needs val_loss: use interval='epoch'")
        encode_arguments(kwargs, f"{scheduler_class.__qualname__} argument")
        dropped = self._restored_description("scheduler")
        self._create_scheduler(scheduler_class, interval, kwargs)
        if dropped:
            self._warn(
                f"set_scheduler({scheduler_class.__qualname__}) replaces the scheduler restored "
                f"from the checkpoint: {dropped} is dropped. To keep it, do not call "
                "set_scheduler after load/resume_from: the scheduler is restored as it was; to "
                "start it fresh on purpose, load with skip_scheduler=True")

    def _create_scheduler(self, scheduler_class: type[Any], interval: str,
                          kwargs: Mapping[str, Any]) -> None:
        self._scheduler = scheduler_class(self._optimizer, **kwargs)
        self._scheduler_spec = (scheduler_class, dict(kwargs), interval)
        self._mark_fresh("scheduler")
        if "scheduler" not in self._registry:
            self._registry.register(ComponentState("scheduler", lambda: self._scheduler))

    def _restored_description(self, key: str) -> str | None:
        """What replacing the optimizer/scheduler would drop, if a checkpoint restored it."""
        provider = self._registry.get(key)
        if not (isinstance(provider, ComponentState) and provider.restored):
            return None
        if key == "optimizer" and self._optimizer is not None:
            tracked = len(self._optimizer.state)
            return (f"its state (moments, step counts: {tracked} parameter tensor(s)) and "
                    "its hyper-parameters from the file")
        if key == "scheduler" and self._scheduler is not None:
            position = getattr(self._scheduler, "last_epoch", None)
            return (f"the scheduler's state ({type(self._scheduler).__qualname__}"
                    + (f", last_epoch={position}" if position is not None else "") + ")")
        return None

    def _mark_fresh(self, key: str) -> None:
        provider = self._registry.get(key)
        if isinstance(provider, ComponentState):
            provider.restored = False

    def _warn(self, message: str) -> None:
        """A warning in the log and as a Python warning (catchable, e.g. in tests)."""
        self.logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def set_loss_fn(self, loss_fn: Callable[[Any, Any], torch.Tensor] | type[nn.Module],
                    **kwargs: Any) -> None:
        """Set ``loss(output, target) -> tensor``: a function, an ``nn.Module`` instance, or an
        ``nn.Module`` class constructed with ``kwargs``. Module-level functions and modules are
        restored by :meth:`load`; lambdas and closures must be set again after loading."""
        if inspect.isclass(loss_fn):
            if not issubclass(loss_fn, nn.Module):
                raise TypeError(f"loss class must be an nn.Module subclass, got {loss_fn!r}")
            loss_fn = loss_fn(**kwargs).to(self.device)
        elif kwargs:
            raise TypeError("keyword arguments are only accepted with a loss class")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        self._loss_fn = loss_fn
        self._warn_if_unrecordable(loss_fn, "loss function", "set_loss_fn")

    def add_metric(self, name: str, metric: Callable[[Any, Any], Any]) -> None:
        """Add ``metric(output, target) -> float`` (or a scalar tensor), averaged per sample."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigurationError(f"metric name {name!r} must be a Python identifier")
        if name == "loss" or name.startswith("val_") or name == "epoch":
            raise ConfigurationError(f"metric name {name!r} is reserved")
        if not callable(metric):
            raise TypeError(f"metric {name!r} must be callable, got {metric!r}")
        self._metrics[name] = metric
        self._warn_if_unrecordable(metric, f"metric {name!r}", "add_metric")

    def set_train_loader(self, dataset: Dataset[Any] | None = None, **loader_kwargs: Any) -> None:
        """Train on ``dataset``; ``loader_kwargs`` go to ``DataLoader`` (``batch_size``,
        ``shuffle``, ``num_workers`` …). After :meth:`load`, omitted arguments default to the
        ones remembered from the checkpoint. Shuffling depends only on the run's seed and the
        absolute epoch, so a resumed run sees the same batches."""
        self._loaders.set("train", dataset, loader_kwargs)

    def set_val_loader(self, dataset: Dataset[Any] | None = None, **loader_kwargs: Any) -> None:
        """Validate on ``dataset`` (see :meth:`set_train_loader`)."""
        self._loaders.set("val", dataset, loader_kwargs)

    def _build_loader(self, which: str, seed: int) -> DataLoader[Any] | None:
        return self._loaders.build(which, seed, self.distributed, self.device.type,
                                   watched_signals(self._callbacks))

    # ------------------------------------------------------------------ callbacks ------------
    def add_callback(self, callback: Callback) -> None:
        """Register ``callback``; a state-providing one also joins every checkpoint, and gets
        its state back at once if a loaded checkpoint holds state under its ``state_key``."""
        if not isinstance(callback, Callback):
            raise TypeError(f"{callback!r} is not an nnhandler.Callback; subclass Callback "
                            "(or use register_state_provider for state without hooks)")
        if any(existing is callback for existing in self._callbacks):
            raise ConfigurationError(f"callback {callback!r} is already registered")
        validate_hooks(callback)
        callback.check_registration(self.callbacks)
        if isinstance(callback, StateProvider) and self._registry.register(callback):
                self.logger.info("restored state of %r from the loaded checkpoint", callback)
        self._callbacks.append(callback)
        self._dispatcher.rebuild(self._callbacks)

    def remove_callback(self, callback: Callback) -> None:
        for index, existing in enumerate(self._callbacks):
            if existing is callback:
                del self._callbacks[index]
                break
        else:
            raise ValueError(f"callback {callback!r} is not registered")
        if isinstance(callback, StateProvider):
            self._registry.unregister(callback)
        if callback is self._autosave:
            self._autosave = None
        self._dispatcher.rebuild(self._callbacks)

    @property
    def state_registry(self) -> StateRegistry:
        """Every state provider of this handler by ``state_key``: what each checkpoint holds
        (``state_registry.get(key)``, ``key in state_registry``). Add providers with
        :meth:`register_state_provider` or :meth:`add_callback`."""
        return self._registry

    def register_state_provider(self, provider: StateProvider) -> None:
        """Add ``provider``'s state to every checkpoint (keys are unique per handler)."""
        self._registry.register(provider)

    def auto_save(
        self,
        interval: int | None,
        save_path: str | os.PathLike[str] = ".",
        name: str = "model_epoch{epoch:02d}",
        overwrite: bool = False,
        **options: Unpack[AutoSaveOptions],
    ) -> AutoSaveCallback:
        """Configure (or reconfigure) this handler's one :class:`AutoSaveCallback`.

        Takes exactly the arguments of :class:`AutoSaveCallback` (the seed's four positional
        ones, every other option keyword-only: ``on_save_error``, ``async_save``, retention as
        ``keep=Retention(...)`` or ``keep_last``/``keep_best``/``monitor``/``mode``/
        ``keep_every``, emergency checkpoints as ``emergency=EmergencySaves(...)`` or
        ``save_on_signal``/``save_on_exception``, see :mod:`nnhandler.preemption`). Calling it
        again reconfigures the same instance (its record of the last file it wrote, and of the
        files it keeps, is kept).
        """
        config = auto_save_config(interval, save_path, name, overwrite, options)
        if self._autosave is None:
            callback = AutoSaveCallback(interval, save_path, name, overwrite, **options)
            self.add_callback(callback)
            self._autosave = callback
            return callback
        callback = self._autosave
        old = callback.config
        self._registry.unregister(callback)
        callback.reconfigure(config)
        try:
            callback.check_registration(self.callbacks)
            self._registry.register(callback)
        except Exception:
            callback.reconfigure(old)
            self._registry.register(callback)
            raise
        return callback

    # ------------------------------------------------------------------ training -------------
    def train(
        self,
        epochs: int | None = None,
        *,
        until_epoch: int | None = None,
        validate_every: int | _Unset = UNSET,
        gradient_accumulation_steps: int | _Unset = UNSET,
        use_amp: bool | _Unset = UNSET,
        gradient_clipping_norm: float | _Unset | None = UNSET,
        ema_decay: float | _Unset = UNSET,
        seed: int | _Unset | None = UNSET,
        progress_bar: bool = True,
        resume: str | os.PathLike[str] | None = None,
    ) -> dict[str, Any]:
        """Train ``epochs`` more epochs, or up to absolute epoch ``until_epoch``.

        Settings not passed default to the handler's (those of the previous call, restored by
        :meth:`load`). ``seed`` seeds every random stream at the start of a fresh run; on a
        handler whose streams were restored (or that trained before), the run's own seed
        continues them and a different one re-seeds with a warning. ``seed=None`` draws a seed
        once per run and records it. Returns the last epoch's logs.

        ``resume="latest"`` first restores (:meth:`resume_from`) the newest valid checkpoint in
        the auto-save directory, if there is one, so a restartable script is one line:
        ``handler.train(until_epoch=E, resume="latest", seed=s)``. ``resume=path`` restores
        that file.

        After an emergency checkpoint (``save_on_signal`` / ``save_on_exception`` of an
        auto-saver) the state lies inside an epoch: the next call first finishes that epoch
        from its next batch, with the same data order and the epoch's partial sums, so its
        logs equal an uninterrupted run's; ``epochs=n`` counts that epoch as the first of the
        ``n``, ``until_epoch`` needs nothing special. A call that a signal stops returns
        normally (the logs of the last completed epoch) with :attr:`preempted` set.
        """
        changes = {
            name: value for name, value in {
                "validate_every": validate_every,
                "gradient_accumulation_steps": gradient_accumulation_steps,
                "use_amp": use_amp,
                "gradient_clipping_norm": gradient_clipping_norm,
                "ema_decay": ema_decay,
                "seed": seed,
            }.items() if value is not UNSET
        }
        # every argument is checked before anything changes (a resume included): a rejected
        # call leaves the handler exactly as it was
        call = validate_call(TrainCall, "train", {"epochs": epochs, "until_epoch": until_epoch,
                                                  "progress_bar": progress_bar,
                                                  "resume": resume})
        validate_call(TrainSettings, "train", changes)
        self._check_trainable()
        settings = self._settings_with(changes)
        if call.resume is not None:
            self._check_resume_argument(call.resume)
            self._resume(call.resume)
            settings = self._settings_with(changes)  # the restored defaults under the call's
        target = self._target_epoch(call.epochs, call.until_epoch)
        start = self.progress.epoch
        guard, partial_changes = None, []
        if target > start:
            partial_changes = self._check_partial_epoch(settings)
            guard = PreemptionGuard.for_train(self, self._position)
        # from here on the call changes the handler
        self._warn_about_resume_changes(changes, partial_changes)
        self._preemption = None
        self._settings = settings
        self._position.restored = False
        if target <= start:
            self.logger.info("already at epoch %d (target %d): nothing to train", start, target)
            return dict(self._last_logs)
        run_seed = self._prepare_random_streams(seed)
        self._prepare_amp_and_ema(settings)
        parts = self._loop_parts(settings, run_seed, guard)
        self._stop_requested = False
        partial = self._position.partial
        self._position.continuing_epoch = None if partial is None else partial.epoch
        self.logger.info("training epochs %d..%d on %s (world size %d)%s", start + 1, target,
                         self.device, self.distributed.world_size,
                         "" if partial is None else
                         f"; epoch {partial.epoch} continues after its batch {partial.batches}")
        return self._run(TrainingLoop(parts, call.progress_bar), guard, start, target)

    def _loop_parts(self, settings: TrainSettings, run_seed: int,
                    guard: PreemptionGuard | None) -> LoopParts:
        """What the training loop of one ``train`` call works with."""
        assert self._optimizer is not None and self._loss_fn is not None
        train_loader = self._build_loader("train", run_seed)
        assert train_loader is not None
        return LoopParts(
            model=self._model, module=self._module, optimizer=self._optimizer,
            scheduler=self._scheduler,
            scheduler_interval=self._scheduler_spec[2] if self._scheduler_spec else "epoch",
            loss_fn=self._loss_fn, metrics=dict(self._metrics), train_loader=train_loader,
            val_loader=self._build_loader("val", run_seed), scaler=self._scaler, ema=self._ema,
            device=self.device, context=self.distributed, dispatcher=self._dispatcher,
            history=self.history_state, progress=self.progress, settings=settings, handler=self,
            set_stop=self._set_stop,
            lockstep_validation=self.distributed.enabled and self.sharded_checkpoints,
            position=self._position,
            stop_watch=guard.stop_watch if guard is not None else None,
            record_failures=guard is not None and guard.records_failures,
        )

    def _run(self, loop: TrainingLoop, guard: PreemptionGuard | None, start: int,
             target: int) -> dict[str, Any]:
        """Run ``loop`` from ``start`` to ``target`` between ``TRAIN_BEGIN`` and ``TRAIN_END``
        (``EXCEPTION`` instead when it fails), under the emergency savers' watch."""
        with guard.watching() if guard is not None else contextlib.nullcontext():
            try:
                self._dispatcher.fire(Event.TRAIN_BEGIN, handler=self, start_epoch=start,
                                      end_epoch=target)
                logs = loop.run(start, target)
                if loop.stopped_at is not None:
                    assert guard is not None
                    self._preemption = guard.after_stop(loop.stopped_at)
                if logs:
                    self._last_logs = logs
                logs = dict(self._last_logs)
                self._dispatcher.fire(Event.TRAIN_END, handler=self, logs=logs)
            except BaseException as error:
                if guard is not None:
                    guard.after_exception(error, loop.failure)
                self._dispatcher.fire(Event.EXCEPTION, handler=self, exception=error)
                raise
            finally:
                self._position.continuing_epoch = None
        return logs

    def _check_trainable(self) -> None:
        missing = [what for what, absent in (
            ("an optimizer (set_optimizer)", self._optimizer is None),
            ("a loss function (set_loss_fn)", self._loss_fn is None),
            ("a training dataset (set_train_loader)", "train" not in self._loaders),
        ) if absent]
        if missing:
            raise ConfigurationError("cannot train without " + ", ".join(missing))

    def _settings_with(self, changes: Mapping[str, Any]) -> TrainSettings:
        """The handler's training defaults with a call's explicit ``changes`` (checked)."""
        settings = validate_call(TrainSettings, "train",
                                 {**self._settings.model_dump(), **changes})
        if settings.ema_decay > 0 and self.sharded_checkpoints:
            raise ConfigurationError(f"ema_decay={settings.ema_decay} is not supported for a "
                                     "model with DTensor parameters (FSDP2); use ema_decay=0")
        return settings

    def _check_partial_epoch(self, settings: TrainSettings) -> list[str]:
        """A partial epoch (from an emergency checkpoint) must be continued exactly as it
        started: same world size, batch size, accumulation and metrics. Checked before the
        call changes anything, on a loader built for the check alone (its length and batch
        size do not depend on the seed). Returns what differs without preventing the
        continuation (dataset length, learning rates), for the warning."""
        partial = self._position.partial
        if partial is None:
            return []
        loader = self._build_loader("train", self.progress.run_seed or 0)
        assert loader is not None and self._optimizer is not None
        batches = loader_length(loader)
        partial.check_resumable(
            completed_epochs=self.progress.epoch, world_size=self.distributed.world_size,
            batch_size=loader.batch_size, accumulation=settings.gradient_accumulation_steps,
            metric_names=list(self._metrics), batches=batches)
        spec = self._loaders.spec("train")
        assert spec is not None
        return partial.changes(samples=dataset_size(spec.dataset),
                               batches_per_epoch=batches,
                               learning_rates=learning_rates_of(self._optimizer))

    def _warn_about_resume_changes(self, changes: Mapping[str, Any],
                                   partial_changes: list[str]) -> None:
        """A call that resumes a checkpoint (the first after a restore, or one that continues
        an interrupted epoch) and changes what the checkpoint recorded gets one warning: the
        run cannot equal an uninterrupted one. ``seed`` has its own warning."""
        partial = self._position.partial
        if not (self._position.restored or partial is not None):
            return
        recorded = self._settings
        notes = [f"{name} {getattr(recorded, name)!r} -> {value!r} (leave {name} unset: it "
                 "defaults to the recorded value)"
                 for name, value in changes.items()
                 if name != "seed" and getattr(recorded, name) != value]
        notes += partial_changes
        if not notes:
            return
        if partial is not None:
            what = (f"continues epoch {partial.epoch} of an emergency checkpoint (after its "
                    f"batch {partial.batches}) with")
        else:
            what = "resumes a checkpoint with"
        self._warn(f"train: this call {what} other settings than the checkpoint recorded: "
                   f"{'; '.join(notes)}. The resumed run will not equal an uninterrupted one")

    def _check_resume_argument(self, resume: str | os.PathLike[str]) -> None:
        if resume == "latest" and self._autosave is None:
            raise ConfigurationError("train(resume='latest') looks in the auto-save directory; "
                                     "call auto_save(...) first or pass resume=<path>")

    def _resume(self, resume: str | os.PathLike[str]) -> None:
        if resume != "latest":
            self.resume_from(resume)
            return
        assert self._autosave is not None  # _check_resume_argument
        directory = self._autosave.config.save_path
        found = find_latest_valid(directory, self.logger) if self.distributed.is_main else None
        latest = self.distributed.broadcast_object(str(found) if found is not None else None)
        if latest is None:
            self.logger.info("resume='latest': no valid checkpoint in %s; starting fresh",
                             directory)
            return
        self.resume_from(latest, verify=False)  # verified while choosing it

    def _target_epoch(self, epochs: int | None, until_epoch: int | None) -> int:
        """The absolute epoch a call trains to (its arguments checked by :class:`TrainCall`)."""
        if epochs is not None:
            return self.progress.epoch + epochs
        assert until_epoch is not None
        return until_epoch

    def _prepare_random_streams(self, seed: int | _Unset | None) -> int:
        current = self.progress.run_seed
        # a checkpoint written before any training has no run seed: nothing to continue,
        # so the first call after loading it starts a fresh run
        continuing = current is not None
        if continuing and (seed is UNSET or seed is None or seed == current):
            assert current is not None
            return current
        if continuing:
            self.logger.warning(
                "train(seed=%s) differs from this run's seed %s: re-seeding every random "
                "stream (a resumed run will not equal the uninterrupted one)", seed, current)
        new_seed = self._settings.seed  # already holds this call's seed
        if new_seed is None:
            new_seed = self.distributed.broadcast_object(secrets.randbits(63))
        seed_everything(new_seed)
        self.progress.run_seed = new_seed
        if not continuing:  # a re-seeded run stays the lineage that wrote its files
            self.progress.run_id = self.distributed.broadcast_object(secrets.token_hex(8))
        return new_seed

    def _prepare_amp_and_ema(self, settings: TrainSettings) -> None:
        if settings.use_amp and self.device.type == "cuda" and self._scaler is None:
            self._create_scaler()
        if settings.ema_decay > 0:
            if self._ema is None:
                self._create_ema(settings.ema_decay)
            else:
                self._ema.multi_avg_fn = get_ema_multi_avg_fn(settings.ema_decay)  # type: ignore[no-untyped-call]
        elif self._ema is not None and self._ema_state is not None:
            self._registry.unregister(self._ema_state)
            self._ema = self._ema_state = None

    def _create_scaler(self) -> None:
        self._scaler = torch.amp.GradScaler("cuda")
        if "grad_scaler" not in self._registry:
            self._registry.register(ComponentState("grad_scaler", lambda: self._scaler))

    def _create_ema(self, decay: float) -> None:
        self._ema = AveragedModel(self._module,
                                  multi_avg_fn=get_ema_multi_avg_fn(decay),  # type: ignore[no-untyped-call]
                                  use_buffers=True)
        if self._ema_state is None:
            self._ema_state = ComponentState("ema", lambda: self._ema)
            self._registry.register(self._ema_state)

    # ------------------------------------------------------------------ saving ---------------
    def save(self, path: str | os.PathLike[str], logs: Mapping[str, Any] | None = None) -> Path:
        """Write the complete checkpoint to ``path`` and return once it is durable.

        Under DDP every rank calls it: rank 0 writes, the others wait, and an error on rank 0 is
        raised on every rank. Fires ``on_checkpoint_saved``. The same as
        ``handler.checkpoints.save(path, logs).path`` (see :attr:`checkpoints`).

        A model with DTensor parameters (:attr:`sharded_checkpoints`, e.g. FSDP2) is written as
        a directory through ``torch.distributed.checkpoint``: every rank writes its own shards,
        and the directory appears under ``path`` (which must end in ``.dcp``) only once it is
        complete. ``save_path`` must then be on a filesystem that every rank shares.
        """
        return self._checkpoints.save(path, logs).path

    def state_dict(self) -> dict[str, Any]:
        """``{state_key: state}`` of every provider: exactly what a checkpoint's ``state`` holds."""
        return self._registry.collect()

    # ------------------------------------------------------------------ plots and export -----
    def export(self, path: str | os.PathLike[str], ema: bool = False) -> Path:
        """Write the model's weights alone as a plain state dict (CPU tensors), atomically.

        ``ema=True`` exports the EMA weights (an error when there is no EMA). The file loads into
        your own model with plain torch, without nnhandler:
        ``model.load_state_dict(torch.load(path, weights_only=True))``. Wrapper prefixes (DDP,
        ``torch.compile``, the EMA's ``AveragedModel``) and ``n_averaged`` are not in it.
        """
        from .export import export_weights

        return export_weights(self, path, ema)

    def plot_losses(self, path: str | os.PathLike[str]) -> Path:
        """Plot training and validation loss per epoch as a PNG (needs ``nnhandler[plot]``)."""
        from .plotting import plot_losses

        return plot_losses(self, path)

    def plot_metrics(self, path: str | os.PathLike[str],
                     names: Iterable[str] | None = None) -> Path:
        """Plot each metric (training and validation) per epoch as a PNG, one panel per metric
        (``names`` selects some; needs ``nnhandler[plot]``)."""
        from .plotting import plot_metrics

        return plot_metrics(self, path, None if names is None else list(names))

    def _sharded_components(self, *, with_optimizer: bool) -> ShardedComponents:
        from .checkpoint.dcp_state import ShardedComponents

        return ShardedComponents(self._module, self._optimizer if with_optimizer else None,
                                 strict=self._model_state.strict)

    def _config_dict(self) -> dict[str, Any]:
        optimizer = scheduler = None
        if self._optimizer_spec is not None:
            cls, kwargs = self._optimizer_spec
            optimizer = {"class": maybe_reference(cls), "kwargs": encode_value(kwargs, "opt")}
        if self._scheduler_spec is not None:
            cls, kwargs, interval = self._scheduler_spec
            scheduler = {"class": maybe_reference(cls),
                         "kwargs": encode_value(kwargs, "scheduler"), "interval": interval}
        stored_kwargs = {k: v for k, v in self._model_kwargs.items()
                         if k not in self._model_kwargs_unstored}
        return {
            "model_class": maybe_reference(self._model_class),
            "model_kwargs": encode_value(stored_kwargs, "model argument"),
            "model_kwargs_unstored": sorted(self._model_kwargs_unstored),
            "compile_model": encode_value(self._compile, "compile_model"),
            "parallelism": self._parallel.parallelism,
            "fsdp_units": [maybe_reference(unit) for unit in self._parallel.fsdp_units],
            "optimizer": optimizer,
            "scheduler": scheduler,
            "loss_fn": describe_callable(self._loss_fn, "loss")[0] if self._loss_fn else None,
            "metrics": {name: describe_callable(fn, name)[0] for name, fn in self._metrics.items()},
            "loaders": self._loaders.state(),
            "train_settings": self._settings.model_dump(),
            "own_autosave": self._autosave.state_key if self._autosave is not None else None,
        }

    def _apply_settings_state(self, record: ConfigRecord, source: str = "") -> None:
        """Take the recorded training defaults and loader arguments (validated: a recorded
        loader configuration that does not fit is a CheckpointSchemaError)."""
        self._loaders.remember(record.loaders, source)
        self._settings = record.train_settings

    def _check_model_kwargs(self) -> set[str]:
        unstored = set()
        for name, value in self._model_kwargs.items():
            try:
                encode_value(value, f"model argument {name!r}")
            except NotReferenceableError as error:
                unstored.add(name)
                self.logger.warning("%s; load() will need model_kwargs={%r: ...}", error, name)
        return unstored

    def _warn_if_unrecordable(self, obj: Any, what: str, setter: str) -> None:
        spec, reason = describe_callable(obj, what)
        if spec is None:
            self.logger.warning("%s cannot be recorded in checkpoints (%s); after load(), call "
                                "%s again", what, reason, setter)

    # ------------------------------------------------------------------ loading --------------
    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device | None = None,
        *,
        skip_optimizer: bool = False,
        skip_scheduler: bool = False,
        skip_history: bool = False,
        skip_ema: bool = False,
        skip_callbacks: bool = False,
        callbacks: Iterable[Callback] | None = None,
        model_class: type[nn.Module] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        strict: bool = True,
        verify: bool = True,
        logger_mode: _LoggingMode | str = _LoggingMode.CONSOLE,
        log_file: str | os.PathLike[str] = "nnhandler.log",
        use_distributed: bool | None = None,
        parallelism: Parallelism | None = None,
        fsdp_units: Iterable[type[nn.Module]] | None = None,
        compile_model: bool | Mapping[str, Any] | None = None,
    ) -> NNHandler:
        """Rebuild a handler from a checkpoint, ready to resume with :meth:`train`.

        Tensors are mapped to ``device`` (``None``: each rank's own device). Classes named in the
        file are imported and must be subclasses of the expected base; ``model_class=`` avoids
        even that for the model. ``skip_*`` leave a component fresh. ``callbacks`` are added
        and receive their state by ``state_key``; the file's other callbacks come back as they
        were unless a passed callback has the same key (or ``skip_callbacks``): those whose
        key is claimed in this process (:func:`~nnhandler.plugins.register_provider_factory`:
        the auto-savers, third-party savers), then the providers of installed plugins
        (entry-point group ``nnhandler.plugins``, see :mod:`nnhandler.plugins`) for the state
        keys they claim. State without an owner is
        kept, written into later checkpoints and reported with a warning.
        ``compile_model`` (default: as recorded) is the constructor's; pass it when the
        recorded options name a function (a custom ``backend``), which a file never supplies.
        What a checkpoint may make ``load`` do is limited (see README "Loading"): it resolves
        classes only in modules already imported and only to the expected base class, never
        imports a module or calls a function on the file's word, and everything it reads is
        validated against a declared schema first (:class:`~nnhandler.CheckpointSchemaError`
        names the file and the field otherwise). Arguments that are functions (a
        ``LambdaLR``'s ``lr_lambda``, a ``collate_fn``) are never taken from the file: a
        warning names each one and the call that supplies it again.
        ``strict`` demands that model weights match exactly. ``verify`` (default) checks the
        file's CRC-32 first and raises :class:`~nnhandler.CheckpointCorruptedError` on any damage;
        ``verify=False`` skips that for speed. Datasets are not saved: call
        ``set_train_loader`` / ``set_val_loader`` again (their arguments are remembered).

        ``path`` may be a sharded checkpoint directory (``NAME.dcp``): every rank loads its part,
        and ``verify`` checks every file against the manifest (the ranks share the reading).
        ``parallelism`` / ``fsdp_units`` default to the ones recorded in the checkpoint; the
        world size may differ from the saving run's where DCP can reshard (FSDP2 can), with a
        warning that the run cannot then equal an uninterrupted one exactly. In one process,
        ``parallelism="none"`` reads a sharded checkpoint into a plain model.
        """
        options = validate_call(LoadOptions, "NNHandler.load", {
            "skip_optimizer": skip_optimizer, "skip_scheduler": skip_scheduler,
            "skip_history": skip_history, "skip_ema": skip_ema, "skip_callbacks": skip_callbacks,
            "callbacks": callbacks, "model_class": model_class, "model_kwargs": model_kwargs,
            "strict": strict, "verify": verify, "logger_mode": logger_mode, "log_file": log_file,
            "use_distributed": use_distributed, "parallelism": parallelism,
            "fsdp_units": fsdp_units, "compile_model": compile_model})
        callbacks, fsdp_units = options.callbacks, options.fsdp_units  # iterables read once
        _check_checkpoint_path(path, "NNHandler.load")
        context = DistributedContext.setup(use_distributed, parse_device(device))
        map_device = resolve_device(device, context)
        checkpoint = read_any_checkpoint(path, map_location=map_device, verify=verify,
                                         context=context)
        state = checkpoint.state
        source = str(checkpoint.path)
        config = check_config(state.get("config"), source)
        model_cls = model_class or resolve_model_class(config.model_class, path)
        restored_kwargs, unrestored = decode_arguments(config.model_kwargs, "model argument")
        kwargs = {**restored_kwargs, **(model_kwargs or {})}
        require_passed("model argument(s)", "model_kwargs={...}", path, kwargs,
                        [*config.model_kwargs_unstored, *(u.name for u in unrestored)],
                        unrestored)
        compile_option: bool | Mapping[str, Any]
        if compile_model is not None:
            compile_option = compile_model
        elif isinstance(config.compile_model, bool):
            compile_option = config.compile_model
        else:
            compile_options, unrestored = decode_arguments(config.compile_model,
                                                           "compile_model")
            require_passed("torch.compile option(s)", "compile_model={...}", path, {},
                            [u.name for u in unrestored], unrestored)
            compile_option = compile_options
        recorded = config.parallelism
        chosen = recorded if parallelism is None else parallelism
        if fsdp_units is None:
            fsdp_units = (resolve_fsdp_units(config.fsdp_units, path)
                          if chosen == "fsdp" and recorded == "fsdp" else ())
        handler = cls(model_cls, device=map_device, logger_mode=logger_mode, log_file=log_file,
                      use_distributed=context.enabled, model_kwargs=kwargs,
                      compile_model=compile_option,
                      parallelism=chosen, fsdp_units=fsdp_units)
        handler._model_state.strict = strict
        handler._apply_settings_state(config, source)
        handler._restore_components(config)
        for callback in callbacks or ():
            handler.add_callback(callback)
        if not skip_callbacks:
            handler._recreate_providers(state, source)
            handler._adopt_own_autosave(config.own_autosave)
        skip = {key for key, flag in (("optimizer", skip_optimizer), ("scheduler", skip_scheduler),
                                       ("history", skip_history), ("ema", skip_ema)) if flag}
        if skip_callbacks:
            skip |= set(state) - _CORE_KEYS
        handler._apply_checkpoint(checkpoint, skip)
        return handler

    @classmethod
    def load_latest(cls, save_path: str | os.PathLike[str], **load_arguments: Any) -> NNHandler:
        """:meth:`load` the newest valid checkpoint in ``save_path``.

        "Newest" is the highest recorded epoch (then step, then save time), read from each
        file's integrity record — never the file's modification time. Damaged or truncated
        files are skipped with a warning that says why; temp files are never candidates.
        Where ``save_path`` has a retention index (``nnhandler-index.json``, written by
        auto-savers with ``keep_*`` rules), a checkpoint it lists wins over another of the same
        epoch and step; checkpoints it does not list (saved by hand, or by an auto-saver
        without rules) stay candidates, and an unreadable index is a warning.
        Under DDP rank 0 chooses and every rank loads the same file. Raises
        :class:`~nnhandler.NoCheckpointFoundError` when there is no valid checkpoint.
        ``load_arguments`` are those of :meth:`load`.
        """
        options = validate_call(LoadOptions, "NNHandler.load_latest", load_arguments)
        for name in ("callbacks", "fsdp_units"):  # iterables are read once
            if name in load_arguments:
                load_arguments[name] = getattr(options, name)
        _check_checkpoint_path(save_path, "NNHandler.load_latest")
        context = DistributedContext.setup(load_arguments.get("use_distributed"),
                                           parse_device(load_arguments.get("device")))
        load_arguments.setdefault("verify", False)  # verified while choosing it
        for _attempt in range(_CHOICES_BEFORE_GIVING_UP):
            found = find_latest_valid(Path(save_path), _LOGGER) if context.is_main else None
            latest = context.broadcast_object(str(found) if found is not None else None)
            if latest is None:
                break
            try:
                return cls.load(latest, **load_arguments)
            except CheckpointError:
                # another job's retention may remove the chosen file before we open it; in
                # one process that is seen here alone, so choose again (under DDP the ranks
                # could disagree about it: the error stands)
                if context.enabled or os.path.lexists(latest):
                    raise
                _LOGGER.info("%s was removed while it was being loaded; choosing again", latest)
        raise NoCheckpointFoundError(f"no valid checkpoint in {str(save_path)!r}")

    def resume_from(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        """Restore this configured handler's state from a checkpoint, in place.

        For restartable scripts that build the handler themselves: everything with a state
        (model, optimizer, scheduler, EMA, history, progress, random streams, callbacks with a
        matching ``state_key``) takes the checkpoint's state, and the training defaults become
        the checkpoint's. The handler's own configuration (model, setters, loaders) stays.

        The optimizer takes the file's hyper-parameters too (``Optimizer.load_state_dict``
        replaces every param group's ``lr``, ``weight_decay``, ``betas`` …): where the
        checkpoint's run was configured with other values than this handler's
        ``set_optimizer`` call, a warning names each one, before and after.
        """
        validate_call(ResumeCall, "resume_from", {"path": path, "verify": verify})
        checkpoint = read_any_checkpoint(path, map_location=self.device, verify=verify,
                                         context=self.distributed)
        config = check_config(checkpoint.state.get("config"), str(checkpoint.path))
        if "optimizer" in checkpoint.state and config.optimizer is not None:
            replaced = self._replaced_optimizer_settings(
                config.optimizer.model_dump(by_alias=True))
            if replaced:
                self._warn(
                    f"resume_from({str(path)!r}): the checkpoint's optimizer settings replace "
                    f"this handler's ({'; '.join(replaced)}): Optimizer.load_state_dict takes "
                    "the file's param groups. To train with this handler's values, set them "
                    "after resuming (handler.optimizer.param_groups), or restore with "
                    "NNHandler.load(..., skip_optimizer=True) to start the optimizer fresh")
        previous = self._settings
        self._settings = config.train_settings
        try:
            self._apply_checkpoint(checkpoint, set())
        except BaseException:  # every state is checked before any is applied: nothing changed
            self._settings = previous
            raise

    def _replaced_optimizer_settings(self, recorded: Any) -> list[str]:
        """``"name before -> after"`` for each optimizer hyper-parameter that the checkpoint's
        run configured differently from this handler (the values ``set_optimizer`` got, or the
        class's defaults). Configured values, not the current ones: a scheduler moves ``lr``
        (and some ``momentum``) during a run, which a resume must continue, not report."""
        if self._optimizer is None or self._optimizer_spec is None:
            return []
        if not isinstance(recorded, Mapping) or not isinstance(recorded.get("kwargs"), Mapping):
            return []
        optimizer_class, ours = self._optimizer_spec
        theirs = recorded["kwargs"]
        notes = []
        reference = maybe_reference(optimizer_class)
        if isinstance(recorded.get("class"), str) and recorded["class"] != reference:
            notes.append(f"optimizer class {reference} -> {recorded['class']}")
        configured = self._optimizer.defaults  # set_optimizer's values over the class defaults
        class_defaults = signature_defaults(optimizer_class)
        for name in sorted(set(ours) | set(theirs)):
            if name not in configured:
                continue
            before = configured[name]
            after = theirs[name] if name in theirs else class_defaults.get(name, before)
            if not same_setting(before, after):
                notes.append(f"{name} {before!r} -> {after!r}")
        return notes

    def _apply_checkpoint(self, checkpoint: Checkpoint, skip: set[str]) -> None:
        """Restore every state of ``checkpoint`` not in ``skip`` (random streams last)."""
        state = checkpoint.state
        source = str(checkpoint.path)
        sharded = isinstance(checkpoint, ShardedCheckpoint)
        if "rng" in state:  # restored last, checked first: nothing changes if it is bad
            try:
                self._rng.check_state(state["rng"])
            except CheckpointSchemaError as error:
                raise relocate(error, prefix="state['rng']", path=source) from None
        if not sharded and self.sharded_checkpoints and "model" in state:
            raise CheckpointError(
                f"{str(checkpoint.path)!r} was written from an unsharded model and cannot be "
                "loaded into this model with DTensor parameters; load it with "
                "parallelism='ddp' (or 'none')")
        wants_ema = self._settings.ema_decay > 0 and "ema" in state and "ema" not in skip
        if wants_ema and self._ema is None:
            self._create_ema(self._settings.ema_decay)
        if "grad_scaler" in state and self.device.type == "cuda" and self._scaler is None:
            self._create_scaler()
        restore_skip = skip | {"config", "rng"}  # the caller applied the config
        if sharded:
            restore_skip |= SHARDED_KEYS  # their tensors are in the DCP files: loaded below
        result = self._registry.restore(state, skip=frozenset(restore_skip), source=source)
        if "position" not in state:  # written before positions were recorded: an epoch's end
            self._position.load_state_dict({"partial": None})
        if sharded:
            assert isinstance(checkpoint, ShardedCheckpoint)
            components = self._sharded_components(with_optimizer="optimizer" not in skip)
            load_sharded_state(checkpoint, components, self.distributed)
        if "rng" in state:
            self._rng.load_state_dict(state["rng"])
        self._report_restore(result, checkpoint.path)
        self._warn_if_world_size_differs(checkpoint)
        self._last_logs = dict(checkpoint.meta.get("logs", {}))
        self.logger.info("loaded %s (epoch %d)", checkpoint.path, checkpoint.epoch)
        self._dispatcher.fire(Event.CHECKPOINT_LOADED, handler=self, path=checkpoint.path,
                              epoch=checkpoint.epoch)

    def _restore_components(self, config: ConfigRecord) -> None:
        """Re-create optimizer, scheduler, loss and metrics from the (validated) configuration.
        What cannot come back (a class that does not resolve, a function-valued argument) is a
        warning that says which setter to call; the component's saved state then waits
        (pending) and is restored when the setter registers it."""
        if config.optimizer is not None:
            try:
                opt_cls = resolve_class(require_reference(config.optimizer.cls, "optimizer"),
                                        torch.optim.Optimizer)
                opt_kwargs = restorable_arguments(config.optimizer.kwargs, opt_cls)
                self.set_optimizer(opt_cls, **opt_kwargs)
            except UnresolvableReferenceError as error:
                self.logger.warning("optimizer not restored (%s); call set_optimizer: its saved "
                                    "state is restored then", error)
        if config.scheduler is not None and self._optimizer is not None:
            try:
                sched_cls: type[Any] = resolve_class(
                    require_reference(config.scheduler.cls, "scheduler"), _SCHEDULER_BASES)
                sched_kwargs = restorable_arguments(config.scheduler.kwargs, sched_cls)
                self.set_scheduler(sched_cls, interval=config.scheduler.interval, **sched_kwargs)
            except UnresolvableReferenceError as error:
                self.logger.warning("scheduler not restored (%s); call set_scheduler: its saved "
                                    "state is restored then", error)
        trusted = frozenset({"__main__", "torch.nn.functional",
                             type(self._module).__module__.split(".", 1)[0]})
        if config.loss_fn is not None:
            try:
                self._loss_fn = to_device(build_callable(config.loss_fn, trusted), self.device)
            except UnresolvableReferenceError as error:
                self.logger.warning("loss function not restored (%s); call set_loss_fn", error)
        for name, spec in config.metrics.items():
            if spec is None:
                self.logger.warning("metric %r was not recordable; call add_metric again", name)
                continue
            try:
                self._metrics[name] = to_device(build_callable(spec, trusted), self.device)
            except UnresolvableReferenceError as error:
                self.logger.warning("metric %r not restored (%s); call add_metric", name, error)
        self._loaders.warn_unrestored()

    def _recreate_providers(self, state: Mapping[str, Any], source: str) -> None:
        """Re-create the owners of the file's states that nothing here owns: through the
        claims made in this process (:func:`~nnhandler.plugins.register_provider_factory`,
        the built-in auto-saver's among them), then, for keys still without an owner, the
        installed plugins (imported only then)."""
        unowned = self._unowned_keys(state)
        if not unowned:
            return
        self._create_providers(in_process_factories(), unowned, state, source)
        unowned = self._unowned_keys(state)
        if unowned:
            self._create_providers(discover_plugins(), unowned, state, source)

    def _unowned_keys(self, state: Mapping[str, Any]) -> list[str]:
        return [key for key in state if key not in _CORE_KEYS and key not in self._registry]

    def _create_providers(self, registry: PluginRegistry, keys: Iterable[str],
                          state: Mapping[str, Any], source: str) -> None:
        for key in keys:
            try:
                provider = registry.create_provider(key, state[key])
            except CheckpointSchemaError as error:
                raise relocate(error, prefix=f"state[{key!r}]", path=source) from None
            if isinstance(provider, Callback):
                self.add_callback(provider)  # its state is restored with the other states
            elif provider is not None:
                self.register_state_provider(provider)

    def _adopt_own_autosave(self, own_key: str | None) -> None:
        """The file's record of which auto-saver was this handler's :meth:`auto_save` one."""
        owner = None if own_key is None else self._registry.get(own_key)
        if isinstance(owner, AutoSaveCallback):
            self._autosave = owner

    def _report_restore(self, result: RestoreResult, path: Path) -> None:
        if result.unmatched:
            message = (
                f"checkpoint {str(path)!r} holds state for {list(result.unmatched)} that nothing "
                "on this handler owns; it is kept (and written into later checkpoints) until a "
                "callback or provider with that state_key is added"
            )
            self.logger.warning(message)
            warnings.warn(message, stacklevel=3)
        missing = [key for key in result.missing if key not in _OPTIONAL_KEYS]
        if missing:
            self.logger.warning("checkpoint has no state for %s; they start fresh", missing)

    def _warn_if_world_size_differs(self, checkpoint: Checkpoint) -> None:
        """Resuming at another world size is allowed, but it cannot be exact: say so."""
        saved = checkpoint.meta.get("world_size")
        current = self.distributed.world_size
        if not isinstance(saved, int) or saved == current:
            return
        message = (
            f"checkpoint {str(checkpoint.path)!r} was written by {saved} rank(s), this run has "
            f"{current}: rank r continues the random streams saved by rank r mod {saved} and "
            "every rank gets a different shard of the data, so the resumed run cannot equal an "
            "uninterrupted one exactly"
        )
        if self.distributed.is_main:
            self.logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)  # on every rank: catchable there

    def __repr__(self) -> str:
        return (f"NNHandler(model={type(self._module).__qualname__}, device={self.device}, "
                f"epoch={self.epoch})")


# ---------------------------------------------------------------------- helpers ---------------
def _check_checkpoint_path(path: Any, call: str) -> None:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ConfigurationError(f"{call}: the path must be a non-empty str or os.PathLike, "
                                 f"got {path!r}")


