"""State providers for the handler's own components (model, optimizer, RNG, history …)."""

from .history import History, Progress
from .modules import ComponentState, ModelState, unwrap_model
from .rng import RNGState, seed_everything

__all__ = [
    "ComponentState",
    "History",
    "ModelState",
    "Progress",
    "RNGState",
    "seed_everything",
    "unwrap_model",
]
