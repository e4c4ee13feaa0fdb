"""The original NNHandler's names (``rouzib/NNHandler``), where taking them is cheap and safe.

* :class:`ModelType`: accepted as ``NNHandler(model_type=...)`` with a ``DeprecationWarning``;
  it has no meaning here (the loss function and the metrics define the task).
* :func:`constructor_keywords` sorts the constructor's extra keyword arguments: those the model
  class names go to the model; the original's handler parameters are mapped to ours
  (``logger_filename=`` -> ``log_file=``, ``logger_level=`` -> the handler logger's level) with
  a ``DeprecationWarning``, or refused with a :class:`~nnhandler.ConfigurationError` that names
  what replaces them; a near miss of one of our own parameters is refused with a "did you
  mean"; everything else goes to the model as before.
* :class:`ModelCalls` (mixed into :class:`~nnhandler.NNHandler`): ``handler(x)`` and
  ``handler.eval()`` / ``handler.eval(False)``.

The "Coming from NNHandler" docs page (docs/migration.md) maps every public name.
"""

from __future__ import annotations

import difflib
import enum
import inspect
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from torch import nn

from .errors import ConfigurationError

__all__ = ["ORIGINAL_CONSTRUCTOR_PARAMETERS", "ConstructorKeywords", "ModelCalls", "ModelType",
           "constructor_keywords"]

#: how close (difflib's ratio) an unknown keyword must be to one of ours to be a "near miss"
_NEAR_MISS_CUTOFF: Final = 0.75
#: the warnings point at the user's ``NNHandler(...)`` line: this module, the facade, the user
_STACKLEVEL: Final = 4


class ModelType(enum.Enum):
    """The original NNHandler's model types. Deprecated: nnhandler has none (the loss function
    and the metrics define the task; score-based models train through the ``nnhandler-sde``
    plugin). ``NNHandler(model_type=...)`` accepts a member or its value and warns."""

    CLASSIFICATION = "classification"
    GENERATIVE = "generative"
    REGRESSION = "regression"
    SCORE_BASED = "score_based"


#: the original constructor's parameters that ours does not have, and what each becomes
ORIGINAL_CONSTRUCTOR_PARAMETERS: Final = {
    "model_type": "nothing (deprecated, ignored)",
    "logger_filename": "log_file=",
    "logger_level": "handler.logger.setLevel(level)",
    "logger_filemode": "nothing: log files are always appended to",
    "save_model_code": "nothing: checkpoints record the model class by import path",
    "ddp_kwargs": "nothing: DistributedDataParallel is wrapped with its defaults",
}


@dataclass(frozen=True)
class ConstructorKeywords:
    """The constructor's extra keyword arguments, sorted: the model's arguments, and what the
    original NNHandler's parameters among them map to."""

    model_kwargs: dict[str, Any]
    log_file: str | os.PathLike[str]
    log_level: int | None = None

    def apply_log_level(self, logger: logging.Logger, is_main: bool) -> None:
        """``logger_level=``: the level of the handler's logger (rank 0; the other ranks keep
        logging warnings and errors only)."""
        if self.log_level is not None and is_main:
            logger.setLevel(self.log_level)


def constructor_keywords(model_class: type[nn.Module], kwargs: Mapping[str, Any],
                         model_kwargs: Mapping[str, Any] | None,
                         log_file: str | os.PathLike[str],
                         handler_init: Callable[..., None]) -> ConstructorKeywords:
    """Sort ``NNHandler(..., **kwargs)`` (see the module docstring) and merge the model's
    share with ``model_kwargs=``; ``handler_init`` is the constructor (its own parameter
    names and ``log_file``'s default are read from it). Raises before anything is built."""
    clash = set(kwargs) & set(model_kwargs or {})
    if clash:
        raise ConfigurationError(f"model argument(s) {sorted(clash)} given twice")
    own = inspect.signature(handler_init).parameters
    own_names = sorted(name for name, parameter in own.items() if name != "self"
                       and parameter.kind is not inspect.Parameter.VAR_KEYWORD)
    default_log_file = own["log_file"].default
    named = _model_parameters(model_class)
    model_arguments: dict[str, Any] = dict(model_kwargs or {})
    legacy: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in named:
            model_arguments[name] = value
        elif name in ORIGINAL_CONSTRUCTOR_PARAMETERS:
            legacy[name] = value
        elif (match := difflib.get_close_matches(name, own_names, n=1,
                                                 cutoff=_NEAR_MISS_CUTOFF)):
            raise ConfigurationError(
                f"NNHandler({name}={value!r}): {name!r} is not an argument of NNHandler (did "
                f"you mean {match[0]}=?) nor a parameter of {model_class.__qualname__}; to pass "
                f"it to the model all the same, use model_kwargs={{{name!r}: ...}}")
        else:  # a model without **kwargs raises its own TypeError naming it
            model_arguments[name] = value
    return _map_original(legacy, model_arguments, log_file, default_log_file)


def _model_parameters(model_class: type[nn.Module]) -> frozenset[str]:
    """The keyword names ``model_class(...)`` declares (a ``**kwargs`` model accepts more, but
    declares none: the original's names and near misses of ours are then still ours)."""
    try:
        signature = inspect.signature(model_class)
    except (TypeError, ValueError):  # a signature that cannot be read declares nothing
        return frozenset()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in signature.parameters.values() if p.kind in kinds)


def _deprecated(message: str) -> None:
    warnings.warn(message, DeprecationWarning, stacklevel=_STACKLEVEL + 1)


def _map_original(legacy: Mapping[str, Any], model_kwargs: dict[str, Any],
                  log_file: str | os.PathLike[str],
                  default_log_file: Any) -> ConstructorKeywords:
    """The original NNHandler's constructor parameters, checked first and then mapped."""
    if "save_model_code" in legacy and legacy["save_model_code"] is not False:
        raise ConfigurationError(
            f"NNHandler(save_model_code={legacy['save_model_code']!r}) is not supported: a "
            "checkpoint records the model class by import path ('package.module:Class') and "
            "never code, which it would have to run to use; keep the model's code under "
            "version control, and pass NNHandler.load(..., model_class=...) to load into "
            "another version of it")
    if "ddp_kwargs" in legacy:
        raise ConfigurationError(
            f"NNHandler(ddp_kwargs={legacy['ddp_kwargs']!r}) is not supported: nnhandler wraps "
            "the model in DistributedDataParallel with its default arguments "
            "(parallelism='ddp'); parallelism='fsdp' shards it instead")
    mode = legacy.get("logger_filemode", "a")
    if mode != "a":
        raise ConfigurationError(
            f"NNHandler(logger_filemode={mode!r}) is not supported: nnhandler always appends "
            "to its log file (log_file=); remove the file first to start it afresh")
    model_type = _model_type(legacy["model_type"]) if "model_type" in legacy else None
    level = _log_level(legacy["logger_level"]) if "logger_level" in legacy else None
    if "logger_filename" in legacy:
        filename = legacy["logger_filename"]
        if not isinstance(filename, (str, os.PathLike)):
            raise ConfigurationError(f"NNHandler(logger_filename={filename!r}) must be a path")
        if os.fspath(log_file) not in (default_log_file, os.fspath(filename)):
            raise ConfigurationError(
                f"NNHandler: log_file={os.fspath(log_file)!r} and logger_filename="
                f"{os.fspath(filename)!r} name two log files; pass log_file= alone")
        log_file = filename
        _deprecated("NNHandler(logger_filename=...) is the original NNHandler's name: use "
                    "log_file=...")
    if model_type is not None:
        plugin = (" (score-based models train through the nnhandler-sde plugin)"
                  if model_type is ModelType.SCORE_BASED else "")
        _deprecated(f"NNHandler(model_type={model_type}) is deprecated and ignored: nnhandler "
                    "has no model types, the loss function and the metrics define the task"
                    f"{plugin}; drop the argument")
    if level is not None:
        _deprecated("NNHandler(logger_level=...) is the original NNHandler's: use "
                    "handler.logger.setLevel(level)")
    if "logger_filemode" in legacy:
        _deprecated("NNHandler(logger_filemode='a') has no effect (log files are always "
                    "appended to): drop it")
    if "save_model_code" in legacy:
        _deprecated("NNHandler(save_model_code=False) has no effect (code is never saved): "
                    "drop it")
    return ConstructorKeywords(model_kwargs, log_file, level)


def _model_type(value: Any) -> ModelType:
    if isinstance(value, ModelType):
        return value
    if isinstance(value, enum.Enum):  # the original library's own ModelType members
        value = value.value
    known = {member.value: member for member in ModelType}
    if isinstance(value, str) and value.lower() in known:
        return known[value.lower()]
    choices = ", ".join(repr(member.value) for member in ModelType)
    raise ConfigurationError(f"NNHandler(model_type={value!r}): not a model type (the "
                             f"original NNHandler's were {choices}; the argument is deprecated)")


def _log_level(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and isinstance(logging.getLevelName(value.upper()), int):
        return int(logging.getLevelName(value.upper()))
    raise ConfigurationError(f"NNHandler(logger_level={value!r}): not a logging level (an int "
                             "such as logging.INFO, or a name such as 'INFO')")


class ModelCalls:
    """Mixed into :class:`~nnhandler.NNHandler`: the model's forward pass and mode switch, as
    the original NNHandler offered them. Reads only ``model``."""

    if TYPE_CHECKING:  # the handler's property
        @property
        def model(self) -> nn.Module: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``handler(x)`` is ``handler.model(x)``: the model as trained (DDP-/compile-wrapped
        where it is), with its raw training weights (never the EMA's: ``handler.ema_model(x)``).
        Gradients are recorded as usual: wrap inference in ``torch.no_grad()``."""
        return self.model(*args, **kwargs)

    def eval(self, activate: bool = True) -> None:
        """``eval()`` puts the model in evaluation mode (dropout off, batch-norm statistics
        frozen), ``eval(False)`` back in training mode: ``handler.model.eval()`` /
        ``handler.model.train()``. ``train`` sets the mode each phase needs by itself."""
        if not isinstance(activate, bool):
            raise TypeError(f"eval(activate={activate!r}): activate must be True or False")
        self.model.train(not activate)
