"""Checkpoint envelope, atomic writer and safe loader."""

from .envelope import FORMAT_NAME, FORMAT_VERSION, Checkpoint, read_checkpoint, write_checkpoint
from .writer import TEMP_INFIX, atomic_write

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TEMP_INFIX",
    "Checkpoint",
    "atomic_write",
    "read_checkpoint",
    "write_checkpoint",
]
