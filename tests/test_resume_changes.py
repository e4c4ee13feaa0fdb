"""Changes that a resume allows but that make it differ from an uninterrupted run are said
(issue 11, item 8): a setter that drops restored optimizer/scheduler state, a checkpoint whose
optimizer settings replace the configured ones, and a resumed call that trains on another
dataset, learning rate or training setting than the checkpoint recorded. The position state
(where an epoch stopped) is validated against its schema."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from nnh_testing import attach_loaders, make_handler

from nnhandler import Callback, CheckpointError, CheckpointSchemaError, NNHandler
from nnhandler.checkpoint import write_checkpoint
from nnhandler.components import EpochPosition, PartialEpoch

CK = Path("ck")


@contextmanager
def resume_warnings() -> Iterator[list[str]]:
    """The messages of the RuntimeWarnings raised inside the block."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield messages
    messages.extend(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))


def saved_run(epochs: int = 3, **optimizer: Any) -> Path:
    handler = make_handler(n=16)
    if optimizer:
        handler.set_optimizer(torch.optim.Adam, **optimizer)
    handler.train(epochs, progress_bar=False)
    return handler.save("run.pth")


# ---------------------------------------------------------------------- set_optimizer --------
def test_set_optimizer_after_load_warns_what_it_drops(caplog: pytest.LogCaptureFixture) -> None:
    loaded = NNHandler.load(saved_run())
    assert loaded.optimizer is not None and loaded.optimizer.state  # restored moments
    with caplog.at_level(logging.WARNING, logger="nnhandler"), resume_warnings() as seen:
        loaded.set_optimizer(torch.optim.Adam, lr=1e-2)
    assert len(seen) == 1
    message = seen[0]
    for part in ("set_optimizer(Adam) replaces the optimizer restored", "moments, step counts",
                 "scheduler's state (StepLR, last_epoch=3)", "do not call set_optimizer",
                 "skip_optimizer=True"):
        assert part in message, part
    assert message in caplog.text
    assert not loaded.optimizer.state  # really dropped: the warning tells the truth


def test_set_optimizer_after_resume_from_warns() -> None:
    path = saved_run()
    handler = make_handler(n=16)
    handler.resume_from(path)
    with resume_warnings() as seen:
        handler.set_optimizer(torch.optim.SGD, lr=0.1)
    assert len(seen) == 1 and "set_optimizer(SGD) replaces the optimizer restored" in seen[0]


def _fresh(path: Path) -> NNHandler:
    return make_handler(n=16)


def _trained_but_never_restored(path: Path) -> NNHandler:
    handler = make_handler(n=16)
    handler.train(1, progress_bar=False)
    return handler


def _loaded_without_optimizer(path: Path) -> NNHandler:
    return NNHandler.load(path, skip_optimizer=True, skip_scheduler=True)


def _replaced_once_already(path: Path) -> NNHandler:
    loaded = NNHandler.load(path)
    with resume_warnings():
        loaded.set_optimizer(torch.optim.Adam, lr=1e-2)
    return loaded


@pytest.mark.parametrize(
    "handler_of",
    [_fresh, _trained_but_never_restored, _loaded_without_optimizer, _replaced_once_already],
    ids=["fresh", "trained-never-restored", "loaded-skip-optimizer", "already-replaced"],
)
def test_set_optimizer_without_restored_state_does_not_warn(
    handler_of: Callable[[Path], NNHandler]
) -> None:
    handler = handler_of(saved_run())
    with resume_warnings() as seen:
        handler.set_optimizer(torch.optim.Adam, lr=1e-3)
    assert seen == []


def test_set_scheduler_after_load_warns_and_skip_scheduler_does_not() -> None:
    path = saved_run()
    loaded = NNHandler.load(path)
    with resume_warnings() as seen:
        loaded.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=5)
    assert len(seen) == 1
    assert "set_scheduler(StepLR) replaces the scheduler restored" in seen[0]
    assert "skip_scheduler=True" in seen[0]
    fresh_scheduler = NNHandler.load(path, skip_scheduler=True)
    with resume_warnings() as seen:
        fresh_scheduler.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=5)
    assert seen == []


def test_a_rejected_set_optimizer_does_not_warn() -> None:
    loaded = NNHandler.load(saved_run())
    with resume_warnings() as seen, pytest.raises(TypeError):
        loaded.set_optimizer(torch.optim.Adam, no_such_argument=1)
    assert seen == []
    assert loaded.optimizer is not None and loaded.optimizer.state  # still the restored one


# ---------------------------------------------------------------------- resume_from ----------
@pytest.mark.parametrize(
    ("saved", "configured", "expected"),
    [
        ({"lr": 1e-2}, {"lr": 1e-3}, "lr 0.001 -> 0.01"),
        ({"lr": 1e-2, "weight_decay": 0.1}, {"lr": 1e-2}, "weight_decay 0 -> 0.1"),
        ({"lr": 1e-2, "betas": (0.8, 0.9)}, {"lr": 1e-2}, "betas (0.9, 0.999) -> (0.8, 0.9)"),
    ],
    ids=["lr", "weight-decay", "betas"],
)
def test_resume_from_warns_when_the_file_replaces_configured_optimizer_settings(
    saved: dict[str, Any], configured: dict[str, Any], expected: str
) -> None:
    path = saved_run(**saved)
    handler = make_handler(n=16)
    handler.set_optimizer(torch.optim.Adam, **configured)
    with resume_warnings() as seen:
        handler.resume_from(path)
    replaced = [m for m in seen if "optimizer settings replace" in m]
    assert len(replaced) == 1 and expected in replaced[0], seen
    assert handler.optimizer is not None
    assert handler.optimizer.param_groups[0]["weight_decay"] == saved.get("weight_decay", 0)


@pytest.mark.parametrize(
    "scheduler",
    [(torch.optim.lr_scheduler.StepLR, {"step_size": 1, "gamma": 0.5}),
     (torch.optim.lr_scheduler.ReduceLROnPlateau, {"patience": 0, "factor": 0.5}),
     (torch.optim.lr_scheduler.OneCycleLR, {"max_lr": 0.1, "total_steps": 100})],
    ids=["step-lr", "plateau", "one-cycle"],
)
def test_resume_from_the_same_configuration_does_not_warn_about_scheduled_values(
    scheduler: tuple[type[Any], dict[str, Any]]
) -> None:
    def configured() -> NNHandler:
        handler = make_handler(n=16, scheduler=False)
        handler.set_optimizer(torch.optim.SGD, lr=1e-2, momentum=0.9)
        handler.set_scheduler(scheduler[0], **scheduler[1])
        return handler

    writer = configured()
    writer.train(3, progress_bar=False)
    path = writer.save("run.pth")
    handler = configured()
    with resume_warnings() as seen:
        handler.resume_from(path)
    assert seen == []


# ---------------------------------------------------------------------- a partial epoch ------
class FailAt(Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_end(self, batch_idx: int, **kwargs: Any) -> None:
        if batch_idx == self.batch:
            raise RuntimeError("interrupted")


def emergency_checkpoint(n: int = 32) -> Path:
    """An epoch-1 emergency checkpoint after 2 of its 4 batches (save_on_exception)."""
    handler = make_handler(n=n, batch_size=8)
    handler.auto_save(None, save_path=CK, save_on_exception=True)
    handler.add_callback(FailAt(1))
    with pytest.raises(RuntimeError, match="interrupted"):
        handler.train(2, progress_bar=False)
    (path,) = CK.iterdir()
    return path


def loaded_mid_epoch(path: Path, n: int = 32) -> NNHandler:
    loaded = NNHandler.load(path, skip_callbacks=True)
    attach_loaders(loaded, n=n)
    assert loaded.stopped_mid_epoch
    return loaded


def test_partial_epoch_records_the_run_it_stopped() -> None:
    path = emergency_checkpoint()
    partial = torch.load(path, weights_only=True)["state"]["position"]["partial"]
    assert (partial["samples"], partial["batches_per_epoch"]) == (32, 4)
    assert partial["learning_rates"] == [1e-2]


def test_continuing_with_the_recorded_setup_does_not_warn() -> None:
    loaded = loaded_mid_epoch(emergency_checkpoint())
    with resume_warnings() as seen:
        loaded.train(1, progress_bar=False)
    assert seen == []
    assert loaded.epoch == 1


@pytest.mark.parametrize(
    ("change", "train_arguments", "expected"),
    [
        (lambda h: attach_loaders(h, n=48), {}, "the training dataset has 48 samples, it had 32"),
        (lambda h: h.optimizer.param_groups[0].__setitem__("lr", 0.5), {},
         "learning rate(s) [0.5], they were [0.01]"),
        (lambda h: None, {"ema_decay": 0.5}, "ema_decay 0.0 -> 0.5"),
        (lambda h: None, {"use_amp": True}, "use_amp False -> True"),
        (lambda h: None, {"gradient_clipping_norm": 1.0}, "gradient_clipping_norm None -> 1.0"),
    ],
    ids=["dataset-length", "learning-rate", "ema-decay", "amp", "clipping"],
)
def test_continuing_an_epoch_with_a_changed_setup_warns(
    change: Callable[[NNHandler], Any], train_arguments: dict[str, Any], expected: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    loaded = loaded_mid_epoch(emergency_checkpoint())
    change(loaded)
    with caplog.at_level(logging.WARNING, logger="nnhandler"), resume_warnings() as seen:
        loaded.train(1, progress_bar=False, **train_arguments)
    assert len(seen) == 1, seen
    assert "continues epoch 1 of an emergency checkpoint (after its batch 2)" in seen[0]
    assert expected in seen[0]
    assert "will not equal an uninterrupted one" in seen[0]
    assert seen[0] in caplog.text


def test_a_partial_epoch_from_an_older_file_without_the_record_does_not_warn() -> None:
    path = emergency_checkpoint()
    envelope = torch.load(path, weights_only=True)
    partial = envelope["state"]["position"]["partial"]
    for key in ("samples", "batches_per_epoch", "learning_rates"):
        del partial[key]
    old = CK / "old.pth"
    write_checkpoint(old, envelope["state"], envelope["meta"])
    path.unlink()
    loaded = loaded_mid_epoch(old, n=48)  # another dataset length: not recorded, not said
    with resume_warnings() as seen:
        loaded.train(1, progress_bar=False)
    assert seen == []
    assert loaded.epoch == 1


# ---------------------------------------------------------------------- an epoch's end -------
@pytest.mark.parametrize(
    ("arguments", "expected"),
    [({"ema_decay": 0.5}, ["ema_decay 0.0 -> 0.5"]),
     ({"use_amp": True, "validate_every": 2}, ["use_amp False -> True", "validate_every 1 -> 2"]),
     ({"ema_decay": 0.0, "use_amp": False}, [])],
    ids=["ema", "amp-and-validate-every", "same-values-explicitly"],
)
def test_first_call_after_load_that_changes_a_recorded_setting_warns_once(
    arguments: dict[str, Any], expected: list[str]
) -> None:
    loaded = NNHandler.load(saved_run(2))
    attach_loaders(loaded, n=16)
    with resume_warnings() as seen:
        loaded.train(1, progress_bar=False, **arguments)
    if not expected:
        assert seen == []
        return
    assert len(seen) == 1 and "resumes a checkpoint with other settings" in seen[0]
    for part in expected:
        assert part in seen[0]
    with resume_warnings() as again:  # once: the next call is no longer a resume
        loaded.train(1, progress_bar=False, ema_decay=0.9)
    assert again == []


def test_train_resume_latest_that_changes_a_recorded_setting_warns() -> None:
    writer = make_handler(n=16)
    writer.auto_save(1, save_path=CK)
    writer.train(2, progress_bar=False)
    restarted = make_handler(n=16)
    restarted.auto_save(1, save_path=CK)
    with resume_warnings() as seen:
        restarted.train(until_epoch=3, resume="latest", ema_decay=0.5, progress_bar=False)
    assert len(seen) == 1 and "ema_decay 0.0 -> 0.5" in seen[0]


def test_a_fresh_handler_changing_its_settings_does_not_warn() -> None:
    handler = make_handler(n=16)
    with resume_warnings() as seen:
        handler.train(1, progress_bar=False)
        handler.train(1, progress_bar=False, ema_decay=0.5, use_amp=True)
    assert seen == []


# ---------------------------------------------------------------------- position schema ------
def _partial_state() -> dict[str, Any]:
    return PartialEpoch(
        epoch=2, batches=3, batch_size=8, accumulation=1, metric_names=("mae",),
        totals=({"loss": torch.tensor(1.5, dtype=torch.float64), "count": 24,
                 "metric_sums": [0.5],
                 "metric_tensors": [torch.tensor(0.0, dtype=torch.float64)]},),
        pending_grads=None, reason="signal", samples=32, batches_per_epoch=4,
        learning_rates=(0.01,),
    ).to_state()


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    state = {"partial": _partial_state()}
    target: Any = state
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return state


CRAFTED = [
    ("reason-unknown", _with(("partial", "reason"), "os.system"), "partial.reason"),
    ("epoch-str", _with(("partial", "epoch"), "3"), "partial.epoch"),
    ("epoch-zero", _with(("partial", "epoch"), 0), "partial.epoch"),
    ("batches-negative", _with(("partial", "batches"), -1), "partial.batches"),
    ("batch-size-float", _with(("partial", "batch_size"), 8.0), "partial.batch_size"),
    ("metric-names-not-str", _with(("partial", "metric_names"), [1]), "partial.metric_names[0]"),
    ("totals-empty", _with(("partial", "totals"), []), "partial.totals"),
    ("totals-count-negative", _with(("partial", "totals", 0, "count"), -4),
     "partial.totals[0].count"),
    ("totals-loss-float", _with(("partial", "totals", 0, "loss"), 1.5),
     "partial.totals[0].loss"),
    ("totals-loss-float32", _with(("partial", "totals", 0, "loss"), torch.tensor(1.5)),
     "partial.totals[0].loss"),
    ("totals-metric-mismatch", _with(("partial", "totals", 0, "metric_sums"), [0.5, 0.1]),
     "partial"),
    ("totals-extra-key", _with(("partial", "totals", 0, "hook"), "os:system"),
     "partial.totals[0].hook"),
    ("grads-not-tensor", _with(("partial", "pending_grads"), {"w": 1}), "partial.pending_grads"),
    ("learning-rates-str", _with(("partial", "learning_rates"), ["fast"]),
     "partial.learning_rates[0]"),
    ("unknown-key", _with(("partial", "callback"), "builtins:print"), "partial.callback"),
    ("partial-list", {"partial": [1, 2]}, "partial"),
    ("no-partial-key", {}, "partial"),
]


@pytest.mark.parametrize(("state", "field"), [row[1:] for row in CRAFTED],
                         ids=[row[0] for row in CRAFTED])
def test_crafted_position_state_is_a_schema_error_naming_the_field(
    state: dict[str, Any], field: str
) -> None:
    position = EpochPosition()
    with pytest.raises(CheckpointSchemaError) as info:
        position.load_state_dict(state)
    assert info.value.field is not None
    assert info.value.field.startswith(f"state['position'].{field}"), info.value.field
    assert position.partial is None and not position.restored


def test_partial_epoch_round_trips_and_older_states_load() -> None:
    state = _partial_state()
    again = PartialEpoch.from_state(state).to_state()
    assert again.keys() == state.keys()
    assert again["learning_rates"] == [0.01] and again["samples"] == 32
    for key in ("samples", "batches_per_epoch", "learning_rates"):
        del state[key]
    older = PartialEpoch.from_state(state)
    assert (older.samples, older.batches_per_epoch, older.learning_rates) == (None, None, None)


def test_crafted_position_in_a_file_is_refused_on_load_naming_the_field() -> None:
    path = emergency_checkpoint()
    envelope = torch.load(path, weights_only=True)
    envelope["state"]["position"]["partial"]["reason"] = "builtins:exec"
    crafted = Path("crafted.pth")
    write_checkpoint(crafted, envelope["state"], envelope["meta"])  # a valid CRC
    with pytest.raises(CheckpointError, match=r"state\['position'\]\.partial\.reason") as info:
        NNHandler.load(crafted)
    # the registry wraps a provider's error in a CheckpointError naming the state key
    schema_error = (info.value if isinstance(info.value, CheckpointSchemaError)
                    else info.value.__cause__)
    assert isinstance(schema_error, CheckpointSchemaError)
    assert schema_error.field == "state['position'].partial.reason"
