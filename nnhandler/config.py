"""Validated (pydantic, strict) configuration for everything a user hands to nnhandler."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from .naming import validate_template

__all__ = ["AutoSaveConfig", "LoaderConfig", "MonitorMode", "ParallelConfig", "Parallelism",
           "SaveErrorPolicy", "TrainSettings"]

SaveErrorPolicy = Literal["warn", "raise"]
MonitorMode = Literal["min", "max"]
Parallelism = Literal["ddp", "fsdp", "none"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


class AutoSaveConfig(_Strict):
    """Configuration of an :class:`~nnhandler.AutoSaveCallback` (see its docstring for rules)."""

    interval: int | None = None
    save_path: Annotated[Path, Field(strict=False)] = Path(".")
    name: str = "model_epoch{epoch:02d}"
    overwrite: bool = False
    on_save_error: SaveErrorPolicy = "warn"
    async_save: bool = False
    keep_last: Annotated[int, Field(ge=1)] | None = None
    keep_best: Annotated[int, Field(ge=1)] | None = None
    monitor: Annotated[str, Field(min_length=1)] | None = None
    mode: MonitorMode = "min"
    keep_every: Annotated[int, Field(ge=1)] | None = None
    save_on_signal: bool | tuple[str, ...] = False
    save_on_exception: bool = False

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

    @field_validator("save_path")
    @classmethod
    def _save_path_rule(cls, value: Path) -> Path:
        if value.exists() and not value.is_dir():
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
        return self

    def retention_arguments(self) -> dict[str, int]:
        """The ``keep_*`` rules that are set (empty: every auto-save is kept)."""
        return {name: value for name, value in (("keep_last", self.keep_last),
                                                ("keep_best", self.keep_best),
                                                ("keep_every", self.keep_every))
                if value is not None}

    @property
    def enabled(self) -> bool:
        return bool(self.interval)

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
            "save_on_signal": (self.save_on_signal if isinstance(self.save_on_signal, bool)
                               else list(self.save_on_signal)),
            "save_on_exception": self.save_on_exception,
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
    """Arguments of ``set_train_loader`` / ``set_val_loader`` that nnhandler interprets itself.

    Other keyword arguments go to ``torch.utils.data.DataLoader`` unchanged.
    """

    batch_size: Annotated[int, Field(ge=1)] = 1
    shuffle: bool = False
    drop_last: bool = False


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
    fsdp_units: Annotated[tuple[type[nn.Module], ...], Field(strict=False)] = ()

    @model_validator(mode="after")
    def _units_need_fsdp(self) -> ParallelConfig:
        if self.fsdp_units and self.parallelism != "fsdp":
            raise ValueError(f"fsdp_units={self.fsdp_units!r} given with "
                             f"parallelism={self.parallelism!r}; they apply only to 'fsdp'")
        return self
