"""The options of an auto-save, defined once for ``AutoSaveCallback(...)`` and
``NNHandler.auto_save(...)``.

The seed's four parameters — ``interval, save_path, name, overwrite`` — are positional; every
other option is keyword-only (:class:`AutoSaveOptions`). Retention and emergency saves can be
given as small objects::

    handler.auto_save(5, "ck", keep=Retention(last=3, best=2, monitor="val_loss"),
                      emergency=EmergencySaves(on_signal=True))

or as today's flat keywords (``keep_last=3, keep_best=2, monitor="val_loss"``,
``save_on_signal=True``); one group given both ways is a :class:`~nnhandler.ConfigurationError`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Annotated, Any, Final, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from ..checkpoint.storage import location_of, store_for
from ..config import AutoSaveConfig, MonitorMode, SaveErrorPolicy
from ..errors import ConfigurationError

__all__ = ["AutoSaveOptions", "EmergencySaves", "Retention", "auto_save_config", "options_repr"]


class _Option(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


class Retention(_Option):
    """Which of an auto-saver's checkpoints are kept (``keep=Retention(...)``); a file is kept
    when any rule keeps it, and the newest is always kept. See docs/retention.md.

    Args:
        last: the N most recent auto-saves (``keep_last``).
        best: the K with the best ``monitor`` value (``keep_best``; needs ``monitor``).
        monitor: the log key ``best`` ranks by, e.g. ``"val_loss"``.
        mode: ``"min"`` (lower is better) or ``"max"``.
        every: the auto-saves of epochs that are multiples of E, forever (``keep_every``).
    """

    last: Annotated[int, Field(ge=1)] | None = None
    best: Annotated[int, Field(ge=1)] | None = None
    monitor: Annotated[str, Field(min_length=1)] | None = None
    mode: MonitorMode = "min"
    every: Annotated[int, Field(ge=1)] | None = None

    def keywords(self) -> dict[str, Any]:
        """The same rules as the flat keywords of ``auto_save``."""
        return {"keep_last": self.last, "keep_best": self.best, "monitor": self.monitor,
                "mode": self.mode, "keep_every": self.every}


class EmergencySaves(_Option):
    """Emergency checkpoints (``emergency=EmergencySaves(...)``), see "Preemption and mid-epoch
    resume" in docs/resuming.md.

    Args:
        on_signal: ``True`` (SIGTERM and SIGUSR1) or a list of signal names/numbers
            (``save_on_signal``).
        on_exception: write one when an exception escapes an epoch (``save_on_exception``).
    """

    on_signal: bool | list[str | int] | tuple[str | int, ...] = False
    on_exception: bool = False

    def keywords(self) -> dict[str, Any]:
        return {"save_on_signal": self.on_signal, "save_on_exception": self.on_exception}


class AutoSaveOptions(TypedDict, total=False):
    """The keyword-only options of ``AutoSaveCallback(...)`` and ``NNHandler.auto_save(...)``
    (documented on :class:`~nnhandler.AutoSaveCallback`)."""

    on_save_error: SaveErrorPolicy
    async_save: bool
    keep: Retention | None
    keep_last: int | None
    keep_best: int | None
    monitor: str | None
    mode: MonitorMode
    keep_every: int | None
    emergency: EmergencySaves | None
    save_on_signal: bool | list[str | int] | tuple[str | int, ...]
    save_on_exception: bool
    #: for a URL ``save_path``: passed to fsspec (``endpoint_url``, ``key``, ``secret`` …);
    #: never saved in a checkpoint, as it may hold credentials
    storage_options: Mapping[str, Any] | None


_GROUPS: Final[dict[str, tuple[type[_Option], tuple[str, ...]]]] = {
    "keep": (Retention, ("keep_last", "keep_best", "monitor", "mode", "keep_every")),
    "emergency": (EmergencySaves, ("save_on_signal", "save_on_exception")),
}
_OPTIONS: Final = frozenset(AutoSaveOptions.__annotations__)


def auto_save_config(interval: int | None, save_path: str | os.PathLike[str], name: str,
                     overwrite: bool, options: Mapping[str, Any]) -> AutoSaveConfig:
    """The validated configuration for the positional settings and keyword ``options`` of
    ``AutoSaveCallback(...)`` / ``NNHandler.auto_save(...)``: a group object (``keep=``,
    ``emergency=``) is flattened into the keywords it stands for."""
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        hints = {key: difflib.get_close_matches(key, sorted(_OPTIONS), n=1) for key in unknown}
        raise ConfigurationError(
            "unknown auto-save option(s) " + ", ".join(
                f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                for key, hint in hints.items())
            + f"; the options are {sorted(_OPTIONS)}")
    flat = {key: value for key, value in options.items() if key not in _GROUPS}
    for group, (kind, keywords) in _GROUPS.items():
        value = options.get(group)
        if value is None:
            continue
        if not isinstance(value, kind):
            raise ConfigurationError(
                f"{group}={value!r}: pass a {kind.__name__}(...) (from nnhandler), or the flat "
                f"keywords {', '.join(keywords)}")
        both = [keyword for keyword in keywords if keyword in flat]
        if both:
            raise ConfigurationError(
                f"{group}={value!r} and {', '.join(f'{k}={flat[k]!r}' for k in both)} set the "
                f"same options twice: give them either as {group}={kind.__name__}(...) or as "
                "flat keywords")
        flat.update(value.keywords())  # type: ignore[attr-defined]
    if not isinstance(save_path, (str, os.PathLike)):
        raise ConfigurationError(f"save_path={save_path!r}: give a directory path (str or "
                                 "os.PathLike)")
    if flat.get("storage_options") is not None:
        flat["storage_options"] = dict(flat["storage_options"])
    config = AutoSaveConfig(interval=interval, save_path=location_of(save_path), name=name,
                            overwrite=overwrite, **flat)
    # a URL without nnhandler[remote], or options for a local path: refused now, not at a save
    store_for(config.save_path, config.storage_options)
    return config


def options_repr(c: AutoSaveConfig) -> str:
    """The arguments that configure ``c``, as an auto-saver's ``repr`` shows them (retention
    rules only where set)."""
    rules = "".join(f", {name}={value!r}" for name, value in (
        *c.retention_arguments().items(), ("monitor", c.monitor), ("mode", c.mode))
        if value is not None and (name != "mode" or c.keep_best is not None))
    return (
        f"interval={c.interval!r}, save_path={str(c.save_path)!r}, "
        f"name={c.name!r}, overwrite={c.overwrite!r}, on_save_error={c.on_save_error!r}, "
        f"async_save={c.async_save!r}, save_on_signal={c.save_on_signal!r}, "
        f"save_on_exception={c.save_on_exception!r}{rules}"
    )
