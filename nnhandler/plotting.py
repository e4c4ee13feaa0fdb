"""PNG plots of a handler's history (matplotlib, the optional extra ``plot``).

Figures are drawn with matplotlib's object API (``matplotlib.figure.Figure``), so no global
backend or pyplot state is touched, and written atomically on rank 0.
"""

from __future__ import annotations

import os
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


def _png_path(path: str | os.PathLike[str], what: str) -> Path:
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ConfigurationError(f"{what}: {str(target)!r} must end in .png (the plot is a PNG)")
    return target


def build_figure(logs: Sequence[dict[str, Any]], panels: Sequence[str]) -> Any:
    """A ``matplotlib.figure.Figure`` with one panel per key of ``panels``: the training values
    (``key``) and the validation values (``val_<key>``) of ``logs`` against the epoch."""
    figure_module = require("matplotlib.figure", extra="plot", feature="plotting")
    figure = figure_module.Figure(figsize=(7, 3.2 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    for axis, key in zip(axes, panels, strict=True):
        _draw(axis, logs, key)
    return figure


def _plot(handler: NNHandler, target: Path, panels: Sequence[str]) -> Path:
    """Draw and write on rank 0 only (every rank checks that matplotlib is there)."""
    require("matplotlib.figure", extra="plot", feature="plotting")

    def write() -> None:
        figure = build_figure(handler.history, panels)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda file: figure.savefig(file, format="png", dpi=100))

    run_on_rank_zero(handler.distributed, write)
    return target


def _draw(axis: Any, logs: Sequence[dict[str, Any]], key: str) -> None:
    for label, name, style in (("train", key, "-"), ("validation", f"val_{key}", "o-")):
        epochs, values = _series(logs, name)
        if epochs:
            axis.plot(epochs, values, style, label=label, markersize=3)
    axis.set_title(key)
    axis.set_xlabel("epoch")
    axis.grid(alpha=0.3)
    axis.legend()


def plot_losses(handler: NNHandler, path: str | os.PathLike[str]) -> Path:
    """Training and validation loss per epoch, as a PNG at ``path``."""
    target = _png_path(path, "plot_losses")
    if not handler.history:
        raise ConfigurationError("plot_losses: no epoch in the history yet; train first")
    return _plot(handler, target, ["loss"])


def plot_metrics(
    handler: NNHandler, path: str | os.PathLike[str], names: Sequence[str] | None = None
) -> Path:
    """One panel per metric (training and validation values per epoch), as a PNG at ``path``.

    ``names`` selects metrics (default: every metric in the history, in the order added).
    """
    target = _png_path(path, "plot_metrics")
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
    return _plot(handler, target, list(names))
