"""``NNHandler``, the facade: constructor, properties, setters, ``auto_save``, and ``train``,
``save``, ``load``, ``load_latest``, ``resume_from`` as validated delegations to the components
that do the work (:mod:`~nnhandler.training`, :mod:`~nnhandler.checkpointing`,
:mod:`~nnhandler.restore`)."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import Dataset

from .callbacks import AutoSaveCallback, Callback
from .callbacks.autosave_options import AutoSaveOptions, auto_save_config
from .checkpoint.storage import URL
from .checkpointing import Checkpointer
from .compat import ModelCalls, constructor_keywords
from .components import EpochPosition, History, ModelState, Progress, RNGState
from .config import ParallelConfig, Parallelism, TrainCall, TrainSettings, validate_call
from .data import Loaders
from .devices import parse_device, resolve_device
from .distributed import DistributedContext
from .events import EventDispatcher
from .history_views import HistoryViews
from .logging import LoggingMode as _LoggingMode
from .logging import make_logger
from .optimization import Optimization
from .preemption import PreemptionReport
from .registered_callbacks import RegisteredCallbacks
from .restore import RestoreParts, Restorer, load_latest, plan_load
from .run_setup import UNSET, AmpAndEma, Unset
from .saved_config import ConfigState, ModelSetup, config_dict
from .sharding import has_dtensor_parameters
from .state import StateProvider, StateRegistry
from .training import Training

if TYPE_CHECKING:  # DCP is imported only when a sharded checkpoint is written or loaded
    from typing_extensions import Unpack

    from .checkpoint.dcp_state import ShardedComponents

__all__ = ["NNHandler"]


class NNHandler(HistoryViews, ModelCalls):
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
        seed: construct the model under this seed (same initial weights in every process and
            run; the caller's random streams are left as they were) and make it the default
            ``seed`` of :meth:`train`.
        **kwargs: further arguments of ``model_class``. The original NNHandler's parameters
            are mapped or refused with what replaces them, near misses of ours are refused
            (``nnhandler.compat``; ``model_kwargs`` passes such a name to the model).

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
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not (inspect.isclass(model_class) and issubclass(model_class, nn.Module)):
            raise TypeError(f"model_class must be an nn.Module subclass, got {model_class!r}")
        if use_distributed not in (None, True, False):
            raise TypeError(f"use_distributed must be None, True or False, got {use_distributed!r}")
        parallel = ParallelConfig(parallelism=parallelism, fsdp_units=tuple(fsdp_units))
        settings = validate_call(TrainSettings, "NNHandler", {"seed": seed})
        extra = constructor_keywords(model_class, kwargs, model_kwargs, log_file,
                                     NNHandler.__init__)
        self.distributed = DistributedContext.setup(use_distributed, parse_device(device))
        self.device = resolve_device(device, self.distributed)
        self.logger = make_logger(logger_mode, extra.log_file, self.distributed.is_main)
        extra.apply_log_level(self.logger, self.distributed.is_main)
        self._setup = ModelSetup.checked(model_class, extra.model_kwargs, compile_model,
                                         parallel, self.logger)
        self._module, self._model = self._setup.build(self.device, self.distributed, seed)

        self._registry = StateRegistry()
        self._optimization = Optimization(self._module, self._registry, self.device,
                                          self.logger)
        self._amp_ema = AmpAndEma(self._module, self._registry)
        self._loaders = Loaders(self.logger)
        self._autosave: AutoSaveCallback | None = None
        self._dispatcher = EventDispatcher()
        self._callbacks = RegisteredCallbacks(self._registry, self._dispatcher, self.logger)

        self.history_state = History()
        self.progress = Progress()
        self._position = EpochPosition()
        self._rng = RNGState(self.distributed)
        self._model_state = ModelState(lambda: self._module)
        self._training = Training(self, optimization=self._optimization, amp_ema=self._amp_ema,
                                  position=self._position, dispatcher=self._dispatcher,
                                  settings=settings)
        self._restorer = Restorer(
            self, RestoreParts(self._rng, self._position, self._amp_ema,
                               self._sharded_components),
            training=self._training, model_state=self._model_state,
            optimization=self._optimization, dispatcher=self._dispatcher)
        for provider in (self._model_state, self.history_state, self.progress, self._position,
                         self._rng, ConfigState(self._config_dict, self._restorer.apply_settings)):
            self._registry.register(provider)
        self._checkpoints = Checkpointer(
            self, rng_gathered=self._rng.gathered, dispatcher=self._dispatcher,
            sharded_components=functools.partial(self._sharded_components, with_optimizer=True))

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
        return self._setup.parallel.parallelism

    @property
    def sharded_checkpoints(self) -> bool:
        """True when the model holds DTensor parameters (FSDP2 or a model that places its own
        DTensors): checkpoints are then ``.dcp`` directories written by every rank through
        ``torch.distributed.checkpoint``."""
        return has_dtensor_parameters(self._module)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimization.optimizer

    @property
    def scheduler(self) -> Any:
        return self._optimization.scheduler

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The AMP grad scaler (CUDA fp16 only; bf16 autocast on CPU needs none)."""
        return self._amp_ema.scaler

    @property
    def ema_model(self) -> AveragedModel | None:
        """The EMA model (``torch.optim.swa_utils.AveragedModel``) when ``ema_decay > 0``."""
        return self._amp_ema.ema

    @property
    def loss_fn(self) -> Callable[[Any, Any], torch.Tensor] | None:
        return self._optimization.loss_fn

    @property
    def metrics(self) -> dict[str, Callable[[Any, Any], Any]]:
        return dict(self._optimization.metrics)

    @property
    def loaders(self) -> Loaders:
        """The datasets and DataLoader arguments set with :meth:`set_train_loader` /
        :meth:`set_val_loader` (``loaders.spec("train")``), and the arguments remembered from
        a loaded checkpoint (``loaders.remembered``)."""
        return self._loaders

    @property
    def callbacks(self) -> tuple[Callback, ...]:
        return tuple(self._callbacks.callbacks)

    @property
    def auto_save_callback(self) -> AutoSaveCallback | None:
        """The callback configured by :meth:`auto_save` (``None`` before)."""
        return self._autosave

    @property
    def settings(self) -> TrainSettings:
        """Training defaults: the settings of the last ``train`` call (restored by ``load``)."""
        return self._training.settings

    @property
    def stop_requested(self) -> bool:
        return self._training.stop_requested

    @property
    def last_logs(self) -> dict[str, Any]:
        """The logs of the last completed epoch (a copy; restored by :meth:`load`): what
        :meth:`save` records when it is given none."""
        return dict(self._training.last_logs)

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
        return self._training.preemption is not None

    @property
    def preemption(self) -> PreemptionReport | None:
        """What the last ``train`` call did when a signal stopped it (signal, where it stopped,
        the checkpoints to resume from); ``None`` when it was not preempted."""
        return self._training.preemption

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
        self._training.stop_requested = True

    # ------------------------------------------------------------------ setters --------------
    def set_optimizer(self, optimizer_class: type[torch.optim.Optimizer], **kwargs: Any) -> None:
        """Create ``optimizer_class(model parameters, **kwargs)``; replaces any previous one
        (and re-creates the scheduler on it).

        After :meth:`load` / :meth:`resume_from` restored the optimizer, replacing it drops its
        state (moments, step counts) and the scheduler's, with a warning: the restored
        optimizer needs no new call, and ``load(..., skip_optimizer=True)`` starts it fresh
        on purpose.
        """
        self._optimization.set_optimizer(optimizer_class, kwargs)

    def set_scheduler(self, scheduler_class: type[Any], interval: str = "epoch",
                      **kwargs: Any) -> None:
        """Create ``scheduler_class(optimizer, **kwargs)``.

        ``interval="epoch"`` steps once per epoch (``ReduceLROnPlateau`` with the epoch's
        ``val_loss``, on epochs that validate); ``"step"`` once per optimizer step. Replacing
        a scheduler that :meth:`load` / :meth:`resume_from` restored drops its state, with a
        warning (``load(..., skip_scheduler=True)`` starts it fresh on purpose).
        """
        self._optimization.set_scheduler(scheduler_class, interval, kwargs)

    def set_loss_fn(self, loss_fn: Callable[[Any, Any], torch.Tensor] | type[nn.Module],
                    **kwargs: Any) -> None:
        """Set ``loss(output, target) -> tensor``: a function, an ``nn.Module`` instance, or an
        ``nn.Module`` class constructed with ``kwargs``. Module-level functions and modules are
        restored by :meth:`load`; lambdas and closures must be set again after loading."""
        self._optimization.set_loss_fn(loss_fn, kwargs)

    def add_metric(self, name: str, metric: Callable[[Any, Any], Any]) -> None:
        """Add ``metric(output, target) -> float`` (or a scalar tensor), averaged per sample."""
        self._optimization.add_metric(name, metric)

    def set_train_loader(self, dataset: Dataset[Any] | None = None, **loader_kwargs: Any) -> None:
        """Train on ``dataset``; ``loader_kwargs`` go to ``DataLoader`` (``batch_size``,
        ``shuffle``, ``num_workers`` …). After :meth:`load`, omitted arguments default to the
        ones remembered from the checkpoint. Shuffling depends only on the run's seed and the
        absolute epoch, so a resumed run sees the same batches."""
        self._loaders.set("train", dataset, loader_kwargs)

    def set_val_loader(self, dataset: Dataset[Any] | None = None, **loader_kwargs: Any) -> None:
        """Validate on ``dataset`` (see :meth:`set_train_loader`)."""
        self._loaders.set("val", dataset, loader_kwargs)

    # ------------------------------------------------------------------ callbacks ------------
    def add_callback(self, callback: Callback) -> None:
        """Register ``callback``; a state-providing one also joins every checkpoint, and gets
        its state back at once if a loaded checkpoint holds state under its ``state_key``."""
        self._callbacks.add(callback)

    def remove_callback(self, callback: Callback) -> None:
        self._callbacks.remove(callback)
        if callback is self._autosave:
            self._autosave = None

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
        interval: int | None = None,
        save_path: str | os.PathLike[str] = ".",
        name: str = "model_epoch{epoch:02d}",
        overwrite: bool = False,
        **options: Unpack[AutoSaveOptions],
    ) -> AutoSaveCallback:
        """Configure (or reconfigure) this handler's one :class:`AutoSaveCallback`.

        Takes exactly the arguments of :class:`AutoSaveCallback` (the seed's four positional
        ones, every other option keyword-only: ``on_save_error``, ``async_save``, retention as
        ``keep=Retention(...)`` or ``keep_last``/``keep_best``/``monitor``/``mode``/
        ``keep_every``/``keep_every_n_steps``, step and time triggers ``every_n_steps``/
        ``every_seconds``, emergency checkpoints as ``emergency=EmergencySaves(...)`` or
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
        self._callbacks.reconfigure(callback, lambda: callback.reconfigure(config),
                                    lambda: callback.reconfigure(old))
        return callback

    # ------------------------------------------------------------------ training -------------
    def train(
        self,
        epochs: int | None = None,
        *,
        until_epoch: int | None = None,
        validate_every: int | Unset = UNSET,
        gradient_accumulation_steps: int | Unset = UNSET,
        use_amp: bool | Unset = UNSET,
        gradient_clipping_norm: float | Unset | None = UNSET,
        ema_decay: float | Unset = UNSET,
        seed: int | Unset | None = UNSET,
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
        return self._training.train(call, changes)

    # ------------------------------------------------------------------ saving ---------------
    def save(self, path: str | os.PathLike[str], logs: Mapping[str, Any] | None = None, *,
             storage_options: Mapping[str, Any] | None = None) -> Path | URL:
        """Write the complete checkpoint to ``path`` and return once it is durable.

        Under DDP every rank calls it: rank 0 writes, the others wait, and an error on rank 0 is
        raised on every rank. Fires ``on_checkpoint_saved``. The same as
        ``handler.checkpoints.save(path, logs).path`` (see :attr:`checkpoints`).

        A model with DTensor parameters (:attr:`sharded_checkpoints`, e.g. FSDP2) is written as
        a directory through ``torch.distributed.checkpoint``: every rank writes its own shards,
        and the directory appears under ``path`` (which must end in ``.dcp``) only once it is
        complete. ``save_path`` must then be on a filesystem that every rank shares.

        ``path`` may be an fsspec URL (``s3://bucket/run/ep010.pth``, ``memory://…``) with
        ``storage_options`` for fsspec; it is uploaded whole once written (docs page "Object
        storage"; needs ``nnhandler[remote]``), and the returned path is then that URL.
        """
        return self._checkpoints.save(path, logs, storage_options=storage_options).path

    def state_dict(self) -> dict[str, Any]:
        """``{state_key: state}`` of every provider: exactly what a checkpoint's ``state`` holds."""
        return self._registry.collect()

    # ------------------------------------------------ export (the plots: HistoryViews) -----
    def export(self, path: str | os.PathLike[str], ema: bool = False, *,
               storage_options: Mapping[str, Any] | None = None) -> Path | URL:
        """Write the model's weights alone as a plain state dict (CPU tensors), atomically.

        ``ema=True`` exports the EMA weights (an error when there is no EMA). The file loads into
        your own model with plain torch, without nnhandler:
        ``model.load_state_dict(torch.load(path, weights_only=True))``. Wrapper prefixes (DDP,
        ``torch.compile``, the EMA's ``AveragedModel``) and ``n_averaged`` are not in it.
        ``path`` may be an fsspec URL (``storage_options`` for fsspec), uploaded whole.
        """
        from .export import export_weights

        return export_weights(self, path, ema, storage_options)

    def _sharded_components(self, *, with_optimizer: bool) -> ShardedComponents:
        from .checkpoint.dcp_state import ShardedComponents

        optimizer = self._optimization.optimizer if with_optimizer else None
        return ShardedComponents(self._module, optimizer, strict=self._model_state.strict)

    def _config_dict(self) -> dict[str, Any]:
        own = self._autosave.state_key if self._autosave is not None else None
        return config_dict(self._setup, self._optimization, self._loaders,
                           self._training.settings, own)

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
        train_data: Dataset[Any] | None = None,
        val_data: Dataset[Any] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> NNHandler:
        """Rebuild a handler from a checkpoint, ready to resume with :meth:`train`.

        Tensors are mapped to ``device`` (``None``: each rank's own device). Classes named in the
        file must be subclasses of the expected base; ``model_class=`` avoids even resolving
        the model's. ``skip_*`` leave a component fresh. ``callbacks`` are added and receive
        their state by ``state_key``; the file's other callbacks come back as they were unless
        a passed callback has the same key (or ``skip_callbacks``): those whose key is claimed
        in this process (:func:`~nnhandler.plugins.register_provider_factory`: the auto-savers,
        third-party savers), then the providers of installed plugins (entry-point group
        ``nnhandler.plugins``, see :mod:`nnhandler.plugins`) for the state keys they claim.
        State without an owner is kept, written into later checkpoints and reported with a
        warning. ``compile_model`` (default: as recorded) is the constructor's; pass it when
        the recorded options name a function (a custom ``backend``), which a file never
        supplies. What a file may make ``load`` do is limited (docs/loading.md): it resolves
        classes only in modules already imported and only to the expected base class, never
        imports or calls anything on the file's word, and validates all it reads against a
        declared schema (:class:`~nnhandler.CheckpointSchemaError` names the bad field).
        Arguments that are functions (a ``LambdaLR``'s ``lr_lambda``, a ``collate_fn``) are
        never taken from the file: a warning names each one and the call that supplies it.
        ``strict`` demands that model weights match exactly; parameters the file gives are not
        randomly initialised first. ``verify`` (default) checks the file's CRC-32 and raises
        :class:`~nnhandler.CheckpointCorruptedError` on any damage; ``verify=False`` skips
        that. Datasets are not saved: pass ``train_data=`` / ``val_data=`` or call
        ``set_train_loader`` / ``set_val_loader``; the file's loader arguments apply either way.

        ``path`` may be a sharded checkpoint directory (``NAME.dcp``): every rank loads its part,
        and ``verify`` checks every file against the manifest (the ranks share the reading).
        ``parallelism`` / ``fsdp_units`` default to the ones recorded in the checkpoint; the
        world size may differ from the saving run's where DCP can reshard (FSDP2 can), with a
        warning that the run cannot then equal an uninterrupted one exactly. In one process,
        ``parallelism="none"`` reads a sharded checkpoint into a plain model.

        ``path`` may be an fsspec URL (``s3://bucket/run/ep010.pth``) with ``storage_options``
        for fsspec (without them: the store's standard configuration, e.g. ``AWS_ENDPOINT_URL``
        and credentials from the environment); a complete copy is read and always verified.
        """
        plan = plan_load(path, device, {
            "skip_optimizer": skip_optimizer, "skip_scheduler": skip_scheduler,
            "skip_history": skip_history, "skip_ema": skip_ema, "skip_callbacks": skip_callbacks,
            "callbacks": callbacks, "model_class": model_class, "model_kwargs": model_kwargs,
            "strict": strict, "verify": verify, "logger_mode": logger_mode, "log_file": log_file,
            "use_distributed": use_distributed, "parallelism": parallelism,
            "fsdp_units": fsdp_units, "compile_model": compile_model,
            "train_data": train_data, "val_data": val_data,
            "storage_options": storage_options})
        arguments = dict(plan.handler_arguments)
        with plan.constructing():
            handler = cls(arguments.pop("model_class"), device=plan.device, logger_mode=logger_mode,
                          log_file=log_file, use_distributed=plan.context.enabled, **arguments)
        handler._adopt_own_autosave(handler._restorer.restore_loaded(plan))
        return handler

    @classmethod
    def load_latest(cls, save_path: str | os.PathLike[str], *, mirror: str | None = None,
                    **load_arguments: Any) -> NNHandler:
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
        ``load_arguments`` are those of :meth:`load`. ``mirror``: the object-storage URL an
        auto-saver mirrors the local ``save_path`` to; the newest valid checkpoint of both by
        epoch, then step, past damaged ones on either side (local wins a tie), as
        ``train(resume="latest")`` picks; ``storage_options`` are the mirror's (docs "Mirror").
        """
        return load_latest(cls.load, save_path, load_arguments, mirror)

    def resume_from(self, path: str | os.PathLike[str], *, verify: bool = True,
                    storage_options: Mapping[str, Any] | None = None) -> None:
        """Restore this configured handler's state from a checkpoint, in place.

        For restartable scripts that build the handler themselves: everything with a state
        (model, optimizer, scheduler, EMA, history, progress, random streams, callbacks with a
        matching ``state_key``) takes the checkpoint's state, and the training defaults become
        the checkpoint's. The handler's own configuration (model, setters, loaders) stays.

        The optimizer takes the file's hyper-parameters too (``Optimizer.load_state_dict``
        replaces every param group's ``lr``, ``weight_decay``, ``betas`` …): where the
        checkpoint's run was configured with other values than this handler's
        ``set_optimizer`` call, a warning names each one, before and after.

        ``path`` may be an fsspec URL (``s3://bucket/run/ep010.pth``) with ``storage_options``
        for fsspec; it is then always verified (docs page "Object storage").
        """
        self._restorer.resume_from(path, verify, storage_options)

    def _adopt_own_autosave(self, own_key: str | None) -> None:
        """The file's record of which auto-saver was this handler's :meth:`auto_save` one."""
        owner = None if own_key is None else self._registry.get(own_key)
        if isinstance(owner, AutoSaveCallback):
            self._autosave = owner

    def __repr__(self) -> str:
        return (f"NNHandler(model={type(self._module).__qualname__}, device={self.device}, "
                f"epoch={self.epoch})")
