"""The callbacks registered with one handler.

:class:`RegisteredCallbacks` keeps them in registration order, checks each one as it joins
(a :class:`~nnhandler.Callback`, not twice, hooks with the documented signatures, its own
:meth:`~nnhandler.Callback.check_registration`), enters a state-providing one into the
handler's :class:`~nnhandler.StateRegistry` (which gives it back its state at once when a
loaded checkpoint holds some under its key) and keeps the event dispatcher's listener lists in
step with the registrations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .callbacks import Callback
from .errors import ConfigurationError
from .events import EventDispatcher, validate_hooks
from .state import StateProvider, StateRegistry

__all__ = ["RegisteredCallbacks"]


class RegisteredCallbacks:
    """One handler's callbacks (see the module docstring)."""

    def __init__(self, registry: StateRegistry, dispatcher: EventDispatcher,
                 logger: logging.Logger) -> None:
        self.registry = registry
        self.dispatcher = dispatcher
        self.logger = logger
        self.callbacks: list[Callback] = []

    def add(self, callback: Callback) -> None:
        if not isinstance(callback, Callback):
            raise TypeError(f"{callback!r} is not an nnhandler.Callback; subclass Callback "
                            "(or use register_state_provider for state without hooks)")
        if any(existing is callback for existing in self.callbacks):
            raise ConfigurationError(f"callback {callback!r} is already registered")
        validate_hooks(callback)
        callback.check_registration(tuple(self.callbacks))
        if isinstance(callback, StateProvider) and self.registry.register(callback):
            self.logger.info("restored state of %r from the loaded checkpoint", callback)
        self.callbacks.append(callback)
        self.dispatcher.rebuild(self.callbacks)

    def remove(self, callback: Callback) -> None:
        for index, existing in enumerate(self.callbacks):
            if existing is callback:
                del self.callbacks[index]
                break
        else:
            raise ValueError(f"callback {callback!r} is not registered")
        if isinstance(callback, StateProvider):
            self.registry.unregister(callback)
        self.dispatcher.rebuild(self.callbacks)

    def reconfigure(self, callback: Callback, change: Callable[[], None],
                    undo: Callable[[], None]) -> None:
        """Change a registered state-providing ``callback`` (``change``; its state key may
        change with it) and check it again as if it joined now; on any error ``undo`` puts the
        previous configuration back and the error propagates."""
        if not isinstance(callback, StateProvider):
            raise TypeError(f"{callback!r} provides no state to reconfigure")
        self.registry.unregister(callback)
        change()
        try:
            callback.check_registration(tuple(self.callbacks))
            self.registry.register(callback)
        except Exception:
            undo()
            self.registry.register(callback)
            raise
        finally:  # the events it listens to may depend on its configuration
            self.dispatcher.rebuild(self.callbacks)
