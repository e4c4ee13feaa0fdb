"""Callbacks: the base class and the built-in ones."""

from .autosave import AutoSaveCallback
from .autosave_options import AutoSaveOptions, EmergencySaves, Retention
from .base import Callback
from .csv_logger import CSVLogger
from .early_stopping import EarlyStopping
from .lr_monitor import LearningRateMonitor
from .tensorboard import TensorBoardLogger

__all__ = [
    "AutoSaveCallback",
    "AutoSaveOptions",
    "CSVLogger",
    "Callback",
    "EarlyStopping",
    "EmergencySaves",
    "LearningRateMonitor",
    "Retention",
    "TensorBoardLogger",
]
