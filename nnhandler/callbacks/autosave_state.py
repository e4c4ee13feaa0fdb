"""The schema of an auto-saver's own state as a checkpoint holds it (untrusted data: validated
before the callback is re-created or takes it)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ..checkpoint.retention import RetentionStateRecord
from ..checkpoint.schema import Schema

__all__ = ["AutoSaveStateRecord", "ScheduleStateRecord"]


class ScheduleStateRecord(Schema):
    """The schema of :meth:`~.autosave_schedule.SaveSchedule.state_dict`: the training
    seconds since the callback's last scheduled save (``every_seconds``)."""

    elapsed_seconds: float = Field(ge=0.0, allow_inf_nan=False)


class AutoSaveStateRecord(Schema):
    """The schema of :meth:`AutoSaveCallback.state_dict` as read back from a checkpoint
    (``config`` is checked by :class:`~nnhandler.config.AutoSaveConfig` when the callback is
    re-created). Files written before retention existed have no ``retention``, those written
    before step and time triggers no ``schedule``."""

    config: dict[str, Any]
    last_saved_path: str | None
    last_saved_epoch: int | None = Field(ge=0)
    save_count: int = Field(ge=0)
    failed_saves: int = Field(default=0, ge=0)
    pending_removal: str | None = None
    retention: RetentionStateRecord | None = None
    schedule: ScheduleStateRecord | None = None
