"""The auto-save options: one definition for ``AutoSaveCallback(...)`` and
``NNHandler.auto_save(...)``; the seed's four positional parameters; the rest keyword-only,
retention and emergency saves groupable (``keep=Retention(...)``, ``emergency=EmergencySaves(...)``)
beside today's flat keywords."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
from nnh_testing import checkpoint_files, make_handler
from pydantic import ValidationError

from nnhandler import (
    AutoSaveCallback,
    ConfigurationError,
    EmergencySaves,
    NNHandler,
    Retention,
)
from nnhandler.callbacks.autosave_options import AutoSaveOptions

CK = Path("ck")


def test_both_entry_points_take_the_same_parameters() -> None:
    callback = inspect.signature(AutoSaveCallback.__init__).parameters
    facade = inspect.signature(NNHandler.auto_save).parameters
    assert list(callback) == list(facade) == ["self", "interval", "save_path", "name",
                                              "overwrite", "options"]
    for name in ("interval", "save_path", "name", "overwrite"):
        assert callback[name].default == facade[name].default
        assert callback[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert callback["options"].kind is facade["options"].kind is inspect.Parameter.VAR_KEYWORD


def test_the_seeds_four_parameters_work_positionally() -> None:
    handler = make_handler(n=16)
    callback = handler.auto_save(2, CK, "seed_ep{epoch:03d}", True)
    assert (callback.config.interval, callback.config.save_path, callback.config.name,
            callback.config.overwrite) == (2, CK, "seed_ep{epoch:03d}", True)
    handler.train(4, progress_bar=False)
    assert checkpoint_files(CK) == ["seed_ep004.pth"]
    by_hand = AutoSaveCallback(3, "other", "x{epoch}", False)
    assert by_hand.config.interval == 3 and not by_hand.config.overwrite


@pytest.mark.parametrize("make", [
    lambda: AutoSaveCallback(1, CK, "n{epoch}", False, "raise"),
    lambda: make_handler(n=16).auto_save(1, CK, "n{epoch}", False, "raise"),
], ids=["callback", "auto_save"])
def test_every_other_option_is_keyword_only(make: Any) -> None:
    with pytest.raises(TypeError, match="positional argument"):
        make()


@pytest.mark.parametrize(("grouped", "flat"), [
    ({"keep": Retention(last=3)}, {"keep_last": 3}),
    ({"keep": Retention(best=2, monitor="val_loss", mode="max", every=5)},
     {"keep_best": 2, "monitor": "val_loss", "mode": "max", "keep_every": 5}),
    ({"emergency": EmergencySaves(on_signal=["SIGTERM"], on_exception=True)},
     {"save_on_signal": ["SIGTERM"], "save_on_exception": True}),
    ({"emergency": EmergencySaves(on_signal=True)}, {"save_on_signal": True}),
    ({"keep": None, "emergency": None}, {}),
], ids=["keep-last", "keep-best-every", "emergency-list", "emergency-true", "none"])
def test_a_group_means_exactly_its_flat_keywords(grouped: AutoSaveOptions,
                                                 flat: AutoSaveOptions) -> None:
    assert (AutoSaveCallback(1, CK, "n{epoch}", **grouped).config
            == AutoSaveCallback(1, CK, "n{epoch}", **flat).config)
    handler = make_handler(n=16)
    assert handler.auto_save(1, CK, "n{epoch}", **grouped).config == AutoSaveCallback(
        1, CK, "n{epoch}", **flat).config


@pytest.mark.parametrize(("options", "match"), [
    ({"keep": Retention(last=3), "keep_last": 2}, r"keep=.*keep_last=2.*twice"),
    ({"keep": Retention(best=1, monitor="loss"), "mode": "max"}, r"mode='max'.*twice"),
    ({"emergency": EmergencySaves(on_signal=True), "save_on_exception": True},
     r"save_on_exception=True.*twice"),
    ({"keep": {"last": 3}}, r"keep=\{'last': 3\}: pass a Retention"),
    ({"emergency": True}, r"emergency=True: pass a EmergencySaves"),
    ({"keep_lats": 3}, r"'keep_lats' \(did you mean 'keep_last'\?\)"),
    ({"asyncsave": True}, r"did you mean 'async_save'"),
    ({"keep": Retention(best=2)}, r"keep_best=2 needs monitor"),
    ({"keep": Retention(last=1), "overwrite_everything": True}, r"overwrite_everything"),
], ids=["keep-twice", "mode-twice", "emergency-twice", "keep-dict", "emergency-bool",
        "near-miss", "near-miss-2", "cross-rule", "unknown"])
def test_bad_options_are_refused_naming_them(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AutoSaveCallback(1, CK, "n{epoch}", **options)
    handler = make_handler(n=16)
    with pytest.raises(ValueError, match=match):
        handler.auto_save(1, CK, "n{epoch}", **options)
    assert handler.auto_save_callback is None


@pytest.mark.parametrize("arguments", [
    {"last": 0}, {"best": -1}, {"every": "5"}, {"mode": "median"}, {"monitor": ""},
    {"last": 2.0}, {"lats": 2},
], ids=["last-zero", "best-negative", "every-str", "mode", "monitor-empty", "last-float",
        "unknown"])
def test_a_retention_object_validates_its_own_values(arguments: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Retention(**arguments)


def test_a_grouped_configuration_trains_and_keeps_what_it_says() -> None:
    handler = make_handler(n=16)
    handler.auto_save(1, CK, "ep{epoch:03d}", keep=Retention(last=2, every=3))
    handler.train(5, progress_bar=False)
    assert checkpoint_files(CK) == ["ep003.pth", "ep004.pth", "ep005.pth"]


def test_a_bad_reconfiguration_keeps_the_old_one() -> None:
    handler = make_handler(n=16)
    callback = handler.auto_save(1, CK, "ep{epoch:03d}", keep=Retention(last=2))
    with pytest.raises(ConfigurationError, match="twice"):
        handler.auto_save(1, CK, "ep{epoch:03d}", keep=Retention(last=2), keep_every=3)
    assert handler.auto_save_callback is callback
    assert callback.config.keep_last == 2 and callback.config.keep_every is None
