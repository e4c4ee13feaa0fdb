"""nnhandler: a PyTorch training handler whose heart is automatic, crash-safe checkpointing."""

__version__ = "0.1.0"

from .callbacks import AutoSaveCallback, Callback
from .checkpoint import Checkpoint, read_checkpoint
from .errors import (
    CallbackValidationError,
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointFormatError,
    ConfigurationError,
    DuplicateStateKeyError,
    NoCheckpointFoundError,
    UnresolvableReferenceError,
)
from .events import Event
from .handler import NNHandler
from .logging import LoggingMode
from .state import RestoreResult, StateProvider

__all__ = [
    "AutoSaveCallback",
    "Callback",
    "CallbackValidationError",
    "Checkpoint",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointFormatError",
    "ConfigurationError",
    "DuplicateStateKeyError",
    "Event",
    "LoggingMode",
    "NNHandler",
    "NoCheckpointFoundError",
    "RestoreResult",
    "StateProvider",
    "UnresolvableReferenceError",
    "__version__",
    "read_checkpoint",
]
