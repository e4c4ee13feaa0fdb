"""nnhandler: a PyTorch training handler whose heart is automatic, crash-safe checkpointing."""

__version__ = "0.1.0"

from .callbacks import (
    AutoSaveCallback,
    Callback,
    CSVLogger,
    EarlyStopping,
    EmergencySaves,
    LearningRateMonitor,
    Retention,
    TensorBoardLogger,
)
from .checkpoint import Checkpoint, read_checkpoint
from .errors import (
    CallbackValidationError,
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointIndexError,
    CheckpointSchemaError,
    ConfigurationError,
    DuplicateStateKeyError,
    MissingDependencyError,
    NoCheckpointFoundError,
    PluginError,
    UnresolvableReferenceError,
)
from .events import Event
from .handler import NNHandler
from .logging import LoggingMode
from .plugins import PluginRegistry, discover_plugins
from .preemption import PreemptionReport
from .state import RestoreResult, StateProvider

__all__ = [
    "AutoSaveCallback",
    "CSVLogger",
    "Callback",
    "CallbackValidationError",
    "Checkpoint",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointIndexError",
    "CheckpointSchemaError",
    "ConfigurationError",
    "DuplicateStateKeyError",
    "EarlyStopping",
    "EmergencySaves",
    "Event",
    "LearningRateMonitor",
    "LoggingMode",
    "MissingDependencyError",
    "NNHandler",
    "NoCheckpointFoundError",
    "PluginError",
    "PluginRegistry",
    "PreemptionReport",
    "RestoreResult",
    "Retention",
    "StateProvider",
    "TensorBoardLogger",
    "UnresolvableReferenceError",
    "__version__",
    "discover_plugins",
    "read_checkpoint",
]
