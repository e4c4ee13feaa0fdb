"""State providers for the handler's own components (model, optimizer, RNG, history …)."""

from .history import History, Progress
from .modules import ComponentState, ModelState, unwrap_model
from .position import EpochPosition, PartialEpoch
from .rng import RNGState, seed_everything

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
