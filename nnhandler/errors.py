"""Exception classes of nnhandler.

Configuration mistakes are ``ValueError``/``TypeError`` subclasses (pydantic's ``ValidationError``
is a ``ValueError`` too); anything wrong with a checkpoint file is a :class:`CheckpointError`.
"""

from __future__ import annotations

__all__ = [
    "CallbackValidationError",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointIndexError",
    "CheckpointSchemaError",
    "ConfigurationError",
    "DuplicateStateKeyError",
    "MissingDependencyError",
    "NoCheckpointFoundError",
    "PluginError",
    "RemoteStorageError",
    "UnresolvableReferenceError",
]


class ConfigurationError(ValueError):
    """A configuration value is wrong; the message names the value and what would be right."""


class DuplicateStateKeyError(ConfigurationError):
    """Two state providers claim the same ``state_key``; the message names both owners."""


class CallbackValidationError(ConfigurationError, TypeError):
    """A callback cannot be registered (unknown hook name, hook signature that cannot be called)."""


class MissingDependencyError(ImportError):
    """An optional feature needs a package that is not installed; the message names the
    ``pip install nnhandler[extra]`` that brings it."""


class PluginError(RuntimeError):
    """An installed plugin (entry-point group ``nnhandler.plugins``) cannot be loaded or
    registered; the message names the plugin, its distribution and what went wrong."""


class CheckpointError(Exception):
    """A checkpoint cannot be written, read or applied."""


class CheckpointCorruptedError(CheckpointError):
    """The file's content does not match the checksum written with it (or it was truncated)."""


class NoCheckpointFoundError(CheckpointError):
    """A directory holds no valid checkpoint to resume from."""


class CheckpointFormatError(CheckpointError):
    """The file is not an nnhandler checkpoint, or one of an unsupported format version."""


class CheckpointSchemaError(CheckpointFormatError):
    """A value read from a checkpoint (its meta, integrity record, manifest, index, or a
    component's state) does not match the declared schema. ``path`` is the file and ``field``
    the dotted location of the first bad value (``"state['progress'].epoch"``)."""

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.field = field


class UnresolvableReferenceError(CheckpointError):
    """A ``"module:QualName"`` reference in a checkpoint cannot be resolved to the expected kind."""


class CheckpointIndexError(CheckpointError):
    """The retention index of an auto-save directory (``nnhandler-index.json``) cannot be read:
    missing permissions, damaged JSON, a wrong structure or a newer format version."""


class RemoteStorageError(OSError):
    """An operation on object storage (an ``s3://``, ``gs://`` … URL) failed after its bounded
    retries, or ran past its deadline; the message names the operation, the URL, the attempts
    and the last error. Being an ``OSError``, a failed save follows ``on_save_error`` like a
    disk error."""
