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

__all__ = ["migrate", "readable_version_problem", "register_migration", "unregister_migration"]

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


def readable_version_problem(version: int, target: int, where: str) -> str | None:
    """Why a file of format ``version`` cannot be read by a reader of ``target`` (``None``
    when it can: the same version, or an older one with a migration for every step)."""
    if version > target:
        return (f"{where} has checkpoint format version {version}, newer than version "
                f"{target} that this nnhandler reads; upgrade nnhandler to load it")
    for step in range(version, target):
        if step not in _MIGRATIONS:
            return (f"{where} has checkpoint format version {version}; no migration to "
                    f"version {step + 1} is registered (this nnhandler writes version {target})")
    return None


def migrate(envelope: Envelope, version: int, target: int, where: str) -> Envelope:
    """``envelope`` (of format ``version``) lifted to ``target``."""
    problem = readable_version_problem(version, target, where)
    if problem is not None:
        raise CheckpointFormatError(problem)
    while version < target:
        envelope = _MIGRATIONS[version](envelope)
        version += 1
        envelope["format"] = {**envelope.get("format", {}), "version": version}
    return envelope
