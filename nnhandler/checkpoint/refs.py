"""Classes and functions recorded as ``"package.module:QualName"`` strings, resolved on load.

Resolving a reference imports the named module (as ``import`` would) and nothing else runs.
A reference resolves only to a subclass of the expected base, or to a plain function where a
function is expected, so a checkpoint cannot smuggle in an arbitrary callable.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Final, TypeVar

from ..errors import ConfigurationError, UnresolvableReferenceError

__all__ = ["REF_KEY", "decode_value", "encode_value", "reference_of", "resolve_class",
           "resolve_function"]

REF_KEY: Final = "__nnhandler_ref__"
_DOTTED: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
T = TypeVar("T")


class NotReferenceableError(ConfigurationError):
    """An object cannot be recorded by import path (lambda, closure, local class)."""


def reference_of(obj: Any) -> str:
    """``"module:QualName"`` for a module-level class or function; raises if there is none."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise NotReferenceableError(f"{obj!r} has no module and qualified name to record")
    if "<" in qualname:  # <lambda>, <locals>
        raise NotReferenceableError(
            f"{module}.{qualname} is a lambda or defined inside a function and cannot be "
            "recorded by import path; define it at module level"
        )
    return f"{module}:{qualname}"


def _lookup(reference: str) -> Any:
    if not isinstance(reference, str) or reference.count(":") != 1:
        raise UnresolvableReferenceError(f"malformed reference {reference!r}: want 'module:Name'")
    module_name, qualname = reference.split(":")
    if not _DOTTED.match(module_name) or not _DOTTED.match(qualname):
        raise UnresolvableReferenceError(f"malformed reference {reference!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise UnresolvableReferenceError(
            f"cannot import module {module_name!r} named by {reference!r}: {error}"
        ) from error
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UnresolvableReferenceError(
                f"{reference!r}: module {module_name!r} has no attribute {qualname!r}"
            ) from None
    return obj


def resolve_class(reference: str, base: type[T]) -> type[T]:
    """The class named by ``reference``, which must be a subclass of ``base``."""
    obj = _lookup(reference)
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        raise UnresolvableReferenceError(
            f"{reference!r} resolves to {obj!r}, which is not a subclass of "
            f"{base.__module__}.{base.__qualname__}; refusing to use it"
        )
    return obj


def resolve_function(reference: str, trusted_packages: frozenset[str]) -> Any:
    """The Python function named by ``reference``, from one of ``trusted_packages`` only.

    A function has no base class to check against, so a checkpoint could otherwise name
    ``os.system``; functions are accepted only from the given top-level packages (the model's
    own package, ``torch``, ``__main__``) and never as C builtins.
    """
    package = reference.split(":", 1)[0].split(".", 1)[0]
    if package not in trusted_packages:
        raise UnresolvableReferenceError(
            f"{reference!r}: functions are restored only from {sorted(trusted_packages)}; "
            "set it again after loading"
        )
    obj = _lookup(reference)
    if not inspect.isfunction(obj):
        raise UnresolvableReferenceError(
            f"{reference!r} resolves to {obj!r}, which is not a Python function; refusing it"
        )
    return obj


_PLAIN_SCALARS: Final = (bool, int, float, str, type(None))


def encode_value(value: Any, where: str) -> Any:
    """``value`` as checkpoint-safe plain data; classes and functions become references.

    Raises :class:`NotReferenceableError` naming ``where`` for anything else.
    """
    import torch

    if isinstance(value, (*_PLAIN_SCALARS, torch.dtype, torch.Tensor)):
        return value
    if isinstance(value, (list, tuple)):
        encoded = [encode_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return encoded if isinstance(value, list) else tuple(encoded)
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise NotReferenceableError(f"{where} is a dict with non-str keys: {value!r}")
        return {k: encode_value(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, torch.device):
        return {REF_KEY: "torch:device", "args": str(value)}
    if inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value):
        return {REF_KEY: reference_of(value)}
    raise NotReferenceableError(
        f"{where} = {value!r} ({type(value).__qualname__}) cannot be stored in a checkpoint: "
        "use numbers, strings, lists, dicts, tensors, dtypes, or module-level classes/functions"
    )


def decode_value(value: Any) -> Any:
    """Inverse of :func:`encode_value`; references resolve to classes or functions only."""
    if isinstance(value, list):
        return [decode_value(item) for item in value]
    if isinstance(value, tuple):
        return tuple(decode_value(item) for item in value)
    if isinstance(value, dict):
        if REF_KEY in value:
            if value[REF_KEY] == "torch:device":
                import torch

                return torch.device(value["args"])
            obj = _lookup(value[REF_KEY])
            if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                raise UnresolvableReferenceError(
                    f"{value[REF_KEY]!r} is neither a class nor a function; refusing to use it"
                )
            return obj
        return {k: decode_value(v) for k, v in value.items()}
    return value
