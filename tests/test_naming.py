"""Checkpoint file names: ``render_name`` / ``validate_template`` (DESIGN §1, the ``name`` row).

A template is a ``str.format`` template filled with the epoch-end logs; ``.pth`` is appended
unless present; a key missing at save time becomes ``NA``; formatted values are sanitised so
that the name always lands directly inside ``save_path``. Templates that cannot give a writable
name are rejected at configuration; a name too long at save time is clipped with a hash, so a
run never ends without checkpoints over a name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, reject
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from nnh_testing import checkpoint_files, make_handler
from pydantic import ValidationError

from nnhandler import AutoSaveCallback, Callback, ConfigurationError, NNHandler, read_checkpoint
from nnhandler.checkpoint.writer import TEMP_INFIX, temp_path_for
from nnhandler.naming import (
    CHECKPOINT_SUFFIX,
    CLIP_MARK,
    MAX_NAME_BYTES,
    MISSING_VALUE,
    NAME_MAX,
    RenderedName,
    name_limit,
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
        ("{epoch!s}_{tag!s}", {"epoch": 2, "tag": "b"}, "2_b.pth"),
    ],
    ids=["default", "design-example", "metrics", "fixed", "pth-once", "pth-once-field",
         "pth-from-value", "callback-key", "conversions"],
)
def test_render_name_fills_template_from_logs(
    template: str, logs: dict[str, Any], expected: str
) -> None:
    assert validate_template(template) == template
    assert render_name(template, logs) == RenderedName(expected, (), None)


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
    assert render_name(template, logs) == RenderedName(expected_name, expected_missing, None)


@pytest.mark.parametrize(
    ("template", "logs", "expected"),
    [
        ("ep{tag}", {"tag": "a/b"}, "epa_b.pth"),
        ("ep{tag}", {"tag": "a\\b"}, "epa_b.pth"),
        ("ep{tag}", {"tag": "../../etc"}, "ep.._.._etc.pth"),
        ("ep{tag}", {"tag": "c:x"}, "epc_x.pth"),
        ("ep{tag}", {"tag": "nul\x00"}, "epnul_.pth"),
        ("{tag}", {"tag": ".hidden"}, "_hidden.pth"),
        ("{tag!s}", {"tag": "a/b"}, "a_b.pth"),
        ("{epoch:03d}", {"epoch": "three"}, "three.pth"),
        ("{epoch:/>4}", {"epoch": 1}, "___1.pth"),
        ("ep{tag}", {"tag": "a\nb\tc\x1b[31m\x7f\x85"}, "epa_b_c_[31m__.pth"),
        ("ep{tag}", {"tag": "a\u2028b\u2029c"}, "epa_b_c.pth"),
        ("ep{tag}", {"tag": "bad\ud800half"}, "epbad_half.pth"),
        ("ep{epoch:03d}", {"epoch": 10**5000}, "epint.pth"),
    ],
    ids=["slash", "backslash", "dotdot", "colon", "nul", "leading-dot", "str-conversion",
         "spec-mismatch-falls-back-to-str", "separator-as-fill-char", "control-chars",
         "line-separators", "lone-surrogate", "int-too-long-for-str"],
)
def test_formatted_values_are_sanitised(
    template: str, logs: dict[str, Any], expected: str
) -> None:
    name, missing, clipped_from = render_name(template, logs)
    assert (name, missing, clipped_from) == (expected, (), None)
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
    name = render_name(template, logs).name
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
    name = render_name(template, logs).name
    assert "/" not in name and "\\" not in name and os.sep not in name and "\x00" not in name
    assert not name.startswith(".")
    assert name.endswith(CHECKPOINT_SUFFIX)
    assert name not in ("", ".", "..")
    save_path = tmp_path / "ck"
    assert (save_path / name).resolve().parent == save_path.resolve()


# --- names that can be written (issue 11, item 5) -------------------------------------------
LONG_LITERAL = "x" * 260


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("ep\x01{epoch}", "control character '\\\\x01'"),
        ("ep{epoch}\n", "control character '\\\\n'"),
        ("ep\t{epoch}", "control character '\\\\t'"),
        ("ep\x7f{epoch}", "control character '\\\\x7f'"),
        ("ep\x85{epoch}", "control character '\\\\x85'"),
        ("ep\u2028{epoch}", "control character '\\\\u2028'"),
        ("ep\ud800{epoch}", "control character '\\\\ud800'"),
        ("ep{epoch:\x1b>5}", "control character '\\\\x1b'"),
        ("ep{epoch:c}", "'c' presentation type"),
        ("ep{epoch:>5c}", "'c' presentation type"),
        ("ep{epoch!r}", "conversion !r"),
        ("ep{tag!a}", "conversion !a"),
        ("ck{epoch:0300d}", "too long for a file name: with values"),
        ("{epoch:>230}", "too long for a file name: with values"),
        ("{loss:.300f}", "too long for a file name: with values"),
        ("{loss:.250e}", "too long for a file name: with values"),
        ("{loss:.230}", "too long for a file name: with values"),
        ("{epoch:\u00e9>120}", "too long for a file name: with values"),
        (LONG_LITERAL, "its literal text alone gives 264 bytes"),
        ("x" * 222, "its literal text alone gives 226 bytes"),
        ("\u00e9" * 111 + "{epoch}", "its literal text alone gives 226 bytes"),
        ("{epoch:0110d}{loss:0110f}{epoch}", "too long for a file name: with values"),
    ],
    ids=["C0", "newline", "tab", "DEL", "C1", "line-separator", "lone-surrogate",
         "control-fill-char", "c-type", "c-type-with-width", "repr", "ascii",
         "width-0300d", "width-230", "precision-300f", "precision-250e", "precision-230g",
         "multibyte-fill", "260-char-literal", "literal-one-byte-over", "multibyte-literal",
         "fields-add-up"],
)
def test_templates_that_cannot_give_a_writable_name_are_rejected(
    template: str, reason: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(template)) + ".*" + reason):
        validate_template(template)
    with pytest.raises(ValidationError, match=re.escape(repr(template))):
        AutoSaveCallback(1, "ck", name=template)


@pytest.mark.parametrize(
    "template",
    ["x" * 221, "x" * 221 + ".pth", "\u00e9" * 100 + "{epoch}", "{epoch:0200d}",
     "{loss:.200}", "ep{epoch:c>5}", "{epoch:,}_{loss:+.3e}_{val_mae:%}", "{tag!s:.10}"],
    ids=["221-char-literal", "225-char-literal-with-pth", "multibyte-literal-at-limit",
         "width-200", "precision-200", "c-as-fill-char", "grouping-sign-percent",
         "str-conversion-precision"],
)
def test_templates_that_fit_the_limit_are_accepted(template: str) -> None:
    assert validate_template(template) == template
    for logs in ({"epoch": 10**7, "loss": -1.2345678e-300, "val_mae": -12345678.901234567},
                 {"epoch": -(10**7), "loss": 5e-324, "val_mae": 0.5}):
        rendered = render_name(template, {**logs, "tag": "t"})
        assert len(rendered.name.encode()) <= MAX_NAME_BYTES
        assert rendered.clipped_from is None


def test_the_limit_leaves_room_for_temp_and_version_suffixes(tmp_path: Path) -> None:
    """A name of MAX_NAME_BYTES with a collision suffix, as the temp file of a writer with the
    largest Linux pid, is still a legal file name: create it."""
    name = "x" * (MAX_NAME_BYTES - len(".pth")) + "-v999999.pth"
    assert len(name.encode()) == MAX_NAME_BYTES + len("-v999999")
    ours = temp_path_for(tmp_path / name).name
    largest = ours.replace(f"{TEMP_INFIX}{os.getpid()}-", f"{TEMP_INFIX}{2**22}-")
    assert len(largest.encode()) <= NAME_MAX
    (tmp_path / largest).write_bytes(b"")
    (tmp_path / name.replace(".pth", ".dcp")).mkdir()


def test_a_long_value_is_clipped_deterministically_with_a_hash_of_the_full_name() -> None:
    logs = {"epoch": 3, "note": "n" * 400}
    first = render_name("ep{epoch:03d}_{note}", logs)
    full = "ep003_" + "n" * 400 + ".pth"
    digest = hashlib.sha1(full.encode()).hexdigest()[:8]
    assert first.clipped_from == full
    assert first.name.endswith(f"{CLIP_MARK}{digest}.pth")
    assert full.startswith(first.name.removesuffix(f"{CLIP_MARK}{digest}.pth"))
    assert len(first.name.encode()) == MAX_NAME_BYTES
    assert render_name("ep{epoch:03d}_{note}", logs) == first
    other = render_name("ep{epoch:03d}_{note}", {**logs, "note": "n" * 399 + "m"})
    assert other.name != first.name


@pytest.mark.parametrize("limit", [20, 64, 113], ids=["tiny", "small", "ecryptfs"])
def test_a_clipped_name_never_cuts_a_character_in_half(limit: int) -> None:
    rendered = render_name("{note}", {"note": "\u00e9\u4e2d\U0001f600" * 100}, limit=limit)
    assert rendered.clipped_from is not None
    assert limit - 3 <= len(rendered.name.encode()) <= limit
    assert rendered.name.encode().decode() == rendered.name


@pytest.mark.parametrize(
    ("reported", "expected"),
    [(255, MAX_NAME_BYTES), (143, 143 - 30), (1024, MAX_NAME_BYTES), (-1, MAX_NAME_BYTES)],
    ids=["linux", "ecryptfs", "larger-than-linux", "no-limit"],
)
def test_name_limit_follows_the_filesystem(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, reported: int, expected: int
) -> None:
    asked: list[str] = []

    def pathconf(path: str | os.PathLike[str], name: str) -> int:
        asked.append(os.fspath(path))
        assert name == "PC_NAME_MAX"
        return reported

    monkeypatch.setattr(os, "pathconf", pathconf)
    assert name_limit(tmp_path / "not" / "yet") == expected
    assert asked == [os.fspath(tmp_path)]  # the nearest directory that exists


def test_name_limit_of_a_real_directory_is_the_linux_limit(tmp_path: Path) -> None:
    if os.pathconf(tmp_path, "PC_NAME_MAX") < NAME_MAX:
        pytest.skip("this filesystem has short names")
    assert name_limit(tmp_path) == MAX_NAME_BYTES


def test_a_filesystem_too_short_for_checkpoint_names_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "pathconf", lambda path, name: 14)  # System V's old limit
    with pytest.raises(ConfigurationError, match=re.escape(repr(str(tmp_path))) + ".*14 bytes"):
        name_limit(tmp_path)


# --- property: every accepted template gives a writable name ---------------------------------
SPECS = ["", "03d", "0200d", ">20", "_^15", "\u00e9<30", ".4f", ".150f", "+.3e", ".200", "%",
         ",", "x", "#o", "c>5", ".10", "0>8"]
FIELDS = ["epoch", "loss", "v", "note"]


def _field(name: str, conversion: str, spec: str) -> str:
    return "{" + name + conversion + (":" + spec if spec else "") + "}"


template_parts = st.one_of(
    st.text(max_size=30).map(lambda text: text.replace("{", "{{").replace("}", "}}")),
    st.builds(_field, st.sampled_from(FIELDS), st.sampled_from(["", "!s", "!r"]),
              st.sampled_from(SPECS)),
)
any_logs_value = st.one_of(
    st.text(),
    st.text(min_size=200, max_size=600),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**4000), max_value=10**4000),
    # beyond Python's int-to-str digit limit (drawn as a digit count: hypothesis cannot print it)
    st.integers(min_value=4301, max_value=6000).map(lambda digits: -(10**digits)),
    st.integers(min_value=-(10**8), max_value=10**8),
)


@pytest.mark.slow
@hypothesis_settings(max_examples=400)
@given(
    parts=st.lists(template_parts, min_size=1, max_size=6),
    values=st.dictionaries(st.sampled_from(FIELDS), any_logs_value),
    limit=st.sampled_from([MAX_NAME_BYTES, 113, 40]),
)
def test_any_accepted_template_renders_a_writable_name(
    parts: list[str], values: dict[str, Any], limit: int
) -> None:
    template = "".join(parts)
    try:
        validate_template(template)
    except ValueError:
        reject()
    name, _, clipped_from = render_name(template, values, limit=limit)
    assert len(name.encode()) <= limit
    assert not any(unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") for char in name)
    assert "/" not in name and "\\" not in name and os.sep not in name
    assert not name.startswith(".")
    assert name.endswith(CHECKPOINT_SUFFIX)
    assert render_name(template, values, limit=limit).name == name
    if clipped_from is not None:
        assert len(clipped_from.encode()) > limit
    with tempfile.TemporaryDirectory() as directory:  # the filesystem takes it, temp name too
        temp = temp_path_for(Path(directory) / name)
        temp.write_bytes(b"")
        os.replace(temp, Path(directory) / name)
        assert os.listdir(directory) == [name]


# --- end to end: a run under "warn" never ends without checkpoints over a name ----------------
class AddLongNote(Callback):
    """Puts a 400-character string into the epoch logs (the template uses it)."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any], **kwargs: Any) -> None:
        logs["note"] = f"e{epoch}-" + "n" * 400


@pytest.mark.parametrize("name_max", [None, 143], ids=["linux-255", "ecryptfs-143"])
def test_a_name_that_renders_too_long_at_save_time_is_clipped_and_saved(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, name_max: int | None
) -> None:
    if name_max is not None:  # a filesystem with shorter names than Linux's usual 255 bytes
        monkeypatch.setattr(os, "pathconf", lambda path, name: name_max)
    limit = MAX_NAME_BYTES if name_max is None else name_max - 30
    handler = make_handler(n=16, batch_size=8)
    handler.add_callback(AddLongNote())
    handler.auto_save(1, "ck", name="ep{epoch:03d}_{note}", on_save_error="warn")
    with caplog.at_level(logging.WARNING, logger="nnhandler"):
        handler.train(epochs=2, progress_bar=False)
    files = checkpoint_files(Path("ck"))
    assert len(files) == 2
    assert [name[:4] for name in files] == ["ep00", "ep00"]
    for epoch, file_name in enumerate(files, start=1):
        assert len(file_name.encode()) <= limit
        assert CLIP_MARK in file_name
        assert read_checkpoint(Path("ck") / file_name).epoch == epoch
    autosave = handler.auto_save_callback
    assert autosave is not None and autosave.failed_saves == 0
    clipped = [r.getMessage() for r in caplog.records if "hash of the full name" in r.getMessage()]
    assert len(clipped) == 2
    assert all("ep{epoch:03d}_{note}" in message for message in clipped)
    resumed = NNHandler.load(Path("ck") / files[-1], device="cpu")
    assert resumed.epoch == 2
