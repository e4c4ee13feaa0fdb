"""Classes and functions recorded as ``"package.module:QualName"`` strings, resolved on load.

The trust rule (docs/loading.md, docs/architecture.md "Trust boundary"):

* A reference read from a checkpoint is looked up only among the modules **already imported**
  in this process (``sys.modules``): a file never makes nnhandler import anything, so no module
  runs its import-time code on a file's word. Import your model's module before
  ``NNHandler.load`` (a script that defines or imports the model has done so), or pass
  ``model_class=``. The trade-off: a checkpoint of a class from a module nobody imported fails
  with an error that says which module to import, instead of importing it.
* The reference must be *canonical*: the object found must report exactly that module and
  qualified name (``reference_of(obj) == reference``), so an attribute chain such as
  ``"__main__:os.system"`` or ``"pkg:Class.__init__.__globals__"`` never reaches anything;
  no part of the qualified name may be a dunder.
* A class resolves only to a subclass of the base the caller expects (``nn.Module`` for a model,
  ``Optimizer`` for an optimizer, …).
* A function resolves only where a function *is* the recorded thing (a loss function or a
  metric set by the user), only to a plain Python function (never a C builtin), and only from
  the trusted packages the caller names (the script, the model's package,
  ``torch.nn.functional``).
* Function-valued or other callable-valued *arguments* (a scheduler's ``lr_lambda``, a loader's
  ``collate_fn``/``worker_init_fn``, a compile ``backend``, anything else) are never resolved
  from a file: :func:`decode_arguments` reports them as :class:`Unrestored` so the caller can
  tell the user to pass them again. Inside arguments, class references resolve only to
  ``nn.Module`` subclasses (e.g. ``activation=nn.GELU``).
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ..errors import ConfigurationError, UnresolvableReferenceError

__all__ = ["REF_KEY", "Unrestored", "decode_arguments", "encode_value", "reference_of",
           "resolve_class", "resolve_function"]

REF_KEY: Final = "__nnhandler_ref__"
_DEVICE_REF: Final = "torch:device"
_NAME: Final = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED: Final = re.compile(rf"^{_NAME}(\.{_NAME})*$")
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


def _split(reference: Any) -> tuple[str, str]:
    if not isinstance(reference, str) or reference.count(":") != 1:
        raise UnresolvableReferenceError(f"malformed reference {reference!r}: want 'module:Name'")
    module_name, qualname = reference.split(":")
    if not _DOTTED.match(module_name) or not _DOTTED.match(qualname):
        raise UnresolvableReferenceError(f"malformed reference {reference!r}")
    if any(part.startswith("__") for part in qualname.split(".")):
        raise UnresolvableReferenceError(
            f"reference {reference!r} names a dunder attribute; refusing it")
    return module_name, qualname


def check_reference(reference: Any) -> str:
    """``reference`` if it is a well-formed ``"module:QualName"`` string (nothing is looked
    up); else :class:`~nnhandler.UnresolvableReferenceError`."""
    _split(reference)
    return str(reference)


def _lookup(reference: str) -> Any:
    """The canonical object ``reference`` names, in an already imported module only."""
    module_name, qualname = _split(reference)
    module = sys.modules.get(module_name)
    if module is None:
        raise UnresolvableReferenceError(
            f"{reference!r}: module {module_name!r} is not imported in this process; "
            "nnhandler never imports a module on a checkpoint's word — import it before "
            "loading (a script that defines or imports the class has done so), or pass the "
            "class explicitly"
        )
    obj: Any = module
    for part in qualname.split("."):
        try:
            obj = inspect.getattr_static(obj, part)
        except AttributeError:
            raise UnresolvableReferenceError(
                f"{reference!r}: module {module_name!r} has no attribute {qualname!r}"
            ) from None
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    try:
        canonical = reference_of(obj)
    except NotReferenceableError:
        canonical = None
    if canonical != reference:
        raise UnresolvableReferenceError(
            f"{reference!r} leads to {obj!r:.80}, which is not defined under that name "
            f"(it reports {canonical!r}); refusing it"
        )
    return obj


def resolve_class(reference: str, base: type[T] | tuple[type[Any], ...]) -> type[T]:
    """The class named by ``reference``, which must be a subclass of ``base`` (a class or a
    tuple of classes)."""
    obj = _lookup(reference)
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        bases = base if isinstance(base, tuple) else (base,)
        names = " or ".join(f"{b.__module__}.{b.__qualname__}" for b in bases)
        raise UnresolvableReferenceError(
            f"{reference!r} resolves to {obj!r}, which is not a subclass of {names}; "
            "refusing to use it"
        )
    return obj


def resolve_function(reference: str, trusted: frozenset[str]) -> Any:
    """The Python function named by ``reference``, from a trusted module only.

    ``trusted`` holds top-level package names (``"__main__"``, the model's package) or full
    module names (``"torch.nn.functional"``); the reference's module must be one of them or
    inside one of the packages. C builtins (``os:_exit``) are never accepted.
    """
    module_name, _ = _split(reference)
    package = module_name.split(".", 1)[0]
    if package not in trusted and module_name not in trusted:
        raise UnresolvableReferenceError(
            f"{reference!r}: functions are restored only from {sorted(trusted)}; "
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
        if REF_KEY in value:
            raise NotReferenceableError(f"{where} uses the reserved key {REF_KEY!r}")
        return {k: encode_value(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, torch.device):
        return {REF_KEY: _DEVICE_REF, "args": str(value)}
    if inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value):
        return {REF_KEY: reference_of(value)}
    raise NotReferenceableError(
        f"{where} = {value!r} ({type(value).__qualname__}) cannot be stored in a checkpoint: "
        "use numbers, strings, lists, dicts, tensors, dtypes, or module-level classes/functions"
    )


@dataclass(frozen=True)
class Unrestored:
    """An argument a checkpoint recorded but never supplies on load (a function or another
    callable): ``name`` is the argument, ``reference`` what the file named, ``reason`` why it
    was not restored."""

    name: str
    reference: str
    reason: str


class _NotRestorable(Exception):
    def __init__(self, reference: str, reason: str) -> None:
        super().__init__(reason)
        self.reference, self.reason = reference, reason


def decode_arguments(encoded: Any, where: str) -> tuple[dict[str, Any], tuple[Unrestored, ...]]:
    """Keyword arguments recorded by :func:`encode_value`, as far as a file may supply them.

    Returns the arguments that were restored and, separately, those that were not (function
    and other callable references, classes that are not ``nn.Module`` subclasses, references
    that do not resolve): the caller tells the user to pass those again. Malformed data is an
    :class:`~nnhandler.UnresolvableReferenceError` naming ``where``.
    """
    if not isinstance(encoded, Mapping) or not all(isinstance(k, str) for k in encoded):
        raise UnresolvableReferenceError(f"{where}: recorded arguments must be a dict with str "
                                         f"keys, got {encoded!r:.80}")
    restored: dict[str, Any] = {}
    unrestored: list[Unrestored] = []
    for name, value in encoded.items():
        try:
            restored[name] = _decode(value, f"{where} {name!r}")
        except _NotRestorable as refusal:
            unrestored.append(Unrestored(name, refusal.reference, refusal.reason))
    return restored, tuple(unrestored)


def _decode(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return [_decode(item, where) for item in value]
    if isinstance(value, tuple):
        return tuple(_decode(item, where) for item in value)
    if isinstance(value, dict):
        if REF_KEY in value:
            return _decode_reference(value, where)
        return {k: _decode(v, where) for k, v in value.items()}
    return value


def _decode_reference(value: Mapping[str, Any], where: str) -> Any:
    reference = value[REF_KEY]
    if reference == _DEVICE_REF:
        import torch

        if set(value) != {REF_KEY, "args"} or not isinstance(value["args"], str):
            raise UnresolvableReferenceError(f"{where}: malformed device record {value!r:.80}")
        try:
            return torch.device(value["args"])
        except RuntimeError as error:
            raise UnresolvableReferenceError(
                f"{where}: {value['args']!r} is not a device: {error}") from None
    if set(value) != {REF_KEY}:
        raise UnresolvableReferenceError(f"{where}: malformed reference record {value!r:.80}")
    check_reference(reference)
    try:
        obj = _lookup(reference)
    except UnresolvableReferenceError as error:
        raise _NotRestorable(reference, str(error)) from None
    from torch import nn

    if inspect.isclass(obj) and issubclass(obj, nn.Module):
        return obj
    kind = "a class" if inspect.isclass(obj) else "a function or other callable"
    raise _NotRestorable(
        reference, f"{reference!r} is {kind}; a checkpoint never supplies one as an argument")
