"""The schema of a checkpoint's ``rng`` state, without torch.

:class:`~.rng.RNGState` writes the random streams as tensors; ``nnhandler verify`` checks them
without torch, where each tensor is a :class:`~nnhandler.checkpoint.plainread.TensorRef`.
The checks accept either and look only at the dtype and the shape.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field

from ..checkpoint.plainread import tensor_facts
from ..checkpoint.schema import Schema, schema_error, validate

__all__ = ["RNGRecord", "check_rng_state"]


def _tensor_of(dtype: str, length: int | None = None) -> Any:
    """A pydantic type: a 1-D tensor (or tensor reference) of ``dtype`` (and ``length``)."""

    def check(value: Any) -> Any:
        facts = tensor_facts(value)
        if facts is None:
            raise ValueError(f"expected a 1-D torch.{dtype} tensor, got a "
                             f"{type(value).__qualname__}")
        found, shape = facts
        if found != dtype or len(shape) != 1:
            raise ValueError(f"expected a 1-D torch.{dtype} tensor, got torch.{found} with "
                             f"shape {shape}")
        if length is not None and shape[0] != length:
            raise ValueError(f"expected {length} values, got {shape[0]}")
        return value

    return Annotated[Any, AfterValidator(check)]


class PythonRNG(Schema):
    version: int
    state: _tensor_of("int64", 625)  # type: ignore[valid-type]
    gauss: float | None


class NumpyRNG(Schema):
    kind: str
    keys: _tensor_of("int64", 624)  # type: ignore[valid-type]
    pos: Annotated[int, Field(ge=0, le=624)]
    has_gauss: int
    cached_gaussian: float


class RankRNG(Schema):
    python: PythonRNG
    torch: _tensor_of("uint8")  # type: ignore[valid-type]
    cuda: list[_tensor_of("uint8")]  # type: ignore[valid-type]
    numpy: NumpyRNG | None = None


class RNGRecord(Schema):
    """What a checkpoint's ``rng`` state may hold: one entry per saving rank."""

    world_size: Annotated[int, Field(ge=1)]
    ranks: Annotated[list[RankRNG], Field(min_length=1)]


def check_rng_state(state: Any) -> None:
    """Raise :class:`~nnhandler.CheckpointSchemaError` unless ``state`` fits :class:`RNGRecord`
    and holds one entry per rank of its ``world_size``."""
    record = validate(RNGRecord, state, where="")
    if record.world_size != len(record.ranks):
        raise schema_error(f"is {record.world_size}, but the state holds "
                           f"{len(record.ranks)} rank(s)", field=".world_size")
