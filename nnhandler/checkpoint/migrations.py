"""Format migrations: functions that lift an envelope from format version ``v`` to ``v + 1``.

A checkpoint of an older version is migrated step by step on load; a newer one is refused with a
message naming both versions. Register a migration when the format changes::

    @register_migration(from_version=1)
    def _v1_to_v2(envelope: dict) -> dict:
        envelope["meta"].setdefault("new_field", None)
        return envelope
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import CheckpointFormatError

__all__ = ["migrate", "register_migration", "unregister_migration"]

Envelope = dict[str, Any]
_MIGRATIONS: dict[int, Callable[[Envelope], Envelope]] = {}


def register_migration(
    from_version: int,
) -> Callable[[Callable[[Envelope], Envelope]], Callable[[Envelope], Envelope]]:
    """Decorator: register ``function(envelope) -> envelope`` lifting ``from_version`` by one."""
    if type(from_version) is not int:
        raise TypeError(f"from_version must be an int, got {from_version!r}")

    def decorate(function: Callable[[Envelope], Envelope]) -> Callable[[Envelope], Envelope]:
        if from_version in _MIGRATIONS and _MIGRATIONS[from_version] is not function:
            raise ValueError(f"a migration from format version {from_version} is already "
                             f"registered: {_MIGRATIONS[from_version]!r}")
        _MIGRATIONS[from_version] = function
        return function

    return decorate


def unregister_migration(from_version: int) -> None:
    _MIGRATIONS.pop(from_version, None)


def migrate(envelope: Envelope, version: int, target: int, where: str) -> Envelope:
    """``envelope`` (of format ``version``) lifted to ``target``."""
    if version > target:
        raise CheckpointFormatError(
            f"{where} has checkpoint format version {version}, newer than version {target} that "
            "this nnhandler reads; upgrade nnhandler to load it"
        )
    while version < target:
        step = _MIGRATIONS.get(version)
        if step is None:
            raise CheckpointFormatError(
                f"{where} has checkpoint format version {version}; no migration to version "
                f"{version + 1} is registered (this nnhandler writes version {target})"
            )
        envelope = step(envelope)
        version += 1
        envelope["format"] = {**envelope.get("format", {}), "version": version}
    return envelope
