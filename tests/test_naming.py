"""Checkpoint file names: ``render_name`` / ``validate_template`` (DESIGN §1, the ``name`` row).

A template is a ``str.format`` template filled with the epoch-end logs; ``.pth`` is appended
unless present; a key missing at save time becomes ``NA``; formatted values are sanitised so
that the name always lands directly inside ``save_path``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from nnhandler.naming import (
    CHECKPOINT_SUFFIX,
    MISSING_VALUE,
    render_name,
    template_fields,
    validate_template,
)


# --- rendering ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("template", "logs", "expected"),
    [
        ("model_epoch{epoch:02d}", {"epoch": 7}, "model_epoch07.pth"),
        ("ckpt_ep{epoch:03d}_valloss{val_loss:.4f}", {"epoch": 10, "val_loss": 0.12344},
         "ckpt_ep010_valloss0.1234.pth"),
        ("m_{epoch}_{loss:.2f}_{val_mae:.3f}", {"epoch": 3, "loss": 1.0, "val_mae": 0.5},
         "m_3_1.00_0.500.pth"),
        ("latest", {"epoch": 3}, "latest.pth"),
        ("latest.pth", {"epoch": 3}, "latest.pth"),
        ("ep{epoch}.pth", {"epoch": 3}, "ep3.pth"),
        ("ep{tag}", {"tag": "x.pth"}, "epx.pth"),
        ("run-{marker}", {"marker": "warmup"}, "run-warmup.pth"),
        ("{epoch!r}_{tag!s}", {"epoch": 2, "tag": "b"}, "2_b.pth"),
    ],
    ids=["default", "design-example", "metrics", "fixed", "pth-once", "pth-once-field",
         "pth-from-value", "callback-key", "conversions"],
)
def test_render_name_fills_template_from_logs(
    template: str, logs: dict[str, Any], expected: str
) -> None:
    assert validate_template(template) == template
    assert render_name(template, logs) == (expected, ())


@pytest.mark.parametrize(
    ("template", "logs", "expected_name", "expected_missing"),
    [
        ("ep{epoch:03d}_v{val_loss:.4f}", {"epoch": 4}, f"ep004_v{MISSING_VALUE}.pth",
         ("val_loss",)),
        ("{a}_{b}_{a:.2f}", {}, f"{MISSING_VALUE}_{MISSING_VALUE}_{MISSING_VALUE}.pth",
         ("a", "b")),
    ],
    ids=["one-missing-spec-ignored", "missing-reported-once-each"],
)
def test_missing_key_is_written_as_na(
    template: str, logs: dict[str, Any], expected_name: str, expected_missing: tuple[str, ...]
) -> None:
    assert render_name(template, logs) == (expected_name, expected_missing)


@pytest.mark.parametrize(
    ("template", "logs", "expected"),
    [
        ("ep{tag}", {"tag": "a/b"}, "epa_b.pth"),
        ("ep{tag}", {"tag": "a\\b"}, "epa_b.pth"),
        ("ep{tag}", {"tag": "../../etc"}, "ep.._.._etc.pth"),
        ("ep{tag}", {"tag": "c:x"}, "epc_x.pth"),
        ("ep{tag}", {"tag": "nul\x00"}, "epnul_.pth"),
        ("{tag}", {"tag": ".hidden"}, "_hidden.pth"),
        ("{tag!r}", {"tag": "a/b"}, "'a_b'.pth"),
        ("{epoch:03d}", {"epoch": "three"}, "three.pth"),
        ("{epoch:/>4}", {"epoch": 1}, "___1.pth"),
    ],
    ids=["slash", "backslash", "dotdot", "colon", "nul", "leading-dot", "repr",
         "spec-mismatch-falls-back-to-str", "separator-as-fill-char"],
)
def test_formatted_values_are_sanitised(
    template: str, logs: dict[str, Any], expected: str
) -> None:
    name, missing = render_name(template, logs)
    assert (name, missing) == (expected, ())
    assert os.sep not in name and "/" not in name and "\\" not in name


@pytest.mark.parametrize(
    ("template", "logs"),
    [("{tag}", {"tag": ""}), ("{tag}", {"tag": "."}), ("{tag}", {"tag": ".pth"}),
     ("{tag}.pth", {"tag": ""})],
    ids=["empty-value", "dot-value", "dot-pth-value", "empty-value-with-suffix"],
)
def test_degenerate_values_still_give_a_visible_pth_name(
    template: str, logs: dict[str, Any]
) -> None:
    name, _ = render_name(template, logs)
    assert name.endswith(CHECKPOINT_SUFFIX)
    assert not name.startswith(".")
    assert name == "_.pth"


def test_template_fields_lists_plain_names() -> None:
    assert template_fields("a{epoch:03d}_{val_loss:.4f}{epoch}") == ("epoch", "val_loss", "epoch")
    assert template_fields("latest") == ()


# --- property: names never escape save_path ---------------------------------------------------
TEMPLATES = [
    "{v}",
    "ep{epoch:03d}_{v}",
    "{v}{v}",
    "x{v:.3}",
    "{v!r}",
    "{v!s}.pth",
    "{v}_{w:.4f}",
    "{epoch:.>6}{v}",
    "ckpt_ep{epoch:03d}_valloss{w:.4f}",
]

log_values = st.one_of(
    st.text(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.sampled_from(["", ".", "..", "/", "\\", "../..", ".pth", "..pth", "a/../b", "~", "\x00"]),
)


@hypothesis_settings(max_examples=300)
@given(
    template=st.sampled_from(TEMPLATES),
    v=log_values,
    w=log_values,
    epoch=st.one_of(st.integers(min_value=0, max_value=10**6), log_values),
    drop=st.sets(st.sampled_from(["v", "w", "epoch"])),
)
def test_rendered_names_never_escape_save_path(
    tmp_path: Path, template: str, v: Any, w: Any, epoch: Any, drop: set[str]
) -> None:
    validate_template(template)
    logs = {k: value for k, value in {"v": v, "w": w, "epoch": epoch}.items() if k not in drop}
    name, _ = render_name(template, logs)
    assert "/" not in name and "\\" not in name and os.sep not in name and "\x00" not in name
    assert not name.startswith(".")
    assert name.endswith(CHECKPOINT_SUFFIX)
    assert name not in ("", ".", "..")
    save_path = tmp_path / "ck"
    assert (save_path / name).resolve().parent == save_path.resolve()
