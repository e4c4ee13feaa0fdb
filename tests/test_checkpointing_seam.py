"""The public checkpointing seam, used the way a third-party saver uses it: only names exported
by ``nnhandler`` (plus ``nnhandler.plugins``), no private member of any nnhandler object.

A saver writes through ``handler.checkpoints`` (sync or :class:`BackgroundSave`), declares
``is_checkpoint_writer``, writes emergency checkpoints as an :class:`EmergencySaver`, and comes
back on ``load`` through :func:`register_provider_factory`.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from nnh_testing import make_handler, regression_dataset
from test_write_path import assert_same

from nnhandler import (
    BackgroundSave,
    Callback,
    CheckpointError,
    CheckpointSchemaError,
    ConfigurationError,
    Emergency,
    EmergencySaver,
    NNHandler,
    PluginError,
    SavedCheckpoint,
    Trainer,
    read_checkpoint,
    register_provider_factory,
)
from nnhandler.checkpoint.integrity import verify_file

OWN = Path("own")


def train(handler: NNHandler, epochs: int) -> dict[str, Any]:
    return handler.train(epochs, seed=0, progress_bar=False)


class EveryEpoch(Callback):
    """A saver on the seam: one synchronous checkpoint per epoch into its own folder."""

    is_checkpoint_writer = True

    def __init__(self, folder: Path = OWN) -> None:
        self.folder = folder
        self.saved: list[SavedCheckpoint] = []

    def on_epoch_end(self, handler: Trainer, epoch: int, logs: dict[str, Any],
                     **kwargs: Any) -> None:
        self.saved.append(handler.checkpoints.save(self.folder / f"e{epoch}.pth", logs))


class Announcements(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[Path, int]] = []

    def on_checkpoint_saved(self, path: Path, epoch: int, **kwargs: Any) -> None:
        self.seen.append((path, epoch))


def test_a_saver_on_the_seam_writes_what_handler_save_writes() -> None:
    handler = make_handler()
    saver, heard = EveryEpoch(), Announcements()
    handler.add_callback(saver)
    handler.add_callback(heard)
    train(handler, 2)
    assert [(s.path, s.epoch) for s in saver.saved] == [(OWN / "e1.pth", 1), (OWN / "e2.pth", 2)]
    assert heard.seen == [(OWN / "e1.pth", 1), (OWN / "e2.pth", 2)]
    for saved in saver.saved:
        assert saved.size == os.path.getsize(saved.path) and saved.seconds >= 0
        assert verify_file(saved.path)["epoch"] == saved.epoch
    by_hand = handler.save("by_hand.pth")
    mine, theirs = read_checkpoint(OWN / "e2.pth"), read_checkpoint(by_hand)
    assert set(mine.state) == set(theirs.state) == set(handler.state_registry)
    assert_same(mine.state["model"], theirs.state["model"])
    assert mine.meta["logs"] == theirs.meta["logs"] == handler.last_logs
    resumed = NNHandler.load(OWN / "e2.pth")
    assert resumed.epoch == 2 and resumed.train_losses == handler.train_losses


def test_save_records_the_logs_it_is_given_and_refuses_a_directory() -> None:
    handler = make_handler()
    train(handler, 1)
    saved = handler.checkpoints.save("x.pth", {"loss": 0.25, "note": "n", "tensor": torch.ones(1)})
    assert read_checkpoint(saved.path).meta["logs"] == {"loss": 0.25, "note": "n"}
    Path("folder").mkdir()
    with pytest.raises(ConfigurationError, match="save path 'folder' is a directory"):
        handler.checkpoints.save("folder")


class InBackground(Callback):
    """A saver that writes in the background through the seam."""

    is_checkpoint_writer = True

    def __init__(self) -> None:
        self.background = BackgroundSave()
        self.written: list[SavedCheckpoint] = []
        self.in_flight_at_next_epoch: list[Path | None] = []

    def on_epoch_end(self, handler: Trainer, epoch: int, logs: dict[str, Any],
                     **kwargs: Any) -> None:
        self.in_flight_at_next_epoch.append(self.background.in_flight)
        self._settle(handler)
        self.background.start(handler, OWN / f"bg{epoch}.pth", epoch, logs)
        handler.checkpoints.save(OWN / f"sync{epoch}.pth", logs)  # the same state, written now

    def on_train_end(self, handler: Trainer, **kwargs: Any) -> None:
        self._settle(handler)
        self.background.release()

    def _settle(self, handler: Trainer) -> None:
        saved = self.background.settle(handler, wait=True)
        if saved is not None:
            handler.checkpoints.announce(saved)
            self.written.append(saved)


def test_a_background_save_writes_what_a_synchronous_save_writes() -> None:
    handler = make_handler()
    saver, heard = InBackground(), Announcements()
    handler.add_callback(saver)
    handler.add_callback(heard)
    train(handler, 3)
    assert [(s.path.name, s.epoch) for s in saver.written] == [
        ("bg1.pth", 1), ("bg2.pth", 2), ("bg3.pth", 3)]
    assert saver.in_flight_at_next_epoch == [None, OWN / "bg1.pth", OWN / "bg2.pth"]
    assert (OWN / "bg3.pth", 3) in heard.seen and saver.background.in_flight is None
    staging = saver.background.staging
    assert staging is not None and staging.arena is None  # released
    for epoch in (1, 2, 3):
        background = read_checkpoint(OWN / f"bg{epoch}.pth")
        sync = read_checkpoint(OWN / f"sync{epoch}.pth")
        assert background.epoch == sync.epoch == epoch
        assert_same(background.state, sync.state)


def test_background_save_misuse_and_failures_are_clear() -> None:
    handler = make_handler()
    background = BackgroundSave()
    assert background.settle(handler, wait=True) is None and background.staging is None
    background.start(handler, Path("a.pth"), 0, {})
    with pytest.raises(RuntimeError, match=r"a background write of a\.pth is in flight"):
        background.start(handler, Path("b.pth"), 0, {})
    saved = background.settle(handler, wait=True)
    assert saved is not None and saved.path == Path("a.pth") and verify_file(saved.path)
    Path("plain_file").write_text("x")
    background.start(handler, Path("plain_file") / "c.pth", 0, {})  # its folder is a file
    with pytest.raises(OSError):
        background.settle(handler, wait=True)
    assert background.in_flight is None  # nothing in flight after a failure
    Path("folder").mkdir()
    with pytest.raises(ConfigurationError, match="is a directory"):
        background.start(handler, Path("folder"), 0, {})
    assert background.in_flight is None


class NotPlain:
    state_key = "not_plain"

    def state_dict(self) -> dict[str, Any]:
        return {"set": {1, 2}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise AssertionError("never saved")


def test_the_seam_checks_plain_data_before_a_file_is_touched() -> None:
    handler = make_handler()
    handler.register_state_provider(NotPlain())
    with pytest.raises(CheckpointError, match=r"state\['not_plain'\]\['set'\] is a builtins.set"):
        handler.checkpoints.save("x.pth")
    with pytest.raises(CheckpointError, match=r"builtins\.set"):
        BackgroundSave().start(handler, Path("y.pth"), 0, {})
    assert not Path("x.pth").exists() and not Path("y.pth").exists()


# -- emergency checkpoints -------------------------------------------------------------------------
class OnSignal(Callback):
    """An emergency saver of its own: SIGUSR1 stops training, it writes into its folder."""

    is_checkpoint_writer = True

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.flushed = 0
        self.emergencies: list[Emergency] = []

    @property
    def emergency_signals(self) -> tuple[signal.Signals, ...]:
        return (signal.SIGUSR1,)

    @property
    def saves_on_exception(self) -> bool:
        return True

    @property
    def emergency_directory(self) -> Path:
        return OWN

    def flush(self, trainer: Trainer) -> None:
        self.flushed += 1

    def save_emergency(self, trainer: Trainer, emergency: Emergency) -> Path | None:
        self.emergencies.append(emergency)
        if self.fail:
            raise OSError("disk gone")
        return trainer.checkpoints.save(OWN / emergency.file_name).path


class SignalAt(Callback):
    def __init__(self, epoch: int, batch: int, number: int = signal.SIGUSR1) -> None:
        self.at, self.number = (epoch, batch), number

    def on_train_batch_end(self, epoch: int, batch_idx: int, **kwargs: Any) -> None:
        if (epoch, batch_idx) == self.at:
            os.kill(os.getpid(), self.number)


class RaiseAt(Callback):
    def on_train_batch_end(self, epoch: int, batch_idx: int, **kwargs: Any) -> None:
        if (epoch, batch_idx) == (2, 1):
            raise RuntimeError("injected")


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs POSIX signals")
def test_a_third_party_emergency_saver_writes_on_its_signal_and_the_run_resumes() -> None:
    handler = make_handler()
    saver = OnSignal()
    assert isinstance(saver, EmergencySaver)
    handler.add_callback(saver)
    handler.add_callback(SignalAt(2, 2))
    train(handler, 4)
    path = OWN / "preempted_ep002_b00003.pth"
    assert handler.preempted and handler.preemption is not None
    assert handler.preemption.paths == (path,)
    assert saver.emergencies == [Emergency("preempted", 2, 3)] and saver.flushed == 1
    assert handler.stopped_mid_epoch and handler.epoch == 1
    resumed = NNHandler.load(path)
    assert resumed.stopped_mid_epoch
    resumed.set_train_loader(regression_dataset(64), batch_size=8, shuffle=True)
    train(resumed, 1)
    assert resumed.epoch == 2 and not resumed.stopped_mid_epoch


def test_an_exception_s_emergency_checkpoint_and_its_failure_are_notes() -> None:
    handler = make_handler()
    handler.add_callback(OnSignal())
    handler.add_callback(RaiseAt())
    with pytest.raises(RuntimeError, match="injected") as raised:
        train(handler, 3)
    assert any("emergency checkpoint own/exception_ep002_b00002.pth" in note
               for note in raised.value.__notes__)
    assert verify_file(OWN / "exception_ep002_b00002.pth")
    failing = make_handler()
    failing.add_callback(OnSignal(fail=True))
    failing.add_callback(RaiseAt())
    with pytest.raises(RuntimeError, match="injected") as raised:
        train(failing, 3)
    assert any("emergency checkpoint into own failed: OSError: disk gone" in note
               for note in raised.value.__notes__)


def test_two_emergency_savers_may_not_share_a_directory() -> None:
    handler = make_handler()
    handler.add_callback(OnSignal())
    handler.add_callback(OnSignal())
    with pytest.raises(ConfigurationError, match="would both write emergency checkpoints into"):
        train(handler, 1)


# -- restored on load ------------------------------------------------------------------------------
class Counting(Callback):
    """A stateful saver that NNHandler.load re-creates through its factory."""

    is_checkpoint_writer = True

    def __init__(self, every: int) -> None:
        self.every, self.saves = every, 0

    @property
    def state_key(self) -> str:
        return f"test_counting:{self.every}"

    def on_epoch_end(self, handler: Trainer, epoch: int, **kwargs: Any) -> None:
        if epoch % self.every == 0:
            self.saves += 1
            handler.checkpoints.save(OWN / f"c{epoch}.pth")

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "saves": self.saves}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saves = state["saves"]

    @classmethod
    def from_state(cls, state_key: str, state: Any) -> Counting:
        if not isinstance(state, dict) or type(state.get("every")) is not int:
            raise CheckpointSchemaError(f"state[{state_key!r}].every is not an int",
                                        field=f"state[{state_key!r}].every")
        return cls(state["every"])


register_provider_factory("test_counting", Counting.from_state)


def test_a_saver_registered_in_process_comes_back_on_load() -> None:
    handler = make_handler()
    handler.add_callback(Counting(2))
    train(handler, 4)
    resumed = NNHandler.load(OWN / "c4.pth")
    (counting,) = [c for c in resumed.callbacks if isinstance(c, Counting)]
    assert counting.every == 2 and counting.saves == 2  # the bookkeeping of epoch 4's file
    resumed.set_train_loader(regression_dataset(64), batch_size=8, shuffle=True)
    train(resumed, 2)
    assert counting.saves == 3 and verify_file(OWN / "c6.pth")["epoch"] == 6
    skipped = NNHandler.load(OWN / "c4.pth", skip_callbacks=True)
    assert not [c for c in skipped.callbacks if isinstance(c, Counting)]
    passed = Counting(2)
    again = NNHandler.load(OWN / "c4.pth", callbacks=[passed])
    assert [c for c in again.callbacks if isinstance(c, Counting)] == [passed]
    assert passed.saves == 2


def test_a_bad_state_for_a_registered_saver_names_the_file_and_field() -> None:
    handler = make_handler()
    handler.add_callback(Counting(1))
    handler.save("ck.pth")
    envelope = torch.load("ck.pth", weights_only=True)
    envelope["state"]["test_counting:1"]["every"] = "x"
    from nnhandler.checkpoint.envelope import write_checkpoint

    write_checkpoint(Path("bad.pth"), envelope["state"], envelope["meta"])
    with pytest.raises(CheckpointSchemaError) as raised:
        NNHandler.load("bad.pth")
    assert raised.value.field == "state['test_counting:1'].every"
    assert raised.value.path is not None and raised.value.path.endswith("bad.pth")


def test_claims_in_process_are_unique_per_factory() -> None:
    register_provider_factory("test_counting", Counting.from_state)  # the same again: fine

    def other(state_key: str, state: Any) -> Counting:
        return Counting(1)

    with pytest.raises(PluginError, match="both claim the state key 'test_counting'"):
        register_provider_factory("test_counting", other)
    with pytest.raises(PluginError, match="must be a non-empty str without ':'"):
        register_provider_factory("a:b", other)


# -- registration checks ---------------------------------------------------------------------------
class OnlyOne(Callback):
    def check_registration(self, callbacks: Any) -> None:
        if any(isinstance(other, OnlyOne) for other in callbacks):
            raise ConfigurationError(f"{self!r}: only one OnlyOne per handler")


def test_a_callback_can_refuse_its_registration() -> None:
    handler = make_handler()
    handler.add_callback(OnlyOne())
    with pytest.raises(ConfigurationError, match=r"OnlyOne\(\): only one OnlyOne per handler"):
        handler.add_callback(OnlyOne())
    assert len([c for c in handler.callbacks if isinstance(c, OnlyOne)]) == 1
