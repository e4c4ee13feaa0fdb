"""Events and callbacks: one hook list, a dispatcher that calls only overrides, keyword hooks,
checkpoint writers last, errors that name their culprit, validation at registration."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
from nnh_testing import checkpoint_files, make_handler

from nnhandler import (
    AutoSaveCallback,
    Callback,
    CallbackValidationError,
    ConfigurationError,
    Event,
)
from nnhandler.events import EventDispatcher

# ---------------------------------------------------------------------- the hook list ---------


def test_every_event_has_a_callback_method_of_its_name() -> None:
    for event in Event:
        hook = getattr(Callback, event.hook_name, None)
        assert hook is not None and callable(hook), event
        assert event.hook_name.startswith("on_")
        assert Event.from_hook_name(event.hook_name) is event


def test_callback_has_no_on_method_that_is_not_an_event() -> None:
    on_methods = {name for name in dir(Callback) if name.startswith("on_")}
    assert on_methods == {event.hook_name for event in Event}


def test_hook_names_and_arguments_are_unique_per_event() -> None:
    names = [event.hook_name for event in Event]
    assert len(names) == len(set(names))
    for event in Event:
        assert "handler" in event.arguments, event
        assert len(event.arguments) == len(set(event.arguments)), event


def test_documented_hooks_are_exactly_the_events() -> None:
    documented = {
        "on_train_begin", "on_epoch_begin", "on_train_batch_begin", "on_train_batch_end",
        "on_train_step_end",
        "on_validation_begin", "on_validation_batch_begin", "on_validation_batch_end",
        "on_validation_end", "on_epoch_end", "on_train_end", "on_checkpoint_saved",
        "on_checkpoint_loaded", "on_exception",
    }
    assert {event.hook_name for event in Event} == documented


# ---------------------------------------------------------------------- the dispatcher --------


class Counting(Callback):
    """Overrides two hooks only and counts its calls."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def on_epoch_end(self, **kwargs: Any) -> None:
        self.calls["on_epoch_end"] = self.calls.get("on_epoch_end", 0) + 1

    def on_train_batch_end(self, **kwargs: Any) -> None:
        self.calls["on_train_batch_end"] = self.calls.get("on_train_batch_end", 0) + 1


def test_dispatcher_alone_lists_only_overriding_callbacks() -> None:
    plain, counting = Callback(), Counting()
    dispatcher = EventDispatcher([plain, counting])
    for event in Event:
        expected = (counting,) if event.hook_name in ("on_epoch_end", "on_train_batch_end") else ()
        assert tuple(dispatcher.listeners(event)) == expected, event
        assert dispatcher.has_listeners(event) == bool(expected), event


def test_dispatcher_alone_calls_only_overriding_callbacks() -> None:
    counting = Counting()
    dispatcher = EventDispatcher([Callback(), counting])
    arguments = {
        event: {name: None for name in event.arguments} for event in Event
    }
    for event in Event:
        dispatcher.fire(event, **arguments[event])
    dispatcher.fire(Event.EPOCH_END, **arguments[Event.EPOCH_END])
    assert counting.calls == {"on_epoch_end": 2, "on_train_batch_end": 1}


def test_dispatcher_rebuild_reflects_a_new_callback_list() -> None:
    first, second = Counting(), Counting()
    dispatcher = EventDispatcher([first])
    dispatcher.rebuild([first, second])
    dispatcher.fire(Event.EPOCH_END, handler=None, epoch=1, logs={})
    assert first.calls == second.calls == {"on_epoch_end": 1}
    dispatcher.rebuild([second])
    dispatcher.fire(Event.EPOCH_END, handler=None, epoch=2, logs={})
    assert first.calls == {"on_epoch_end": 1}
    assert second.calls == {"on_epoch_end": 2}


def test_handler_calls_each_overridden_hook_the_expected_number_of_times() -> None:
    handler = make_handler(n=32, batch_size=8)  # 4 train batches, 1 validation batch
    counting = Counting()
    handler.add_callback(counting)
    handler.train(3, progress_bar=False)
    assert counting.calls == {"on_epoch_end": 3, "on_train_batch_end": 12}


def test_base_class_hooks_are_never_called() -> None:
    dispatcher = EventDispatcher([Callback()])
    assert not any(dispatcher.has_listeners(event) for event in Event)


# ---------------------------------------------------------------------- keyword arguments -----


class KwargsOnly(Callback):
    def __init__(self) -> None:
        self.seen: dict[str, dict[str, Any]] = {}

    def on_train_begin(self, **kwargs: Any) -> None:
        self.seen["on_train_begin"] = kwargs

    def on_epoch_end(self, **kwargs: Any) -> None:
        self.seen["on_epoch_end"] = kwargs

    def on_train_batch_begin(self, **kwargs: Any) -> None:
        self.seen["on_train_batch_begin"] = kwargs

    def on_validation_end(self, **kwargs: Any) -> None:
        self.seen["on_validation_end"] = kwargs

    def on_train_end(self, **kwargs: Any) -> None:
        self.seen["on_train_end"] = kwargs


class NamedParameters(Callback):
    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.losses: list[float] = []
        self.begin: tuple[int, int] | None = None

    def on_train_begin(self, handler: Any, start_epoch: int, end_epoch: int) -> None:
        self.begin = (start_epoch, end_epoch)

    def on_epoch_end(self, *, handler: Any, epoch: int, logs: dict[str, Any]) -> None:
        self.epochs.append(epoch)
        self.losses.append(logs["loss"])

    def on_train_batch_end(self, handler: Any, loss: Any, **rest: Any) -> None:
        assert "batch_idx" in rest


def test_hook_taking_only_kwargs_gets_the_event_arguments_by_name() -> None:
    handler = make_handler(n=16)
    callback = KwargsOnly()
    handler.add_callback(callback)
    handler.train(1, progress_bar=False)
    for hook, kwargs in callback.seen.items():
        event = Event.from_hook_name(hook)
        assert event is not None
        assert set(kwargs) == set(event.arguments), hook
        assert kwargs["handler"] is handler
    assert callback.seen["on_train_begin"]["start_epoch"] == 0
    assert callback.seen["on_train_begin"]["end_epoch"] == 1
    assert callback.seen["on_epoch_end"]["epoch"] == 1
    assert set(callback.seen["on_validation_end"]["logs"]) == {"val_loss", "val_mae"}
    assert callback.seen["on_train_end"]["logs"]["epoch"] == 1


def test_hook_with_named_parameters_works() -> None:
    handler = make_handler(n=16)
    callback = NamedParameters()
    handler.add_callback(callback)
    handler.train(2, progress_bar=False)
    assert callback.begin == (0, 2)
    assert callback.epochs == [1, 2]
    assert callback.losses == handler.train_losses


# ---------------------------------------------------------------------- ordering --------------


class Recorder(Callback):
    """Adds a key to the epoch logs and records the order of epoch ends and saves."""

    def __init__(self) -> None:
        self.order: list[tuple[str, int]] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any], **kwargs: Any) -> None:
        logs["marker"] = 100 + epoch
        self.order.append(("epoch_end", epoch))

    def on_checkpoint_saved(self, epoch: int, **kwargs: Any) -> None:
        self.order.append(("saved", epoch))


def test_checkpoint_writer_runs_after_other_epoch_end_callbacks_even_when_added_first(
    tmp_path: Path,
) -> None:
    handler = make_handler(n=16)
    handler.add_callback(AutoSaveCallback(1, "ck", name="ep{epoch}_m{marker}"))
    recorder = Recorder()
    handler.add_callback(recorder)
    handler.train(2, progress_bar=False)
    # the writer saw the key the other callback added, so it ran after it
    assert checkpoint_files(tmp_path / "ck") == ["ep1_m101.pth", "ep2_m102.pth"]
    assert recorder.order == [("epoch_end", 1), ("saved", 1), ("epoch_end", 2), ("saved", 2)]


class Writer(Callback):
    is_checkpoint_writer = True

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def on_epoch_end(self, **kwargs: Any) -> None:
        self.log.append("writer")


class Plain(Callback):
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def on_epoch_end(self, **kwargs: Any) -> None:
        self.log.append(self.name)


def test_dispatcher_alone_orders_checkpoint_writers_last_keeping_registration_order() -> None:
    log: list[str] = []
    dispatcher = EventDispatcher([Writer(log), Plain(log, "a"), Plain(log, "b")])
    dispatcher.fire(Event.EPOCH_END, handler=None, epoch=1, logs={})
    assert log == ["a", "b", "writer"]


# ---------------------------------------------------------------------- exceptions ------------


class Exploding(Callback):
    def __init__(self) -> None:
        self.exceptions: list[BaseException] = []

    def on_epoch_end(self, **kwargs: Any) -> None:
        raise RuntimeError("boom in epoch end")

    def on_exception(self, handler: Any, exception: BaseException) -> None:
        self.exceptions.append(exception)


class Watching(Callback):
    def __init__(self) -> None:
        self.exceptions: list[BaseException] = []

    def on_exception(self, **kwargs: Any) -> None:
        self.exceptions.append(kwargs["exception"])


def test_callback_exception_propagates_with_a_note_and_fires_on_exception() -> None:
    handler = make_handler(n=16)
    exploding, watching = Exploding(), Watching()
    handler.add_callback(exploding)
    handler.add_callback(watching)
    with pytest.raises(RuntimeError, match="boom in epoch end") as info:
        handler.train(2, progress_bar=False)
    notes = getattr(info.value, "__notes__", [])
    assert any("Exploding" in note and "on_epoch_end" in note for note in notes), notes
    assert exploding.exceptions == [info.value]
    assert watching.exceptions == [info.value]
    assert handler.epoch == 1  # the epoch completed before its end hook raised


def test_dispatcher_alone_adds_a_note_naming_class_and_hook() -> None:
    dispatcher = EventDispatcher([Exploding()])
    with pytest.raises(RuntimeError, match="boom") as info:
        dispatcher.fire(Event.EPOCH_END, handler=None, epoch=1, logs={})
    notes = info.value.__notes__
    assert len(notes) == 1
    assert "Exploding" in notes[0] and "on_epoch_end" in notes[0]


# ---------------------------------------------------------------------- validation ------------


class Misspelt(Callback):
    def on_epoch_ends(self, **kwargs: Any) -> None:  # not a hook
        pass


class NeedsUnknownArgument(Callback):
    def on_epoch_end(self, handler: Any, epoch: int, logs: Any, optimizer: Any) -> None:
        pass


class PositionalOnly(Callback):
    def on_epoch_begin(self, handler: Any, /, epoch: int) -> None:
        pass


@pytest.mark.parametrize(
    ("callback_class", "message"),
    [
        (Misspelt, r"Misspelt defines on_epoch_ends\(\), which is not a known hook"),
        (NeedsUnknownArgument, r"NeedsUnknownArgument\.on_epoch_end\(\) requires .*optimizer"),
        (PositionalOnly, r"PositionalOnly\.on_epoch_begin\(\) requires .*handler"),
    ],
    ids=["misspelt-hook", "required-arg-not-passed", "positional-only-param"],
)
def test_bad_callback_is_rejected_at_add_callback(
    callback_class: type[Callback], message: str
) -> None:
    handler = make_handler(n=16)
    with pytest.raises(CallbackValidationError, match=message):
        handler.add_callback(callback_class())
    assert handler.callbacks == ()


def test_callback_validation_error_is_a_configuration_and_type_error() -> None:
    assert issubclass(CallbackValidationError, ConfigurationError)
    assert issubclass(CallbackValidationError, ValueError)
    assert issubclass(CallbackValidationError, TypeError)


class OptionalExtra(Callback):
    def __init__(self) -> None:
        self.extra: list[Any] = []

    def on_epoch_end(self, handler: Any, epoch: int, logs: Any, extra: Any = "default") -> None:
        self.extra.append(extra)


def test_hook_with_an_optional_extra_parameter_is_accepted() -> None:
    handler = make_handler(n=16)
    callback = OptionalExtra()
    handler.add_callback(callback)
    handler.train(1, progress_bar=False)
    assert callback.extra == ["default"]


class HelperMethods(Callback):
    """Methods not starting with on_ are helpers and are not checked."""

    def __init__(self) -> None:
        self.count = 0

    def bump(self, amount: int) -> None:
        self.count += amount

    def on_epoch_end(self, **kwargs: Any) -> None:
        self.bump(1)


def test_non_hook_helper_methods_are_allowed() -> None:
    handler = make_handler(n=16)
    callback = HelperMethods()
    handler.add_callback(callback)
    handler.train(2, progress_bar=False)
    assert callback.count == 2


class NoSuperInit(Callback):
    def __init__(self, tag: str) -> None:  # deliberately does not call super().__init__()
        self.tag = tag
        self.epochs: list[int] = []

    def on_epoch_end(self, epoch: int, **kwargs: Any) -> None:
        self.epochs.append(epoch)


def test_subclass_that_never_calls_super_init_works() -> None:
    handler = make_handler(n=16)
    callback = NoSuperInit("x")
    handler.add_callback(callback)
    handler.train(2, progress_bar=False)
    assert callback.epochs == [1, 2]
    assert "NoSuperInit" in repr(callback)


def test_same_instance_added_twice_is_an_error() -> None:
    handler = make_handler(n=16)
    callback = Counting()
    handler.add_callback(callback)
    with pytest.raises(ConfigurationError, match="already registered"):
        handler.add_callback(callback)
    assert handler.callbacks == (callback,)


def test_two_instances_of_the_same_class_are_fine() -> None:
    handler = make_handler(n=16)
    first, second = Counting(), Counting()
    handler.add_callback(first)
    handler.add_callback(second)
    handler.train(1, progress_bar=False)
    assert first.calls["on_epoch_end"] == second.calls["on_epoch_end"] == 1


def test_non_callback_object_is_refused() -> None:
    handler = make_handler(n=16)

    class Duck:
        def on_epoch_end(self, **kwargs: Any) -> None:
            pass

    with pytest.raises(TypeError, match=r"not an nnhandler\.Callback"):
        handler.add_callback(Duck())  # type: ignore[arg-type]


def test_remove_callback_stops_its_calls() -> None:
    handler = make_handler(n=16)
    kept, removed = Counting(), Counting()
    handler.add_callback(kept)
    handler.add_callback(removed)
    handler.train(1, progress_bar=False)
    handler.remove_callback(removed)
    assert handler.callbacks == (kept,)
    handler.train(2, progress_bar=False)
    assert kept.calls["on_epoch_end"] == 3
    assert removed.calls["on_epoch_end"] == 1
    with pytest.raises(ValueError, match="is not registered"):
        handler.remove_callback(removed)


def test_removed_callback_can_be_added_again() -> None:
    handler = make_handler(n=16)
    callback = Counting()
    handler.add_callback(callback)
    handler.remove_callback(callback)
    handler.add_callback(callback)
    handler.train(1, progress_bar=False)
    assert callback.calls["on_epoch_end"] == 1


def test_request_stop_from_a_hook_ends_training_after_the_epoch() -> None:
    class StopAtTwo(Callback):
        def on_epoch_end(self, handler: Any, epoch: int, **kwargs: Any) -> None:
            if epoch == 2:
                handler.request_stop()

    handler = make_handler(n=16)
    handler.add_callback(StopAtTwo())
    handler.train(5, progress_bar=False)
    assert handler.epoch == 2
    assert len(handler.train_losses) == 2


def test_default_hook_docstring_names_the_event_arguments() -> None:
    for event in Event:
        doc = inspect.getdoc(getattr(Callback, event.hook_name)) or ""
        for argument in event.arguments:
            assert argument in doc, (event, argument)
