"""Lifecycle events: the one list of hooks, and the dispatcher that calls them.

:class:`Event` is the single source of truth. Each member carries the name of the callback method
that handles it and the keyword arguments it is called with. ``Callback`` gets its no-op hook
methods from this enum, and the dispatcher calls only callbacks whose class overrides a hook.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

__all__ = ["Event", "EventDispatcher", "is_default_hook", "note_failure"]


class Event(enum.Enum):
    """A point in the training lifecycle. ``value`` is the callback method name."""

    TRAIN_BEGIN = ("on_train_begin", ("handler", "start_epoch", "end_epoch"))
    EPOCH_BEGIN = ("on_epoch_begin", ("handler", "epoch"))
    TRAIN_BATCH_BEGIN = ("on_train_batch_begin", ("handler", "epoch", "batch_idx", "batch"))
    TRAIN_BATCH_END = ("on_train_batch_end", ("handler", "epoch", "batch_idx", "batch", "loss"))
    #: after each optimizer step, once its batch is fully accounted (after TRAIN_BATCH_END);
    #: ``mid_epoch`` is a ``nnhandler.loop.MidEpoch`` (where the epoch stands, its running
    #: logs, and the partial-epoch record a checkpoint written now needs). Fired only when
    #: some callback listens (see ``EventDispatcher.rebuild``)
    TRAIN_STEP_END = ("on_train_step_end", ("handler", "epoch", "step", "mid_epoch"))
    VALIDATION_BEGIN = ("on_validation_begin", ("handler", "epoch"))
    VALIDATION_BATCH_BEGIN = (
        "on_validation_batch_begin",
        ("handler", "epoch", "batch_idx", "batch"),
    )
    VALIDATION_BATCH_END = (
        "on_validation_batch_end",
        ("handler", "epoch", "batch_idx", "batch", "loss"),
    )
    VALIDATION_END = ("on_validation_end", ("handler", "epoch", "logs"))
    EPOCH_END = ("on_epoch_end", ("handler", "epoch", "logs"))
    TRAIN_END = ("on_train_end", ("handler", "logs"))
    CHECKPOINT_SAVED = ("on_checkpoint_saved", ("handler", "path", "epoch"))
    CHECKPOINT_LOADED = ("on_checkpoint_loaded", ("handler", "path", "epoch"))
    EXCEPTION = ("on_exception", ("handler", "exception"))

    def __init__(self, hook_name: str, arguments: tuple[str, ...]) -> None:
        self.hook_name: Final = hook_name
        self.arguments: Final = arguments

    @classmethod
    def from_hook_name(cls, name: str) -> Event | None:
        """The event handled by a method called ``name``, or ``None``."""
        return _BY_HOOK_NAME.get(name)


_BY_HOOK_NAME: Final[dict[str, Event]] = {event.hook_name: event for event in Event}

_DEFAULT_HOOK_MARK: Final = "__nnhandler_default_hook__"


def default_hook(function: Any) -> Any:
    """Mark ``function`` as a base-class no-op, which the dispatcher never calls."""
    setattr(function, _DEFAULT_HOOK_MARK, True)
    return function


def is_default_hook(callback: object, event: Event) -> bool:
    """True when ``callback`` does not override the hook of ``event`` (or has none)."""
    hook = getattr(type(callback), event.hook_name, None)
    return hook is None or getattr(hook, _DEFAULT_HOOK_MARK, False)


def validate_hooks(callback: object) -> None:
    """Reject a callback with a misspelt hook or a hook that cannot take the event's arguments.

    Raised at registration so that a typo is found before epoch 40, not silently ignored.
    """
    from .errors import CallbackValidationError

    owner = type(callback).__qualname__
    for name in dir(type(callback)):
        if not name.startswith("on_") or not callable(getattr(type(callback), name, None)):
            continue
        event = Event.from_hook_name(name)
        if event is None:
            known = ", ".join(sorted(_BY_HOOK_NAME))
            raise CallbackValidationError(
                f"callback {owner} defines {name}(), which is not a known hook; "
                f"rename it to one of: {known} (or drop the 'on_' prefix for a helper method)"
            )
        if is_default_hook(callback, event):
            continue
        _check_hook_signature(owner, getattr(callback, name), event)


def _check_hook_signature(owner: str, hook: Any, event: Event) -> None:
    from .errors import CallbackValidationError

    parameters = inspect.signature(hook).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    unknown = [
        p.name
        for p in parameters
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL,) and p.name not in event.arguments
        and p.default is inspect.Parameter.empty
    ]
    positional_only = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    if unknown or positional_only:
        bad = ", ".join(unknown + positional_only)
        raise CallbackValidationError(
            f"{owner}.{event.hook_name}() requires argument(s) {bad} that the event does not "
            f"pass by keyword; it is called with {', '.join(event.arguments)}. "
            f"Accept **kwargs to stay compatible when arguments are added."
        )


def note_failure(error: BaseException, callback: object, event: Event) -> None:
    """Add to ``error`` the note naming the callback and hook it escaped from."""
    error.add_note(f"raised by callback {type(callback).__qualname__} in {event.hook_name}()")


def _listens(callback: object, event: Event) -> bool:
    listens_to = getattr(callback, "listens_to", None)
    return True if listens_to is None else bool(listens_to(event))


class EventDispatcher:
    """Calls, for each event, the callbacks that override its hook, in registration order.

    Callbacks flagged ``is_checkpoint_writer`` run after all others so that the state they
    collect is final. The per-event lists are rebuilt only when the callback list (or a
    callback's configuration, see :meth:`rebuild`) changes, so a batch event with no listener
    costs one dictionary lookup.
    """

    __slots__ = ("_listeners",)

    def __init__(self, callbacks: Iterable[object] = ()) -> None:
        self._listeners: dict[Event, tuple[object, ...]] = {}
        self.rebuild(callbacks)

    def rebuild(self, callbacks: Iterable[object]) -> None:
        """The listeners of each event: callbacks whose class overrides its hook, less those
        whose ``listens_to(event)`` (an optional method) says no for this configuration: an
        instance may decline a per-step event it has nothing to do for, so the loop's hot path
        stays as without it."""
        ordered = sorted(callbacks, key=lambda cb: bool(getattr(cb, "is_checkpoint_writer", False)))
        self._listeners = {
            event: tuple(cb for cb in ordered
                         if not is_default_hook(cb, event) and _listens(cb, event))
            for event in Event
        }

    def has_listeners(self, event: Event) -> bool:
        return bool(self._listeners[event])

    def listeners(self, event: Event) -> Sequence[object]:
        return self._listeners[event]

    def hooks(self, event: Event) -> tuple[Callable[..., Any], ...]:
        """The bound hook methods of ``event``'s listeners, in calling order, for a hot path
        that calls them itself (with :func:`note_failure` on an exception): a per-step event
        costs then one call per listener, not a dispatch. Events with ``before_writers`` need
        :meth:`fire`."""
        return tuple(getattr(callback, event.hook_name) for callback in self._listeners[event])

    def fire(
        self, event: Event, before_writers: Callable[[], None] | None = None, **arguments: Any
    ) -> None:
        """Call every listener of ``event``; an exception propagates with a note naming both.

        ``before_writers`` runs after the ordinary listeners and before the checkpoint writers
        (the loop uses it to make every rank agree on a stop request before anything saves).
        """
        pending_hook = before_writers
        for callback in self._listeners[event]:
            if pending_hook is not None and getattr(callback, "is_checkpoint_writer", False):
                pending_hook()
                pending_hook = None
            try:
                getattr(callback, event.hook_name)(**arguments)
            except BaseException as error:
                note_failure(error, callback, event)
                raise
        if pending_hook is not None:
            pending_hook()
