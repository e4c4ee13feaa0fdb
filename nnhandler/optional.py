"""Optional dependencies: import them on demand, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

__all__ = ["require"]


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``; a :class:`~nnhandler.MissingDependencyError` naming
    ``pip install nnhandler[extra]`` when it (or a package it needs) is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(
            f"{feature} needs the optional dependency {error.name or module!r}, which is not "
            f"installed: pip install nnhandler[{extra}]"
        ) from error
