"""Checkpoint file names from ``str.format`` templates filled with epoch-end logs.

Rules checked at configuration (:func:`validate_template`, a ``ValueError`` naming the template
and the reason):

- the literal text may not hold a path separator, ``..``, a control character (C0, DEL, C1),
  a line/paragraph separator or a lone surrogate — anywhere in the template, fill characters of
  format specs included;
- fields must be plain names (``{epoch:03d}``, not ``{0}``, ``{a.b}`` or ``{a[0]}``);
- only ``!s`` (or no) conversion: ``!r``/``!a`` give numbers nothing and put quotes and
  backslash escapes into names made from strings;
- no ``c`` presentation type (``{x:c}`` turns a number into any character, ``/`` included);
- the name rendered with generous sample values (integers of 8 digits, floats such as
  ``-1.2345678e-300`` and ``-12345678.901234567``) must fit :data:`MAX_NAME_BYTES` in UTF-8,
  so ``{epoch:0300d}`` or a 260-character literal are refused before training starts.

At save time (:func:`render_name`) every formatted value is sanitised (path separators, ``:``,
control characters, line separators and lone surrogates become ``_``) so the file always lands
directly inside ``save_path``; ``.pth`` is appended unless the formatted name already ends with
it; a field missing from the logs is written as ``NA`` (its format spec ignored). A name that
is still longer than the limit (a long string a callback put into the logs) is clipped
deterministically to ``<start>~<8 hex digits of the SHA-1 of the full name>.pth``: the
checkpoint is never lost over a name.

A template key that a run's logs may not hold is therefore not refused at configuration or
when ``train`` starts: the logs are filled by the training loop (``epoch``, ``loss``, each
metric and, on epochs that validate, ``val_loss`` and ``val_<metric>``) *and by callbacks*,
which may add any key at epoch end (before the auto-savers run), so no check made before an
epoch has ended can know that a key will be missing, and refusing it would break the ``NA``
rule above. What :class:`~nnhandler.AutoSaveCallback` does instead is say so once per key,
with the reason (:func:`missing_key_reason`), as soon as the logs are final: at the end of
each ``train`` call's first epoch for a key no epoch of this configuration has (no validation
loader for a ``val_*`` key; a key neither the loop nor a callback produced, with the nearest
known key when it looks like a typo), even when that epoch is not saved; else at the first
save without it (an epoch that ``validate_every`` skips). Later saves without it are logged
at debug level. The ``monitor`` of ``keep_best`` follows the same rule (a missing value makes
that checkpoint no "best" candidate).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

from .errors import ConfigurationError

__all__ = [
    "CHECKPOINT_SUFFIX",
    "CLIP_MARK",
    "MAX_NAME_BYTES",
    "MISSING_VALUE",
    "NAME_MAX",
    "LogSources",
    "MissingKey",
    "RenderedName",
    "missing_key_reason",
    "name_limit",
    "render_name",
    "template_fields",
    "validate_template",
]

CHECKPOINT_SUFFIX: Final = ".pth"
MISSING_VALUE: Final = "NA"
#: the longest file name (one path component) Linux filesystems allow, in bytes
NAME_MAX: Final = 255
#: what a save's temp file adds to a checkpoint name: ``.NAME.tmp-PID-8HEX``
#: (:func:`nnhandler.checkpoint.writer.temp_path_for`): the dot, ``.tmp-``, a pid of up to
#: 7 digits (Linux's ``pid_max`` is at most 2**22) and ``-`` plus 8 hex digits
TEMP_NAME_OVERHEAD: Final = 1 + len(".tmp-") + 7 + 1 + 8
#: room for a collision suffix ``-v<N>`` before ``.pth`` (``-v`` and up to 6 digits)
VERSION_SUFFIX_RESERVE: Final = 8
#: The longest checkpoint name :func:`render_name` produces, in UTF-8 bytes (225): a name this
#: long still fits ``NAME_MAX`` as a temp file and with a collision suffix. A sharded
#: checkpoint swaps ``.pth`` for ``.dcp`` (same length).
MAX_NAME_BYTES: Final = NAME_MAX - TEMP_NAME_OVERHEAD - VERSION_SUFFIX_RESERVE
#: separates the kept start of a clipped name from the hash of the full name
CLIP_MARK: Final = "~"
_HASH_DIGITS: Final = 8
_CLIP_TAIL_BYTES: Final = len(CLIP_MARK) + _HASH_DIGITS + len(CHECKPOINT_SUFFIX)
#: a filesystem whose names leave fewer bytes than this for checkpoint names is refused
_MIN_LIMIT: Final = _CLIP_TAIL_BYTES + 8
_FIELD_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: characters that never appear in a template (control characters, line separators, lone
#: surrogates), and, with path separators and ``:``, never in a formatted value
_CONTROL: Final = r"\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff"
_FORBIDDEN_IN_TEMPLATE: Final = re.compile(f"[{_CONTROL}]")
_UNSAFE: Final = re.compile(rf"[/\\:{_CONTROL}]")
#: the standard format-spec grammar (every spec that numbers accept matches it)
_SPEC: Final = re.compile(
    r"(?:(?P<fill>.)?(?P<align>[<>=^]))?(?P<sign>[-+ ])?z?#?0?(?P<width>\d+)?[,_]?"
    r"(?:\.(?P<precision>\d+))?(?P<type>[a-zA-Z%])?",
    re.DOTALL,
)
#: values a field is rendered with to bound the length of a template's names
_SAMPLES: Final = (10**7, -(10**7), -1.2345678e-300, -12345678.901234567, 0.5)
_FORMATTER: Final = string.Formatter()

_Part = tuple[str, str | None, str | None, str | None]


class RenderedName(NamedTuple):
    """A checkpoint file name rendered from a template (see :func:`render_name`)."""

    #: the file name: no separator, not hidden, ends with ``.pth``, at most ``limit`` bytes
    name: str
    #: template fields missing from the logs (each once), written as ``NA``
    missing: tuple[str, ...]
    #: the full name when it was longer than the limit and ``name`` is its clipped form
    clipped_from: str | None = None


def _parse(template: str) -> list[_Part]:
    try:
        return list(_FORMATTER.parse(template))
    except ValueError as error:
        raise ValueError(f"malformed name template {template!r}: {error}") from None


def template_fields(template: str) -> tuple[str, ...]:
    return tuple(field for _, field, _, _ in _parse(template) if field is not None)


def validate_template(template: str) -> str:
    """Return ``template`` if it is a usable name template, else raise ``ValueError`` naming
    the template and the reason (the rules are in the module docstring)."""
    if not template:
        raise ValueError("name template must not be empty")
    bad = _FORBIDDEN_IN_TEMPLATE.search(template)
    if bad is not None:
        raise ValueError(
            f"name template {template!r} contains the control character {bad.group()!r} (at "
            f"position {bad.start()}); file names may hold only printable characters"
        )
    parts = _parse(template)
    literal = "".join(text for text, _, _, _ in parts)
    if "/" in literal or "\\" in literal or ".." in literal:
        raise ValueError(
            f"name template {template!r} contains a path separator or '..'; put directories "
            "in save_path and keep name a plain file name"
        )
    for _, field, spec, conversion in parts:
        if field is not None:
            _check_field(template, field, spec or "", conversion)
    _check_length(template, parts)
    return template


def _check_field(template: str, field: str, spec: str, conversion: str | None) -> None:
    if not _FIELD_NAME.match(field):
        raise ValueError(
            f"name template {template!r} has field {{{field}}}: use plain log keys such "
            "as {epoch:03d} or {val_loss:.4f} (no positions, attributes or indexing)"
        )
    if "{" in spec:
        raise ValueError(f"name template {template!r}: nested fields are not supported")
    if conversion not in (None, "s"):
        raise ValueError(
            f"name template {template!r}: conversion !{conversion} of field {{{field}}} is not "
            "allowed in file names (for numbers it changes nothing, for strings it adds quotes "
            f"and backslash escapes); write {{{field}}} or {{{field}!s}}"
        )
    for candidate in (1 if field == "epoch" else 0.5, 1):
        try:
            format(candidate, spec)
            break
        except (ValueError, TypeError):
            continue
    else:
        raise ValueError(
            f"name template {template!r}: format spec {spec!r} of field {{{field}}} fits "
            "neither a number nor an integer"
        )
    parsed = _SPEC.fullmatch(spec)
    if parsed is not None and parsed.group("type") == "c":
        raise ValueError(
            f"name template {template!r}: format spec {spec!r} of field {{{field}}} uses the "
            "'c' presentation type, which turns a number into an arbitrary character "
            "(control characters and '/' included); use 'd' for integers"
        )


def _check_length(template: str, parts: list[_Part]) -> None:
    """Refuse a template whose names can exceed :data:`MAX_NAME_BYTES` with ordinary values."""
    pieces: list[str] = []
    for text, field, spec, conversion in parts:
        pieces.append(text)
        if field is not None:
            renderings = (_format_value(sample, spec or "", conversion) for sample in _SAMPLES)
            pieces.append(max(renderings, key=_utf8_length))
    name = _with_suffix("".join(pieces))
    size = _utf8_length(name)
    if size <= MAX_NAME_BYTES:
        return
    literal = _with_suffix("".join(text for text, _, _, _ in parts))
    what = (f"its literal text alone gives {_utf8_length(literal)} bytes"
            if _utf8_length(literal) > MAX_NAME_BYTES else
            f"with values such as epoch=10000000 or loss=-1.2345678e-300 it renders "
            f"{size} bytes ({name[:60]!r}…)")
    raise ValueError(
        f"name template {template!r} is too long for a file name: {what}, more than the "
        f"{MAX_NAME_BYTES} bytes (UTF-8) a checkpoint name may have (file names are at most "
        f"{NAME_MAX} bytes, with room kept for temp and version suffixes); shorten the text "
        "or the width/precision of its fields"
    )


def _utf8_length(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _with_suffix(name: str) -> str:
    return name if name.endswith(CHECKPOINT_SUFFIX) else name + CHECKPOINT_SUFFIX


def _sanitise(text: str) -> str:
    return _UNSAFE.sub("_", text)


def _format_value(value: Any, spec: str, conversion: str | None) -> str:
    try:
        if conversion is not None:
            value = _FORMATTER.convert_field(value, conversion)
        return format(value, spec)
    except (ValueError, TypeError, ArithmeticError):  # {epoch:03d} given a str; {x:.4f} a
        pass                                           # huge int (OverflowError)
    try:
        return str(value)
    except (ValueError, TypeError, ArithmeticError):  # an int beyond the int-to-str limit
        return type(value).__name__


def render_name(
    template: str, logs: Mapping[str, Any], *, limit: int = MAX_NAME_BYTES
) -> RenderedName:
    """The file name for ``logs``, the template fields that were missing from them and, when
    the name had to be clipped to ``limit`` UTF-8 bytes, the full name.

    The name never contains a path separator or a control character, never starts with a dot,
    always ends with ``.pth`` and has at most ``limit`` bytes, so joined to a directory it names
    a visible file directly inside it. The same template and logs always give the same name.
    """
    pieces: list[str] = []
    missing: list[str] = []
    for text, field, spec, conversion in _parse(template):
        pieces.append(text)
        if field is None:
            continue
        if field not in logs:
            missing.append(field)
            pieces.append(MISSING_VALUE)
            continue
        pieces.append(_sanitise(_format_value(logs[field], spec or "", conversion)))
    name = _with_suffix("".join(pieces))
    if name.startswith("."):  # hidden names are reserved for temp files
        # replace the dot, but keep the suffix when the whole name is just ".pth"
        name = "_" + (name if name == CHECKPOINT_SUFFIX else name[1:])
    missing_once = tuple(dict.fromkeys(missing))
    if _utf8_length(name) <= limit:
        return RenderedName(name, missing_once)
    return RenderedName(_clip(name, limit), missing_once, name)


def _clip(name: str, limit: int) -> str:
    """``name`` cut to ``limit`` bytes as ``<start>~<8 hex of SHA-1(name)>.pth``."""
    encoded = name.encode("utf-8", "surrogatepass")
    digest = hashlib.sha1(encoded, usedforsecurity=False).hexdigest()[:_HASH_DIGITS]
    room = max(limit - _CLIP_TAIL_BYTES, 1)
    start = encoded[:room].decode("utf-8", "ignore")  # never half a character
    return f"{start}{CLIP_MARK}{digest}{CHECKPOINT_SUFFIX}"


def name_limit(directory: str | os.PathLike[str]) -> int:
    """The longest checkpoint name (UTF-8 bytes) for files in ``directory``: at most
    :data:`MAX_NAME_BYTES`, less where the filesystem reports a smaller ``NAME_MAX``
    (``os.pathconf``; for a directory not yet created, that of its nearest existing parent).

    Raises :class:`~nnhandler.ConfigurationError` for a filesystem whose names are too short to
    hold even a clipped checkpoint name.
    """
    from .checkpoint.storage import URL, location_of

    if isinstance(location_of(directory), URL):
        return MAX_NAME_BYTES  # an object key (S3: up to 1024 bytes)
    path = Path(directory)
    existing = next((p for p in (path, *path.parents) if p.is_dir()), None)
    pathconf = getattr(os, "pathconf", None)  # absent on Windows
    if existing is None or pathconf is None:
        return MAX_NAME_BYTES
    try:
        reported = int(pathconf(existing, "PC_NAME_MAX"))
    except (OSError, ValueError):  # the filesystem reports no limit
        return MAX_NAME_BYTES
    if reported <= 0:  # -1: no limit
        return MAX_NAME_BYTES
    limit = min(MAX_NAME_BYTES, reported - TEMP_NAME_OVERHEAD - VERSION_SUFFIX_RESERVE)
    if limit < _MIN_LIMIT:
        raise ConfigurationError(
            f"save_path {str(directory)!r} is on a filesystem whose file names have at most "
            f"{reported} bytes: too short for checkpoint names (they need at least "
            f"{_MIN_LIMIT + TEMP_NAME_OVERHEAD + VERSION_SUFFIX_RESERVE}); choose another "
            "save_path"
        )
    return limit


class LogSources(NamedTuple):
    """What the training loop of a run puts into the epoch-end logs (callbacks may add any
    other key)."""

    #: the metric names (``add_metric``): each is logged, and as ``val_<name>`` too
    metrics: Sequence[str]
    #: whether a validation loader is set
    validates: bool
    #: only epochs divisible by it validate
    validate_every: int = 1

    def loop_keys(self, *, validating: bool) -> tuple[str, ...]:
        """The keys the loop logs on an epoch that validates (``validating``) or not."""
        keys = ("epoch", "loss", *self.metrics)
        return (*keys, "val_loss", *(f"val_{m}" for m in self.metrics)) if validating else keys


class MissingKey(NamedTuple):
    """Why a key is missing from the epoch-end logs (see :func:`missing_key_reason`)."""

    reason: str
    #: the reason holds for every epoch of this configuration (not only for this one)
    every_epoch: bool


def missing_key_reason(key: str, sources: LogSources, epoch: int,
                       logs: Mapping[str, Any]) -> MissingKey:
    """Why ``key`` is not in the epoch-``epoch`` ``logs`` of a run that ``sources`` describe:
    no validation loader, an epoch ``validate_every`` skips, or a key nobody produces (with the
    nearest known key when there is one within a typo)."""
    validation_keys = set(sources.loop_keys(validating=True)) - set(
        sources.loop_keys(validating=False))
    if key in validation_keys:
        if not sources.validates:
            return MissingKey(f"no validation loader is set (set_val_loader), so no epoch "
                              f"logs {key!r} or any other val_* key", True)
        if epoch % sources.validate_every:
            every = sources.validate_every
            return MissingKey(f"epoch {epoch} did not validate (validate_every={every}: only "
                              f"epochs divisible by {every} log val_* keys; save at such "
                              "epochs to have them in every name)", False)
        return MissingKey(f"{key!r} is logged on epochs that validate, but not in these logs "
                          "(a callback removed it?)", False)
    if key in sources.loop_keys(validating=False):
        return MissingKey(f"{key!r} is logged every epoch, but not in these logs (a callback "
                          "removed it?)", False)
    metric = key.removeprefix("val_")
    reason = (f"no metric is named {metric!r} (add_metric({metric!r}, fn) logs {metric!r} "
              f"and {'val_' + metric!r}) and no callback put {key!r} into these logs"
              if metric != key else
              f"neither the training loop nor a callback put {key!r} into these logs "
              f"(add_metric({key!r}, fn) would)")
    known = sorted({*sources.loop_keys(validating=True), *logs})
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if near:
        needs = (" (logged only with a validation loader: set_val_loader)"
                 if near[0] in validation_keys and not sources.validates else "")
        reason += f"; did you mean {near[0]!r}{needs}?"
    return MissingKey(reason, True)
