"""Build a model whose parameters a checkpoint is about to overwrite without drawing their
random initial values.

``NNHandler.load`` constructs the model and then copies the checkpoint's weights into it, so
the random initialisation its constructor runs (``nn.init.kaiming_uniform_`` of every
``nn.Linear``, ``orthogonal_`` of an RNN, ...) is thrown away; on a model of 100 MB it costs
as much as reading and verifying the checkpoint (Hugging Face's ``from_pretrained`` skips it
for the same reason). While :func:`weights_from_checkpoint` names the state-dict keys the
checkpoint will load, :func:`construct` runs the constructor with every *random* initialiser
(:data:`RANDOM_INITIALISERS`) that is called on an ``nn.Parameter`` filling it with zeros
instead. Then

- if every parameter so filled is under a name the checkpoint loads, the model is kept: each
  of them is overwritten by the checkpoint's value before ``load`` returns (a key the file
  lacks fails ``load`` with ``strict=True``);
- otherwise (``strict=False`` and the file lacks a parameter, or a parameter the module's
  ``state_dict`` leaves out) the model is constructed again the usual way, so a parameter the
  checkpoint does not give always has the random initial value it would have had;
- a constructor that fails on the zeros (one that factorises a weight it has just
  initialised, say) is run again the usual way too, whose outcome stands.

Buffers, constant initialisers (``ones_``, ``zeros_``, ``fill_``) and anything the
constructor computes from other tensors run as always. The random streams do not matter:
``load`` restores the checkpoint's afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, Final

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["RANDOM_INITIALISERS", "construct", "weights_from_checkpoint"]

#: the calls whose draw is skipped on a parameter: the tensor methods that fill in place from a
#: random distribution, and the ``torch.nn.init`` functions that dispatch to a torch-function
#: mode themselves. The other random ``nn.init`` functions (``xavier_*``, ``kaiming_normal_``,
#: ``trunc_normal_``, ``sparse_``) end in one of those methods on the parameter, and so are
#: skipped too; ``orthogonal_`` draws into a tensor of its own and copies the result in, so it
#: runs as usual.
RANDOM_INITIALISERS: Final[frozenset[Callable[..., Any]]] = frozenset({
    nn.init.uniform_, nn.init.normal_, nn.init.kaiming_uniform_,
    torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.bernoulli_,
    torch.Tensor.cauchy_, torch.Tensor.exponential_, torch.Tensor.geometric_,
    torch.Tensor.log_normal_, torch.Tensor.random_,
})

_LOADED_NAMES: ContextVar[frozenset[str] | None] = ContextVar("nnhandler_loaded_names",
                                                              default=None)


@contextlib.contextmanager
def weights_from_checkpoint(names: frozenset[str] | None) -> Iterator[None]:
    """Within the block, :func:`construct` may skip the random initialisation of the parameters
    under ``names`` (the model state-dict keys a checkpoint is about to load); ``None``:
    construct as usual."""
    token = _LOADED_NAMES.set(names)
    try:
        yield
    finally:
        _LOADED_NAMES.reset(token)


def construct(model_class: type[nn.Module], model_kwargs: Mapping[str, Any],
              construct_again: Callable[[], contextlib.AbstractContextManager[Any]]
              ) -> nn.Module:
    """``model_class(**model_kwargs)``, without the random initial values of the parameters
    the checkpoint of :func:`weights_from_checkpoint` overwrites. ``construct_again`` gives
    the context (the seeded random streams) a second, usual construction runs in."""
    names = _LOADED_NAMES.get()
    if names is None:
        return model_class(**model_kwargs)
    module = _without_draws(model_class, model_kwargs, names)
    if module is not None:
        return module
    with construct_again():
        return model_class(**model_kwargs)


def _without_draws(model_class: type[nn.Module], model_kwargs: Mapping[str, Any],
                   names: frozenset[str]) -> nn.Module | None:
    """The module constructed with zeros for the random draws of its parameters, if every
    parameter so filled is under one of ``names``; ``None`` otherwise, and where the
    constructor failed on the zeros (one that factorises a weight it has just drawn, say: the
    usual construction then decides)."""
    try:
        with _ZeroFilledParameters() as mode:
            module = model_class(**model_kwargs)
    except Exception:
        return None
    filled = {id(parameter) for parameter in mode.filled}
    if all(name in names for name, parameter in module.named_parameters(remove_duplicate=False)
           if id(parameter) in filled):
        return module
    return None


class _ZeroFilledParameters(TorchFunctionMode):
    """Zeros, instead of a random draw, for a random initialiser called on a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.filled: list[nn.Parameter] = []

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if func in RANDOM_INITIALISERS and isinstance(target, nn.Parameter):
            with torch.no_grad():
                target.zero_()
            self.filled.append(target)  # kept alive, so that no id is reused meanwhile
            return target
        return func(*args, **kwargs)
