"""The trust boundary: every value read back from a checkpoint is checked against a declared
schema before anything acts on it.

A checkpoint is data from an untrusted source. Each structure nnhandler reads back (the
envelope's ``format`` and ``meta``, the integrity record, a sharded checkpoint's manifest, the
retention index, the handler configuration and the state of every component nnhandler owns) has
a pydantic model here or beside its owner, derived from :class:`Schema` (strict, frozen, no
unknown fields). :func:`validate` turns a mismatch into a
:class:`~nnhandler.CheckpointSchemaError` that names the file and the field, so a crafted or
damaged file is refused with one clear error instead of a ``KeyError`` deep inside a restore.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import CheckpointSchemaError

__all__ = ["LogValue", "Schema", "describe_location", "relocate", "schema_error", "validate"]

S = TypeVar("S", bound=BaseModel)


#: a value of an epoch's logs as checkpoints record it (meta, integrity record, manifest,
#: history): plain scalars only
LogValue = bool | int | float | str | None


class Schema(BaseModel):
    """Base of every checkpoint schema: strict types, immutable, unknown fields refused."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", defer_build=True)


def describe_location(location: tuple[int | str, ...]) -> str:
    """A pydantic error location as ``a.b[0].c``."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _message(path: str | None, field: str, detail: str) -> str:
    source = f"{path!r}: " if path is not None else ""
    return (f"{source}{field} {detail} (the file does not match the checkpoint schema: it was "
            "not written by this nnhandler version, or it was altered)")


def schema_error(detail: str, *, field: str, path: str | None = None) -> CheckpointSchemaError:
    """A :class:`~nnhandler.CheckpointSchemaError` for ``field`` (``detail`` says what is
    wrong with it, e.g. ``"is 'abc': not an integer"``)."""
    error = CheckpointSchemaError(_message(path, field, detail), path=path, field=field)
    error.detail = detail  # type: ignore[attr-defined]
    return error


def relocate(error: CheckpointSchemaError, *, prefix: str,
             path: str | None) -> CheckpointSchemaError:
    """``error`` (raised for a value's own fields) as seen from the file: its field under
    ``prefix`` (``"state['progress']"``) and the file named."""
    inner = error.field or ""
    if not inner:
        field = prefix
    elif inner.startswith(prefix):  # the owner already named its place in the file
        field = inner
    elif inner.startswith((".", "[")):
        field = prefix + inner
    else:
        field = f"{prefix}.{inner}"
    detail = getattr(error, "detail", str(error))
    return schema_error(detail, field=field, path=path if path is not None else error.path)


def validate(schema: type[S], data: Any, *, where: str, path: str | None = None) -> S:
    """``data`` as an instance of ``schema``; a :class:`~nnhandler.CheckpointSchemaError`
    naming ``path`` (the file) and the field (``where`` plus the location inside it) when it
    does not fit. ``where`` may be ``""`` for a value whose location the caller adds later
    (:func:`relocate`)."""
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        inner = describe_location(tuple(first["loc"]))
        field = f"{where}.{inner}" if inner and where else inner or where or "(value)"
        shown = repr(first.get("input"))
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise schema_error(f"is {shown}: {first['msg']}", field=field, path=path) from None
