"""State providers over objects that already have ``state_dict``/``load_state_dict``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..checkpoint.schema import schema_error

__all__ = ["ComponentState", "ModelState", "check_module_state", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP, DataParallel and ``torch.compile`` wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner
        else:
            return model


def check_module_state(module: nn.Module, state: Any, *, strict: bool = True) -> None:
    """Raise a :class:`~nnhandler.CheckpointSchemaError` unless ``state`` is a state dict that
    ``module.load_state_dict`` takes whole: tensors under the module's keys, with its shapes
    (all keys, with ``strict``). ``load_state_dict`` itself copies what fits before it
    complains, so a bad file would otherwise leave a half-loaded model."""
    if not isinstance(state, dict):
        raise schema_error(f"is a {type(state).__name__}, not a state dict", field="")
    own = module.state_dict()
    if strict:
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise schema_error(f"does not fit {type(module).__qualname__}: missing keys "
                               f"{missing[:5]}, unexpected keys {unexpected[:5]}", field="")
    for key, tensor in state.items():
        expected = own.get(key)
        if expected is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise schema_error(f"is a {type(tensor).__name__}, not a tensor", field=f"[{key!r}]")
        if tensor.shape != expected.shape:
            raise schema_error(f"has shape {tuple(tensor.shape)}; {type(module).__qualname__} "
                               f"expects {tuple(expected.shape)}", field=f"[{key!r}]")


class ComponentState:
    """Provides the state of whatever ``get()`` currently returns (optimizer, scheduler …).

    Looking the object up at every call means a component replaced by a setter is still the one
    saved and restored. ``restored`` is True once a checkpoint's state was loaded into the
    current object; the setter that replaces the object resets it.
    """

    __slots__ = ("_get", "restored", "state_key")

    def __init__(self, state_key: str, get: Callable[[], Any]) -> None:
        self.state_key = state_key
        self._get = get
        self.restored = False

    def state_dict(self) -> Any:
        return self._get().state_dict()

    def check_state(self, state: Any) -> None:
        """A state dict (a dict); a module's (EMA) must fit its keys and shapes."""
        target = self._get()
        if isinstance(target, nn.Module):
            check_module_state(target, state)
        elif not isinstance(state, dict):
            raise schema_error(f"is a {type(state).__name__}, not a state dict", field="")

    def load_state_dict(self, state: Any) -> None:
        self._get().load_state_dict(state)
        self.restored = True


class ModelState(ComponentState):
    """The unwrapped model's weights; ``strict`` demands that the keys match exactly."""

    __slots__ = ("strict",)

    def __init__(self, get_module: Callable[[], nn.Module], strict: bool = True) -> None:
        super().__init__("model", get_module)
        self.strict = strict

    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = unwrap_model(self._get()).state_dict()
        return state

    def check_state(self, state: Any) -> None:
        check_module_state(unwrap_model(self._get()), state, strict=self.strict)

    def load_state_dict(self, state: Any) -> None:
        unwrap_model(self._get()).load_state_dict(state, strict=self.strict)
