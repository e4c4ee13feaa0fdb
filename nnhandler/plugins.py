"""Plugins: packages that add state providers to nnhandler through an entry point.

A plugin declares, in its ``pyproject.toml``::

    [project.entry-points."nnhandler.plugins"]
    myplugin = "my_package.plugin:register"

The entry point names a function ``register(registry: PluginRegistry) -> None``. It tells the
registry which checkpoint state keys the plugin owns and how to re-create the provider for such
a key (``registry.add_state_provider(key, factory)``), so that :meth:`NNHandler.load
<nnhandler.NNHandler.load>` brings the plugin's callbacks back from a checkpoint even when the
caller does not pass them. The core finds plugins only through
``importlib.metadata.entry_points(group="nnhandler.plugins")``; it never imports one by name, and
it imports them only when a loaded checkpoint holds state that nothing on the handler owns.

A callback or provider defined in a script or a package without an entry point claims its key in
the running process instead, with :func:`register_provider_factory` (the built-in
:class:`~nnhandler.AutoSaveCallback` claims ``"autosave"`` that way). :meth:`NNHandler.load`
consults these claims first, then, for keys still without an owner, the installed plugins.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from .errors import CheckpointError, PluginError
from .state import StateProvider

__all__ = ["ENTRY_POINT_GROUP", "PluginRegistry", "ProviderFactory", "discover_plugins",
           "in_process_factories", "register_provider_factory"]

ENTRY_POINT_GROUP: Final = "nnhandler.plugins"
_BY_HAND: Final = "<registered by hand>"

#: ``factory(state_key, state) -> provider``: builds the provider that owns ``state_key`` from
#: the state a checkpoint holds for it (a ``Callback`` is added as a callback, anything else is
#: registered as a plain state provider); the handler then restores ``state`` into it.
ProviderFactory = Callable[[str, Any], StateProvider]


@dataclass(frozen=True)
class _Claim:
    key: str
    plugin: str
    factory: ProviderFactory


class PluginRegistry:
    """What the installed plugins registered: which state keys they own, and their factories.

    A claim on ``key`` covers the state key ``key`` itself and every ``key:<anything>`` (so one
    claim covers several named instances). Two plugins claiming the same key is a
    :class:`~nnhandler.PluginError` naming both.
    """

    __slots__ = ("_claims", "_current", "plugins")

    def __init__(self) -> None:
        self._claims: dict[str, _Claim] = {}
        self._current = _BY_HAND
        #: names of the entry points whose ``register`` ran, in order
        self.plugins: list[str] = []

    def add_state_provider(self, key: str, factory: ProviderFactory) -> None:
        """Own the state key ``key`` (and ``key:*``); ``factory(state_key, state)`` re-creates
        the provider for it when a checkpoint holding such state is loaded."""
        if not isinstance(key, str) or not key or ":" in key:
            raise PluginError(f"plugin {self._current}: state key {key!r} must be a non-empty "
                              "str without ':' (a claim on 'k' also covers 'k:<name>')")
        if not callable(factory):
            raise PluginError(f"plugin {self._current}: factory for {key!r} is not callable: "
                              f"{factory!r}")
        existing = self._claims.get(key)
        if existing is not None:
            raise PluginError(f"plugins {existing.plugin} and {self._current} both claim the "
                              f"state key {key!r}; uninstall one of them")
        self._claims[key] = _Claim(key, self._current, factory)

    def forget(self, key: str) -> None:
        """Drop the claim on ``key`` (if any)."""
        self._claims.pop(key, None)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self._claims)

    def claim_for(self, state_key: str) -> tuple[str, ProviderFactory] | None:
        """``(plugin name, factory)`` owning ``state_key``, or ``None``."""
        claim = self._claims.get(state_key.split(":", 1)[0])
        return None if claim is None else (claim.plugin, claim.factory)

    def create_provider(self, state_key: str, state: Any) -> StateProvider | None:
        """The provider a plugin builds for ``state_key`` (``None`` when no plugin owns it).
        A :class:`~nnhandler.CheckpointError` of the factory (the state does not fit its
        schema) propagates as it is; any other failure is a :class:`~nnhandler.PluginError`."""
        found = self.claim_for(state_key)
        if found is None:
            return None
        plugin, factory = found
        try:
            provider = factory(state_key, state)
        except CheckpointError:  # the file's state does not fit: the file's fault, said so
            raise
        except Exception as error:
            raise PluginError(f"plugin {plugin} failed to re-create the provider of state "
                              f"{state_key!r}: {type(error).__name__}: {error}") from error
        if not isinstance(provider, StateProvider) or provider.state_key != state_key:
            raise PluginError(f"plugin {plugin} returned {provider!r} for state {state_key!r}: "
                              f"expected a StateProvider whose state_key is {state_key!r}")
        return provider

    def run(self, name: str, register: Callable[[PluginRegistry], object]) -> None:
        """Call one plugin's ``register(self)``; errors name the plugin."""
        self._current = name
        try:
            register(self)
        except PluginError:
            raise
        except Exception as error:
            raise PluginError(f"plugin {name}: register() raised "
                              f"{type(error).__name__}: {error}") from error
        finally:
            self._current = _BY_HAND
        self.plugins.append(name)


def _entry_point_name(entry_point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    origin = f" from {dist.name} {dist.version}" if dist is not None else ""
    return f"{entry_point.name} ({entry_point.value}{origin})"


def discover_plugins(
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
) -> PluginRegistry:
    """Import every plugin of the group ``nnhandler.plugins`` and run its ``register``.

    ``entry_points`` defaults to the installed ones. A plugin that cannot be imported, whose
    entry point is not callable, or whose ``register`` fails is a :class:`~nnhandler.PluginError`
    naming it: a broken installation is reported, never skipped silently.
    """
    found = (importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
             if entry_points is None else entry_points)
    registry = PluginRegistry()
    for entry_point in sorted(found, key=lambda ep: ep.name):
        name = _entry_point_name(entry_point)
        try:
            register = entry_point.load()
        except Exception as error:
            raise PluginError(f"plugin {name} cannot be imported: {type(error).__name__}: "
                              f"{error}; fix or uninstall it") from error
        if not callable(register):
            raise PluginError(f"plugin {name} must point to a function register(registry), "
                              f"got {register!r}")
        registry.run(name, register)
    return registry


def _same_factory(first: ProviderFactory, second: ProviderFactory) -> bool:
    """The same function, or one of the same name (a module imported again re-registers)."""
    if first == second:
        return True
    return (getattr(first, "__module__", None), getattr(first, "__qualname__", None)) == (
        getattr(second, "__module__", None), getattr(second, "__qualname__", object()))


_IN_PROCESS: Final = PluginRegistry()


def register_provider_factory(key: str, factory: ProviderFactory) -> None:
    """Claim the state key ``key`` (and every ``key:<name>``) in this process:
    :meth:`NNHandler.load <nnhandler.NNHandler.load>` re-creates the owner of such a state
    that no passed callback replaces with ``factory(state_key, state)`` (a ``Callback`` is
    added as a callback, anything else registered as a provider; its state is restored into
    it), unless ``skip_callbacks``. For savers and other stateful callbacks that need no
    entry point; the built-in :class:`~nnhandler.AutoSaveCallback` claims ``"autosave"``.

    ``factory`` must build its object from ``state``, which is untrusted data: validate what
    it reads (a :class:`~nnhandler.CheckpointSchemaError` naming the field). Registering the
    same factory again is allowed; another factory for a claimed key is a
    :class:`~nnhandler.PluginError` naming both.
    """
    found = _IN_PROCESS.claim_for(key) if isinstance(key, str) and key else None
    if found is not None and _same_factory(found[1], factory):
        _IN_PROCESS.forget(key)
    module = getattr(factory, "__module__", None) or "<unknown module>"
    name = getattr(factory, "__qualname__", None) or repr(factory)
    _IN_PROCESS.run(f"{module}:{name}", lambda registry: registry.add_state_provider(key, factory))


def in_process_factories() -> PluginRegistry:
    """The claims made with :func:`register_provider_factory` in this process."""
    return _IN_PROCESS
