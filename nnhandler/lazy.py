"""Lazy public names for a package's ``__init__`` (PEP 562).

``import nnhandler`` must stay cheap: the ``nnhandler`` command's ``list`` and ``verify`` read
checkpoint files without torch, and the console script imports the package first. A package
names each public object and the submodule that defines it; the submodule is imported on the
first access of one of its names (``from nnhandler import NNHandler`` works as before), and
type checkers and IDEs read the same names from the package's ``if TYPE_CHECKING:`` imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str], namespace: dict[str, Any],
                 ) -> tuple[Callable[[str], Any], Callable[[], Iterable[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``: ``exports`` maps each public
    name to the submodule (relative, e.g. ``".handler"``) that defines it; ``namespace`` is the
    package's ``globals()``, where an imported name is cached so it is looked up once."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> Iterable[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
