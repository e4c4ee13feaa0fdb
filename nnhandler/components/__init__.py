"""State providers for the handler's own components (model, optimizer, RNG, history …).

The names below are imported on first use (:mod:`nnhandler.lazy`): the schema checks of
``nnhandler verify`` read :mod:`.history` and :mod:`.rng_record` without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .history import History, Progress
    from .modules import ComponentState, ModelState, unwrap_model
    from .position import EpochPosition, PartialEpoch
    from .rng import RNGState, seed_everything

_EXPORTS = {
    "History": ".history",
    "Progress": ".history",
    "ComponentState": ".modules",
    "ModelState": ".modules",
    "unwrap_model": ".modules",
    "EpochPosition": ".position",
    "PartialEpoch": ".position",
    "RNGState": ".rng",
    "seed_everything": ".rng",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

__all__ = [
    "ComponentState",
    "EpochPosition",
    "History",
    "ModelState",
    "PartialEpoch",
    "Progress",
    "RNGState",
    "seed_everything",
    "unwrap_model",
]
