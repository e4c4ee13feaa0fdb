"""Checkpoint file names from ``str.format`` templates filled with epoch-end logs.

Rules: the literal text of a template may not hold a path separator or ``..``; fields must be
plain names (``{epoch:03d}``, not ``{0}``, ``{a.b}`` or ``{a[0]}``); formatted values are
sanitised so the file always lands directly inside ``save_path``; ``.pth`` is appended unless the
formatted name already ends with it. A field missing from the logs at save time is written as
``NA`` (its format spec ignored) so that the checkpoint is never lost over a name.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["CHECKPOINT_SUFFIX", "MISSING_VALUE", "render_name", "template_fields",
           "validate_template"]

CHECKPOINT_SUFFIX: Final = ".pth"
MISSING_VALUE: Final = "NA"
_FIELD_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNSAFE: Final = re.compile(r"[/\\\x00:]")
_FORMATTER: Final = string.Formatter()


def _parse(template: str) -> list[tuple[str, str | None, str | None, str | None]]:
    try:
        return list(_FORMATTER.parse(template))
    except ValueError as error:
        raise ValueError(f"malformed name template {template!r}: {error}") from None


def template_fields(template: str) -> tuple[str, ...]:
    return tuple(field for _, field, _, _ in _parse(template) if field is not None)


def validate_template(template: str) -> str:
    """Return ``template`` if it is a usable name template, else raise ``ValueError``."""
    if not template:
        raise ValueError("name template must not be empty")
    parts = _parse(template)
    literal = "".join(text for text, _, _, _ in parts)
    if "/" in literal or "\\" in literal or ".." in literal or "\x00" in literal:
        raise ValueError(
            f"name template {template!r} contains a path separator or '..'; put directories "
            "in save_path and keep name a plain file name"
        )
    sample: dict[str, Any] = {}
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if not _FIELD_NAME.match(field):
            raise ValueError(
                f"name template {template!r} has field {{{field}}}: use plain log keys such "
                "as {epoch:03d} or {val_loss:.4f} (no positions, attributes or indexing)"
            )
        if spec and ("{" in spec):
            raise ValueError(f"name template {template!r}: nested fields are not supported")
        del conversion
        sample[field] = 1 if field == "epoch" else 0.5
    _check_specs(template, parts, sample)
    return template


def _check_specs(
    template: str,
    parts: list[tuple[str, str | None, str | None, str | None]],
    sample: dict[str, Any],
) -> None:
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        value = _convert(sample[field], conversion)
        for candidate in (value, 1):
            try:
                format(candidate, spec or "")
                break
            except (ValueError, TypeError):
                continue
        else:
            raise ValueError(
                f"name template {template!r}: format spec {spec!r} of field {{{field}}} fits "
                "neither a number nor an integer"
            )


def _convert(value: Any, conversion: str | None) -> Any:
    if conversion is None:
        return value
    if conversion in ("s", "r", "a"):
        return _FORMATTER.convert_field(value, conversion)
    raise ValueError(f"unknown conversion !{conversion}")


def _sanitise(text: str) -> str:
    return _UNSAFE.sub("_", text)


def render_name(template: str, logs: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """The file name for ``logs`` and the template fields that were missing from them.

    The result never contains a path separator, never starts with a dot and always ends with
    ``.pth``, so joined to a directory it names a visible file directly inside it.
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
        value = _convert(logs[field], conversion)
        try:
            formatted = format(value, spec or "")
        except (ValueError, TypeError):  # e.g. {epoch:03d} given a str added by a callback
            formatted = str(value)
        pieces.append(_sanitise(formatted))
    name = "".join(pieces)
    if not name.endswith(CHECKPOINT_SUFFIX):
        name += CHECKPOINT_SUFFIX
    if name.startswith("."):  # hidden names are reserved for temp files
        # replace the dot, but keep the suffix when the whole name is just ".pth"
        name = "_" + (name if name == CHECKPOINT_SUFFIX else name[1:])
    return name, tuple(dict.fromkeys(missing))
