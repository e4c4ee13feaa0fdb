"""The ``Callback`` base class, whose hook methods are generated from :class:`Event`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from ..events import Event, default_hook

__all__ = ["Callback"]


class Callback:
    """Base class for callbacks: override the hooks you need (``on_epoch_end`` …).

    Hooks are called with keyword arguments only (``handler=``, ``epoch=``, ``logs=`` …; see
    :class:`~nnhandler.Event` for each hook's arguments), so an override that accepts
    ``**kwargs`` keeps working when arguments are added. A subclass need not call
    ``super().__init__()``. Only overridden hooks are ever called.

    A callback that also defines ``state_key``, ``state_dict()`` and ``load_state_dict()`` is a
    :class:`~nnhandler.StateProvider`: its state goes into every checkpoint and is restored by
    :meth:`NNHandler.load <nnhandler.NNHandler.load>`.

    Every hook receives the handler as ``handler=``; what a callback may use of it is the
    :class:`~nnhandler.Trainer` protocol. A saver writes through ``handler.checkpoints`` (see
    :mod:`nnhandler.checkpointing`): set :attr:`is_checkpoint_writer`, implement
    :class:`~nnhandler.EmergencySaver` to write emergency checkpoints, and register a factory
    with :func:`~nnhandler.plugins.register_provider_factory` to come back on ``load``.
    """

    #: Declare ``True`` for a callback that writes checkpoints: for every event it runs after
    #: all callbacks that do not, so the state it collects is final (under DDP the ranks agree
    #: on a stop request in between, so every rank saves the same epoch). Among themselves,
    #: writers (and the others) keep their registration order. Any callback may declare it.
    is_checkpoint_writer: ClassVar[bool] = False

    def check_registration(self, callbacks: Sequence[Callback]) -> None:
        """Called when the callback is added to a handler, with the callbacks registered
        there already (and again when its configuration changes in place); raise a
        :class:`~nnhandler.ConfigurationError` (or a subclass) to refuse, naming the conflict.
        The default accepts."""

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}()"


def _make_default_hook(event: Event) -> Any:
    def hook(self: Callback, **kwargs: Any) -> None:
        """Called for this event; the base implementation does nothing and is never called."""

    hook.__name__ = hook.__qualname__ = event.hook_name
    hook.__doc__ = f"Called at {event.name} with keyword arguments: {', '.join(event.arguments)}."
    return default_hook(hook)


for _event in Event:
    setattr(Callback, _event.hook_name, _make_default_hook(_event))
del _event
