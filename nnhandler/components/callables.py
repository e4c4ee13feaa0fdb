"""Loss functions and metrics recorded by import path, so that a loaded handler gets them back.

Recordable: module-level functions, and ``nn.Module`` classes or instances whose constructor
arguments can be read back (an instance's ``__init__`` parameters found as same-named
attributes; tensors among them are stored as tensors) plus their buffers. Anything else — a
lambda, a closure, a callable object — is not recorded; the user sets it again after ``load``.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Literal

from ..checkpoint.refs import (
    NotReferenceableError,
    decode_arguments,
    encode_value,
    reference_of,
    resolve_class,
    resolve_function,
)
from ..checkpoint.schema import Schema
from ..errors import UnresolvableReferenceError

if TYPE_CHECKING:  # torch is imported where a callable is described or built, not by the schemas
    from torch import nn

__all__ = ["CallableSpec", "FunctionSpec", "ModuleSpec", "build_callable", "describe_callable"]


def describe_callable(obj: Any, what: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(spec, None)`` when ``obj`` can be recorded, else ``(None, reason)``."""
    from torch import nn

    try:
        if isinstance(obj, nn.Module):
            return _describe_module(obj, what), None
        if inspect.isfunction(obj) or inspect.isbuiltin(obj):
            return {"kind": "function", "ref": reference_of(obj)}, None
    except NotReferenceableError as error:
        return None, str(error)
    return None, f"{what} {obj!r} is neither a module-level function nor an nn.Module"


def _describe_module(module: nn.Module, what: str) -> dict[str, Any]:
    cls = type(module)
    kwargs: dict[str, Any] = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if hasattr(module, name):
            kwargs[name] = encode_value(getattr(module, name), f"{what}.{name}")
        elif parameter.default is inspect.Parameter.empty:
            raise NotReferenceableError(
                f"{what} {cls.__qualname__}: constructor argument {name!r} is not stored as an "
                "attribute and cannot be recovered"
            )
    return {
        "kind": "module",
        "ref": reference_of(cls),
        "kwargs": kwargs,
        "state": module.state_dict(),
    }


class FunctionSpec(Schema):
    """A recorded module-level function (schema of what a checkpoint may hold)."""

    kind: Literal["function"]
    ref: str


class ModuleSpec(Schema):
    """A recorded ``nn.Module`` loss or metric: class, constructor arguments, buffers."""

    kind: Literal["module"]
    ref: str
    kwargs: dict[str, Any]
    state: dict[str, Any]


CallableSpec = FunctionSpec | ModuleSpec


def build_callable(spec: FunctionSpec | ModuleSpec, trusted: frozenset[str]) -> Any:
    """The function or module a (validated) spec from :func:`describe_callable` describes.

    Functions are resolved from ``trusted`` modules only (see ``resolve_function``); modules
    must be ``nn.Module`` subclasses, and a constructor argument that is a function is never
    taken from the file (:class:`~nnhandler.UnresolvableReferenceError` says which to pass).
    """
    from torch import nn

    if isinstance(spec, FunctionSpec):
        return resolve_function(spec.ref, trusted)
    cls = resolve_class(spec.ref, nn.Module)
    kwargs, unrestored = decode_arguments(spec.kwargs, f"{cls.__qualname__} argument")
    if unrestored:
        raise UnresolvableReferenceError(
            f"{cls.__qualname__} argument(s) {[u.name for u in unrestored]} name "
            f"{[u.reference for u in unrestored]}; a checkpoint never supplies functions")
    module = cls(**kwargs)
    module.load_state_dict(spec.state, strict=False)
    return module
