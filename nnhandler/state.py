"""The ``StateProvider`` protocol and the registry that collects and restores state by key."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .checkpoint.schema import relocate
from .errors import CheckpointError, CheckpointSchemaError, DuplicateStateKeyError

__all__ = ["RestoreResult", "StateProvider", "StateRegistry"]


@runtime_checkable
class StateProvider(Protocol):
    """Anything that contributes state to a checkpoint.

    ``state_key`` names its entry in the checkpoint and must be unique on a handler.
    ``state_dict()`` must be cheap and free of side effects: it may be called at any save, and it
    must return only tensors, numbers, strings, ``None`` and lists/tuples/dicts of those (the
    checkpoint opens with ``torch.load(weights_only=True)``). ``load_state_dict(state)`` receives
    exactly what ``state_dict()`` returned. A provider may also define
    ``check_state(state)``: it is called for every provider before any state of a checkpoint is
    loaded (the file is untrusted data), and raises — typically a
    :class:`~nnhandler.CheckpointSchemaError` from a pydantic schema — when ``state`` does not
    fit, so a bad file changes nothing. ``torch.nn.Module``-like objects, optimizers,
    schedulers and ``GradScaler`` satisfy the two methods already; give them a ``state_key`` via a
    small wrapper (see ``nnhandler.components``).
    """

    @property
    def state_key(self) -> str: ...

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, /) -> Any: ...


@dataclass(frozen=True)
class RestoreResult:
    """What :meth:`StateRegistry.restore` did: keys restored, skipped, and without an owner."""

    restored: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    unmatched: tuple[str, ...] = ()
    missing: tuple[str, ...] = field(default=())


def describe_owner(provider: object) -> str:
    """The provider's repr where its class defines one (it shows the configuration), else the
    class's full name."""
    if type(provider).__repr__ is not object.__repr__:
        return repr(provider)
    return f"{type(provider).__module__}.{type(provider).__qualname__}"


class StateRegistry:
    """Providers by ``state_key``. Duplicate keys are rejected at registration, naming both owners.

    States read from a checkpoint whose owner is not registered yet are kept as *pending*: a
    provider registered later with that key receives its state on registration, and until then the
    pending state is written unchanged into later checkpoints, so nothing is dropped silently.
    """

    __slots__ = ("_pending", "_providers")

    def __init__(self) -> None:
        self._providers: dict[str, StateProvider] = {}
        self._pending: dict[str, Any] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._providers

    def __iter__(self) -> Iterator[str]:
        return iter(self._providers)

    def __len__(self) -> int:
        return len(self._providers)

    def get(self, key: str) -> StateProvider | None:
        return self._providers.get(key)

    @property
    def pending_keys(self) -> tuple[str, ...]:
        return tuple(self._pending)

    def register(self, provider: StateProvider) -> bool:
        """Add ``provider``; returns True when a pending state was loaded into it."""
        if not isinstance(provider, StateProvider):
            raise TypeError(
                f"{describe_owner(provider)} is not a StateProvider: it needs a str attribute "
                "'state_key' and methods state_dict() and load_state_dict(state)"
            )
        key = provider.state_key
        if not isinstance(key, str) or not key:
            raise TypeError(
                f"{describe_owner(provider)}.state_key must be a non-empty str, got {key!r}"
            )
        existing = self._providers.get(key)
        if existing is not None and existing is not provider:
            raise DuplicateStateKeyError(
                f"state_key {key!r} of {describe_owner(provider)} is already used by "
                f"{describe_owner(existing)}; give one of them a different state_key"
            )
        if key in self._pending:  # a state that does not fit leaves the provider unregistered
            _check(provider, key, self._pending[key], None)
            _load_into(provider, key, self._pending[key])
            del self._pending[key]
            self._providers[key] = provider
            return True
        self._providers[key] = provider
        return False

    def unregister(self, provider: StateProvider) -> None:
        for key, registered in list(self._providers.items()):
            if registered is provider:
                del self._providers[key]

    def collect(self, exclude: Iterable[str] = ()) -> dict[str, Any]:
        """``{state_key: state_dict()}`` of every provider, plus still-pending states, without
        the keys in ``exclude``."""
        excluded = frozenset(exclude)
        states: dict[str, Any] = {k: v for k, v in self._pending.items() if k not in excluded}
        for key, provider in self._providers.items():
            if key not in excluded:
                states[key] = provider.state_dict()
        return states

    def restore(
        self, states: Mapping[str, Any], skip: frozenset[str] = frozenset(),
        source: str | None = None,
    ) -> RestoreResult:
        """Load ``states`` into registered providers; keep the rest as pending.

        Every state is first checked (``check_state`` of its provider, where defined), so an
        error leaves every provider as it was. ``source`` names the file in errors.
        """
        for key, state in states.items():
            provider = self._providers.get(key)
            if key not in skip and provider is not None:
                _check(provider, key, state, source)
        restored, skipped, unmatched = [], [], []
        for key, state in states.items():
            if key in skip:
                skipped.append(key)
            elif key in self._providers:
                _load_into(self._providers[key], key, state, source)
                restored.append(key)
            else:
                self._pending[key] = state
                unmatched.append(key)
        missing = tuple(k for k in self._providers if k not in states and k not in skip)
        return RestoreResult(tuple(restored), tuple(skipped), tuple(unmatched), missing)


def _check(provider: StateProvider, key: str, state: Any, source: str | None) -> None:
    check = getattr(provider, "check_state", None)
    if check is None:
        return
    try:
        check(state)
    except CheckpointSchemaError as error:
        raise relocate(error, prefix=f"state[{key!r}]", path=source) from None
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(_cannot_load(key, provider, source, error)) from error


def _cannot_load(key: str, provider: StateProvider, source: str | None,
                 error: BaseException) -> str:
    origin = f" (from {source!r})" if source is not None else ""
    return (f"checkpoint state {key!r} cannot be loaded into {describe_owner(provider)}{origin}: "
            f"{error}")


def _load_into(provider: StateProvider, key: str, state: Any, source: str | None = None) -> None:
    """``provider.load_state_dict(state)``; a state that does not fit is a CheckpointError
    naming the key and the owner (e.g. optimizer state for a different set of parameters)."""
    try:
        provider.load_state_dict(state)
    except CheckpointSchemaError as error:
        raise relocate(error, prefix=f"state[{key!r}]", path=source) from None
    except Exception as error:
        raise CheckpointError(_cannot_load(key, provider, source, error)) from error
