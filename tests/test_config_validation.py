"""Auto-save configuration is validated when it is given, never at save time (DESIGN §1).

Both entry points — ``handler.auto_save(...)`` and ``AutoSaveCallback(...)`` — reject the same
mistakes with a ``ValueError``/``TypeError`` (pydantic's ``ValidationError`` is a ``ValueError``)
and never fall back to a silent "off".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nnh_testing import make_handler
from pydantic import ValidationError

from nnhandler import AutoSaveCallback, NNHandler
from nnhandler.config import AutoSaveConfig

Configure = Callable[..., Any]


def via_auto_save(**kwargs: Any) -> Any:
    handler = make_handler(n=16)
    try:
        return handler.auto_save(**kwargs)
    finally:
        # a rejected configuration must not leave a half-configured callback behind
        if handler.auto_save_callback is None:
            assert not any(isinstance(c, AutoSaveCallback) for c in handler.callbacks)


def via_callback(**kwargs: Any) -> Any:
    return AutoSaveCallback(**kwargs)


ENTRY_POINTS = pytest.mark.parametrize(
    "configure", [via_auto_save, via_callback], ids=["handler.auto_save", "AutoSaveCallback"]
)


# --- valid settings are accepted --------------------------------------------------------------
@ENTRY_POINTS
@pytest.mark.parametrize(
    "interval", [None, 0, -1, 1, 5, 1000], ids=["None", "0", "-1", "1", "5", "1000"]
)
def test_valid_interval_is_accepted(configure: Configure, interval: int | None) -> None:
    callback = configure(interval=interval, save_path="ck")
    assert callback.config.interval == interval
    assert callback.config.enabled is bool(interval)


# --- interval ---------------------------------------------------------------------------------
@ENTRY_POINTS
@pytest.mark.parametrize(
    ("interval", "match"),
    [
        (-2, "interval=-2 is not allowed"),
        (-100, "interval=-100 is not allowed"),
        ("5", "interval"),
        (2.0, "interval"),
        (True, "interval"),
        (False, "interval"),
        ([5], "interval"),
    ],
    ids=["minus-2", "minus-100", "str", "float", "True", "False", "list"],
)
def test_bad_interval_is_a_validation_error(
    configure: Configure, interval: Any, match: str
) -> None:
    with pytest.raises(ValidationError, match=match):
        configure(interval=interval, save_path="ck")


def test_validation_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="interval"):
        AutoSaveConfig(interval="5")  # type: ignore[arg-type]


# --- name template ----------------------------------------------------------------------------
@ENTRY_POINTS
@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("ep{epoch", "malformed name template"),
        ("ep}epoch", "malformed name template"),
        ("{}", "plain log keys"),
        ("{0}", "plain log keys"),
        ("{a.b}", "plain log keys"),
        ("{a[0]}", "plain log keys"),
        ("{epoch:{width}}", "nested fields"),
        ("{epoch:zz}", "format spec 'zz'"),
        ("{val_loss:.4q}", "format spec"),
        ("{epoch!x}", "conversion"),
        ("", "must not be empty"),
    ],
    ids=["unclosed", "lone-close", "positional-empty", "positional-index", "attribute",
         "indexing", "nested-spec", "bad-spec", "bad-float-spec", "bad-conversion", "empty"],
)
def test_malformed_template_is_rejected(configure: Configure, name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        configure(interval=1, save_path="ck", name=name)


@ENTRY_POINTS
@pytest.mark.parametrize(
    "name",
    ["sub/ep{epoch}", "sub\\ep{epoch}", "../ep{epoch}", "..", "ep{epoch}..pth", "/abs{epoch}",
     "a..b"],
    ids=["slash", "backslash", "parent", "dotdot-only", "dotdot-suffix", "absolute",
         "dotdot-inside"],
)
def test_template_with_path_parts_is_rejected(configure: Configure, name: str) -> None:
    with pytest.raises(ValueError, match=re.escape("path separator or '..'")):
        configure(interval=1, save_path="ck", name=name)


@ENTRY_POINTS
@pytest.mark.parametrize(
    ("name", "overwrite"),
    [(5, False), (b"ep{epoch}", False), ("ep{epoch}", "yes"), ("ep{epoch}", 1)],
    ids=["name-int", "name-bytes", "overwrite-str", "overwrite-int"],
)
def test_wrong_types_are_rejected(configure: Configure, name: Any, overwrite: Any) -> None:
    with pytest.raises(ValidationError):
        configure(interval=1, save_path="ck", name=name, overwrite=overwrite)


@ENTRY_POINTS
@pytest.mark.parametrize(
    "name",
    ["latest", "ckpt_ep{epoch:03d}_valloss{val_loss:.4f}", "m{epoch:d}_{val_mae:.2e}",
     "{epoch!s}", "e{epoch:>5}", "x.pth", "v1.2_{epoch}"],
    ids=["fixed", "design-example", "metric", "conversion", "align", "pth", "single-dot"],
)
def test_valid_template_is_accepted(configure: Configure, name: str) -> None:
    assert configure(interval=1, save_path="ck", name=name).config.name == name


# --- save_path --------------------------------------------------------------------------------
@ENTRY_POINTS
def test_save_path_that_is_an_existing_file_is_rejected(configure: Configure) -> None:
    Path("taken").write_text("not a directory")
    with pytest.raises(ValueError, match="save_path 'taken' exists and is not a directory"):
        configure(interval=1, save_path="taken")
    with pytest.raises(ValueError, match="not a directory"):
        configure(interval=1, save_path=Path("taken").resolve())


@ENTRY_POINTS
def test_missing_save_path_is_accepted_and_not_created_yet(configure: Configure) -> None:
    configure(interval=1, save_path=Path("a") / "b" / "c")
    assert not Path("a").exists()


# --- reconfiguration --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [{"interval": -2}, {"interval": "5"}, {"name": "ep{epoch"}, {"name": "../x"},
     {"save_path": "taken"}],
    ids=["interval-minus-2", "interval-str", "malformed-name", "escaping-name", "file-path"],
)
def test_bad_reconfiguration_keeps_the_previous_configuration(bad: dict[str, Any]) -> None:
    Path("taken").write_text("file")
    handler: NNHandler = make_handler(n=16)
    callback = handler.auto_save(3, "ck", name="ep{epoch}")
    before = callback.config
    with pytest.raises(ValueError):
        handler.auto_save(**{"interval": 3, "save_path": "ck", "name": "ep{epoch}", **bad})
    assert handler.auto_save_callback is callback
    assert callback.config == before
    assert [c for c in handler.callbacks if isinstance(c, AutoSaveCallback)] == [callback]
