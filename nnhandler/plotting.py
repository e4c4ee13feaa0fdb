"""Plots of a handler's history (matplotlib, the optional extra ``plot``).

Figures are drawn with matplotlib's object API (``matplotlib.figure.Figure``), so no global
backend or pyplot state is touched, and written as PNGs atomically on rank 0; without a path
the figure itself is returned (a notebook displays it). Only ``show=True`` goes through
pyplot, which then manages the figure and shows it on rank 0.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint.writer import atomic_write
from .distributed import run_on_rank_zero
from .errors import ConfigurationError
from .optional import require

if TYPE_CHECKING:
    from .handler import NNHandler

__all__ = ["build_figure", "plot_losses", "plot_metrics"]


def _series(logs: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(epochs, values)`` of the epochs whose logs hold ``key``."""
    pairs = [(int(entry["epoch"]), float(entry[key])) for entry in logs
             if isinstance(entry.get(key), (int, float)) and not isinstance(entry[key], bool)]
    return [e for e, _ in pairs], [v for _, v in pairs]


_PathArgument = str | os.PathLike[str] | bool | None


def _request(path: _PathArgument, log_y_scale: bool, show: bool,
             what: str) -> tuple[Path | None, bool]:
    """``(PNG path or None, log_y_scale)`` of a plot call, checked. A bool in the path's place
    is the original NNHandler's first argument, ``log_y_scale``."""
    for name, flag in (("log_y_scale", log_y_scale), ("show", show)):
        if not isinstance(flag, bool):
            raise ConfigurationError(f"{what}({name}={flag!r}): must be True or False")
    if isinstance(path, bool):
        warnings.warn(f"{what}({path}): the original NNHandler's first argument was log_y_scale; "
                      f"write {what}(log_y_scale={path}) (and pass a .png path first to write "
                      "a file)", DeprecationWarning, stacklevel=4)
        return None, path or log_y_scale
    if path is None:
        return None, log_y_scale
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigurationError(f"{what}(path={path!r}): a .png path (str or os.PathLike), or "
                                 "None for the matplotlib Figure")
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ConfigurationError(f"{what}: {str(target)!r} must end in .png (the plot is a PNG)")
    return target, log_y_scale


def build_figure(logs: Sequence[dict[str, Any]], panels: Sequence[str],
                 log_y_scale: bool = False, pyplot: bool = False) -> Any:
    """A ``matplotlib.figure.Figure`` with one panel per key of ``panels``: the training values
    (``key``) and the validation values (``val_<key>``) of ``logs`` against the epoch, on a
    logarithmic y axis with ``log_y_scale``. ``pyplot=True`` creates it through pyplot (which
    then manages it, so that ``pyplot.show()`` shows it)."""
    size = (7, 3.2 * len(panels))
    if pyplot:
        plt = require("matplotlib.pyplot", extra="plot", feature="plotting")
        figure = plt.figure(figsize=size, layout="constrained")
    else:
        figure_module = require("matplotlib.figure", extra="plot", feature="plotting")
        figure = figure_module.Figure(figsize=size, layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    for axis, key in zip(axes, panels, strict=True):
        _draw(axis, logs, key)
        if log_y_scale:
            axis.set_yscale("log")
    return figure


def _plot(handler: NNHandler, target: Path | None, panels: Sequence[str], log_y_scale: bool,
          show: bool) -> Any:
    """The figure, written to ``target`` on rank 0 only (every rank checks that matplotlib
    is there) and shown there with ``show``; returns ``target``, or the figure without one."""
    require("matplotlib.figure", extra="plot", feature="plotting")
    figure = build_figure(handler.history, panels, log_y_scale,
                          pyplot=show and handler.distributed.is_main)
    if target is not None:
        def write() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, lambda file: figure.savefig(file, format="png", dpi=100))

        run_on_rank_zero(handler.distributed, write)
    if show and handler.distributed.is_main:
        require("matplotlib.pyplot", extra="plot", feature="plotting").show()
    return figure if target is None else target


def _draw(axis: Any, logs: Sequence[dict[str, Any]], key: str) -> None:
    for label, name, style in (("train", key, "-"), ("validation", f"val_{key}", "o-")):
        epochs, values = _series(logs, name)
        if epochs:
            axis.plot(epochs, values, style, label=label, markersize=3)
    axis.set_title(key)
    axis.set_xlabel("epoch")
    axis.grid(alpha=0.3)
    axis.legend()


def plot_losses(handler: NNHandler, path: _PathArgument = None, *, log_y_scale: bool = False,
                show: bool = False) -> Any:
    """Training and validation loss per epoch: a PNG at ``path`` (returned), or the figure."""
    target, log_y_scale = _request(path, log_y_scale, show, "plot_losses")
    if not handler.history:
        raise ConfigurationError("plot_losses: no epoch in the history yet; train first")
    return _plot(handler, target, ["loss"], log_y_scale, show)


def plot_metrics(handler: NNHandler, path: _PathArgument = None,
                 names: Sequence[str] | None = None, *, log_y_scale: bool = False,
                 show: bool = False) -> Any:
    """One panel per metric (training and validation values per epoch): a PNG at ``path``
    (returned), or the figure.

    ``names`` selects metrics (default: every metric in the history, in the order added).
    """
    target, log_y_scale = _request(path, log_y_scale, show, "plot_metrics")
    recorded = list(dict.fromkeys([*handler.train_metrics_history, *handler.val_metrics_history]))
    if names is None:
        names = recorded
        if not names:
            raise ConfigurationError("plot_metrics: the history holds no metric; add_metric(...) "
                                     "and train first (plot_losses plots the loss)")
    unknown = [name for name in names if name not in recorded]
    if unknown or not names:
        raise ConfigurationError(f"plot_metrics: metric(s) {unknown or list(names)} not in the "
                                 f"history (recorded: {recorded})")
    return _plot(handler, target, list(names), log_y_scale, show)
