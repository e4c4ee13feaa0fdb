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
        every: the auto-saves of epochs that are multiples of E, forever (``keep_every``;
            end-of-epoch saves only).
        every_n_steps: the auto-saves at optimizer steps that are multiples of S, forever
            (``keep_every_n_steps``; end-of-epoch and mid-epoch saves alike).
    """

    last: Annotated[int, Field(ge=1)] | None = None
    best: Annotated[int, Field(ge=1)] | None = None
    monitor: Annotated[str, Field(min_length=1)] | None = None
    mode: MonitorMode = "min"
    every: Annotated[int, Field(ge=1)] | None = None
    every_n_steps: Annotated[int, Field(ge=1)] | None = None

    def keywords(self) -> dict[str, Any]:
        """The same rules as the flat keywords of ``auto_save``."""
        return {"keep_last": self.last, "keep_best": self.best, "monitor": self.monitor,
                "mode": self.mode, "keep_every": self.every,
                "keep_every_n_steps": self.every_n_steps}


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
    """The keyword-only options of :class:`~nnhandler.AutoSaveCallback` and
    :meth:`NNHandler.auto_save <nnhandler.NNHandler.auto_save>` (after the positional
    ``interval, save_path, name, overwrite``).

    Keyword Args:
        every_n_steps: also save after every optimizer step (after gradient accumulation)
            whose absolute number, counted across resumes, is a multiple of S (a positive
            int). Such a save inside an epoch records the partial epoch, so loading it
            continues the epoch from its next batch exactly.
        every_seconds: also save once this many seconds of training time (a finite number,
            at least 1.0) have passed since this callback's last scheduled save: wall-clock
            time inside ``train``, validation and saving included, between calls excluded;
            carried across resumes in the callback's state. Under DDP rank 0's clock decides
            and every rank saves at the same step. The three schedules combine (a save when
            any fires, never two for one step; one due at an epoch's last step is made at the
            epoch's end); see ``nnhandler.callbacks.autosave_schedule``.
        on_save_error: what a failed save (full disk, I/O or permission error, a provider
            whose ``state_dict`` raises) does. ``"warn"`` (default): the error is logged, the
            previous checkpoint stays intact, training goes on, the next scheduled save tries
            again (with ``interval=-1``, whose save after the last epoch has no next one, the end
            of ``train`` tries it once more; each failed attempt counts), and the end of
            ``train`` reports how many saves failed. ``"raise"``: the
            error propagates and ends ``train``. Either way no partial file is left.
        async_save: write in the background. Training pays only for a snapshot of the state
            into host memory (pinned for CUDA tensors; the buffers are allocated once and
            reused for every save of a ``train`` call); a writer thread then serialises,
            checksums and writes the file under the same atomicity rules. At most one write is
            in flight: a save that comes while the previous write runs waits for it (a
            scheduled save is never skipped; the end of ``train`` logs how many waited, and
            how long). A background failure is reported at the next epoch end (or save, or the
            end of ``train``) and follows ``on_save_error``. ``train`` returns only once every
            file it saved is durable (under DDP every rank waits for rank 0's write); an
            exception or ``KeyboardInterrupt`` waits for the write in flight too, and so does
            interpreter exit (:meth:`~nnhandler.AutoSaveCallback.flush` waits by hand).
            ``on_checkpoint_saved`` fires when the file is durable.
        save_on_signal: ``True`` (SIGTERM and SIGUSR1) or a list of signal names/numbers
            (``["SIGTERM", "SIGINT"]``): on such a signal the current step finishes, training
            stops (under DDP every rank after the same step), an emergency checkpoint
            ``preempted_ep{epoch:03d}_b{batches:05d}.pth`` is written synchronously into
            ``save_path`` (or, when this callback has just saved at that very step, that file
            is it) and ``train`` returns normally with ``handler.preempted == True``. It
            records the position inside the epoch, so a resumed run continues from the next
            batch exactly. Works with no schedule too (emergency checkpoints only). See
            :mod:`nnhandler.preemption`.
        save_on_exception: when an exception (``KeyboardInterrupt`` too) escapes an epoch's
            batches or its validation, write ``exception_ep…_b….pth`` with the state as of the
            last completed batch, then let the exception propagate unchanged (a failed
            emergency save is a note on it). Single process only: under DDP it does nothing
            (a warning says so when ``train`` starts).
        keep_last: keep the N auto-saves this callback wrote most recently.
        keep_best: keep the K auto-saves with the best ``monitor`` value (required with it).
            A value missing from the logs (an epoch that did not validate; ``val_*`` inside an
            epoch), NaN or infinite is never best; ties go to the earlier epoch. Inside an
            epoch the value is the running mean so far.
        monitor: the log key ``keep_best`` ranks by, e.g. ``"val_loss"``.
        mode: ``"min"`` (default): lower is better; ``"max"``: higher is better.
        keep_every: keep the end-of-epoch auto-saves of epochs that are multiples of E forever.
        keep_every_n_steps: keep the auto-saves at optimizer steps that are multiples of S
            forever (end-of-epoch and mid-epoch ones alike).
        keep: the retention rules as one object, ``keep=Retention(last=3, best=2,
            monitor="val_loss", mode="min", every=10, every_n_steps=1000)`` (the same rules as
            the six keywords above, which it excludes).
        emergency: the emergency checkpoints as one object,
            ``emergency=EmergencySaves(on_signal=True, on_exception=False)`` (instead of
            ``save_on_signal`` / ``save_on_exception``).
    """

    every_n_steps: int | None
    every_seconds: float | None
    on_save_error: SaveErrorPolicy
    async_save: bool
    keep: Retention | None
    keep_last: int | None
    keep_best: int | None
    monitor: str | None
    mode: MonitorMode
    keep_every: int | None
    keep_every_n_steps: int | None
    emergency: EmergencySaves | None
    save_on_signal: bool | list[str | int] | tuple[str | int, ...]
    save_on_exception: bool
    #: for a URL ``save_path``: passed to fsspec (``endpoint_url``, ``key``, ``secret`` …);
    #: never saved in a checkpoint, as it may hold credentials; with ``mirror``, the mirror's
    storage_options: Mapping[str, Any] | None
    #: an fsspec URL (``s3://bucket/run``) that each completed local checkpoint is uploaded to
    #: in the background, under the same retention (see
    #: ``nnhandler.callbacks.autosave_mirror``)
    mirror: str | None


_GROUPS: Final[dict[str, tuple[type[_Option], tuple[str, ...]]]] = {
    "keep": (Retention, ("keep_last", "keep_best", "monitor", "mode", "keep_every",
                         "keep_every_n_steps")),
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
    store_for(config.save_path, config.save_path_options)
    if config.mirror is not None:
        store_for(config.mirror, config.storage_options)
    return config


def options_repr(c: AutoSaveConfig) -> str:
    """The arguments that configure ``c``, as an auto-saver's ``repr`` shows them (step and
    time triggers and retention rules only where set)."""
    rules = "".join(f", {name}={value!r}" for name, value in (
        *c.retention_arguments().items(), ("monitor", c.monitor), ("mode", c.mode))
        if value is not None and (name != "mode" or c.keep_best is not None))
    triggers = "".join(f", {name}={value!r}" for name, value in (
        ("every_n_steps", c.every_n_steps), ("every_seconds", c.every_seconds))
        if value is not None)
    return (
        f"interval={c.interval!r}{triggers}, save_path={str(c.save_path)!r}, "
        f"name={c.name!r}, overwrite={c.overwrite!r}, on_save_error={c.on_save_error!r}, "
        f"async_save={c.async_save!r}, save_on_signal={c.save_on_signal!r}, "
        f"save_on_exception={c.save_on_exception!r}{rules}"
        + ("" if c.mirror is None else f", mirror={str(c.mirror)!r}")
    )
