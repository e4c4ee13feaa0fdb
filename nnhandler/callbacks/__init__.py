"""Callbacks: the base class and the built-in ones."""

from .autosave import AutoSaveCallback
from .base import Callback

__all__ = ["AutoSaveCallback", "Callback"]
