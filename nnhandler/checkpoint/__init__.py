"""Checkpoint envelope, atomic writer and safe loader.

The names below are imported on first use (:mod:`nnhandler.lazy`): reading an integrity record
or a retention index (``nnhandler list``/``verify``) imports this package, never torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .envelope import read_checkpoint, write_checkpoint
    from .format import FORMAT_NAME, FORMAT_VERSION, Checkpoint
    from .writer import TEMP_INFIX, atomic_write

_EXPORTS = {
    "FORMAT_NAME": ".format",
    "FORMAT_VERSION": ".format",
    "Checkpoint": ".format",
    "read_checkpoint": ".envelope",
    "write_checkpoint": ".envelope",
    "TEMP_INFIX": ".writer",
    "atomic_write": ".writer",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TEMP_INFIX",
    "Checkpoint",
    "atomic_write",
    "read_checkpoint",
    "write_checkpoint",
]
