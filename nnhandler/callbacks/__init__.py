"""Callbacks: the base class and the built-in ones."""

from .autosave import AutoSaveCallback
from .base import Callback
from .csv_logger import CSVLogger
from .early_stopping import EarlyStopping
from .lr_monitor import LearningRateMonitor
from .tensorboard import TensorBoardLogger

__all__ = [
    "AutoSaveCallback",
    "CSVLogger",
    "Callback",
    "EarlyStopping",
    "LearningRateMonitor",
    "TensorBoardLogger",
]
