"""The handler's public API: construction, setters, training options, history and logging,
and the errors bad input gets."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from nnh_testing import TinyNet, attach_loaders, make_handler, regression_dataset
from torch import nn

from nnhandler import ConfigurationError, LoggingMode, NNHandler
from nnhandler.components import unwrap_model


class ClashNet(nn.Module):
    """A model whose constructor arguments clash with the handler's own names."""

    def __init__(self, device: str = "unset", logger_mode: int = 0, hidden: int = 8) -> None:
        super().__init__()
        self.device_argument, self.logger_mode_argument = device, logger_mode
        self.net = nn.Linear(4, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.out(self.net(x))
        return result


class RecordingPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """Records what it is stepped with."""

    def __init__(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)
        self.seen: list[Any] = []

    def step(self, metrics: Any, epoch: Any = None) -> None:  # type: ignore[override]
        self.seen.append(metrics)
        super().step(metrics)


def lr_of(handler: NNHandler) -> float:
    assert handler.optimizer is not None
    return float(handler.optimizer.param_groups[0]["lr"])


# ---------------------------------------------------------------------- construction ----------


def test_extra_kwargs_and_model_kwargs_both_reach_the_model() -> None:
    handler = NNHandler(ClashNet, device="cpu", hidden=5,
                        model_kwargs={"device": "from-model-kwargs", "logger_mode": 3})
    module = handler.module
    assert isinstance(module, ClashNet)
    assert module.device_argument == "from-model-kwargs"
    assert module.logger_mode_argument == 3
    assert module.net.out_features == 5
    assert handler.device == torch.device("cpu")


def test_model_kwargs_survive_save_and_load() -> None:
    handler = NNHandler(ClashNet, device="cpu", hidden=5, model_kwargs={"device": "abc"})
    handler.save("ck.pth")
    loaded = NNHandler.load("ck.pth")
    assert isinstance(loaded.module, ClashNet)
    assert loaded.module.device_argument == "abc"
    assert loaded.module.net.out_features == 5


def test_same_model_argument_given_twice_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match=r"\['hidden'\] given twice"):
        NNHandler(TinyNet, device="cpu", hidden=4, model_kwargs={"hidden": 5})


@pytest.mark.parametrize(
    "model_class",
    [dict, nn.Linear(2, 2), lambda: nn.Linear(2, 2), "nnh_testing:TinyNet", None],
    ids=["non-module-class", "module-instance", "factory-function", "reference-string", "none"],
)
def test_model_class_that_is_not_a_module_class_is_a_type_error(model_class: Any) -> None:
    with pytest.raises(TypeError, match=r"model_class must be an nn\.Module subclass"):
        NNHandler(model_class, device="cpu")


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cpux", "'cpux'"),
        ("not a device", "'not a device'"),
        pytest.param("cuda", "'cuda'", marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="CUDA is available here")),
        pytest.param("cuda:0", "'cuda:0'", marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="CUDA is available here")),
    ],
    ids=["cpux", "garbage", "cuda-without-cuda", "cuda0-without-cuda"],
)
def test_unknown_or_unavailable_device_is_a_value_error_naming_it(
    device: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        NNHandler(TinyNet, device=device)


def test_device_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="device must be"):
        NNHandler(TinyNet, device=0)  # type: ignore[arg-type]


def test_torch_device_object_is_accepted() -> None:
    handler = NNHandler(TinyNet, device=torch.device("cpu"))
    assert handler.device == torch.device("cpu")
    assert next(handler.module.parameters()).device == torch.device("cpu")


# ---------------------------------------------------------------------- missing pieces --------


def bare_handler(*, optimizer: bool, loss: bool, loader: bool) -> NNHandler:
    handler = NNHandler(TinyNet, device="cpu")
    if optimizer:
        handler.set_optimizer(torch.optim.SGD, lr=0.1)
    if loss:
        handler.set_loss_fn(nn.MSELoss)
    if loader:
        handler.set_train_loader(regression_dataset(16), batch_size=8)
    return handler


@pytest.mark.parametrize(
    ("optimizer", "loss", "loader", "missing"),
    [
        (False, True, True, [r"optimizer \(set_optimizer\)"]),
        (True, False, True, [r"loss function \(set_loss_fn\)"]),
        (True, True, False, [r"training dataset \(set_train_loader\)"]),
        (False, False, False, ["set_optimizer", "set_loss_fn", "set_train_loader"]),
    ],
    ids=["no-optimizer", "no-loss", "no-loader", "nothing"],
)
def test_train_without_a_required_piece_names_what_is_missing(
    optimizer: bool, loss: bool, loader: bool, missing: list[str]
) -> None:
    handler = bare_handler(optimizer=optimizer, loss=loss, loader=loader)
    with pytest.raises(ConfigurationError, match="cannot train without") as info:
        handler.train(1, progress_bar=False)
    for pattern in missing:
        assert info.match(pattern)
    assert handler.epoch == 0


def test_set_scheduler_before_set_optimizer_is_an_error() -> None:
    handler = NNHandler(TinyNet, device="cpu")
    with pytest.raises(ConfigurationError, match="set_optimizer must be called before"):
        handler.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1)
    assert handler.scheduler is None


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda h: h.set_optimizer(nn.Linear), TypeError, "Optimizer subclass"),
        (lambda h: h.set_scheduler(torch.optim.SGD), TypeError, "LRScheduler subclass"),
        (lambda h: h.set_scheduler(torch.optim.lr_scheduler.StepLR, interval="batch",
                                   step_size=1), ConfigurationError, "'epoch' or 'step'"),
        (lambda h: h.set_scheduler(torch.optim.lr_scheduler.ReduceLROnPlateau,
                                   interval="step"), ConfigurationError, "val_loss"),
        (lambda h: h.set_loss_fn(dict), TypeError, "nn.Module subclass"),
        (lambda h: h.set_loss_fn(42), TypeError, "callable"),
        (lambda h: h.add_metric("val_x", abs), ConfigurationError, "reserved"),
        (lambda h: h.add_metric("loss", abs), ConfigurationError, "reserved"),
        (lambda h: h.add_metric("not an identifier", abs), ConfigurationError, "identifier"),
        (lambda h: h.set_train_loader(), ConfigurationError, "needs a dataset"),
        (lambda h: h.set_train_loader(torch.utils.data.DataLoader(regression_dataset(4))),
         TypeError, "not a DataLoader"),
        (lambda h: h.set_train_loader(regression_dataset(4), batch_size=0), ValueError,
         "batch_size"),
        (lambda h: h.train(1, validate_every=0), ValueError, "validate_every"),
        (lambda h: h.train(1, ema_decay=1.0), ValueError, "ema_decay"),
        (lambda h: h.train(1, gradient_clipping_norm=-1.0), ValueError,
         "gradient_clipping_norm"),
        (lambda h: h.train(1, progress_bar="yes"), ConfigurationError, "progress_bar='yes'"),
        (lambda h: h.train(), ConfigurationError, "exactly one of epochs"),
        (lambda h: h.train(1, until_epoch=2), ConfigurationError, "exactly one of epochs"),
        (lambda h: h.train(-1), ConfigurationError, "non-negative int"),
        (lambda h: h.train(2.0), ConfigurationError, "non-negative int"),
    ],
    ids=["optimizer-not-optimizer", "scheduler-not-scheduler", "bad-interval",
         "plateau-per-step", "loss-class-not-module", "loss-not-callable", "metric-val-prefix",
         "metric-loss", "metric-not-identifier", "loader-without-dataset", "loader-dataloader",
         "loader-batch-size-0", "validate-every-0", "ema-decay-1", "negative-clipping",
         "progress-bar-str", "no-epochs", "both-epochs", "negative-epochs", "float-epochs"],
)
def test_bad_configuration_is_refused(call: Any, error: type[Exception], message: str) -> None:
    handler = make_handler(n=16)
    with pytest.raises(error, match=message):
        call(handler)
    assert handler.epoch == 0


# ---------------------------------------------------------------------- schedulers ------------


@pytest.mark.parametrize(
    ("interval", "expected_steps"),
    [("epoch", 2), ("step", 8)],  # 2 epochs of 4 batches
    ids=["per-epoch", "per-optimizer-step"],
)
def test_scheduler_interval(interval: str, expected_steps: int) -> None:
    handler = make_handler(n=32, batch_size=8, scheduler=False)
    handler.set_scheduler(torch.optim.lr_scheduler.StepLR, interval=interval, step_size=1,
                          gamma=0.5)
    seen: list[float] = []

    from nnhandler import Callback

    class LrProbe(Callback):
        def on_train_batch_end(self, handler: NNHandler, **kwargs: Any) -> None:
            seen.append(lr_of(handler))

    handler.add_callback(LrProbe())
    handler.train(2, progress_bar=False)
    assert lr_of(handler) == pytest.approx(1e-2 * 0.5**expected_steps)
    assert handler.scheduler.last_epoch == expected_steps
    if interval == "step":
        # the learning rate changes after every optimizer step, within an epoch
        assert len(set(seen)) == len(seen) == 8
    else:
        assert len(set(seen)) == 2


def test_step_scheduler_with_accumulation_steps_per_optimizer_step() -> None:
    handler = make_handler(n=32, batch_size=8, scheduler=False)
    handler.set_scheduler(torch.optim.lr_scheduler.StepLR, interval="step", step_size=1,
                          gamma=0.5)
    handler.train(1, gradient_accumulation_steps=2, progress_bar=False)
    assert handler.global_step == 2
    assert lr_of(handler) == pytest.approx(1e-2 * 0.25)


def test_reduce_lr_on_plateau_is_fed_val_loss_on_validating_epochs() -> None:
    handler = make_handler(n=32, scheduler=False)
    handler.set_scheduler(RecordingPlateau, patience=0, factor=0.5)
    handler.train(4, validate_every=2, progress_bar=False)
    scheduler = handler.scheduler
    assert isinstance(scheduler, RecordingPlateau)
    assert len(handler.val_losses) == 2
    assert scheduler.seen == pytest.approx(handler.val_losses)
    assert all(type(value) is float for value in scheduler.seen)


def test_reduce_lr_on_plateau_reduces_when_val_loss_does_not_improve() -> None:
    handler = make_handler(n=32, scheduler=False)
    handler.set_optimizer(torch.optim.SGD, lr=0.0)  # nothing moves: val_loss stays the same
    handler.set_scheduler(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0, factor=0.5)
    assert handler.optimizer is not None
    for group in handler.optimizer.param_groups:
        group["lr"] = 1e-12  # too small to change val_loss, big enough to be reduced
    handler.train(3, progress_bar=False)
    assert lr_of(handler) == pytest.approx(1e-12 * 0.25)


def test_set_optimizer_again_rebuilds_the_scheduler_on_the_new_optimizer() -> None:
    handler = make_handler()
    handler.set_optimizer(torch.optim.SGD, lr=0.5)
    assert handler.scheduler.optimizer is handler.optimizer
    assert isinstance(handler.optimizer, torch.optim.SGD)


# ---------------------------------------------------------------------- training options ------


def full_batch_handler(clip: float | None) -> NNHandler:
    torch.manual_seed(0)
    handler = NNHandler(TinyNet, device="cpu", dropout=0.0)
    handler.set_optimizer(torch.optim.SGD, lr=1.0)
    handler.set_loss_fn(nn.MSELoss)
    handler.set_train_loader(regression_dataset(32), batch_size=32)  # one step per epoch
    return handler


def parameter_vector(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("clip", [1e-3, 0.05], ids=["clip-1e-3", "clip-0.05"])
def test_gradient_clipping_bounds_the_update(clip: float) -> None:
    clipped, free = full_batch_handler(clip), full_batch_handler(None)
    before = parameter_vector(clipped.module)
    assert torch.equal(before, parameter_vector(free.module))
    clipped.train(1, gradient_clipping_norm=clip, seed=0, progress_bar=False)
    free.train(1, seed=0, progress_bar=False)
    clipped_update = float((parameter_vector(clipped.module) - before).norm())
    free_update = float((parameter_vector(free.module) - before).norm())
    assert clipped_update == pytest.approx(clip, rel=1e-4)  # SGD, lr=1: update = clipped grad
    assert free_update > 10 * clip
    assert clipped.settings.gradient_clipping_norm == clip


@pytest.mark.parametrize(
    ("accumulation", "steps_per_epoch"),
    [(1, 8), (2, 4), (3, 3), (8, 1), (20, 1)],  # 8 batches per epoch; a short last group steps
    ids=["acc1", "acc2", "acc3-short-last-group", "acc8", "acc-more-than-batches"],
)
def test_gradient_accumulation_sets_the_number_of_optimizer_steps(
    accumulation: int, steps_per_epoch: int
) -> None:
    handler = make_handler(n=64, batch_size=8, validation=False)
    handler.train(2, gradient_accumulation_steps=accumulation, progress_bar=False)
    assert handler.global_step == 2 * steps_per_epoch
    assert handler.scheduler.last_epoch == 2  # the epoch scheduler does not care
    assert handler.settings.gradient_accumulation_steps == accumulation


def test_amp_on_cpu_trains_and_resumes() -> None:
    full = make_handler(n=32)  # the uninterrupted run
    full.train(3, use_amp=True, seed=1, progress_bar=False)

    handler = make_handler(n=32)
    handler.train(2, use_amp=True, seed=1, progress_bar=False)
    assert handler.grad_scaler is None  # bf16 autocast on CPU needs no scaler
    assert all(math.isfinite(x) for x in handler.train_losses + handler.val_losses)
    handler.save("amp.pth")

    loaded = NNHandler.load("amp.pth")
    assert loaded.settings.use_amp is True
    attach_loaders(loaded, n=32)
    loaded.train(1, seed=1, progress_bar=False)
    assert loaded.epoch == 3
    assert loaded.settings.use_amp is True
    assert loaded.train_losses[:2] == handler.train_losses
    assert all(math.isfinite(x) for x in loaded.train_losses)
    assert loaded.train_losses == full.train_losses
    for key, value in full.module.state_dict().items():
        assert torch.equal(value, loaded.module.state_dict()[key]), key


def test_amp_autocast_actually_runs_in_bfloat16() -> None:
    dtypes: list[torch.dtype] = []

    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dtypes.append(output.dtype)
        return nn.functional.mse_loss(output.float(), target)

    handler = make_handler(n=16, validation=False)
    handler.set_loss_fn(loss)
    handler.train(1, use_amp=True, progress_bar=False)
    assert dtypes and set(dtypes) == {torch.bfloat16}


def evaluate_by_hand(module: nn.Module, n: int = 32) -> float:
    data = regression_dataset(n, seed=1)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        x, y = data.tensors
        value = float(nn.functional.mse_loss(module(x), y))
    module.train(was_training)
    return value


def test_ema_validation_uses_ema_weights_and_module_keeps_the_raw_weights() -> None:
    handler = make_handler(n=64)
    handler.train(3, ema_decay=0.9, seed=0, progress_bar=False)
    ema = handler.ema_model
    assert ema is not None
    assert ema.module is not handler.module
    assert handler.val_losses[-1] == pytest.approx(evaluate_by_hand(ema.module), rel=1e-5)
    assert handler.val_losses[-1] != pytest.approx(evaluate_by_hand(handler.module), rel=1e-3)
    raw = handler.module.state_dict()
    averaged = ema.module.state_dict()
    assert raw.keys() == averaged.keys()
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)
    # the raw weights are the ones the optimizer updates
    assert handler.optimizer is not None
    optimized = {id(p) for group in handler.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in handler.module.parameters()} == optimized


def test_ema_off_removes_the_ema_model() -> None:
    handler = make_handler(n=16)
    handler.train(1, ema_decay=0.5, progress_bar=False)
    assert handler.ema_model is not None and "ema" in handler.state_dict()
    handler.train(1, ema_decay=0.0, progress_bar=False)
    assert handler.ema_model is None and "ema" not in handler.state_dict()


# ---------------------------------------------------------------------- epochs and history ----


def test_epochs_are_additional_and_until_epoch_is_absolute() -> None:
    handler = make_handler(n=16)
    logs = handler.train(2, progress_bar=False)
    assert handler.epoch == 2 and logs["epoch"] == 2
    logs = handler.train(until_epoch=5, progress_bar=False)
    assert handler.epoch == 5 and logs["epoch"] == 5
    logs = handler.train(3, progress_bar=False)
    assert handler.epoch == 8 and logs["epoch"] == 8
    assert [entry["epoch"] for entry in handler.history] == list(range(1, 9))
    assert len(handler.train_losses) == 8


@pytest.mark.parametrize(
    "call",
    [{"until_epoch": 3}, {"until_epoch": 2}, {"until_epoch": 0}, {"epochs": 0}],
    ids=["until-current", "until-below", "until-zero", "zero-epochs"],
)
def test_nothing_to_train_leaves_everything_as_it_is(call: dict[str, Any]) -> None:
    handler = make_handler(n=16)
    last = handler.train(3, progress_bar=False)
    before = {k: v.clone() for k, v in handler.module.state_dict().items()}
    steps, losses = handler.global_step, list(handler.train_losses)
    logs = handler.train(**call, progress_bar=False)
    assert logs == last
    assert handler.epoch == 3 and handler.global_step == steps
    assert handler.train_losses == losses
    for key, value in handler.module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_history_holds_plain_floats_and_val_entries_only_on_validated_epochs() -> None:
    handler = make_handler(n=16)
    handler.train(5, validate_every=2, progress_bar=False)
    assert len(handler.train_losses) == 5
    assert len(handler.val_losses) == 2
    assert len(handler.train_metrics_history["mae"]) == 5
    assert len(handler.val_metrics_history["mae"]) == 2
    values = (handler.train_losses + handler.val_losses + handler.train_metrics_history["mae"]
              + handler.val_metrics_history["mae"])
    assert all(type(value) is float for value in values)
    validated = [entry["epoch"] for entry in handler.history if "val_loss" in entry]
    assert validated == [2, 4]
    assert [entry["val_loss"] for entry in handler.history if "val_loss" in entry] == (
        handler.val_losses
    )
    assert set(handler.history[1]) == {"epoch", "loss", "mae", "val_loss", "val_mae"}
    assert set(handler.history[0]) == {"epoch", "loss", "mae"}
    assert all(type(entry["epoch"]) is int for entry in handler.history)


def test_validate_every_counts_absolute_epochs_across_calls() -> None:
    handler = make_handler(n=16)
    handler.train(1, validate_every=2, progress_bar=False)
    handler.train(3, progress_bar=False)  # validate_every=2 stays the default
    assert [entry["epoch"] for entry in handler.history if "val_loss" in entry] == [2, 4]


def test_train_returns_the_last_epoch_logs_with_metrics() -> None:
    handler = make_handler(n=16)
    logs = handler.train(2, progress_bar=False)
    assert set(logs) == {"epoch", "loss", "mae", "val_loss", "val_mae"}
    assert logs["loss"] == handler.train_losses[-1]
    assert logs["val_mae"] == handler.val_metrics_history["mae"][-1]


def test_training_with_the_rich_progress_bar_on() -> None:
    handler = make_handler(n=16)
    logs = handler.train(2, progress_bar=True)
    assert logs["epoch"] == 2 and handler.epoch == 2


# ---------------------------------------------------------------------- logging ---------------


@pytest.mark.parametrize(
    ("mode", "writes_file", "console"),
    [
        (NNHandler.LoggingMode.FILE, True, False),
        (NNHandler.LoggingMode.BOTH, True, True),
        (NNHandler.LoggingMode.CONSOLE, False, True),
        ("file", True, False),
    ],
    ids=["file", "both", "console", "file-as-string"],
)
def test_logging_mode(mode: Any, writes_file: bool, console: bool, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "run.log"
    handler = NNHandler(TinyNet, device="cpu", logger_mode=mode, log_file=log_file)
    handler.set_optimizer(torch.optim.SGD, lr=0.1)
    handler.set_loss_fn(nn.MSELoss)
    handler.set_train_loader(regression_dataset(16), batch_size=8)
    handler.train(1, progress_bar=False)
    handler.save("ck.pth")
    for each in handler.logger.handlers:
        each.flush()
    assert log_file.exists() == writes_file
    if writes_file:
        text = log_file.read_text()
        assert "training epochs 1..1" in text
        assert "saved checkpoint ck.pth" in text
    kinds = {type(each).__name__ for each in handler.logger.handlers}
    assert ("RichHandler" in kinds) == console
    assert ("FileHandler" in kinds) == writes_file


def test_logging_mode_is_reachable_from_the_handler_class() -> None:
    assert NNHandler.LoggingMode is LoggingMode
    assert {mode.name for mode in LoggingMode} == {"CONSOLE", "FILE", "BOTH"}


@pytest.mark.parametrize("mode", ["loud", 3, None], ids=["bad-string", "int", "none"])
def test_bad_logger_mode_is_a_value_error(mode: Any) -> None:
    with pytest.raises(ValueError, match=r"logger_mode=.* is not one of CONSOLE, FILE, BOTH"):
        NNHandler(TinyNet, device="cpu", logger_mode=mode)


def test_each_handler_logs_through_its_own_logger(caplog: pytest.LogCaptureFixture) -> None:
    first, second = make_handler(n=16), make_handler(n=16)
    assert first.logger is not second.logger
    assert first.logger.name.startswith("nnhandler.")
    with caplog.at_level(logging.INFO, logger="nnhandler"):
        first.train(1, progress_bar=False)
    assert any(record.name == first.logger.name for record in caplog.records)
    assert not any(record.name == second.logger.name for record in caplog.records)


# ---------------------------------------------------------------------- torch.compile ---------


def test_compiled_model_unwraps_to_the_raw_module_and_saves_without_prefix() -> None:
    torch.manual_seed(0)
    handler = NNHandler(TinyNet, device="cpu", compile_model=True)
    assert handler.model is not handler.module
    assert hasattr(handler.model, "_orig_mod")
    assert unwrap_model(handler.model) is handler.module
    assert isinstance(handler.module, TinyNet)
    handler.save("compiled.pth")
    state = torch.load("compiled.pth", weights_only=True)["state"]
    assert set(state["model"]) == set(TinyNet().state_dict())
    assert not any("_orig_mod" in key for key in state["model"])
    assert state["config"]["compile_model"] is True
    for key, value in handler.module.state_dict().items():
        assert torch.equal(state["model"][key], value), key
