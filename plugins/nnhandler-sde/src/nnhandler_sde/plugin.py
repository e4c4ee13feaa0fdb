"""The entry point (``nnhandler.plugins``): nnhandler calls :func:`register` when a loaded
checkpoint holds state that nothing on the handler owns."""

from __future__ import annotations

from nnhandler import PluginRegistry

from .callback import STATE_KEY, ScoreSDE

__all__ = ["register"]


def register(registry: PluginRegistry) -> None:
    """Claim the state keys ``"sde"`` and ``"sde:<name>"``: ``NNHandler.load`` re-creates the
    :class:`ScoreSDE` callback from a checkpoint's state, without the caller passing it."""
    registry.add_state_provider(STATE_KEY, ScoreSDE.from_state)
