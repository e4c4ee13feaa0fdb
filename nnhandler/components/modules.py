"""State providers over objects that already have ``state_dict``/``load_state_dict``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["ComponentState", "ModelState", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP, DataParallel and ``torch.compile`` wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner
        else:
            return model


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

    def load_state_dict(self, state: Any) -> None:
        unwrap_model(self._get()).load_state_dict(state, strict=self.strict)
