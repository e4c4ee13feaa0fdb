"""What a checkpoint records of the handler's configuration, and how it comes back.

Classes are recorded by reference and resolved only under the rules of
:mod:`.checkpoint.refs`; constructor arguments a file cannot supply (functions) are named so
that ``load`` can say which call supplies them again.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint.refs import (
    NotReferenceableError,
    Unrestored,
    decode_arguments,
    encode_value,
    reference_of,
    resolve_class,
)
from .errors import CheckpointError, UnresolvableReferenceError

__all__ = ["encode_arguments", "maybe_reference", "require_passed", "require_reference",
           "resolve_fsdp_units", "resolve_model_class", "restorable_arguments", "same_setting",
           "signature_defaults", "storable", "to_device"]


def signature_defaults(cls: type[Any]) -> dict[str, Any]:
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return {}
    return {name: parameter.default for name, parameter in parameters.items()
            if parameter.default is not inspect.Parameter.empty}


def same_setting(a: Any, b: Any) -> bool:
    """Equal hyper-parameter values: numbers by value (0 == 0.0, a 1-element tensor as its
    number), sequences element by element (a tuple read back as a list is the same)."""
    if isinstance(a, torch.Tensor) and a.numel() == 1:
        a = a.item()
    if isinstance(b, torch.Tensor) and b.numel() == 1:
        b = b.item()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_setting(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and bool(torch.equal(a, b)))
    return bool(a == b)


def encode_arguments(arguments: Mapping[str, Any], what: str) -> None:
    for name, value in arguments.items():
        encode_value(value, f"{what} {name!r}")


def maybe_reference(cls: type[Any]) -> str | None:
    try:
        return reference_of(cls)
    except NotReferenceableError:
        return None


def restorable_arguments(encoded: Mapping[str, Any], cls: type[Any]) -> dict[str, Any]:
    """Constructor arguments of ``cls`` as a file may supply them; a function-valued one (a
    ``LambdaLR``'s ``lr_lambda``) means the component is not re-created from the file."""
    kwargs, unrestored = decode_arguments(encoded, f"{cls.__qualname__} argument")
    if unrestored:
        raise UnresolvableReferenceError(
            f"{cls.__qualname__} argument(s) "
            + ", ".join(f"{u.name}={u.reference}" for u in unrestored)
            + " are functions or callables, which a checkpoint never supplies")
    return kwargs


def require_passed(what: str, argument: str, path: str | os.PathLike[str],
                    given: Mapping[str, Any], needed: Iterable[str],
                    unrestored: Iterable[Unrestored]) -> None:
    """Raise unless every name in ``needed`` is in ``given`` (what ``load`` cannot take from
    the file), naming each one and the ``load`` argument that supplies it."""
    absent = [name for name in needed if name not in given]
    if not absent:
        return
    details = {u.name: u.reference for u in unrestored if u.name in absent}
    named = ", ".join(f"{name} (recorded as {details[name]})" if name in details else name
                      for name in absent)
    raise CheckpointError(
        f"{what} {named} of {str(path)!r} cannot be restored from the file (functions, "
        f"lambdas and other callables never are); pass them: NNHandler.load({str(path)!r}, "
        f"{argument})")


def require_reference(reference: str | None, what: str) -> str:
    if reference is None:
        raise UnresolvableReferenceError(f"the {what} class was local and was not recorded")
    return reference


def resolve_model_class(
    reference: str | None, path: str | os.PathLike[str]
) -> type[nn.Module]:
    try:
        return resolve_class(require_reference(reference, "model"), nn.Module)
    except UnresolvableReferenceError as error:
        raise UnresolvableReferenceError(
            f"{error}. Pass the class explicitly: NNHandler.load({str(path)!r}, model_class=...)"
        ) from error


def resolve_fsdp_units(
    references: Iterable[str | None], path: str | os.PathLike[str]
) -> tuple[type[nn.Module], ...]:
    units = []
    for reference in references:
        try:
            units.append(resolve_class(require_reference(reference, "FSDP unit"), nn.Module))
        except UnresolvableReferenceError as error:
            raise UnresolvableReferenceError(
                f"{error}. Pass the classes explicitly: NNHandler.load({str(path)!r}, "
                "fsdp_units=[...])"
            ) from error
    return tuple(units)


def to_device(obj: Any, device: torch.device) -> Any:
    return obj.to(device) if isinstance(obj, nn.Module) else obj


def storable(value: Any) -> bool:
    try:
        encode_value(value, "loader argument")
    except NotReferenceableError:
        return False
    return True
