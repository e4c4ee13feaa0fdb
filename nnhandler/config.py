"""Validated (pydantic, strict) configuration for everything a user hands to nnhandler."""

from __future__ import annotations

import inspect
import math
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from .checkpoint.storage import URL, location_of
from .errors import ConfigurationError
from .logging import LoggingMode
from .naming import validate_template

__all__ = ["AutoSaveConfig", "LoadOptions", "LoaderConfig", "MonitorMode", "ParallelConfig",
           "Parallelism", "ResumeCall", "SaveErrorPolicy", "TrainCall", "TrainSettings",
           "mirror_location", "validate_call"]

SaveErrorPolicy = Literal["warn", "raise"]
MonitorMode = Literal["min", "max"]
Parallelism = Literal["ddp", "fsdp", "none"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", defer_build=True)


def _save_location(value: Any) -> Path | URL:
    """``save_path``: a ``Path``, or a :class:`~nnhandler.checkpoint.storage.URL` for
    ``scheme://…`` (``file://`` is a local path)."""
    if isinstance(value, (str, os.PathLike)):
        return location_of(value)
    raise ValueError(f"save_path={value!r}: give a directory path (str or os.PathLike) or a "
                     "URL such as 's3://bucket/run'")


def mirror_location(value: Any) -> URL | None:
    """``mirror``: ``None`` or an fsspec URL (a local folder is no mirror)."""
    if value is None:
        return None
    location = _save_location(value) if isinstance(value, (str, os.PathLike)) else value
    if not isinstance(location, URL):
        raise ValueError(f"mirror={value!r} is not an object-storage URL: give one such as "
                         "'s3://bucket/run' (a local folder is no mirror; use save_path)")
    return location


class AutoSaveConfig(_Strict):
    """Configuration of an :class:`~nnhandler.AutoSaveCallback` (see its docstring for rules)."""

    interval: int | None = None
    every_n_steps: Annotated[int, Field(ge=1)] | None = None
    every_seconds: Annotated[float, Field(strict=False)] | None = None
    #: a directory, or an fsspec URL (``s3://bucket/run``: see docs/object-storage.md)
    save_path: Annotated[Path | URL, PlainValidator(_save_location)] = Path(".")
    name: str = "model_epoch{epoch:02d}"
    overwrite: bool = False
    on_save_error: SaveErrorPolicy = "warn"
    async_save: bool = False
    keep_last: Annotated[int, Field(ge=1)] | None = None
    keep_best: Annotated[int, Field(ge=1)] | None = None
    monitor: Annotated[str, Field(min_length=1)] | None = None
    mode: MonitorMode = "min"
    keep_every: Annotated[int, Field(ge=1)] | None = None
    keep_every_n_steps: Annotated[int, Field(ge=1)] | None = None
    save_on_signal: bool | tuple[str, ...] = False
    save_on_exception: bool = False
    #: passed to fsspec for a URL ``save_path``; never saved in a checkpoint (it may hold
    #: credentials)
    storage_options: Annotated[dict[str, Any], Field(strict=False)] | None = None
    #: a URL each completed local checkpoint is uploaded to in the background
    #: (:mod:`nnhandler.callbacks.autosave_mirror`); ``storage_options`` are then its options
    mirror: Annotated[URL | None, PlainValidator(mirror_location)] = None

    @field_validator("save_on_signal", mode="before")
    @classmethod
    def _signal_rule(cls, value: Any) -> Any:
        return _signal_names(value)

    @field_validator("interval")
    @classmethod
    def _interval_rule(cls, value: int | None) -> int | None:
        if value is not None and value < -1:
            raise ValueError(
                f"interval={value} is not allowed: use None or 0 (off), N > 0 (every N-th "
                "epoch) or -1 (after the last epoch of each train call)"
            )
        return value

    @field_validator("every_seconds", mode="before")
    @classmethod
    def _seconds_rule(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"every_seconds={value!r} is not a number of seconds: pass a "
                             "float (or int) of at least 1.0, e.g. every_seconds=1800.0, or "
                             "None (off)")
        if not math.isfinite(value) or value < 1.0:
            raise ValueError(f"every_seconds={value!r} is not allowed: pass a finite number "
                             "of seconds of at least 1.0 (a save per second or more often "
                             "would spend the run writing checkpoints), or None (off)")
        return float(value)

    @field_validator("save_path")
    @classmethod
    def _save_path_rule(cls, value: Path | URL) -> Path | URL:
        if isinstance(value, Path) and value.exists() and not value.is_dir():
            raise ValueError(f"save_path {str(value)!r} exists and is not a directory")
        return value

    @field_validator("name")
    @classmethod
    def _name_rule(cls, value: str) -> str:
        return validate_template(value)

    @model_validator(mode="after")
    def _retention_rules(self) -> AutoSaveConfig:
        rules = self.retention_arguments()
        if self.overwrite and rules:
            given = ", ".join(f"{name}={value!r}" for name, value in rules.items())
            raise ValueError(
                f"overwrite=True cannot be combined with {given}: overwrite keeps only the "
                "latest auto-save; use keep_last=1 instead of overwrite to combine it with "
                "other keep_* rules"
            )
        if self.keep_best is not None and self.monitor is None:
            raise ValueError(f"keep_best={self.keep_best} needs monitor=<a log key such as "
                             "'val_loss'> to rank checkpoints by; monitor is None")
        if self.monitor is not None and self.keep_best is None:
            raise ValueError(f"monitor={self.monitor!r} is only used by keep_best, which is "
                             "None: pass keep_best=K too (or drop monitor)")
        if self.mode != "min" and self.keep_best is None:
            raise ValueError(f"mode={self.mode!r} is only used by keep_best, which is None")
        if self.mirror is not None and isinstance(self.save_path, URL):
            raise ValueError(f"mirror={str(self.mirror)!r} needs a local save_path; "
                             f"save_path={str(self.save_path)!r} is object storage already")
        return self

    @property
    def save_path_options(self) -> dict[str, Any] | None:
        """The ``storage_options`` of ``save_path`` (with a ``mirror`` they are the
        mirror's, and a local ``save_path`` takes none)."""
        return None if self.mirror is not None else self.storage_options

    def retention_arguments(self) -> dict[str, int]:
        """The ``keep_*`` rules that are set (empty: every auto-save is kept)."""
        return {name: value for name, value in (("keep_last", self.keep_last),
                                                ("keep_best", self.keep_best),
                                                ("keep_every", self.keep_every),
                                                ("keep_every_n_steps", self.keep_every_n_steps))
                if value is not None}

    @property
    def enabled(self) -> bool:
        """Whether any schedule is on (``interval``, ``every_n_steps``, ``every_seconds``)."""
        return bool(self.interval) or self.saves_inside_epochs

    @property
    def saves_inside_epochs(self) -> bool:
        """Whether a step or time trigger is set (saves may fall inside an epoch)."""
        return self.every_n_steps is not None or self.every_seconds is not None

    @property
    def signals(self) -> tuple[signal.Signals, ...]:
        """The signals that stop training with an emergency checkpoint (none when off)."""
        if self.save_on_signal is True:
            return DEFAULT_STOP_SIGNALS
        if self.save_on_signal is False:
            return ()
        return tuple(signal.Signals[name] for name in self.save_on_signal)

    @property
    def writes_emergency_checkpoints(self) -> bool:
        return bool(self.save_on_signal) or self.save_on_exception

    def to_state(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "every_n_steps": self.every_n_steps,
            "every_seconds": self.every_seconds,
            "save_path": str(self.save_path),
            "name": self.name,
            "overwrite": self.overwrite,
            "on_save_error": self.on_save_error,
            "async_save": self.async_save,
            "keep_last": self.keep_last,
            "keep_best": self.keep_best,
            "monitor": self.monitor,
            "mode": self.mode,
            "keep_every": self.keep_every,
            "keep_every_n_steps": self.keep_every_n_steps,
            "save_on_signal": (self.save_on_signal if isinstance(self.save_on_signal, bool)
                               else list(self.save_on_signal)),
            "save_on_exception": self.save_on_exception,
            "mirror": None if self.mirror is None else str(self.mirror),
        }


#: ``save_on_signal=True``: SIGTERM (what schedulers and ``kill`` send) and SIGUSR1 (what a
#: SLURM ``--signal=USR1@120`` sends) where the platform has it
DEFAULT_STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal.Signals, name) for name in ("SIGTERM", "SIGUSR1")
    if hasattr(signal.Signals, name))
#: signals a process cannot catch
_UNCATCHABLE = frozenset(name for name in ("SIGKILL", "SIGSTOP") if hasattr(signal.Signals, name))


def _signal_names(value: Any) -> Any:
    """``save_on_signal``: a bool passes on (strict validation follows); a list or tuple of
    signal names (``"SIGTERM"``) or numbers becomes a tuple of unique names. Anything else,
    an unknown or uncatchable signal, or an empty list is an error naming the value."""
    if isinstance(value, str):
        raise ValueError(f"save_on_signal={value!r}: pass True or a list of signals, e.g. "
                         f"[{value!r}]")
    if isinstance(value, bool) or not isinstance(value, (list, tuple)):
        return value
    if not value:
        raise ValueError("save_on_signal=[] names no signal: use False (off), True (SIGTERM "
                         "and SIGUSR1) or a list such as ['SIGTERM', 'SIGINT']")
    names: list[str] = []
    for item in value:
        if type(item) is int:
            try:
                name = signal.Signals(item).name
            except ValueError:
                raise ValueError(f"save_on_signal: {item!r} is not a signal number on this "
                                 "platform") from None
        elif isinstance(item, str):
            if item not in signal.Signals.__members__:
                raise ValueError(f"save_on_signal: unknown signal name {item!r}; use names "
                                 "such as 'SIGTERM', 'SIGUSR1', 'SIGINT'")
            name = item
        else:
            raise ValueError(f"save_on_signal: {item!r} is neither a signal name nor a signal "
                             "number")
        if name in _UNCATCHABLE:
            raise ValueError(f"save_on_signal: {name} cannot be caught by a process")
        if name not in names:
            names.append(name)
    return tuple(names)


class TrainSettings(_Strict):
    """Training settings of a ``train`` call, saved and used as a resumed handler's defaults."""

    validate_every: Annotated[int, Field(ge=1)] = 1
    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 1
    use_amp: bool = False
    gradient_clipping_norm: Annotated[float, Field(gt=0)] | None = None
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None


class LoaderConfig(_Strict):
    """Arguments of ``set_train_loader`` / ``set_val_loader`` that nnhandler checks itself.

    ``batch_size``, ``shuffle`` and ``drop_last`` nnhandler interprets (it provides the
    sampler). The ``DataLoader`` arguments below are checked here (``None``: not given, the
    ``DataLoader`` default applies) and passed on; any other keyword argument goes to
    ``torch.utils.data.DataLoader`` unchanged, which names one it does not know.
    """

    batch_size: Annotated[int, Field(ge=1)] = 1
    shuffle: bool = False
    drop_last: bool = False
    num_workers: Annotated[int, Field(ge=0)] | None = None
    pin_memory: bool | None = None
    persistent_workers: bool | None = None
    prefetch_factor: Annotated[int, Field(ge=1)] | None = None
    timeout: Annotated[float, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _workers_rules(self) -> LoaderConfig:
        workers = self.num_workers or 0
        if workers == 0 and self.persistent_workers:
            raise ValueError("persistent_workers=True needs num_workers > 0 (worker processes "
                             f"to keep); num_workers is {self.num_workers!r}")
        if workers == 0 and self.prefetch_factor is not None:
            raise ValueError(f"prefetch_factor={self.prefetch_factor} needs num_workers > 0 "
                             f"(it counts batches per worker); num_workers is "
                             f"{self.num_workers!r}")
        if workers == 0 and self.timeout:
            raise ValueError(f"timeout={self.timeout} needs num_workers > 0 (it bounds the wait "
                             f"for a worker's batch); num_workers is {self.num_workers!r}")
        return self

    def dataloader_arguments(self) -> dict[str, Any]:
        """The checked ``DataLoader`` arguments that were given (``batch_size``, ``shuffle``
        and ``drop_last`` excluded: nnhandler applies those through its sampler)."""
        return {name: getattr(self, name) for name in _DATALOADER_FIELDS
                if getattr(self, name) is not None}


_DATALOADER_FIELDS = ("num_workers", "pin_memory", "persistent_workers", "prefetch_factor",
                      "timeout")


def _fsdp_unit(value: type) -> type:
    from torch import nn  # at validation, not import (nnhandler verify/list run without torch)

    if not issubclass(value, nn.Module):
        raise ValueError(f"should be a subclass of Module (torch.nn.Module), got {value!r}")
    return value


class ParallelConfig(_Strict):
    """How the handler distributes its model (``NNHandler(parallelism=..., fsdp_units=...)``).

    ``"ddp"`` (default): ``DistributedDataParallel`` under torchrun/SLURM, the plain model in one
    process. ``"fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every submodule that
    is an instance of one of ``fsdp_units``, then on the root; needs a process group.
    ``"none"``: the model is used as constructed (one that places its own DTensors, or a single
    process that reads a sharded checkpoint).
    """

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid",
                              arbitrary_types_allowed=True)

    parallelism: Parallelism = "ddp"
    fsdp_units: Annotated[tuple[Annotated[type, AfterValidator(_fsdp_unit)], ...],
                          Field(strict=False)] = ()

    @model_validator(mode="after")
    def _units_need_fsdp(self) -> ParallelConfig:
        if self.fsdp_units and self.parallelism != "fsdp":
            raise ValueError(f"fsdp_units={self.fsdp_units!r} given with "
                             f"parallelism={self.parallelism!r}; they apply only to 'fsdp'")
        return self


# ---------------------------------------------------------------------- call arguments ---------
M = TypeVar("M", bound=BaseModel)


def validate_call(model: type[M], call: str, arguments: Mapping[str, Any]) -> M:
    """``arguments`` of ``call`` as an instance of ``model``, or a
    :class:`~nnhandler.ConfigurationError` naming the call, each bad argument and its value.

    Used at the start of every public call, before it changes anything (a rejected call leaves
    the handler exactly as it was). The pydantic error is kept as the ``__cause__``.
    """
    try:
        return model.model_validate(dict(arguments))
    except ValidationError as error:
        problems = []
        for item in error.errors():
            location = item["loc"]
            name = ".".join(str(part) for part in location)
            if len(location) == 1 and location[0] in arguments:
                value = arguments[str(location[0])]
            else:
                value = item.get("input")
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = (f"unknown argument (accepted: "
                           f"{', '.join(sorted(model.model_fields))})")
            problems.append(f"{call}({name}={value!r}): {message}" if location
                            else f"{call}: {message}")
        raise ConfigurationError("; ".join(problems)) from error


def _non_negative_int(name: str, value: Any) -> Any:
    if value is not None and (type(value) is not int or value < 0):
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _path_like(name: str, value: Any, *, optional: bool = False) -> Any:
    if optional and value is None:
        return value
    if not isinstance(value, (str, os.PathLike)) or isinstance(value, bytes):
        allowed = "a str, an os.PathLike or None" if optional else "a str or an os.PathLike"
        raise ValueError(f"{name} must be {allowed}, got {type(value).__qualname__}")
    if not os.fspath(value):
        raise ValueError(f"{name} must not be empty")
    return value


def _module_class(name: str, value: Any) -> Any:
    from torch import nn  # here, not at import: nnhandler verify/list read configs without torch

    if not (inspect.isclass(value) and issubclass(value, nn.Module)):
        raise ValueError(f"{name} must be an nn.Module subclass, got {value!r}")
    return value


class TrainCall(_Strict):
    """The arguments of :meth:`NNHandler.train` besides its training settings (those are a
    :class:`TrainSettings` of the explicitly passed values)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid",
                              arbitrary_types_allowed=True)

    epochs: int | None = None
    until_epoch: int | None = None
    progress_bar: bool = True
    resume: Any = None

    @field_validator("epochs", "until_epoch", mode="before")
    @classmethod
    def _epoch_counts(cls, value: Any, info: Any) -> Any:
        return _non_negative_int(info.field_name, value)

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_rule(cls, value: Any) -> Any:
        return _path_like("resume", value, optional=True)

    @model_validator(mode="after")
    def _one_target(self) -> TrainCall:
        if (self.epochs is None) == (self.until_epoch is None):
            raise ValueError("pass exactly one of epochs (additional epochs) or until_epoch "
                             f"(absolute); got epochs={self.epochs!r}, "
                             f"until_epoch={self.until_epoch!r}")
        return self


class ResumeCall(_Strict):
    """The arguments of :meth:`NNHandler.resume_from`."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid",
                              arbitrary_types_allowed=True)

    path: Any
    verify: bool = True
    storage_options: Annotated[dict[str, Any], Field(strict=False)] | None = None

    @field_validator("path", mode="before")
    @classmethod
    def _path_rule(cls, value: Any) -> Any:
        return _path_like("path", value)


class LoadOptions(_Strict):
    """The keyword arguments of :meth:`NNHandler.load` (and of ``load_latest``) besides
    ``device``, checked before any file is read. ``callbacks`` and ``fsdp_units`` become
    tuples."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid",
                              arbitrary_types_allowed=True)

    skip_optimizer: bool = False
    skip_scheduler: bool = False
    skip_history: bool = False
    skip_ema: bool = False
    skip_callbacks: bool = False
    callbacks: tuple[Any, ...] | None = None
    model_class: Any = None
    model_kwargs: Any = None
    strict: bool = True
    verify: bool = True
    logger_mode: Any = LoggingMode.CONSOLE
    log_file: Any = "nnhandler.log"
    use_distributed: bool | None = None
    parallelism: Parallelism | None = None
    fsdp_units: tuple[Any, ...] | None = None
    compile_model: bool | dict[str, Any] | None = None
    #: fsspec's options for a checkpoint at a URL (docs page "Object storage")
    storage_options: dict[str, Any] | None = None
    # ``device`` is checked by the handler (availability included); it is accepted here so
    # that load_latest can check all of its keyword arguments at once
    device: Any = None

    @field_validator("callbacks", mode="before")
    @classmethod
    def _callbacks_rule(cls, value: Any) -> Any:
        from .callbacks.base import Callback

        if value is None:
            return value
        if isinstance(value, Callback):
            raise ValueError("callbacks must be a list of Callback instances, got a single "
                             f"callback {value!r}: pass [{type(value).__qualname__}(...)]")
        if isinstance(value, (str, bytes, Mapping)) or not _iterable(value):
            raise ValueError("callbacks must be None or a list of Callback instances, got "
                             f"{value!r}")
        items = tuple(value)
        for index, item in enumerate(items):
            if not isinstance(item, Callback):
                raise ValueError(f"callbacks[{index}] = {item!r} is not an nnhandler.Callback")
        return items

    @field_validator("model_class", mode="before")
    @classmethod
    def _model_class_rule(cls, value: Any) -> Any:
        return None if value is None else _module_class("model_class", value)

    @field_validator("model_kwargs", mode="before")
    @classmethod
    def _model_kwargs_rule(cls, value: Any) -> Any:
        if value is None:
            return value
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"model_kwargs must be None or a mapping with str keys, got "
                             f"{value!r}")
        return dict(value)

    @field_validator("logger_mode", mode="before")
    @classmethod
    def _logger_mode_rule(cls, value: Any) -> Any:
        if isinstance(value, LoggingMode):
            return value
        if isinstance(value, str) and value in {mode.value for mode in LoggingMode}:
            return value
        choices = ", ".join(f"NNHandler.LoggingMode.{mode.name}" for mode in LoggingMode)
        raise ValueError(f"logger_mode must be one of {choices} (or their values "
                         f"{[mode.value for mode in LoggingMode]}), got {value!r}")

    @field_validator("log_file", mode="before")
    @classmethod
    def _log_file_rule(cls, value: Any) -> Any:
        return _path_like("log_file", value)

    @field_validator("fsdp_units", mode="before")
    @classmethod
    def _fsdp_units_rule(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, (str, bytes)) or inspect.isclass(value) or not _iterable(value):
            raise ValueError(f"fsdp_units must be None or a list of nn.Module subclasses, got "
                             f"{value!r}")
        return tuple(_module_class(f"fsdp_units[{index}]", unit)
                     for index, unit in enumerate(value))


def _iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True
