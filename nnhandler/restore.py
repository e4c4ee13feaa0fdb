"""Restoring a checkpoint: the one path that :meth:`NNHandler.load`, ``load_latest``,
``resume_from`` and ``train(resume=...)`` share.

* :func:`latest_checkpoint` chooses the newest valid file of a directory (rank 0 chooses,
  every rank takes its answer); :func:`load_latest` loads it, choosing again when another job
  removed it meanwhile.
* :func:`handler_arguments` reads what builds the handler from the file's (validated)
  configuration: model class and arguments, ``torch.compile``, parallelism, FSDP units.
* :func:`recreate_providers` brings back the owners of the file's states that nothing on the
  handler owns (savers, plugin providers), through the generic factory registries.
* :func:`apply_checkpoint` checks, then applies every state (random streams last) and reports
  what did not match.
* :func:`plan_load` reads and checks what ``load`` builds a handler from (with the datasets
  given to it, :class:`LoadData`); the handler's :class:`Restorer` restores into it
  (``load``), or into a configured handler in place (``resume_from``, ``train(resume=...)``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from .callbacks import Callback
from .checkpoint import Checkpoint
from .checkpoint.content import ConfigRecord, check_config
from .checkpoint.discovery import find_latest_valid
from .checkpoint.newest import newest_of_local_and_mirror
from .checkpoint.refs import decode_arguments
from .checkpoint.schema import relocate
from .checkpoint.sharded import (
    SHARDED_KEYS,
    ShardedCheckpoint,
    load_sharded_state,
    read_any_checkpoint,
)
from .checkpoint.storage import URL, is_url, location_of
from .components import EpochPosition, ModelState, RNGState
from .config import LoadOptions, ResumeCall, mirror_location, validate_call
from .devices import parse_device, resolve_device
from .distributed import DistributedContext, run_on_rank_zero
from .errors import (
    CheckpointError,
    CheckpointSchemaError,
    ConfigurationError,
    NoCheckpointFoundError,
)
from .events import Event, EventDispatcher
from .optimization import Optimization, warn
from .plugins import PluginRegistry, discover_plugins, in_process_factories
from .recorded import require_passed, resolve_fsdp_units, resolve_model_class
from .run_setup import AmpAndEma
from .skipped_init import weights_from_checkpoint
from .state import RestoreResult

if TYPE_CHECKING:
    import torch

    from .checkpoint.dcp_state import ShardedComponents
    from .handler import NNHandler
    from .training import Training

__all__ = ["CORE_KEYS", "LoadData", "LoadPlan", "RestoreParts", "Restorer", "apply_checkpoint",
           "check_checkpoint_path", "handler_arguments", "latest_checkpoint", "load_latest",
           "optimizer_replaced_warning", "plan_load", "recreate_providers", "skipped_keys"]

_LOGGER: Final = logging.getLogger("nnhandler")
#: load_latest: how often a chosen file may vanish (another job pruning) before it gives up
_CHOICES_BEFORE_GIVING_UP: Final = 5
#: State keys of the handler's own components; everything else belongs to callbacks/plugins.
CORE_KEYS: Final = frozenset({"model", "optimizer", "scheduler", "grad_scaler", "ema",
                              "history", "progress", "rng", "config", "position"})
#: core keys a checkpoint may lack without a warning (files written before they existed)
_OPTIONAL_KEYS: Final = frozenset({"position"})
#: state keys whose tensors restoring copies into live ones and then drops (``ModelState``:
#: ``module.load_state_dict``), so a verified read leaves them mapped, to be copied once
#: (``read_checkpoint``'s ``copied``)
COPIED_ON_LOAD: Final = frozenset({"model"})

Loaded = TypeVar("Loaded")


def check_checkpoint_path(path: Any, call: str) -> None:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ConfigurationError(f"{call}: the path must be a non-empty str or os.PathLike, "
                                 f"got {path!r}")


# -- choosing the file -------------------------------------------------------------------------
def latest_checkpoint(directory: str | os.PathLike[str], context: DistributedContext,
                      logger: logging.Logger,
                      storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The newest valid checkpoint in ``directory`` (see ``NNHandler.load_latest``), chosen
    by rank 0 and the same on every rank; ``None`` when there is none. ``directory`` may be
    a URL (``storage_options`` for fsspec). An error while rank 0 chooses (a store that does
    not answer, options given for a local folder) is raised on every rank, never a hang."""
    def choose() -> str | None:
        found = find_latest_valid(directory, logger, storage_options=storage_options)
        return str(found) if found is not None else None

    return run_on_rank_zero(context, choose)


def load_latest(load: Callable[..., Loaded], save_path: str | os.PathLike[str],
                load_arguments: dict[str, Any], mirror: Any = None) -> Loaded:
    """``load`` (:meth:`NNHandler.load`) the newest valid checkpoint in ``save_path`` (and,
    with a ``mirror`` URL, of the folder and the mirror:
    :func:`~.checkpoint.newest.newest_of_local_and_mirror`; ``storage_options`` are then the
    mirror's)."""
    data = LoadData.take(load_arguments, "NNHandler.load_latest")
    options = validate_call(LoadOptions, "NNHandler.load_latest", load_arguments)
    for name in ("callbacks", "fsdp_units"):  # iterables are read once
        if name in load_arguments:
            load_arguments[name] = getattr(options, name)
    check_checkpoint_path(save_path, "NNHandler.load_latest")
    mirrored = _mirror_of(save_path, mirror)
    context = DistributedContext.setup(load_arguments.get("use_distributed"),
                                       parse_device(load_arguments.get("device")))
    load_arguments.setdefault("verify", False)  # verified while choosing it
    storage_options = load_arguments.pop("storage_options", None)
    for _attempt in range(_CHOICES_BEFORE_GIVING_UP):
        if mirrored is None:
            latest = latest_checkpoint(save_path, context, _LOGGER, storage_options)
        else:
            # run_on_rank_zero: an error while choosing reaches every rank, never a hang
            latest = run_on_rank_zero(context, partial(_newest_name, *mirrored, storage_options))
        if latest is None:
            break
        remote = is_url(latest)
        try:
            return load(latest, **load_arguments, **data.arguments(),
                        storage_options=storage_options if remote else None)
        except CheckpointError:
            # another job's retention may remove the chosen file before we open it; in
            # one process that is seen here alone, so choose again (under DDP the ranks
            # could disagree about it: the error stands)
            if context.enabled or os.path.lexists(latest) or remote:
                raise
            _LOGGER.info("%s was removed while it was being loaded; choosing again", latest)
    raise NoCheckpointFoundError(f"no valid checkpoint in {str(save_path)!r}" + (
        "" if mirrored is None else f" nor in its mirror {str(mirrored[1])!r}"))


def _newest_name(local: Path, mirror: URL, storage_options: Mapping[str, Any] | None
                 ) -> str | None:
    found = newest_of_local_and_mirror(local, mirror, _LOGGER, storage_options)
    return None if found is None else str(found)


def _mirror_of(save_path: str | os.PathLike[str], mirror: Any) -> tuple[Path, URL] | None:
    """``load_latest``'s ``mirror``, checked: an object-storage URL beside a local folder
    (a ``file://`` URL is one); the folder and the mirror, ``None`` without a mirror."""
    try:
        location = mirror_location(mirror)
    except ValueError as error:
        raise ConfigurationError(f"NNHandler.load_latest: {error}") from None
    if location is None:
        return None
    local = location_of(save_path)
    if not isinstance(local, Path):
        raise ConfigurationError(
            f"NNHandler.load_latest(mirror={str(location)!r}): save_path "
            f"{os.fspath(save_path)!r} is a URL; a mirror is the copy of a local folder")
    return local, location


# -- building the handler -----------------------------------------------------------------------
@dataclass(frozen=True)
class LoadData:
    """``load(..., train_data=..., val_data=...)``: the datasets a loaded handler trains and
    validates on, set with ``set_train_loader`` / ``set_val_loader`` and the loader arguments
    the checkpoint recorded (batch size, shuffle, workers ...; calling the setter after
    ``load`` changes them). Datasets are never in a checkpoint."""

    train: Any = None
    val: Any = None

    @classmethod
    def take(cls, arguments: dict[str, Any], call: str) -> LoadData:
        """Take ``train_data`` / ``val_data`` out of ``arguments``, checked before any file is
        read: a DataLoader, or something without ``len`` and indexing, is a ``TypeError``."""
        from torch.utils.data import DataLoader

        data = cls(arguments.pop("train_data", None), arguments.pop("val_data", None))
        for name, which, dataset in (("train_data", "train", data.train),
                                     ("val_data", "val", data.val)):
            if dataset is None:
                continue
            if isinstance(dataset, DataLoader):
                raise TypeError(f"{call}({name}=<DataLoader>): pass the dataset; the loader "
                                "arguments recorded in the checkpoint apply (call "
                                f"set_{which}_loader(dataset, **kwargs) after loading to "
                                "change them)")
            if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
                raise TypeError(f"{call}({name}={dataset!r}): not a map-style dataset (a "
                                "torch.utils.data.Dataset with __len__ and __getitem__)")
        return data

    def arguments(self) -> dict[str, Any]:
        """The ``load`` keyword arguments that pass these datasets on."""
        return {name: dataset for name, dataset in (("train_data", self.train),
                                                    ("val_data", self.val))
                if dataset is not None}

    def attach(self, handler: NNHandler) -> None:
        if self.train is not None:
            handler.set_train_loader(self.train)
        if self.val is not None:
            handler.set_val_loader(self.val)


def handler_arguments(config: ConfigRecord, path: str | os.PathLike[str], *,
                      model_class: Any, model_kwargs: Mapping[str, Any] | None,
                      compile_model: bool | Mapping[str, Any] | None,
                      parallelism: Any, fsdp_units: Iterable[Any] | None) -> dict[str, Any]:
    """The constructor arguments (``model_class``, ``model_kwargs``, ``compile_model``,
    ``parallelism``, ``fsdp_units``) of the handler that ``load`` builds: those passed, else
    the recorded ones. A recorded argument that a file cannot supply (a function) must be
    passed; otherwise the error names it."""
    model_cls = model_class or resolve_model_class(config.model_class, path)
    restored_kwargs, unrestored = decode_arguments(config.model_kwargs, "model argument")
    kwargs = {**restored_kwargs, **(model_kwargs or {})}
    require_passed("model argument(s)", "model_kwargs={...}", path, kwargs,
                   [*config.model_kwargs_unstored, *(u.name for u in unrestored)], unrestored)
    compile_option: bool | Mapping[str, Any]
    if compile_model is not None:
        compile_option = compile_model
    elif isinstance(config.compile_model, bool):
        compile_option = config.compile_model
    else:
        compile_options, unrestored = decode_arguments(config.compile_model, "compile_model")
        require_passed("torch.compile option(s)", "compile_model={...}", path, {},
                       [u.name for u in unrestored], unrestored)
        compile_option = compile_options
    recorded = config.parallelism
    chosen = recorded if parallelism is None else parallelism
    if fsdp_units is None:
        fsdp_units = (resolve_fsdp_units(config.fsdp_units, path)
                      if chosen == "fsdp" and recorded == "fsdp" else ())
    return {"model_class": model_cls, "model_kwargs": kwargs, "compile_model": compile_option,
            "parallelism": chosen, "fsdp_units": fsdp_units}


def skipped_keys(options: LoadOptions, state: Mapping[str, Any]) -> set[str]:
    """The state keys ``load``'s ``skip_*`` options leave fresh."""
    skip = {key for key, flag in (("optimizer", options.skip_optimizer),
                                   ("scheduler", options.skip_scheduler),
                                   ("history", options.skip_history),
                                   ("ema", options.skip_ema)) if flag}
    if options.skip_callbacks:
        skip |= set(state) - CORE_KEYS
    return skip


def recreate_providers(handler: NNHandler, state: Mapping[str, Any], source: str) -> None:
    """Re-create the owners of the file's states that nothing on ``handler`` owns: through the
    claims made in this process (:func:`~nnhandler.plugins.register_provider_factory`, the
    built-in auto-saver's among them), then, for keys still without an owner, the installed
    plugins (imported only then)."""
    unowned = _unowned_keys(handler, state)
    if not unowned:
        return
    _create_providers(handler, in_process_factories(), unowned, state, source)
    unowned = _unowned_keys(handler, state)
    if unowned:
        _create_providers(handler, discover_plugins(), unowned, state, source)


def _unowned_keys(handler: NNHandler, state: Mapping[str, Any]) -> list[str]:
    return [key for key in state if key not in CORE_KEYS and key not in handler.state_registry]


def _create_providers(handler: NNHandler, registry: PluginRegistry, keys: Iterable[str],
                      state: Mapping[str, Any], source: str) -> None:
    for key in keys:
        try:
            provider = registry.create_provider(key, state[key])
        except CheckpointSchemaError as error:
            raise relocate(error, prefix=f"state[{key!r}]", path=source) from None
        if isinstance(provider, Callback):
            handler.add_callback(provider)  # its state is restored with the other states
        elif provider is not None:
            handler.register_state_provider(provider)


# -- applying the states ------------------------------------------------------------------------
@dataclass(frozen=True)
class RestoreParts:
    """The handler's components that a restore applies states to beyond its registry."""

    rng: RNGState
    position: EpochPosition
    amp_ema: AmpAndEma
    sharded_components: Callable[..., ShardedComponents]


def apply_checkpoint(handler: NNHandler, parts: RestoreParts, checkpoint: Checkpoint,
                     skip: set[str]) -> dict[str, Any]:
    """Restore every state of ``checkpoint`` not in ``skip`` into ``handler`` (random streams
    last; every state is checked before any is applied); returns the file's logs."""
    state = checkpoint.state
    source = str(checkpoint.path)
    sharded = isinstance(checkpoint, ShardedCheckpoint)
    if "rng" in state:  # restored last, checked first: nothing changes if it is bad
        try:
            parts.rng.check_state(state["rng"])
        except CheckpointSchemaError as error:
            raise relocate(error, prefix="state['rng']", path=source) from None
    if not sharded and handler.sharded_checkpoints and "model" in state:
        raise CheckpointError(
            f"{str(checkpoint.path)!r} was written from an unsharded model and cannot be "
            "loaded into this model with DTensor parameters; load it with "
            "parallelism='ddp' (or 'none')")
    amp_ema = parts.amp_ema
    wants_ema = handler.settings.ema_decay > 0 and "ema" in state and "ema" not in skip
    if wants_ema and amp_ema.ema is None:
        amp_ema.create_ema(handler.settings.ema_decay)
    if "grad_scaler" in state and handler.device.type == "cuda" and amp_ema.scaler is None:
        amp_ema.create_scaler()
    restore_skip = skip | {"config", "rng"}  # the caller applied the config
    if sharded:
        restore_skip |= SHARDED_KEYS  # their tensors are in the DCP files: loaded below
    result = handler.state_registry.restore(state, skip=frozenset(restore_skip), source=source)
    if "position" not in state:  # written before positions were recorded: an epoch's end
        parts.position.load_state_dict({"partial": None})
    if sharded:
        assert isinstance(checkpoint, ShardedCheckpoint)
        components = parts.sharded_components(with_optimizer="optimizer" not in skip)
        load_sharded_state(checkpoint, components, handler.distributed)
    if "rng" in state:
        parts.rng.load_state_dict(state["rng"])
    _report_restore(result, checkpoint.path, handler.logger)
    _warn_if_world_size_differs(checkpoint, handler.distributed, handler.logger)
    return dict(checkpoint.meta.get("logs", {}))


def _report_restore(result: RestoreResult, path: Path, logger: logging.Logger) -> None:
    if result.unmatched:
        message = (
            f"checkpoint {str(path)!r} holds state for {list(result.unmatched)} that nothing "
            "on this handler owns; it is kept (and written into later checkpoints) until a "
            "callback or provider with that state_key is added"
        )
        logger.warning(message)
        warnings.warn(message, stacklevel=3)
    missing = [key for key in result.missing if key not in _OPTIONAL_KEYS]
    if missing:
        logger.warning("checkpoint has no state for %s; they start fresh", missing)


def _warn_if_world_size_differs(checkpoint: Checkpoint, context: DistributedContext,
                                logger: logging.Logger) -> None:
    """Resuming at another world size is allowed, but it cannot be exact: say so."""
    saved = checkpoint.meta.get("world_size")
    current = context.world_size
    if not isinstance(saved, int) or saved == current:
        return
    message = (
        f"checkpoint {str(checkpoint.path)!r} was written by {saved} rank(s), this run has "
        f"{current}: rank r continues the random streams saved by rank r mod {saved} and "
        "every rank gets a different shard of the data, so the resumed run cannot equal an "
        "uninterrupted one exactly"
    )
    if context.is_main:
        logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)  # on every rank: catchable there


def optimizer_replaced_warning(path: str | os.PathLike[str], replaced: list[str]) -> str:
    """``resume_from``'s warning when the file's optimizer settings replace the handler's."""
    return (f"resume_from({str(path)!r}): the checkpoint's optimizer settings replace "
            f"this handler's ({'; '.join(replaced)}): Optimizer.load_state_dict takes "
            "the file's param groups. To train with this handler's values, set them "
            "after resuming (handler.optimizer.param_groups), or restore with "
            "NNHandler.load(..., skip_optimizer=True) to start the optimizer fresh")


# -- the handler's restores ---------------------------------------------------------------------
@dataclass(frozen=True)
class LoadPlan:
    """What :meth:`NNHandler.load` builds its handler from, read and checked."""

    checkpoint: Checkpoint
    config: ConfigRecord
    options: LoadOptions
    device: torch.device
    context: DistributedContext
    #: the constructor's ``model_class``, ``model_kwargs``, ``compile_model``, ``parallelism``,
    #: ``fsdp_units`` (see :func:`handler_arguments`)
    handler_arguments: dict[str, Any]
    data: LoadData = LoadData()

    def constructing(self) -> contextlib.AbstractContextManager[None]:
        """The context the handler is constructed in: the keys of the file's model state given
        to :func:`~nnhandler.skipped_init.weights_from_checkpoint` (no random initial values
        for the parameters it overwrites; ``None``, a usual construction, where the model
        state is not a dict)."""
        model = self.checkpoint.state.get("model")
        names = frozenset(model) if isinstance(model, dict) else None
        return weights_from_checkpoint(names)


def plan_load(path: str | os.PathLike[str], device: Any, arguments: dict[str, Any]) -> LoadPlan:
    """Validate ``load``'s ``arguments``, read ``path`` (verified unless ``verify=False``) and
    its configuration, and choose the constructor's arguments (passed, else recorded)."""
    data = LoadData.take(arguments, "NNHandler.load")
    options = validate_call(LoadOptions, "NNHandler.load", arguments)
    check_checkpoint_path(path, "NNHandler.load")
    context = DistributedContext.setup(arguments["use_distributed"], parse_device(device))
    map_device = resolve_device(device, context)
    checkpoint = read_any_checkpoint(path, map_location=map_device, verify=arguments["verify"],
                                     context=context,
                                     storage_options=arguments.get("storage_options"),
                                     copied=COPIED_ON_LOAD)
    config = check_config(checkpoint.state.get("config"), str(checkpoint.path))
    constructor = handler_arguments(
        config, path, model_class=arguments["model_class"],
        model_kwargs=arguments["model_kwargs"], compile_model=arguments["compile_model"],
        parallelism=arguments["parallelism"],
        fsdp_units=options.fsdp_units)  # iterables are read once
    return LoadPlan(checkpoint, config, options, map_device, context, constructor, data)


class Restorer:
    """Restores checkpoints into one handler: after ``load`` built it, or in place."""

    def __init__(self, handler: NNHandler, parts: RestoreParts, *, training: Training,
                 model_state: ModelState, optimization: Optimization,
                 dispatcher: EventDispatcher) -> None:
        self.handler = handler
        self.parts = parts
        self.training = training
        self.model_state = model_state
        self.optimization = optimization
        self.dispatcher = dispatcher

    def apply_settings(self, record: ConfigRecord, source: str = "") -> None:
        """Take the recorded training defaults and loader arguments (validated: a recorded
        loader configuration that does not fit is a CheckpointSchemaError)."""
        self.handler.loaders.remember(record.loaders, source)
        self.training.settings = record.train_settings

    def restore_loaded(self, plan: LoadPlan) -> str | None:
        """``load``'s restore into the handler it has just built from ``plan``; returns the
        state key of the file's ``auto_save`` callback (if it had one)."""
        checkpoint, config, options = plan.checkpoint, plan.config, plan.options
        source = str(checkpoint.path)
        self.model_state.strict = options.strict
        self.apply_settings(config, source)
        self.optimization.restore(config)
        self.note_unrestored(checkpoint, config)
        self.handler.loaders.warn_unrestored()
        plan.data.attach(self.handler)
        for callback in options.callbacks or ():
            self.handler.add_callback(callback)
        if not options.skip_callbacks:
            recreate_providers(self.handler, checkpoint.state, source)
        self.apply(checkpoint, skipped_keys(options, checkpoint.state))
        return None if options.skip_callbacks else config.own_autosave

    def note_unrestored(self, checkpoint: Checkpoint, config: ConfigRecord) -> None:
        """Tell :meth:`~nnhandler.training.Training.check_trainable` where the handler came
        from and why a component the checkpoint's run had did not come back (the warnings
        logged while restoring said so once; ``train`` without it says so again)."""
        training = self.training
        training.loaded_from = str(checkpoint.path)
        trained = checkpoint.epoch > 0 or int(checkpoint.meta.get("step", 0) or 0) > 0
        if config.optimizer is not None and self.optimization.optimizer is None:
            training.unrestored["optimizer"] = (
                f" (the checkpoint's optimizer {config.optimizer.cls} could not be re-created: "
                "see the warning logged by load)")
        if self.optimization.loss_fn is not None:
            return
        if config.loss_fn is not None:
            training.unrestored["loss_fn"] = (
                " (the checkpoint's loss function could not be re-created: see the warning "
                "logged by load)")
        elif trained:
            training.unrestored["loss_fn"] = (
                " (the checkpoint's run trained with a loss function that a checkpoint cannot "
                "record: a lambda, a closure or a function defined inside another; a "
                "module-level function or an nn.Module loss is restored by load)")

    def resume_from(self, path: str | os.PathLike[str], verify: bool,
                    storage_options: Mapping[str, Any] | None = None) -> None:
        """:meth:`NNHandler.resume_from`: every state is checked before any is applied, so a
        failure changes nothing."""
        handler, training = self.handler, self.training
        validate_call(ResumeCall, "resume_from", {"path": path, "verify": verify,
                                                  "storage_options": storage_options})
        checkpoint = read_any_checkpoint(path, map_location=handler.device, verify=verify,
                                         context=handler.distributed,
                                         storage_options=storage_options,
                                         copied=COPIED_ON_LOAD)
        config = check_config(checkpoint.state.get("config"), str(checkpoint.path))
        if "optimizer" in checkpoint.state and config.optimizer is not None:
            replaced = self.optimization.replaced_settings(
                config.optimizer.model_dump(by_alias=True))
            if replaced:
                warn(handler.logger, optimizer_replaced_warning(path, replaced))
        previous = training.settings
        training.settings = config.train_settings
        try:
            self.apply(checkpoint, set())
        except BaseException:
            training.settings = previous
            raise

    def apply(self, checkpoint: Checkpoint, skip: set[str]) -> None:
        """Restore every state of ``checkpoint`` not in ``skip`` (see
        :func:`apply_checkpoint`), then announce it (``CHECKPOINT_LOADED``)."""
        handler = self.handler
        self.training.last_logs = apply_checkpoint(handler, self.parts, checkpoint, skip)
        handler.logger.info("loaded %s (epoch %d)", checkpoint.path, checkpoint.epoch)
        self.dispatcher.fire(Event.CHECKPOINT_LOADED, handler=handler, path=checkpoint.path,
                             epoch=checkpoint.epoch)
