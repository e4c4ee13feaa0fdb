"""Loading and resuming: the file format, skip options, strictness, what is restored by
reference (and what is refused), and bit-exact resume."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from nnh_testing import (
    TinyNet,
    assert_deep_equal,
    attach_loaders,
    checkpoint_files,
    mae,
    make_handler,
)
from torch import nn

from nnhandler import (
    AutoSaveCallback,
    Callback,
    CheckpointError,
    ConfigurationError,
    NNHandler,
    UnresolvableReferenceError,
)
from nnhandler.checkpoint import write_checkpoint

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


class WiderNet(TinyNet):
    """TinyNet plus one layer that the checkpoint does not have."""

    def __init__(self, hidden: int = 8, dropout: float = 0.1) -> None:
        super().__init__(hidden, dropout)
        self.extra = nn.Linear(1, 1)


class EpochCounter(Callback):
    state_key = "epoch_counter"

    def __init__(self) -> None:
        self.count = 0

    def on_epoch_end(self, **kwargs: Any) -> None:
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]


def trained_handler(epochs: int = 2, **train_kwargs: Any) -> NNHandler:
    handler = make_handler(n=32)
    handler.add_callback(EpochCounter())
    handler.train(epochs, progress_bar=False, **{"ema_decay": 0.8, "seed": 0, **train_kwargs})
    return handler


# ---------------------------------------------------------------------- the file --------------


def test_every_checkpoint_opens_with_weights_only_and_has_the_envelope(tmp_path: Path) -> None:
    handler = make_handler(n=32)
    handler.add_callback(EpochCounter())
    handler.auto_save(1, "ck", name="a{epoch}")
    handler.add_callback(AutoSaveCallback(2, "ck", name="b{epoch}_{val_loss:.3f}"))
    handler.train(2, ema_decay=0.5, gradient_accumulation_steps=2, seed=4, progress_bar=False)
    handler.save("manual.pth")
    files = [tmp_path / "ck" / name for name in checkpoint_files(tmp_path / "ck")]
    assert len(files) == 3
    for path in [*files, tmp_path / "manual.pth"]:
        envelope = torch.load(path, weights_only=True)
        assert {"format", "meta", "state"} <= set(envelope), path
        assert envelope["format"]["name"] == "nnhandler.checkpoint"
        assert isinstance(envelope["format"]["version"], int)
        assert envelope["meta"]["epoch"] in (1, 2)
        assert {"model", "optimizer", "scheduler", "ema", "history", "progress", "rng",
                "config", "epoch_counter"} <= set(envelope["state"]), path


def test_meta_records_epoch_step_logs_and_versions() -> None:
    handler = trained_handler(2)
    handler.save("ck.pth")
    meta = torch.load("ck.pth", weights_only=True)["meta"]
    assert meta["epoch"] == 2
    assert meta["step"] == handler.global_step
    assert meta["logs"]["epoch"] == 2
    assert meta["logs"]["loss"] == handler.train_losses[-1]
    assert meta["world_size"] == 1
    assert meta["versions"]["nnhandler"] and meta["versions"]["torch"]


# ---------------------------------------------------------------------- skip options ----------


def optimizer_is_fresh(handler: NNHandler) -> bool:
    assert handler.optimizer is not None
    return not handler.optimizer.state_dict()["state"]


def scheduler_is_fresh(handler: NNHandler) -> bool:
    return bool(handler.scheduler.last_epoch == 0)


def history_is_fresh(handler: NNHandler) -> bool:
    return handler.train_losses == [] and handler.val_losses == [] and handler.history == []


def ema_is_fresh(handler: NNHandler) -> bool:
    return handler.ema_model is None


def callbacks_are_fresh(handler: NNHandler) -> bool:
    counter = next(cb for cb in handler.callbacks if isinstance(cb, EpochCounter))
    return counter.count == 0 and handler.auto_save_callback is None


FRESH_CHECKS: dict[str, Callable[[NNHandler], bool]] = {
    "skip_optimizer": optimizer_is_fresh,
    "skip_scheduler": scheduler_is_fresh,
    "skip_history": history_is_fresh,
    "skip_ema": ema_is_fresh,
    "skip_callbacks": callbacks_are_fresh,
}


@pytest.mark.parametrize("skip", list(FRESH_CHECKS), ids=list(FRESH_CHECKS))
def test_skip_option_leaves_only_that_component_fresh(skip: str) -> None:
    handler = trained_handler(2)
    handler.auto_save(5, "ck")
    handler.save("ck.pth")

    options: dict[str, Any] = {skip: True}
    loaded = NNHandler.load("ck.pth", callbacks=[EpochCounter()], **options)
    for option, is_fresh in FRESH_CHECKS.items():
        assert is_fresh(loaded) == (option == skip), option
    assert_deep_equal(handler.module.state_dict(), loaded.module.state_dict())
    assert loaded.epoch == 2 and loaded.global_step == handler.global_step


def test_loaded_handler_without_skips_has_every_component_back() -> None:
    handler = trained_handler(2)
    handler.auto_save(5, "ck")
    handler.save("ck.pth")
    counter = EpochCounter()
    loaded = NNHandler.load("ck.pth", callbacks=[counter])
    assert counter.count == 2
    assert loaded.auto_save_callback is not None
    assert loaded.auto_save_callback.config.interval == 5
    assert loaded.ema_model is not None
    assert loaded.settings.ema_decay == 0.8
    assert loaded.train_losses == handler.train_losses
    assert_deep_equal(handler.optimizer.state_dict(), loaded.optimizer.state_dict())  # type: ignore[union-attr]
    assert_deep_equal(handler.scheduler.state_dict(), loaded.scheduler.state_dict())
    assert_deep_equal(handler.ema_model.state_dict(), loaded.ema_model.state_dict())  # type: ignore[union-attr]


def test_skipped_component_trains_on_from_fresh() -> None:
    handler = trained_handler(2)
    handler.save("ck.pth")
    loaded = NNHandler.load("ck.pth", callbacks=[EpochCounter()], skip_history=True,
                            skip_ema=True)
    attach_loaders(loaded, n=32)
    loaded.train(1, progress_bar=False)
    assert loaded.epoch == 3
    assert len(loaded.train_losses) == 1
    assert loaded.ema_model is not None  # recreated from the settings, from the raw weights


# ---------------------------------------------------------------------- strictness ------------


def test_strict_false_loads_into_a_model_with_an_extra_layer() -> None:
    handler = trained_handler(1, ema_decay=0.0)
    handler.save("ck.pth")
    loaded = NNHandler.load("ck.pth", model_class=WiderNet, strict=False, skip_optimizer=True,
                            callbacks=[EpochCounter()])
    assert isinstance(loaded.module, WiderNet)
    for key, value in handler.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    attach_loaders(loaded, n=32)
    loaded.train(1, progress_bar=False)
    assert loaded.epoch == 2


def test_strict_true_refuses_a_model_with_an_extra_layer() -> None:
    handler = trained_handler(1, ema_decay=0.0)
    handler.save("ck.pth")
    with pytest.raises(CheckpointError, match=r"'model'(.|\n)*extra\.weight"):
        NNHandler.load("ck.pth", model_class=WiderNet, skip_optimizer=True)


def test_optimizer_state_for_other_parameters_is_a_checkpoint_error_naming_it() -> None:
    handler = trained_handler(1, ema_decay=0.0)
    handler.save("ck.pth")
    with pytest.raises(CheckpointError, match="'optimizer' cannot be loaded into"):
        NNHandler.load("ck.pth", model_class=WiderNet, strict=False)


# ---------------------------------------------------------------------- loss and metrics ------


def test_loss_class_with_kwargs_and_function_metric_are_restored() -> None:
    handler = make_handler(n=32)
    handler.set_loss_fn(nn.HuberLoss, delta=0.25)
    handler.add_metric("mae_again", mae)
    handler.train(1, progress_bar=False)
    handler.save("ck.pth")
    loaded = NNHandler.load("ck.pth")
    assert isinstance(loaded.loss_fn, nn.HuberLoss)
    assert loaded.loss_fn.delta == 0.25
    assert loaded.metrics == {"mae": mae, "mae_again": mae}
    attach_loaders(loaded, n=32)
    logs = loaded.train(1, progress_bar=False)
    assert {"mae", "mae_again", "val_mae", "val_mae_again"} <= set(logs)


def test_plain_mse_loss_class_is_restored() -> None:
    handler = make_handler(n=32)
    handler.save("ck.pth")
    assert isinstance(NNHandler.load("ck.pth").loss_fn, nn.MSELoss)


def test_loss_module_buffers_are_restored() -> None:
    handler = make_handler(n=32)
    weight = torch.tensor([0.25, 4.0])
    handler.set_loss_fn(nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1))
    handler.save("ck.pth")
    loaded = NNHandler.load("ck.pth")
    assert isinstance(loaded.loss_fn, nn.CrossEntropyLoss)
    assert loaded.loss_fn.weight is not None
    assert torch.equal(loaded.loss_fn.weight, weight)
    assert loaded.loss_fn.label_smoothing == 0.1


def test_lambda_loss_is_not_restored_and_train_asks_for_set_loss_fn() -> None:
    handler = make_handler(n=32)
    handler.set_loss_fn(lambda output, target: ((output - target) ** 2).mean())
    handler.add_metric("lambda_metric", lambda output, target: 0.0)
    handler.train(1, progress_bar=False)
    handler.save("ck.pth")
    loaded = NNHandler.load("ck.pth")
    assert loaded.loss_fn is None
    assert "lambda_metric" not in loaded.metrics
    attach_loaders(loaded, n=32)
    with pytest.raises(ConfigurationError, match=r"loss function \(set_loss_fn\)"):
        loaded.train(1, progress_bar=False)
    loaded.set_loss_fn(nn.MSELoss)
    loaded.train(1, progress_bar=False)
    assert loaded.epoch == 2


# ---------------------------------------------------------------------- classes by reference --


MAIN_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from nnh_testing import TinyNet, regression_dataset
    from nnhandler import NNHandler

    class MainNet(TinyNet):
        pass

    torch.manual_seed(0)
    handler = NNHandler(MainNet, device="cpu", hidden=6)
    handler.set_optimizer(torch.optim.SGD, lr=0.1)
    handler.set_loss_fn(torch.nn.MSELoss)
    handler.set_train_loader(regression_dataset(16), batch_size=8)
    handler.train(1, progress_bar=False, seed=0)
    handler.save(sys.argv[1])

    again = NNHandler.load(sys.argv[1])  # the same process resolves __main__:MainNet
    assert type(again.module) is MainNet, type(again.module)
    for key, value in handler.module.state_dict().items():
        assert torch.equal(value, again.module.state_dict()[key]), key
    print("SAME-PROCESS-OK")
    """
)


@pytest.mark.slow
def test_model_class_from_main_loads_elsewhere_only_with_model_class(tmp_path: Path) -> None:
    script = tmp_path / "train_main.py"
    script.write_text(MAIN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run([sys.executable, str(script), "main.pth"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "SAME-PROCESS-OK" in completed.stdout
    config = torch.load("main.pth", weights_only=True)["state"]["config"]
    assert config["model_class"] == "__main__:MainNet"

    # this (pytest) process is a different process: its __main__ has no MainNet
    with pytest.raises(UnresolvableReferenceError, match=r"model_class=") as info:
        NNHandler.load("main.pth")
    assert isinstance(info.value, CheckpointError)
    assert "MainNet" in str(info.value)

    loaded = NNHandler.load("main.pth", model_class=TinyNet)
    assert isinstance(loaded.module, TinyNet)
    assert loaded.module.net[0].out_features == 6  # model kwargs came from the file
    assert loaded.epoch == 1


def rewrite_checkpoint(path: str, change: Callable[[dict[str, Any]], None]) -> None:
    """A crafted, otherwise well-formed checkpoint (written by the library's own writer)."""
    envelope = torch.load(path, weights_only=True)
    change(envelope)
    write_checkpoint(Path(path), envelope["state"], envelope["meta"])


@pytest.mark.parametrize(
    "reference",
    ["os:system", "builtins:dict", "nnh_testing:mae", "collections:OrderedDict",
     "torch.optim:Adam", "os", "os:path.join", "no_such_module_xyz:Net", "nnh_testing:Nope"],
    ids=["os-system", "builtins-dict", "function", "non-module-class", "optimizer-class",
         "malformed", "nested-function", "missing-module", "missing-name"],
)
def test_model_reference_that_is_not_a_module_class_is_refused(reference: str) -> None:
    make_handler().save("ck.pth")

    def set_model_class(envelope: dict[str, Any]) -> None:
        envelope["state"]["config"]["model_class"] = reference

    rewrite_checkpoint("ck.pth", set_model_class)
    with pytest.raises(UnresolvableReferenceError, match="model_class="):
        NNHandler.load("ck.pth")


def test_optimizer_reference_that_is_not_an_optimizer_is_not_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    make_handler().save("ck.pth")

    def set_optimizer_class(envelope: dict[str, Any]) -> None:
        envelope["state"]["config"]["optimizer"]["class"] = "builtins:dict"

    rewrite_checkpoint("ck.pth", set_optimizer_class)
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        loaded = NNHandler.load("ck.pth", skip_optimizer=True, skip_scheduler=True)
    assert loaded.optimizer is None
    assert "optimizer not restored" in caplog.text


def test_loss_reference_that_is_not_a_module_is_not_used() -> None:
    make_handler().save("ck.pth")

    def set_loss_class(envelope: dict[str, Any]) -> None:
        envelope["state"]["config"]["loss_fn"]["ref"] = "builtins:dict"

    rewrite_checkpoint("ck.pth", set_loss_class)
    loaded = NNHandler.load("ck.pth")
    assert loaded.loss_fn is None


# ---------------------------------------------------------------------- exact resume ----------


RESUME_SETTINGS: dict[str, Any] = {
    "seed": 11, "ema_decay": 0.7, "gradient_accumulation_steps": 3, "validate_every": 2,
}


def equal_runs(full: NNHandler, resumed: NNHandler) -> None:
    assert resumed.epoch == full.epoch and resumed.global_step == full.global_step
    assert resumed.train_losses == full.train_losses
    assert resumed.val_losses == full.val_losses
    assert resumed.train_metrics_history == full.train_metrics_history
    assert_deep_equal(full.module.state_dict(), resumed.module.state_dict(), "model")
    assert_deep_equal(full.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")  # type: ignore[union-attr]
    assert_deep_equal(full.scheduler.state_dict(), resumed.scheduler.state_dict(), "scheduler")
    assert_deep_equal(full.ema_model.state_dict(), resumed.ema_model.state_dict(), "ema")  # type: ignore[union-attr]


@pytest.mark.parametrize("split", [1, 2, 3], ids=["after-1", "after-2", "after-3"])
def test_resume_is_bit_exact(split: int) -> None:
    full = make_handler()  # TinyNet with dropout, StepLR, validation, a metric
    full.train(4, progress_bar=False, **RESUME_SETTINGS)

    part = make_handler()
    part.train(split, progress_bar=False, **RESUME_SETTINGS)
    part.save("part.pth")
    resumed = NNHandler.load("part.pth")
    attach_loaders(resumed)
    resumed.train(4 - split, seed=RESUME_SETTINGS["seed"], progress_bar=False)
    equal_runs(full, resumed)


def test_resume_with_until_epoch_and_saved_settings_is_bit_exact() -> None:
    full = make_handler()
    full.train(4, progress_bar=False, **RESUME_SETTINGS)

    part = make_handler()
    part.auto_save(2, "ck", name="ep{epoch}")
    part.train(3, progress_bar=False, **RESUME_SETTINGS)
    resumed = NNHandler.load("ck/ep2.pth")  # settings come back as defaults
    attach_loaders(resumed)
    resumed.train(until_epoch=4, progress_bar=False)  # no seed: the restored run continues
    equal_runs(full, resumed)


def test_resume_with_a_drawn_seed_is_bit_exact() -> None:
    settings = {**RESUME_SETTINGS, "seed": None}
    original = make_handler()
    original.train(2, progress_bar=False, **settings)
    drawn = original.progress.run_seed
    assert drawn is not None
    original.save("part.pth")
    original.train(2, progress_bar=False)  # the uninterrupted continuation

    resumed = NNHandler.load("part.pth")  # restores every random stream
    assert resumed.progress.run_seed == drawn
    attach_loaders(resumed)
    resumed.train(2, progress_bar=False)
    equal_runs(original, resumed)


def test_different_seed_on_resume_warns_and_reseeds(caplog: pytest.LogCaptureFixture) -> None:
    part = make_handler()
    part.train(2, progress_bar=False, **RESUME_SETTINGS)
    part.save("part.pth")

    same = NNHandler.load("part.pth")
    attach_loaders(same)
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        same.train(1, seed=RESUME_SETTINGS["seed"], progress_bar=False)
    assert "re-seeding" not in caplog.text

    reseeded = NNHandler.load("part.pth")
    attach_loaders(reseeded)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        reseeded.train(1, seed=99, progress_bar=False)
    assert "differs from this run's seed 11" in caplog.text
    assert "re-seeding" in caplog.text
    assert reseeded.progress.run_seed == 99
    assert reseeded.train_losses[-1] != same.train_losses[-1]

    again = NNHandler.load("part.pth")  # re-seeding is itself reproducible
    attach_loaders(again)
    again.train(1, seed=99, progress_bar=False)
    assert again.train_losses == reseeded.train_losses
    assert_deep_equal(again.module.state_dict(), reseeded.module.state_dict())


# ---------------------------------------------------------------------- round-trip property ----


COMPONENTS = ("model", "optimizer", "scheduler", "ema", "history", "progress")


@hypothesis_settings(max_examples=10)
@given(
    epochs=st.integers(min_value=0, max_value=3),
    ema_decay=st.sampled_from([0.0, 0.5, 0.9]),
    accumulation=st.integers(min_value=1, max_value=3),
    validate_every=st.integers(min_value=1, max_value=2),
    optimizer=st.sampled_from(["adam", "sgd-momentum"]),
    scheduler=st.sampled_from(["none", "step", "step-per-batch", "plateau"]),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_save_load_round_trips_every_component_exactly(
    epochs: int, ema_decay: float, accumulation: int, validate_every: int, optimizer: str,
    scheduler: str, seed: int,
) -> None:
    handler = make_handler(n=16, batch_size=4, scheduler=False)
    if optimizer == "sgd-momentum":
        handler.set_optimizer(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True)
    if scheduler == "step":
        handler.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.9)
    elif scheduler == "step-per-batch":
        handler.set_scheduler(torch.optim.lr_scheduler.ExponentialLR, interval="step",
                              gamma=0.99)
    elif scheduler == "plateau":
        handler.set_scheduler(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0)
    handler.train(epochs, ema_decay=ema_decay, gradient_accumulation_steps=accumulation,
                  validate_every=validate_every, seed=seed, progress_bar=False)
    before = handler.state_dict()
    handler.save("round.pth")
    saved_rng = torch.load("round.pth", weights_only=True)["state"]["rng"]

    loaded = NNHandler.load("round.pth")
    after = loaded.state_dict()
    present = [key for key in COMPONENTS if key in before]
    assert [key for key in COMPONENTS if key in after] == present
    for key in present:
        assert_deep_equal(before[key], after[key], key)
    assert_deep_equal(saved_rng, after["rng"], "rng")
    assert loaded.settings == handler.settings
