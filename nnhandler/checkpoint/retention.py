"""Retention of auto-saves: which of a callback's checkpoints are kept, why, and when the rest
are removed.

Rules (``AutoSaveCallback(keep_last=, keep_best=, monitor=, mode=, keep_every=)``), combinable;
a file is kept when *any* rule keeps it, and every reason is recorded:

* ``keep_last=N``: the N files this callback wrote most recently (``"latest 1/N"`` …).
* ``keep_best=K``: the K files with the best ``monitor`` value, the lowest for ``mode="min"``,
  the highest for ``"max"`` (``"best val_loss=0.123 (rank 1/K)"``). A value that is missing
  from the epoch's logs (an epoch that did not validate) or is NaN or infinite is never best.
  Ties: the earlier epoch wins.
* ``keep_every=E``: files of epochs that are multiples of E, forever (``"every E epochs"``):
  end-of-epoch saves only (a save inside an epoch, by steps or time, is not one of epoch E).
* ``keep_every_n_steps=S``: files written at an optimizer step that is a multiple of S,
  forever (``"every S steps"``), end-of-epoch and mid-epoch saves alike.
* Saves inside an epoch (``every_n_steps``, ``every_seconds``) take part in ``keep_last`` and
  ``keep_best``; their ``monitor`` value is the epoch's running mean so far (``loss``, a
  metric), and a ``val_*`` monitor is missing there (no validation mid-epoch): such a file is
  then no best candidate, silently.
* The newest file is always kept (it is the resume point), with the reason ``"newest"`` when no
  rule keeps it.

The decision (:func:`decide`) is a pure function of the callback's files and the rules.
:class:`Retention` holds the bookkeeping: the files the callback owns (its *lineage*: this run
and the runs resumed from its checkpoints), the files decided for removal and the write order.
It is part of the callback's state in every checkpoint and of the index
(:mod:`.index`). A save updates it before the state is collected (so the checkpoint knows
itself); rank 0 then writes the index once the checkpoint is durable, and only then removes the
files no rule keeps. A file is removed only when it is this callback's own and no other
callback's section of the index lists it as kept, and every removal goes through
:class:`~.removal.RemovalGuard`: a recorded name that is not directly in the current
``save_path``, not of the callback's name template, a symlink, or a file whose own record names
another lineage is dropped from the bookkeeping with a warning, never removed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pydantic import Field

from ..errors import CheckpointIndexError
from .index import IndexEntry, IndexEntryRecord, IndexSection, read_index, update_index
from .removal import Outcome, Refused, RemovalGuard
from .schema import Schema, validate

if TYPE_CHECKING:
    from ..config import AutoSaveConfig

__all__ = ["Retention", "RetentionPlan", "RetentionRules", "RetentionState",
           "RetentionStateRecord", "adopt_replica", "decide", "held_on_replica",
           "monitored_value"]


@dataclass(frozen=True)
class RetentionRules:
    """The ``keep_*`` rules of one auto-save callback (all ``None``: every file is kept)."""

    keep_last: int | None = None
    keep_best: int | None = None
    monitor: str | None = None
    mode: str = "min"
    keep_every: int | None = None
    keep_every_n_steps: int | None = None

    @classmethod
    def from_config(cls, config: AutoSaveConfig) -> RetentionRules:
        return cls(keep_last=config.keep_last, keep_best=config.keep_best,
                   monitor=config.monitor, mode=config.mode, keep_every=config.keep_every,
                   keep_every_n_steps=config.keep_every_n_steps)

    @property
    def active(self) -> bool:
        """Whether any rule is set (otherwise nothing is tracked and nothing removed)."""
        return any(rule is not None for rule in (self.keep_last, self.keep_best,
                                                 self.keep_every, self.keep_every_n_steps))

    def to_json(self) -> dict[str, Any]:
        rules = {"keep_last": self.keep_last, "keep_best": self.keep_best,
                 "monitor": self.monitor, "mode": self.mode, "keep_every": self.keep_every}
        if self.keep_every_n_steps is not None:  # indexes without it read as before
            rules["keep_every_n_steps"] = self.keep_every_n_steps
        return rules


def monitored_value(logs: Mapping[str, Any], monitor: str | None) -> float | None:
    """``logs[monitor]`` as a float when it is a finite number, else ``None`` (never best)."""
    if monitor is None:
        return None
    value = logs.get(monitor)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def decide(files: Sequence[IndexEntry], rules: RetentionRules) -> dict[str, tuple[str, ...]]:
    """Why each kept file is kept (``name -> reasons``); a file missing from the result is to
    be removed. ``files`` are one callback's own files with distinct names."""
    if not files:
        return {}
    reasons: dict[str, list[str]] = {entry.name: [] for entry in files}
    by_recency = sorted(files, key=lambda entry: entry.seq, reverse=True)
    if rules.keep_last is not None:
        for rank, entry in enumerate(by_recency[: rules.keep_last], start=1):
            reasons[entry.name].append(f"latest {rank}/{rules.keep_last}")
    if rules.keep_best is not None:
        sign = 1.0 if rules.mode == "min" else -1.0
        candidates = sorted((entry for entry in files
                             if entry.value is not None and not entry.partial),
                            key=lambda entry: (sign * (entry.value or 0.0), entry.epoch,
                                               entry.seq))
        for rank, entry in enumerate(candidates[: rules.keep_best], start=1):
            reasons[entry.name].append(
                f"best {rules.monitor}={entry.value:.6g} (rank {rank}/{rules.keep_best})")
    if rules.keep_every is not None:
        for entry in files:
            if (entry.epoch > 0 and entry.epoch % rules.keep_every == 0 and not entry.partial
                    and entry.batch is None):
                reasons[entry.name].append(f"every {rules.keep_every} epochs")
    if rules.keep_every_n_steps is not None:
        for entry in files:
            if entry.step > 0 and entry.step % rules.keep_every_n_steps == 0 and not entry.partial:
                reasons[entry.name].append(f"every {rules.keep_every_n_steps} steps")
    newest = by_recency[0]
    if not reasons[newest.name]:
        reasons[newest.name].append("newest")
    return {name: tuple(kept) for name, kept in reasons.items() if kept}


@dataclass(frozen=True)
class RetentionState:
    """A callback's retention bookkeeping at one moment (immutable: replaced as a whole, so a
    background writer thread and the training thread never see half an update).

    ``files``: the kept own files with their reasons, ``removing``: own files decided for
    removal and not yet known to be gone, ``next_seq``: the write order of the next save,
    ``lineage``: the id shared by a run and every run resumed from its checkpoints (the
    run's :attr:`~nnhandler.components.history.Progress.lineage`; empty until the first
    ``train`` or save).
    """

    lineage: str = ""
    files: tuple[IndexEntry, ...] = ()
    removing: tuple[str, ...] = ()
    next_seq: int = 1

    def to_state(self) -> dict[str, Any]:
        return {"lineage": self.lineage, "next_seq": self.next_seq,
                "files": [entry.to_json() for entry in self.files],
                "removing": list(self.removing)}

    @classmethod
    def from_state(cls, state: Any, *, where: str = "retention",
                   path: str | None = None) -> RetentionState:
        """The bookkeeping as a checkpoint stores it, checked against
        :class:`RetentionStateRecord` (a :class:`~nnhandler.CheckpointSchemaError` names the
        field, e.g. ``retention.files[0].epoch``)."""
        record = validate(RetentionStateRecord, state, where=where, path=path)
        return cls(lineage=record.lineage, next_seq=record.next_seq,
                   files=tuple(entry.entry() for entry in record.files),
                   removing=tuple(record.removing))

    @classmethod
    def from_section(cls, section: IndexSection) -> RetentionState:
        return cls(lineage=section.lineage, files=section.checkpoints, removing=section.removing,
                   next_seq=section.next_seq)

    def section(self, rules: RetentionRules) -> IndexSection:
        return IndexSection(lineage=self.lineage, rules=rules.to_json(), next_seq=self.next_seq,
                            checkpoints=self.files, removing=self.removing)


class RetentionStateRecord(Schema):
    """The schema of :meth:`RetentionState.to_state` as read back from a checkpoint."""

    lineage: str
    next_seq: int = Field(ge=0)
    files: list[IndexEntryRecord]
    removing: list[str]


@dataclass(frozen=True)
class RetentionPlan:
    """One save's change of the bookkeeping: ``before`` is restored if the save fails."""

    before: RetentionState
    after: RetentionState


class Retention:
    """The retention bookkeeping of one auto-save callback (see the module docstring).

    Every rank keeps it (the decision depends only on the epoch logs, which are the same on
    every rank); only rank 0 reads and writes the index and removes files, and its bookkeeping
    is the one saved in checkpoints.
    """

    def __init__(self) -> None:
        self.state = RetentionState()
        #: the bookkeeping continues a lineage (restored from a checkpoint, or this instance has
        #: saved): only then are the index's records of that lineage adopted as its own
        self.continuing = False
        #: the state key (directory and name template) the recorded files belong to
        self.key: str | None = None
        self._noticed: set[str] = set()

    def bind(self, key: str) -> None:
        """The files are written under ``key`` from now on. Files recorded under another key
        (the callback was reconfigured to another folder or name) are no longer tracked: they
        are left where they are, never removed."""
        if self.key is not None and self.key != key:
            self.state = replace(self.state, files=(), removing=())
        self.key = key

    # -- one save ------------------------------------------------------------------------------
    def plan(self, rules: RetentionRules, name: str, epoch: int, step: int,
             logs: Mapping[str, Any], *, lineage: str, is_main: bool,
             logger: logging.Logger, partial: bool = False, batch: int | None = None,
             why_missing: Callable[[str], str] | None = None) -> RetentionPlan:
        """Record the save of ``name`` (before its state is collected) and decide what is kept.
        ``lineage`` is taken when the bookkeeping has none yet. Non-main ranks forget earlier
        removals: removing files is rank 0's work. ``partial``: an emergency checkpoint from
        inside an epoch (its logs are the last complete epoch's: no ``keep_best`` value).
        ``batch``: a scheduled save inside an epoch after that many of its batches (``logs``
        are the running means so far; a monitor missing there is expected and not noticed).
        ``why_missing(key)``: the reason a key is missing from ``logs``, for the notice."""
        before = self.state
        value = None if partial else monitored_value(logs, rules.monitor)
        if (rules.keep_best is not None and value is None and is_main and not partial
                and (batch is None or rules.monitor in logs)):
            assert rules.monitor is not None  # keep_best needs it (AutoSaveConfig)
            reason = (why_missing(rules.monitor)
                      if why_missing is not None and rules.monitor not in logs else None)
            self.notice_not_a_candidate(rules.monitor, logs, epoch, logger, reason=reason)
        new = IndexEntry(name=name, epoch=epoch, step=step, seq=before.next_seq, value=value,
                         partial=partial, batch=batch)
        files = [entry for entry in before.files if entry.name != name] + [new]
        kept = decide(files, rules)
        dropped = [entry.name for entry in files if entry.name not in kept]
        removing = _unique(name for name in (*(before.removing if is_main else ()), *dropped)
                           if name not in kept)
        after = RetentionState(
            lineage=before.lineage or lineage, next_seq=before.next_seq + 1, removing=removing,
            files=tuple(replace(entry, reasons=kept[entry.name]) for entry in files
                        if entry.name in kept))
        self.state = after
        self.continuing = True
        return RetentionPlan(before, after)

    def rollback(self, plan: RetentionPlan) -> None:
        """The save of ``plan`` failed: its file does not exist, nothing was removed."""
        self.state = plan.before

    def commit(self, state: RetentionState, guard: RemovalGuard, key: str,
               rules: RetentionRules) -> None:
        """Rank 0, once the checkpoint recorded in ``state`` is durable: write the index in
        ``guard.directory``, then remove the files ``state`` no longer keeps, each through
        ``guard`` (confined to the folder, the name template and the run's lineage). Never
        raises: a failure is a warning; a file that could not be removed stays recorded for
        removal, one that fails a check is dropped from the bookkeeping."""
        directory, logger = guard.directory, guard.logger
        try:
            sections, problem = update_index(directory, key, state.section(rules), guard.store)
        except Exception as error:  # an I/O error must not cost the checkpoint just written
            logger.warning("retention: could not write the index in %s (%s: %s); no file is "
                           "removed until it is written", directory, type(error).__name__, error)
            return
        if problem is not None:
            logger.warning("retention: %s; it was rebuilt from the bookkeeping of %s (other "
                           "auto-savers' entries return at their next save; no file they "
                           "listed is removed)", problem, key)
        kept_by_others = {entry.name: other for other, section in sections.items()
                          if other != key for entry in section.checkpoints}
        failed = []
        for name in state.removing:
            if name in kept_by_others:
                logger.warning("retention: not removing %s: the index lists it as kept by "
                               "%s", directory / name, kept_by_others[name])
                continue
            outcome = guard.remove(name, what="retention: superseded checkpoint",
                                   in_directory=True)
            if outcome is Outcome.FAILED:
                logger.warning("retention: %s is tried again after the next save",
                               directory / name)
                failed.append(name)
            elif outcome is Outcome.REMOVED:
                logger.info("retention: removed %s (no keep rule holds it)", directory / name)
        if tuple(failed) == state.removing:
            return
        final = replace(state, removing=tuple(failed))
        try:  # the index stops listing what is gone (were this lost, a resume drops them)
            update_index(directory, key, final.section(rules), guard.store)
        except Exception as error:
            logger.warning("retention: could not update the index in %s after removing "
                           "files (%s: %s)", directory, type(error).__name__, error)
        if self.state is state:
            self.state = final

    # -- resuming ------------------------------------------------------------------------------
    def resume(self, guard: RemovalGuard, key: str,
               replica: RemovalGuard | None = None) -> RetentionState:
        """Rank 0, when ``train`` starts: this lineage's files as the index and the restored
        bookkeeping know them together, without files that no longer exist and without
        records that fail ``guard``'s checks (outside ``guard.directory``, another name, a
        symlink, another lineage: dropped with a warning, never removed). The run's lineage
        ``guard.lineage`` is taken when the bookkeeping has none yet.

        Where the two disagree about a file, the one written later (the higher write order)
        wins. Files the index records for this lineage that the checkpoint does not know —
        saves of an interrupted run after the checkpoint this run resumed from — stay this
        callback's own files and follow the same rules. The section of a fresh run's key (an
        earlier run into the same folder) or of another lineage is not adopted: its files are
        never removed by this run.

        ``replica``: the guard of a second copy of the folder (the auto-saver's ``mirror``).
        When the continued bookkeeping records a file the folder no longer has, or the folder
        has no section of this lineage (the local disk was lost), the replica's index is
        merged in as the local one is (:func:`adopt_replica`), and a recorded file missing
        locally stays in the bookkeeping while the replica holds it as this lineage's own
        (:func:`held_on_replica`): the rules then decide over the same files as if the folder
        had survived, on both sides.
        """
        directory, logger = guard.directory, guard.logger
        state = (self.state if self.state.lineage
                 else replace(self.state, lineage=guard.lineage))
        section = None
        try:
            section = (read_index(directory, guard.store) or {}).get(key)
        except CheckpointIndexError as error:
            logger.warning("retention: %s; it is rebuilt from the checkpointed bookkeeping at "
                           "the next save, and no file only it listed is removed", error)
        if section is not None and (not self.continuing or section.lineage != state.lineage):
            if section.checkpoints or section.removing:
                logger.warning(
                    "retention: the index in %s records %d checkpoint(s) for %s from another "
                    "run (not one this run continues); they are left alone and never removed "
                    "by this run", directory, len(section.checkpoints), key)
            section = None
        if section is not None:
            state = _merge(state, RetentionState.from_section(section))
        held: frozenset[str] = frozenset()
        if replica is not None and self.continuing:
            if section is None or any(not guard.exists(name) for name in _names(state)):
                state = adopt_replica(state, guard, replica, key)
            held = held_on_replica(replica, [name for name in _names(state)
                                             if not guard.exists(name)])
        return replace(
            state,
            files=tuple(entry for entry in state.files
                        if _vetted(guard, entry.name, "checkpoint recorded as kept", held)),
            removing=tuple(name for name in state.removing
                           if _vetted(guard, name, "checkpoint recorded for removal", held)))

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.state.to_state()

    def load_state_dict(self, state: Any, *, where: str = "retention") -> None:
        """Restore the bookkeeping; off-schema data is a
        :class:`~nnhandler.CheckpointSchemaError` naming the field."""
        self.state = RetentionState.from_state(state, where=where)
        self.continuing = True

    def notice_not_a_candidate(self, monitor: str, logs: Mapping[str, Any], epoch: int,
                               logger: logging.Logger, *, reason: str | None = None) -> None:
        """Say that the ``monitor`` value of the epoch-``epoch`` ``logs`` is missing or not a
        finite number, so its checkpoint is no best candidate: a warning the first time for
        each of the two problems, debug level after. ``reason``: why it is missing."""
        problem = "missing" if monitor not in logs else "not a finite number"
        message = ("keep_best: monitor %r is %s in the epoch-%d logs (keys: %s%s); that "
                   "checkpoint is not a best candidate")
        arguments = (monitor, problem, epoch, ", ".join(sorted(logs)),
                     "" if reason is None else f"; {reason}")
        if problem in self._noticed:
            logger.debug(message, *arguments)
        else:
            self._noticed.add(problem)
            logger.warning(message + " (said once; later ones are logged at debug level)",
                           *arguments)


def _merge(first: RetentionState, second: RetentionState) -> RetentionState:
    """Two records of one lineage; the later one (higher ``next_seq``) wins on each file."""
    older, newer = (first, second) if second.next_seq > first.next_seq else (second, first)
    kept = {entry.name: entry for entry in older.files}
    removing = dict.fromkeys(older.removing)
    for name in newer.removing:
        kept.pop(name, None)
        removing[name] = None
    for entry in newer.files:
        kept[entry.name] = entry
        removing.pop(entry.name, None)
    files = tuple(sorted(kept.values(), key=lambda entry: entry.seq))
    next_seq = max(first.next_seq, second.next_seq, *(entry.seq + 1 for entry in files))
    return RetentionState(lineage=newer.lineage, files=files, removing=tuple(removing),
                          next_seq=next_seq)


def _unique(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _names(state: RetentionState) -> list[str]:
    return [*(entry.name for entry in state.files), *state.removing]


def _vetted(guard: RemovalGuard, name: str, what: str,
            held: frozenset[str] = frozenset()) -> bool:
    """Whether the recorded ``name`` stays in the bookkeeping: it passes every check of
    ``guard`` (a failure is a warning naming it and the reason) and still exists, in the
    folder or among the names a replica ``held``."""
    reason = guard.refusal(name, in_directory=True)
    if reason is not None:
        guard.logger.warning("retention: %s %r is dropped from the bookkeeping and never "
                             "removed: %s", what, name, reason)
        return False
    return guard.exists(name) or name in held


def adopt_replica(state: RetentionState, guard: RemovalGuard, replica: RemovalGuard,
                  key: str) -> RetentionState:
    """``state`` merged with ``key``'s section of the replica's index, as :meth:`Retention.
    resume` merges the local one (the later record wins on each file).

    The replica's index is data from a store: read through the schema of :mod:`.index`
    (a damaged or off-schema index is a warning and is not used), adopted only when its
    section is of ``state``'s lineage, and only about files the local folder does not have:
    a file in ``guard.directory`` follows the local bookkeeping alone, so no replica can make
    a local file be removed (or kept). Whether a name it adds is really this lineage's own is
    :func:`held_on_replica`'s test."""
    logger = guard.logger
    try:
        section = (read_index(replica.directory, replica.store) or {}).get(key)
    except CheckpointIndexError as error:
        logger.warning("retention: %s; the bookkeeping of the files missing in %s is not "
                       "completed from it", error, guard.directory)
        return state
    if section is None:
        return state
    if section.lineage != state.lineage:
        logger.warning("retention: the index in %s records %d checkpoint(s) for %s from another "
                       "run (lineage %r, this run %r); they are left alone and never removed by "
                       "this run", replica.directory, len(section.checkpoints), key,
                       section.lineage, state.lineage)
        return state
    elsewhere = RetentionState(
        lineage=section.lineage, next_seq=section.next_seq,
        files=tuple(entry for entry in section.checkpoints if not guard.exists(entry.name)),
        removing=tuple(name for name in section.removing if not guard.exists(name)))
    return _merge(state, elsewhere)


def held_on_replica(replica: RemovalGuard, names: Sequence[str]) -> frozenset[str]:
    """Which of ``names`` (recorded files the local folder lacks) the replica holds as this
    lineage's own: listed directly in ``replica.directory`` and passing every check of
    ``replica`` (the name template, one object and not a folder, the lineage in the object's
    own record: :func:`~.removal.require_own_lineage`). A name that fails is a warning and is
    dropped from the bookkeeping (never removed). A replica that does not answer keeps every
    name (a warning says so): the rules go on deciding over them, and every removal on the
    replica checks again."""
    if not names:
        return frozenset()
    logger = replica.logger
    try:
        listed = {entry.location.name for entry in replica.store.entries(replica.directory)
                  if not entry.is_dir}
    except OSError as error:
        logger.warning("retention: %s did not answer (%s); the %d checkpoint(s) the local "
                       "bookkeeping records there stay in it unchecked", replica.directory,
                       error, len(names))
        return frozenset(names)
    held = set()
    for name in dict.fromkeys(names):
        if name not in listed:
            continue  # gone on both sides
        try:
            if replica.locate(name, in_directory=True) is not None:
                held.add(name)
        except Refused as refused:
            logger.warning("retention: %s/%s is dropped from the bookkeeping and never "
                           "removed: %s", replica.directory, name, refused)
        except OSError as error:
            logger.warning("retention: could not check %s/%s (%s); it stays in the "
                           "bookkeeping", replica.directory, name, error)
            held.add(name)
    return frozenset(held)
