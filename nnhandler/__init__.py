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
from .checkpointing import (
    BackgroundSave,
    Checkpointer,
    Emergency,
    EmergencySaver,
    SavedCheckpoint,
)
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
    RemoteStorageError,
    UnresolvableReferenceError,
)
from .events import Event
from .handler import NNHandler
from .logging import LoggingMode
from .plugins import PluginRegistry, discover_plugins, register_provider_factory
from .preemption import PreemptionReport
from .state import RestoreResult, StateProvider
from .trainer import Trainer

__all__ = [
    "AutoSaveCallback",
    "BackgroundSave",
    "CSVLogger",
    "Callback",
    "CallbackValidationError",
    "Checkpoint",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointIndexError",
    "CheckpointSchemaError",
    "Checkpointer",
    "ConfigurationError",
    "DuplicateStateKeyError",
    "EarlyStopping",
    "Emergency",
    "EmergencySaver",
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
    "RemoteStorageError",
    "RestoreResult",
    "Retention",
    "SavedCheckpoint",
    "StateProvider",
    "TensorBoardLogger",
    "Trainer",
    "UnresolvableReferenceError",
    "__version__",
    "discover_plugins",
    "read_checkpoint",
    "register_provider_factory",
]
