"""Confinement of every removal: a checkpoint is never a delete list.

Every file an auto-save callback removes (the previous auto-save under ``overwrite=True``, a
removal recorded as pending in a checkpoint, retention's superseded files, the index's
``removing``, stale temp files) goes through :class:`RemovalGuard`. A recorded value (an
absolute path, a path relative to the working directory, or a bare name in the folder) is
removed only when

* resolved with its symlinks (``os.path.realpath``), it lies *directly* inside the callback's
  current ``save_path``, and the entry itself is not a symlink (one is never followed, and never
  ``rmtree``'d through);
* its name is one the callback writes: its name template (literal text exact, each field any
  text; the ``.pth`` rule, the ``.dcp`` name of a sharded checkpoint, the ``-v<N>`` of a name
  taken by another run, a clipped ``<prefix>~<8 hex>`` name) or an emergency name
  (``preempted_ep…_b….pth``, ``exception_ep…_b….pth``);
* the lineage recorded in the file itself (its integrity record, or a sharded checkpoint's
  manifest) is the run's (:attr:`~nnhandler.components.history.Progress.lineage`).

Stale temp clean-up removes only entries named exactly like the temp files of
:func:`~.writer.atomic_write` (``.NAME.tmp-PID-8HEX``) whose writer is gone, never a symlink.
Anything that fails is left where it is and reported by a warning naming the value and the
reason; nothing here raises into training.

The same lineage test decides whether an auto-save may replace an existing file of its name
(:func:`distinct_target`): a file of another run, or one that records no lineage, is never
replaced; the checkpoint goes to ``<stem>-v<N><suffix>`` instead.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import re
import string
from pathlib import Path
from typing import Final

from ..errors import CheckpointError
from .integrity import read_integrity_record
from .sharded import SHARDED_SUFFIX, read_manifest
from .storage import LOCAL_STORE, Store
from .writer import TEMP_INFIX, remove_checkpoint_path

__all__ = [
    "LINEAGE_FIELD",
    "Outcome",
    "Refused",
    "RemovalGuard",
    "distinct_target",
    "is_own_name",
    "recorded_lineage",
    "remove_stale_temp_files",
    "versioned",
]

#: the key of a checkpoint's lineage in its meta, integrity record and manifest
LINEAGE_FIELD: Final = "lineage"
_SUFFIXES: Final = (".pth", SHARDED_SUFFIX)
_VERSION: Final = re.compile(r"-v[1-9][0-9]*$")
_EMERGENCY: Final = re.compile(r"(?:preempted|exception)_ep[0-9]{3,}_b[0-9]{5,}")
_CLIP_MARK: Final = r"~[0-9a-f]{8}"
_TEMP: Final = re.compile(r"\.(?P<name>.+)" + re.escape(TEMP_INFIX)
                          + r"(?P<pid>[0-9]+)-[0-9a-f]{8}")
#: how many ``-v<N>`` names :func:`distinct_target` tries before giving up
MAX_VERSION: Final = 10_000


class Outcome(enum.Enum):
    """What :meth:`RemovalGuard.remove` did."""

    REMOVED = "removed"
    GONE = "gone"  # nothing at that path: nothing to do
    REFUSED = "refused"  # failed a check: never acted on (a warning said why)
    FAILED = "failed"  # passed the checks, the removal raised an OSError (a warning said so)


class Refused(Exception):
    """A recorded value that fails a check; the message is the reason."""


# -- names ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _template_patterns(template: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """The regexes of the formatted template (literal text escaped, each field ``.*``) and of
    a clipped name's prefix (any non-empty prefix of the first literal, or that literal
    followed by anything when a field follows it)."""
    parts = list(string.Formatter().parse(template))
    full = "".join(re.escape(text) + (".*" if field is not None else "")
                   for text, field, _, _ in parts)
    first = parts[0][0] if parts else ""
    has_field = any(field is not None for _, field, _, _ in parts)
    prefix = ".*" if has_field else ""
    for char in reversed(first[1:]):
        prefix = f"(?:{re.escape(char)}{prefix})?"
    prefix = (re.escape(first[0]) + prefix) if first else ".+"
    return re.compile(full, re.DOTALL), re.compile(prefix + _CLIP_MARK, re.DOTALL)


def _unrendered(stem: str) -> tuple[str, ...]:
    """``stem`` and what it was before ``render_name`` replaced a leading dot by ``_``."""
    if stem.startswith("_"):
        return stem, "." + stem[1:], stem[1:]
    return (stem,)


def is_own_name(name: str, template: str) -> bool:
    """Whether ``name`` is one an auto-save with name template ``template`` writes: the
    rendered template (``.pth`` appended, ``.dcp`` for a sharded checkpoint), clipped to
    ``<prefix>~<8 hex>``, an emergency name, each optionally with a ``-v<N>`` collision
    suffix."""
    if not name.endswith(_SUFFIXES) or "/" in name or "\\" in name:
        return False
    stem = name[: -len(".pth")]
    stems = [stem]
    version = _VERSION.search(stem)
    if version is not None:
        stems.append(stem[: version.start()])
    full, clipped = _template_patterns(template)
    for base in stems:
        for candidate in _unrendered(base):
            if _EMERGENCY.fullmatch(candidate) or clipped.fullmatch(candidate):
                return True
            # the stem may have lost a ".pth" the template wrote itself, or ".dcp" (sharded)
            if any(full.fullmatch(candidate + tail) for tail in ("", ".pth", ".dcp", ".dcp.pth")):
                return True
    return False


def versioned(path: Path, number: int) -> Path:
    """``path`` with the collision suffix: ``ep001.pth`` → ``ep001-v2.pth`` (``.dcp`` too)."""
    suffix = SHARDED_SUFFIX if path.name.endswith(SHARDED_SUFFIX) else ".pth"
    stem = path.name.removesuffix(suffix)
    return path.with_name(f"{stem}-v{number}{suffix}")


# -- lineage ---------------------------------------------------------------------------------------
def recorded_lineage(path: Path) -> str | None:
    """The lineage the checkpoint at ``path`` records about itself (its integrity record, a
    tail read, or a sharded checkpoint's manifest); ``None`` for a symlink, a file that is not
    a checkpoint or records none, or one that cannot be read."""
    try:
        if path.is_symlink():
            return None
        if path.is_dir():
            record: dict[str, object] = read_manifest(path)
        elif path.is_file():
            record = read_integrity_record(path)
        else:
            return None
    except (CheckpointError, OSError):
        return None
    value = record.get(LINEAGE_FIELD)
    return value if isinstance(value, str) and value else None


def _owned_or_free(path: Path, lineage: str) -> bool:
    return not os.path.lexists(path) or (bool(lineage) and recorded_lineage(path) == lineage)


def distinct_target(path: Path, lineage: str) -> Path:
    """Where an auto-save of ``lineage`` meant for ``path`` goes: ``path`` itself when it is
    free or this lineage's own checkpoint (it is then replaced atomically), else the first of
    ``<stem>-v1<suffix>``, ``-v2`` … that is. Raises :class:`CheckpointError` after
    :data:`MAX_VERSION` names that all belong to others."""
    if _owned_or_free(path, lineage):
        return path
    for number in range(1, MAX_VERSION + 1):
        candidate = versioned(path, number)
        if _owned_or_free(candidate, lineage):
            return candidate
    raise CheckpointError(
        f"{str(path)!r} and its -v1 … -v{MAX_VERSION} variants all belong to other runs; "
        "use another save_path or name")


# -- the guard ----------------------------------------------------------------------------------
class RemovalGuard:
    """The one door for removals of an auto-save callback's files (see the module docstring).

    ``directory``: the callback's current ``save_path``; ``template``: its name template;
    ``lineage``: the run's lineage; ``logger`` receives a warning for each refusal.
    ``earlier_templates``: templates the same callback instance was configured with before
    in this process (``auto_save`` called again with another ``name``), whose files it may
    still remove; never taken from a file. ``store``: where the files are (a URL's
    ``save_path`` has :class:`~.store_files.StoreRemovalGuard`).
    """

    store: Store = LOCAL_STORE

    def __init__(self, directory: Path, template: str, lineage: str,
                 logger: logging.Logger, earlier_templates: tuple[str, ...] = ()) -> None:
        self.directory = Path(directory)
        self.template = template
        self.templates = (template, *(t for t in earlier_templates if t != template))
        self.lineage = lineage
        self.logger = logger

    def locate(self, recorded: str, *, in_directory: bool = False) -> Path | None:
        """The entry ``recorded`` names if it may be removed, ``None`` when nothing is there;
        raises :class:`Refused` with the reason otherwise. ``in_directory``: a relative
        value is a name in the folder (retention), else relative to the working directory
        (paths recorded by ``overwrite``)."""
        if not isinstance(recorded, str) or not recorded:
            raise Refused("not a file name")
        candidate = Path(recorded)
        if in_directory and not candidate.is_absolute():
            candidate = self.directory / candidate
        name = candidate.name
        if name in ("", ".", ".."):
            raise Refused("not a file name")
        folder = os.path.realpath(self.directory)
        if os.path.realpath(candidate.parent) != folder:
            raise Refused(f"not directly inside save_path {folder!r}")
        target = self.directory / name  # the same entry: its parent resolves to the folder
        if target.is_symlink():
            raise Refused("a symbolic link (never followed)")
        if not os.path.lexists(target):
            return None
        if not any(is_own_name(name, template) for template in self.templates):
            raise Refused(f"its name does not match the name template {self.template!r}")
        if target.is_dir() and not name.endswith(SHARDED_SUFFIX):
            raise Refused(f"a directory (only sharded {SHARDED_SUFFIX} checkpoints are)")
        require_own_lineage(recorded_lineage(target), self.lineage)
        return target

    def exists(self, name: str) -> bool:
        """Whether something named ``name`` is in the folder (a symlink too)."""
        return os.path.lexists(self.directory / name)

    def refusal(self, recorded: str, *, in_directory: bool = False) -> str | None:
        """Why ``recorded`` may not be removed, or ``None`` when it may (or is gone)."""
        try:
            self.locate(recorded, in_directory=in_directory)
        except Refused as refused:
            return str(refused)
        return None

    def remove(self, recorded: str, *, what: str, in_directory: bool = False) -> Outcome:
        """Remove what ``recorded`` names if every check passes; ``what`` says in the warnings
        what the value is (``"overwrite: the previous auto-save"``). Never raises."""
        try:
            target = self.locate(recorded, in_directory=in_directory)
        except Refused as refused:
            self.logger.warning("%s %r is not removed and is dropped from the bookkeeping: %s",
                                what, recorded, refused)
            return Outcome.REFUSED
        if target is None:
            return Outcome.GONE
        try:
            remove_checkpoint_path(target)
        except OSError as error:
            self.logger.warning("%s: could not remove %s: %s", what, target, error)
            return Outcome.FAILED
        return Outcome.REMOVED


# -- temp files -------------------------------------------------------------------------------
def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # exists, owned by someone else / not a pid
        return True
    return True


def remove_stale_temp_files(directory: Path,
                            logger: logging.Logger | None = None) -> list[Path]:
    """Remove the temp files (and temp directories of sharded saves) in ``directory`` whose
    writing process is gone; returns them.

    Only entries named exactly ``.NAME.tmp-PID-8HEX`` are candidates; one that is a symlink is
    never followed nor removed (``logger`` is warned). A temp file of a process that is still
    alive (another job writing into the same folder) is left alone. On a filesystem shared
    between machines a pid says nothing about the other machine, so only run this where one
    job owns the folder.
    """
    removed = []
    for path in sorted(Path(directory).iterdir()):
        match = _TEMP.fullmatch(path.name)
        if match is None:
            continue
        if path.is_symlink():
            if logger is not None:
                logger.warning("temp file look-alike %s is a symbolic link: not removed",
                               path)
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _process_alive(pid):
            continue
        try:
            remove_checkpoint_path(path)
        except FileNotFoundError:
            continue
        except OSError as error:
            if logger is not None:
                logger.warning("could not remove temp file %s: %s", path, error)
            continue
        removed.append(path)
    return removed


def require_own_lineage(found: str | None, lineage: str | None) -> None:
    """Raise :class:`Refused` unless ``found`` (the lineage a checkpoint records) is this
    run's ``lineage``: the last rule of every removal, local or on a store."""
    if found is None:
        raise Refused("it records no lineage (not a checkpoint of this nnhandler, or "
                      "unreadable)")
    if found != lineage:
        raise Refused(f"it belongs to another run (lineage {found!r}, this run "
                      f"{lineage or 'none yet'!r})")
