"""Every argument of a public call is checked before the call changes anything (issue 11,
items 6 and 7): a rejected ``train``, ``resume_from``, ``set_*_loader``, ``load`` or
``load_latest`` leaves the handler, and the checkpoints in its folder, exactly as they were."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nnh_testing import TinyNet, assert_deep_equal, make_handler, regression_dataset

from nnhandler import Callback, ConfigurationError, NNHandler
from nnhandler.config import LoaderConfig

CK = Path("ck")
Call = Callable[[NNHandler], Any]


def trained_handler() -> NNHandler:
    """Three epochs with an auto-save every second epoch (ck/model_epoch02.pth, the newest)
    and a checkpoint saved by hand after epoch 1: a resume would go back to epoch 2."""
    handler = make_handler(n=16)
    handler.auto_save(2, save_path=CK)
    handler.train(1, progress_bar=False)
    handler.save(CK / "by_hand.pth")
    handler.train(2, progress_bar=False)
    return handler


def folder_digest() -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(CK.iterdir())}


def observable(handler: NNHandler) -> dict[str, Any]:
    """Everything a call could change, copied (tensors too) so a later change shows."""
    loaders = handler.loaders
    return {
        "state": copy.deepcopy(handler.state_dict()),
        "settings": handler.settings,
        "epoch": handler.epoch,
        "step": handler.global_step,
        "loaders": {which: (spec, spec.config, dict(spec.extra))
                    for which, spec in loaders.specs.items()},
        "remembered": copy.deepcopy(dict(loaders.remembered)),
        "callbacks": handler.callbacks,
        "optimizer": handler.optimizer,
        "scheduler": handler.scheduler,
        "ema": handler.ema_model,
        "preemption": handler.preemption,
        "files": folder_digest(),
    }


def assert_unchanged(before: dict[str, Any], handler: NNHandler) -> None:
    after = observable(handler)
    assert_deep_equal(before["state"], after["state"])
    for key in ("settings", "epoch", "step", "files"):
        assert before[key] == after[key], key
    assert before["remembered"] == after["remembered"]
    assert before["loaders"].keys() == after["loaders"].keys()
    for which, (spec, config, extra) in before["loaders"].items():
        now_spec, now_config, now_extra = after["loaders"][which]
        assert now_spec is spec and now_config == config and now_extra == extra, which
    for key in ("optimizer", "scheduler", "ema", "preemption"):
        assert after[key] is before[key], key
    assert len(after["callbacks"]) == len(before["callbacks"])
    assert all(a is b for a, b in zip(after["callbacks"], before["callbacks"], strict=True))


# ---------------------------------------------------------------------- the table ------------
def _load(**kwargs: Any) -> Call:
    return lambda handler: NNHandler.load(CK / "model_epoch02.pth", **kwargs)


def _load_latest(**kwargs: Any) -> Call:
    return lambda handler: NNHandler.load_latest(CK, **kwargs)


INVALID_CALLS: list[tuple[str, Call, type[Exception], str]] = [
    ("train-resume-negative-epochs",
     lambda h: h.train(-1, resume="latest"), ConfigurationError, r"epochs=-1"),
    ("train-resume-ema-decay-2",
     lambda h: h.train(1, resume="latest", ema_decay=2.0), ConfigurationError,
     r"ema_decay=2\.0"),
    ("train-resume-progress-bar-str",
     lambda h: h.train(1, resume="latest", progress_bar="yes"), ConfigurationError,  # type: ignore[arg-type]
     r"progress_bar='yes'"),
    ("train-resume-float-until",
     lambda h: h.train(until_epoch=4.0, resume="latest"), ConfigurationError,  # type: ignore[arg-type]
     r"until_epoch must be a non-negative int, got 4\.0"),
    ("train-resume-both-targets",
     lambda h: h.train(1, until_epoch=4, resume="latest"), ConfigurationError,
     "exactly one of epochs"),
    ("train-resume-bad-seed",
     lambda h: h.train(1, resume="latest", seed=-1), ConfigurationError, r"seed=-1"),
    ("train-resume-amp-int",
     lambda h: h.train(1, resume="latest", use_amp=1), ConfigurationError, r"use_amp=1"),  # type: ignore[arg-type]
    ("train-resume-int",
     lambda h: h.train(1, resume=3), ConfigurationError, r"resume=3.*str, an os.PathLike"),  # type: ignore[arg-type]
    ("train-resume-empty",
     lambda h: h.train(1, resume=""), ConfigurationError, "resume must not be empty"),
    ("resume-from-verify-str",
     lambda h: h.resume_from(CK / "model_epoch02.pth", verify="no"), ConfigurationError,  # type: ignore[arg-type]
     r"resume_from\(verify='no'\)"),
    ("resume-from-path-int",
     lambda h: h.resume_from(2), ConfigurationError, r"resume_from\(path=2\)"),  # type: ignore[arg-type]
    ("loader-num-workers-negative",
     lambda h: h.set_train_loader(regression_dataset(8), num_workers=-1), ConfigurationError,
     r"set_train_loader\(num_workers=-1\)"),
    ("loader-pin-memory-str",
     lambda h: h.set_val_loader(regression_dataset(8), pin_memory="yes"), ConfigurationError,
     r"set_val_loader\(pin_memory='yes'\)"),
    ("loader-persistent-without-workers",
     lambda h: h.set_train_loader(regression_dataset(8), persistent_workers=True),
     ConfigurationError, "persistent_workers=True needs num_workers > 0"),
    ("loader-prefetch-zero",
     lambda h: h.set_train_loader(regression_dataset(8), num_workers=1, prefetch_factor=0),
     ConfigurationError, r"prefetch_factor=0"),
    ("loader-prefetch-without-workers",
     lambda h: h.set_train_loader(regression_dataset(8), prefetch_factor=2),
     ConfigurationError, "prefetch_factor=2 needs num_workers > 0"),
    ("loader-timeout-without-workers",
     lambda h: h.set_train_loader(regression_dataset(8), timeout=5.0), ConfigurationError,
     "timeout=5.0 needs num_workers > 0"),
    ("loader-timeout-negative",
     lambda h: h.set_train_loader(regression_dataset(8), timeout=-1.0), ConfigurationError,
     r"timeout=-1\.0"),
    ("loader-unknown-dataloader-argument",
     lambda h: h.set_train_loader(regression_dataset(8), not_a_loader_argument=1), TypeError,
     "not_a_loader_argument"),
    ("loader-sampler",
     lambda h: h.set_train_loader(regression_dataset(8), sampler=[0, 1]), ConfigurationError,
     "nnhandler provides the sampler"),
    ("load-verify-str", _load(verify="no"), ConfigurationError, r"load\(verify='no'\)"),
    ("load-skip-optimizer-str", _load(skip_optimizer="False"), ConfigurationError,
     r"skip_optimizer='False'"),
    ("load-callbacks-int", _load(callbacks=0), ConfigurationError, r"callbacks=0"),
    ("load-callbacks-single", _load(callbacks=Callback()), ConfigurationError,
     "a single callback"),
    ("load-callbacks-not-callbacks", _load(callbacks=[print]), ConfigurationError,
     r"callbacks\[0\]"),
    ("load-model-class-empty", _load(model_class=""), ConfigurationError,
     r"model_class=''.*nn.Module subclass"),
    ("load-model-class-instance", _load(model_class=TinyNet()), ConfigurationError,
     "model_class"),
    ("load-model-kwargs-list", _load(model_kwargs=[1]), ConfigurationError, "model_kwargs"),
    ("load-strict-int", _load(strict=1), ConfigurationError, r"strict=1"),
    ("load-use-distributed-str", _load(use_distributed="yes"), ConfigurationError,
     r"use_distributed='yes'"),
    ("load-log-file-int", _load(log_file=3), ConfigurationError, r"log_file=3"),
    ("load-logger-mode-unknown", _load(logger_mode="loud"), ConfigurationError,
     r"logger_mode='loud'"),
    ("load-parallelism-unknown", _load(parallelism="x"), ConfigurationError,
     r"parallelism='x'"),
    ("load-fsdp-units-int", _load(fsdp_units=3), ConfigurationError, r"fsdp_units=3"),
    ("load-path-int", lambda h: NNHandler.load(3), ConfigurationError, "got 3"),  # type: ignore[arg-type]
    ("load-latest-unknown-keyword", _load_latest(skip_optimiser=True), ConfigurationError,
     r"skip_optimiser=True\): unknown argument"),
    ("load-latest-verify-str", _load_latest(verify="no"), ConfigurationError,
     r"verify='no'"),
    ("load-latest-device-meta", _load_latest(device="meta"), ConfigurationError, "'meta'"),
]


@pytest.mark.parametrize(("call", "error", "match"), [row[1:] for row in INVALID_CALLS],
                         ids=[row[0] for row in INVALID_CALLS])
def test_invalid_call_is_refused_and_changes_nothing(call: Call, error: type[Exception],
                                                     match: str) -> None:
    handler = trained_handler()
    before = observable(handler)
    with pytest.raises(error, match=match):
        call(handler)
    assert_unchanged(before, handler)
    assert handler.epoch == 3  # not the checkpoint's epoch 2


def test_a_rejected_resume_keeps_the_weights() -> None:
    handler = trained_handler()
    weights = {k: v.clone() for k, v in handler.module.state_dict().items()}
    with pytest.raises(ConfigurationError, match="epochs=-1"):
        handler.train(-1, resume="latest")
    for key, value in handler.module.state_dict().items():
        assert torch.equal(value, weights[key]), key
    handler.train(1, resume="latest", progress_bar=False)  # the valid call still resumes
    assert handler.epoch == 3  # from epoch 2, one more


def test_a_rejected_partial_epoch_continuation_changes_nothing() -> None:
    """An emergency checkpoint continues only with its accumulation: a call that changes it
    is refused before it seeds, builds an EMA or commits its settings."""
    handler = make_handler(n=32, batch_size=8)
    handler.auto_save(None, save_path=CK, save_on_exception=True)

    class FailAtBatch(Callback):
        def on_train_batch_end(self, batch_idx: int, **kwargs: Any) -> None:
            if batch_idx == 1:
                raise RuntimeError("boom")

    failing = FailAtBatch()
    handler.add_callback(failing)
    with pytest.raises(RuntimeError, match="boom"):
        handler.train(1, progress_bar=False)
    handler.remove_callback(failing)
    assert handler.stopped_mid_epoch
    before = observable(handler)
    with pytest.raises(ConfigurationError, match="gradient_accumulation_steps=1"):
        handler.train(1, gradient_accumulation_steps=2, ema_decay=0.5, seed=123,
                      progress_bar=False)
    assert_unchanged(before, handler)
    assert handler.ema_model is None


# ---------------------------------------------------------------------- hypothesis -----------
_NOT_BOOLS = st.sampled_from(["yes", "False", 1, 0, None, 1.0])
_NOT_COUNTS = st.sampled_from([-1, -5, 1.5, "3", True, 2.0])

#: method -> {argument: strategy of values that argument must refuse}
BAD_ARGUMENTS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "train": {
        "epochs": _NOT_COUNTS,
        "until_epoch": _NOT_COUNTS,
        "validate_every": st.sampled_from([0, -1, 1.0, "1", True]),
        "gradient_accumulation_steps": st.sampled_from([0, 2.0, "2", False]),
        "use_amp": _NOT_BOOLS,
        "gradient_clipping_norm": st.sampled_from([0.0, -1.0, "1"]),
        "ema_decay": st.one_of(st.floats(min_value=1.0, max_value=1e6),
                               st.floats(max_value=-1e-6, min_value=-1e6),
                               st.sampled_from(["0.9", True])),
        "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63),
                          st.sampled_from([1.5, "1"])),
        "progress_bar": _NOT_BOOLS.filter(lambda v: v is not None),
        "resume": st.sampled_from([3, 1.5, b"ck", ""]),
    },
    "resume_from": {
        "path": st.sampled_from([3, None, 1.5, ""]),
        "verify": _NOT_BOOLS,
    },
    "set_train_loader": {
        "batch_size": st.sampled_from([0, -1, 2.0, "8", True]),
        "shuffle": _NOT_BOOLS.filter(lambda v: v is not None),
        "drop_last": _NOT_BOOLS.filter(lambda v: v is not None),
        "num_workers": _NOT_COUNTS,
        "pin_memory": _NOT_BOOLS.filter(lambda v: v is not None),
        "persistent_workers": st.sampled_from(["yes", 1, True]),
        "prefetch_factor": st.sampled_from([0, -2, 1.5, 2]),
        "timeout": st.sampled_from([-1, -0.5, "5"]),
        "no_such_loader_argument": st.integers(),
    },
    "load": {
        "device": st.sampled_from(["meta", "cpu:3", "cpux", "cuda:99", 0]
                                  + ([] if torch.backends.mps.is_available() else ["mps"])),
        "verify": _NOT_BOOLS,
        "skip_optimizer": _NOT_BOOLS,
        "skip_callbacks": _NOT_BOOLS,
        "callbacks": st.sampled_from([0, "cb", [1], {"a": 1}]),
        "model_class": st.sampled_from(["", int, "nnh_testing:TinyNet", 0]),
        "model_kwargs": st.sampled_from([3, [1], {1: 2}]),
        "strict": st.sampled_from([1, "yes"]),
        "logger_mode": st.sampled_from(["loud", 3]),
        "log_file": st.sampled_from([3, None, ""]),
        "use_distributed": st.sampled_from(["yes", 1]),
        "parallelism": st.sampled_from(["x", "DDP", 1]),
        "fsdp_units": st.sampled_from([3, [int], "TinyNet"]),
    },
}
BAD_ARGUMENTS["set_val_loader"] = BAD_ARGUMENTS["set_train_loader"]
BAD_ARGUMENTS["load_latest"] = {**BAD_ARGUMENTS["load"],
                                "unknown_keyword": st.integers()}


@st.composite
def invalid_calls(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    method = draw(st.sampled_from(sorted(BAD_ARGUMENTS)))
    argument = draw(st.sampled_from(sorted(BAD_ARGUMENTS[method])))
    value = draw(BAD_ARGUMENTS[method][argument])
    kwargs: dict[str, Any] = {argument: value}
    if method == "train":
        if argument not in ("epochs", "until_epoch"):
            kwargs["epochs"] = 1
        if argument != "resume" and draw(st.booleans()):
            kwargs["resume"] = "latest"  # the worst case: a valid resume next to a bad value
    return method, argument, kwargs


def _invoke(handler: NNHandler, method: str, kwargs: dict[str, Any]) -> None:
    if method == "train":
        handler.train(**kwargs)
    elif method == "resume_from":
        handler.resume_from(**{"path": CK / "by_hand.pth", **kwargs})
    elif method in ("set_train_loader", "set_val_loader"):
        getattr(handler, method)(regression_dataset(8), **kwargs)
    elif method == "load":
        NNHandler.load(CK / "by_hand.pth", **kwargs)
    else:
        NNHandler.load_latest(CK, **kwargs)


@settings(max_examples=40, deadline=None)
@given(drawn=invalid_calls())
def test_random_invalid_call_raises_and_leaves_the_handler_bit_for_bit(
    drawn: tuple[str, str, dict[str, Any]]
) -> None:
    method, argument, kwargs = drawn
    handler = trained_handler()
    try:
        before = observable(handler)
        with pytest.raises((ValueError, TypeError)) as info:
            _invoke(handler, method, kwargs)
        shown = "device" if argument == "device" else argument
        assert shown in str(info.value), (method, kwargs, str(info.value))
        assert_unchanged(before, handler)
    finally:
        for path in CK.iterdir():
            path.unlink()
        CK.rmdir()


# ---------------------------------------------------------------------- valid calls ----------
def test_checked_dataloader_arguments_reach_the_dataloader_and_are_remembered() -> None:
    handler = make_handler(n=16)
    handler.set_train_loader(regression_dataset(16), batch_size=4, shuffle=True, num_workers=1,
                             prefetch_factor=3, timeout=5.0, pin_memory=False)
    loader = handler.loaders.build("train", 0, handler.distributed, "cpu", ())
    assert loader is not None
    assert (loader.num_workers, loader.prefetch_factor, loader.timeout,
            loader.pin_memory) == (1, 3, 5.0, False)
    handler.save("ck.pth")
    loaded = NNHandler.load("ck.pth")
    loaded.set_train_loader(regression_dataset(16))  # the arguments are remembered
    again = loaded.loaders.build("train", 0, loaded.distributed, "cpu", ())
    assert again is not None
    assert (again.batch_size, again.num_workers, again.prefetch_factor,
            again.timeout) == (4, 1, 3, 5.0)


def test_loader_config_accepts_workers_settings() -> None:
    config = LoaderConfig(num_workers=2, persistent_workers=True, prefetch_factor=3)
    assert config.dataloader_arguments() == {"num_workers": 2, "persistent_workers": True,
                                             "prefetch_factor": 3}


def test_load_latest_with_valid_arguments_still_loads() -> None:
    trained_handler()
    loaded = NNHandler.load_latest(CK, device="cpu", callbacks=iter([Callback()]),
                                   skip_optimizer=True)
    assert loaded.epoch == 2
    assert sum(type(c) is Callback for c in loaded.callbacks) == 1


# ---------------------------------------------------------------------- devices (item 7) -----
_UNAVAILABLE_DEVICES = [
    ("meta", "'meta' holds no data"),
    ("meta:0", "'meta:0' holds no data"),
    (torch.device("meta"), "'meta' holds no data"),
    ("cpu:3", "'cpu:3': there is one CPU device"),
    ("cpu:1", "'cpu:1': there is one CPU device"),
    ("cpux", "unknown device 'cpux'"),
    ("cuda:-1", "unknown device 'cuda:-1'"),
    ("hpu", "'hpu' is not supported"),
    ("cuda:99", "'cuda:99'"),
]
_DEVICE_IDS = ["meta", "meta-0", "meta-object", "cpu-3", "cpu-1", "garbage", "cuda-negative",
               "hpu", "cuda-99"]
if not torch.backends.mps.is_available():
    _UNAVAILABLE_DEVICES.append(("mps", "'mps': the mps backend is not available"))
    _DEVICE_IDS.append("mps")
if not torch.xpu.is_available():
    _UNAVAILABLE_DEVICES.append(("xpu:0", "'xpu:0': the xpu backend is not available"))
    _DEVICE_IDS.append("xpu")
if not torch.cuda.is_available():
    _UNAVAILABLE_DEVICES.append(("cuda", "'cuda' requested but CUDA is not available"))
    _DEVICE_IDS.append("cuda-without-cuda")

DEVICES = pytest.mark.parametrize(("device", "match"), _UNAVAILABLE_DEVICES, ids=_DEVICE_IDS)


@DEVICES
def test_unavailable_device_in_the_constructor_names_it(device: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        NNHandler(TinyNet, device=device)
    assert "available here: cpu" in str(info.value)


@DEVICES
def test_unavailable_device_in_load_is_refused_before_the_file_is_read(
    device: Any, match: str
) -> None:
    # the file does not exist: an error about it would mean it was looked at first
    with pytest.raises(ConfigurationError, match=match):
        NNHandler.load("does-not-exist.pth", device=device)


@DEVICES
def test_unavailable_device_in_load_of_a_real_file(device: Any, match: str) -> None:
    trained_handler()
    with pytest.raises(ConfigurationError, match=match):
        NNHandler.load(CK / "by_hand.pth", device=device)


@DEVICES
def test_unavailable_device_in_load_latest_is_refused_before_the_folder_is_read(
    device: Any, match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        NNHandler.load_latest("no-such-folder", device=device)


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu", 0), None],
                         ids=["cpu", "cpu-0", "cpu-0-object", "default"])
def test_the_cpu_is_accepted(device: Any) -> None:
    handler = NNHandler(TinyNet, device=device)
    assert handler.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_beyond_the_visible_count_names_the_count() -> None:
    count = torch.cuda.device_count()
    with pytest.raises(ConfigurationError, match=f"only {count} CUDA device"):
        NNHandler(TinyNet, device=f"cuda:{count}")
    handler = NNHandler(TinyNet, device=f"cuda:{count - 1}")
    assert handler.device == torch.device("cuda", count - 1)
