"""nnhandler: a PyTorch training handler whose heart is automatic, crash-safe checkpointing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name imports on first use
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

#: each public name and the submodule that defines it (imported when the name is first used:
#: ``nnhandler list``/``verify`` never import torch)
_EXPORTS = {
    "AutoSaveCallback": ".callbacks",
    "Callback": ".callbacks",
    "CSVLogger": ".callbacks",
    "EarlyStopping": ".callbacks",
    "EmergencySaves": ".callbacks",
    "LearningRateMonitor": ".callbacks",
    "Retention": ".callbacks",
    "TensorBoardLogger": ".callbacks",
    "Checkpoint": ".checkpoint",
    "read_checkpoint": ".checkpoint",
    "BackgroundSave": ".checkpointing",
    "Checkpointer": ".checkpointing",
    "Emergency": ".checkpointing",
    "EmergencySaver": ".checkpointing",
    "SavedCheckpoint": ".checkpointing",
    "CallbackValidationError": ".errors",
    "CheckpointCorruptedError": ".errors",
    "CheckpointError": ".errors",
    "CheckpointFormatError": ".errors",
    "CheckpointIndexError": ".errors",
    "CheckpointSchemaError": ".errors",
    "ConfigurationError": ".errors",
    "DuplicateStateKeyError": ".errors",
    "MissingDependencyError": ".errors",
    "NoCheckpointFoundError": ".errors",
    "PluginError": ".errors",
    "RemoteStorageError": ".errors",
    "UnresolvableReferenceError": ".errors",
    "Event": ".events",
    "NNHandler": ".handler",
    "LoggingMode": ".logging",
    "PluginRegistry": ".plugins",
    "discover_plugins": ".plugins",
    "register_provider_factory": ".plugins",
    "PreemptionReport": ".preemption",
    "RestoreResult": ".state",
    "StateProvider": ".state",
    "Trainer": ".trainer",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

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
