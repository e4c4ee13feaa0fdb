"""StateRegistry and StateProvider: unique keys, custom providers, pending state, plain data."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from nnh_testing import attach_loaders, make_handler

from nnhandler import (
    Callback,
    CheckpointError,
    DuplicateStateKeyError,
    NNHandler,
    StateProvider,
)
from nnhandler.checkpoint import TEMP_INFIX
from nnhandler.state import StateRegistry


class Counter:
    """A provider that is not a callback."""

    def __init__(self, key: str = "counter", value: int = 0) -> None:
        self.state_key = key
        self.value = value
        self.tensor = torch.arange(3.0) * value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "tensor": self.tensor.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]
        self.tensor = state["tensor"].clone()


class OtherCounter(Counter):
    pass


class StatefulCallback(Callback):
    """A callback that counts epochs and is a state provider."""

    state_key = "epoch_counter"

    def __init__(self) -> None:
        self.epochs_seen = 0
        self.loaded_from: list[Any] = []

    def on_epoch_end(self, **kwargs: Any) -> None:
        self.epochs_seen += 1

    def on_checkpoint_loaded(self, path: Path, epoch: int, **kwargs: Any) -> None:
        self.loaded_from.append((Path(path).name, epoch))

    def state_dict(self) -> dict[str, Any]:
        return {"epochs_seen": self.epochs_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs_seen = state["epochs_seen"]


class NotPlain:
    pass


class BadProvider:
    state_key = "bad_thing"

    def state_dict(self) -> dict[str, Any]:
        return {"fine": 1, "nested": {"obj": NotPlain()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ---------------------------------------------------------------------- the registry alone ----


def test_registry_alone_rejects_a_duplicate_key_naming_both_owners() -> None:
    registry = StateRegistry()
    registry.register(Counter("shared"))
    with pytest.raises(DuplicateStateKeyError,
                       match=r"'shared' of .*OtherCounter is already used by .*\.Counter"):
        registry.register(OtherCounter("shared"))
    assert len(registry) == 1


def test_registry_alone_allows_re_registering_the_same_provider() -> None:
    registry = StateRegistry()
    counter = Counter()
    registry.register(counter)
    registry.register(counter)
    assert list(registry) == ["counter"]


@pytest.mark.parametrize(
    ("provider", "error", "message"),
    [
        (object(), TypeError, "is not a StateProvider"),
        (Counter(""), TypeError, "state_key must be a non-empty str"),
    ],
    ids=["not-a-provider", "empty-key"],
)
def test_registry_alone_refuses_bad_providers(
    provider: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        StateRegistry().register(provider)


def test_registry_alone_keeps_unmatched_state_pending_and_collects_it() -> None:
    registry = StateRegistry()
    registry.register(Counter("a", 1))
    result = registry.restore({"a": {"value": 5, "tensor": torch.zeros(3)},
                               "orphan": {"x": 1}, "skipped": 2}, skip=frozenset({"skipped"}))
    assert result.restored == ("a",)
    assert result.unmatched == ("orphan",)
    assert result.skipped == ("skipped",)
    assert registry.pending_keys == ("orphan",)
    assert registry.collect()["orphan"] == {"x": 1}
    late = Counter("orphan")
    late.load_state_dict = lambda state: setattr(late, "value", state["x"])  # type: ignore[method-assign]
    assert registry.register(late) is True
    assert late.value == 1
    assert not registry.pending_keys


def test_registry_alone_reports_providers_missing_from_the_states() -> None:
    registry = StateRegistry()
    registry.register(Counter("a"))
    registry.register(Counter("b"))
    result = registry.restore({"a": {"value": 1, "tensor": torch.zeros(3)}})
    assert result.missing == ("b",)


def test_builtin_components_satisfy_the_protocol() -> None:
    handler = make_handler()
    assert isinstance(handler.history_state, StateProvider)
    assert isinstance(handler.progress, StateProvider)
    assert isinstance(Counter(), StateProvider)
    assert isinstance(StatefulCallback(), StateProvider)
    assert {"model", "optimizer", "scheduler", "history", "progress", "rng", "config"} <= set(
        handler.state_dict()
    )


# ---------------------------------------------------------------------- on a handler ----------


@pytest.mark.parametrize(
    "key",
    ["model", "optimizer", "history", "progress", "rng", "config"],
    ids=lambda key: f"core-{key}",
)
def test_custom_provider_cannot_take_a_core_key(key: str) -> None:
    handler = make_handler()
    with pytest.raises(DuplicateStateKeyError, match=rf"{key!r} of .*Counter is already used by"):
        handler.register_state_provider(Counter(key))


def test_duplicate_key_between_provider_and_callback_names_both_owners() -> None:
    handler = make_handler()
    handler.register_state_provider(Counter("epoch_counter"))
    with pytest.raises(DuplicateStateKeyError,
                       match=r"StatefulCallback is already used by .*\.Counter|"
                             r"StatefulCallback.*already used by .*Counter"):
        handler.add_callback(StatefulCallback())
    assert handler.callbacks == ()


def test_custom_provider_round_trips_through_save_and_load() -> None:
    handler = make_handler()
    handler.register_state_provider(Counter(value=7))
    handler.train(1, progress_bar=False)
    handler.save("ck.pth")
    assert torch.load("ck.pth", weights_only=True)["state"]["counter"]["value"] == 7

    with pytest.warns(UserWarning, match="counter"):
        loaded = NNHandler.load("ck.pth")
    fresh = Counter(value=0)
    loaded.register_state_provider(fresh)
    assert fresh.value == 7
    assert torch.equal(fresh.tensor, torch.arange(3.0) * 7)


def test_callback_passed_to_load_gets_its_state() -> None:
    handler = make_handler()
    callback = StatefulCallback()
    handler.add_callback(callback)
    handler.train(3, progress_bar=False)
    handler.save("ck.pth")

    received = StatefulCallback()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is unowned: no warning
        loaded = NNHandler.load("ck.pth", callbacks=[received])
    assert received.epochs_seen == 3
    assert received.loaded_from == [("ck.pth", 3)]
    assert loaded.callbacks == (received,)
    attach_loaders(loaded)
    loaded.train(1, progress_bar=False)
    assert received.epochs_seen == 4


def test_callback_added_after_load_gets_the_pending_state() -> None:
    handler = make_handler()
    handler.add_callback(StatefulCallback())
    handler.train(2, progress_bar=False)
    handler.save("ck.pth")

    with pytest.warns(UserWarning, match="epoch_counter"):
        loaded = NNHandler.load("ck.pth")
    late = StatefulCallback()
    loaded.add_callback(late)
    assert late.epochs_seen == 2
    # the pending state was consumed: the callback's own state is saved from now on
    late.epochs_seen = 10
    loaded.save("again.pth")
    assert torch.load("again.pth", weights_only=True)["state"]["epoch_counter"] == {
        "epochs_seen": 10
    }


def test_unowned_state_warns_and_is_kept_in_the_next_checkpoint() -> None:
    handler = make_handler()
    handler.register_state_provider(Counter(value=3))
    handler.train(1, progress_bar=False)
    handler.save("ck.pth")

    with pytest.warns(UserWarning, match=r"\['counter'\].*nothing on this handler owns"):
        loaded = NNHandler.load("ck.pth")
    attach_loaders(loaded)
    loaded.train(1, progress_bar=False)
    loaded.save("next.pth")
    state = torch.load("next.pth", weights_only=True)["state"]
    assert state["counter"]["value"] == 3
    assert torch.equal(state["counter"]["tensor"], torch.arange(3.0) * 3)

    # and it survives a second generation too
    with pytest.warns(UserWarning, match="counter"):
        again = NNHandler.load("next.pth")
    owner = Counter()
    again.register_state_provider(owner)
    assert owner.value == 3


def test_skip_callbacks_leaves_callback_state_out_and_fresh() -> None:
    handler = make_handler()
    handler.add_callback(StatefulCallback())
    handler.train(2, progress_bar=False)
    handler.save("ck.pth")
    received = StatefulCallback()
    NNHandler.load("ck.pth", callbacks=[received], skip_callbacks=True)
    assert received.epochs_seen == 0


@pytest.mark.parametrize("register", ["provider", "callback"], ids=["provider", "callback"])
def test_non_plain_state_fails_the_save_naming_the_key_and_leaves_no_file(
    register: str, tmp_path: Path
) -> None:
    handler = make_handler()
    if register == "provider":
        handler.register_state_provider(BadProvider())
    else:
        class BadCallback(Callback, BadProvider):
            pass

        handler.add_callback(BadCallback())
    (tmp_path / "out").mkdir()
    where = r"state\['bad_thing'\]\['nested'\]\['obj'\].*NotPlain"
    with pytest.raises(CheckpointError, match=where):
        handler.save(tmp_path / "out" / "ck.pth")
    assert list((tmp_path / "out").iterdir()) == []
    assert not any(TEMP_INFIX in p.name for p in tmp_path.rglob("*"))



class Picky(StatefulCallback):
    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise KeyError("wanted 'epochs' not 'epochs_seen'")


def test_pending_state_that_does_not_fit_a_late_callback_is_a_checkpoint_error() -> None:
    handler = make_handler()
    handler.add_callback(StatefulCallback())
    handler.train(1, progress_bar=False)
    handler.save("ck.pth")
    with pytest.warns(UserWarning, match="epoch_counter"):
        loaded = NNHandler.load("ck.pth")
    with pytest.raises(CheckpointError, match=r"'epoch_counter' cannot be loaded into .*Picky"):
        loaded.add_callback(Picky())
    assert loaded.callbacks == ()
    # nothing half-registered: the state is still pending and a fitting callback takes it
    fitting = StatefulCallback()
    loaded.add_callback(fitting)
    assert fitting.epochs_seen == 1


def test_state_that_does_not_fit_a_callback_passed_to_load_is_a_checkpoint_error() -> None:
    handler = make_handler()
    handler.add_callback(StatefulCallback())
    handler.save("ck.pth")
    with pytest.raises(CheckpointError, match=r"'epoch_counter' cannot be loaded into .*Picky"):
        NNHandler.load("ck.pth", callbacks=[Picky()])
