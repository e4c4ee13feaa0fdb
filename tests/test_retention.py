"""Retention policies of ``AutoSaveCallback`` (``keep_last``, ``keep_best`` with ``monitor`` and
``mode``, ``keep_every``) and the index that records what is kept and why.

| each rule alone and combined, on real runs | NaN / inf / missing never best, ties to the
earlier epoch | the kept set equals a reference model (hypothesis) | index written atomically
after the checkpoint, removals after the index (sync and async) | resume from the middle,
abandoned futures, a lost or corrupt index, a fresh run into a used folder | two callbacks in one
folder | load_latest with an index | validation of the arguments |
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from nnh_testing import attach_loaders, make_handler

import nnhandler.checkpoint.removal as removal_module
import nnhandler.checkpoint.retention as retention_module
import nnhandler.checkpoint.writer as writer_module
from nnhandler import AutoSaveCallback, Callback, DuplicateStateKeyError, NNHandler
from nnhandler.checkpoint.envelope import build_meta, write_checkpoint
from nnhandler.checkpoint.index import (
    INDEX_FILE,
    INDEX_FORMAT,
    INDEX_VERSION,
    IndexEntry,
    IndexSection,
    read_index,
    update_index,
)
from nnhandler.checkpoint.integrity import crc32, verify_file
from nnhandler.checkpoint.removal import RemovalGuard
from nnhandler.checkpoint.retention import Retention, RetentionRules, decide
from nnhandler.errors import CheckpointIndexError

CK = Path("ck")
N = 16  # two training batches of 8, one validation batch
SEED = 7
NAME = "ep{epoch:03d}"
KEY = "autosave:ck/ep{epoch:03d}"
MARKED = "autosave:ck/ep{epoch:03d}_{run}"


# ============================================================================================
# helpers
# ============================================================================================
def new_handler(**autosave: Any) -> NNHandler:
    handler = make_handler(n=N, batch_size=8)
    handler.auto_save(autosave.pop("interval", 1), CK, name=autosave.pop("name", NAME),
                      **autosave)
    return handler


def train(handler: NNHandler, **kwargs: Any) -> None:
    handler.train(progress_bar=False, seed=SEED, **kwargs)


def load(path: Path, **kwargs: Any) -> NNHandler:
    handler = NNHandler.load(path, device="cpu", **kwargs)
    attach_loaders(handler, n=N)
    return handler


def files(directory: Path = CK) -> list[str]:
    """Everything in ``directory`` but the index."""
    return sorted(p.name for p in directory.iterdir() if p.name != INDEX_FILE)


def ep(*epochs: int, suffix: str = "") -> list[str]:
    return [f"ep{e:03d}{suffix}.pth" for e in epochs]


def kept_reasons(key: str = KEY, directory: Path = CK) -> dict[str, list[str]]:
    index = read_index(directory)
    assert index is not None, "no index"
    return {entry.name: list(entry.reasons) for entry in index[key].checkpoints}


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and text in r.getMessage()]


class Score(Callback):
    """Puts ``score`` into the epoch logs from a table; an epoch not in it has no ``score``."""

    def __init__(self, values: dict[int, float]) -> None:
        self.values = values

    def on_epoch_end(self, epoch: int, logs: dict[str, Any], **kwargs: Any) -> None:
        if epoch in self.values:
            logs["score"] = self.values[epoch]


class Marker(Callback):
    """Puts ``run`` into the epoch logs, so file names say which run wrote them."""

    def __init__(self, run: str) -> None:
        self.run = run

    def on_epoch_end(self, logs: dict[str, Any], **kwargs: Any) -> None:
        logs["run"] = self.run


class Listing(Callback):
    """The files in ``ck`` at the start of every epoch."""

    def __init__(self) -> None:
        self.seen: dict[int, list[str]] = {}

    def on_epoch_begin(self, epoch: int, **kwargs: Any) -> None:
        self.seen[epoch] = files()


@dataclass
class Removal:
    name: str
    thread: str
    newest_verifies: bool
    index_lists_newest: bool


@pytest.fixture
def removals(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Removal]]:
    """Every file retention removes, with what held at that moment: does the newest checkpoint
    of the run verify, and does the index on disk list it as kept?"""
    found: list[Removal] = []
    real_remove = removal_module.remove_checkpoint_path

    def observe(path: Path) -> None:
        newest = max((p for p in path.parent.glob("*.pth") if p != path),
                     key=lambda p: p.name)
        try:
            verify_file(newest)
            verifies = True
        except Exception:
            verifies = False
        index = read_index(path.parent) or {}
        listed = any(entry.name == newest.name for section in index.values()
                     for entry in section.checkpoints)
        found.append(Removal(path.name, threading.current_thread().name, verifies, listed))
        real_remove(path)

    monkeypatch.setattr(removal_module, "remove_checkpoint_path", observe)
    yield found


# ============================================================================================
# each rule, alone and combined
# ============================================================================================
def test_keep_last_keeps_the_n_most_recent() -> None:
    train(new_handler(keep_last=2), epochs=5)
    assert files() == ep(4, 5)
    assert kept_reasons() == {"ep004.pth": ["latest 2/2"], "ep005.pth": ["latest 1/2"]}


def test_keep_last_counts_saves_not_epochs() -> None:
    train(new_handler(interval=2, keep_last=2), epochs=9)
    assert files() == ep(6, 8)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("min", {"ep004.pth": ["best score=1 (rank 1/2)"],
                 "ep006.pth": ["best score=2 (rank 2/2)"]}),
        ("max", {"ep001.pth": ["best score=5 (rank 2/2)"],
                 "ep005.pth": ["best score=6 (rank 1/2)"], "ep006.pth": ["newest"]}),
    ],
)
def test_keep_best_keeps_the_k_best_and_always_the_newest(
    mode: str, expected: dict[str, list[str]]
) -> None:
    handler = new_handler(keep_best=2, monitor="score", mode=mode)
    handler.add_callback(Score({1: 5.0, 2: 3.0, 3: 4.0, 4: 1.0, 5: 6.0, 6: 2.0}))
    train(handler, epochs=6)
    assert files() == sorted(expected)
    assert kept_reasons() == expected


def test_keep_every_keeps_multiples_forever_and_the_newest() -> None:
    train(new_handler(keep_every=3), epochs=7)
    assert files() == ep(3, 6, 7)
    assert kept_reasons() == {"ep003.pth": ["every 3 epochs"], "ep006.pth": ["every 3 epochs"],
                              "ep007.pth": ["newest"]}


def test_rules_combine_as_a_union_and_every_reason_is_recorded() -> None:
    handler = new_handler(keep_last=2, keep_best=1, monitor="score", keep_every=4)
    handler.add_callback(Score({1: 9, 2: 1, 3: 8, 4: 7, 5: 6, 6: 5, 7: 4, 8: 3}))
    train(handler, epochs=8)
    assert kept_reasons() == {
        "ep002.pth": ["best score=1 (rank 1/1)"],
        "ep004.pth": ["every 4 epochs"],
        "ep007.pth": ["latest 2/2"],
        "ep008.pth": ["latest 1/2", "every 4 epochs"],
    }
    assert files() == ep(2, 4, 7, 8)


def test_without_keep_rules_every_file_is_kept_and_no_index_is_written() -> None:
    train(new_handler(), epochs=3)
    assert sorted(p.name for p in CK.iterdir()) == ep(1, 2, 3)


def test_overwrite_behaves_as_before_and_writes_no_index() -> None:
    train(new_handler(overwrite=True), epochs=3)
    assert sorted(p.name for p in CK.iterdir()) == ep(3)


def test_the_monitored_value_is_recorded_and_keep_best_follows_val_loss() -> None:
    handler = new_handler(keep_best=1, monitor="val_loss")
    train(handler, epochs=4)
    index = read_index(CK)
    assert index is not None
    values = {entry.name: entry.value for entry in index[KEY].checkpoints}
    best = min(range(1, 5), key=lambda e: handler.history[e - 1]["val_loss"])
    assert ep(best)[0] in values
    assert values[ep(best)[0]] == pytest.approx(handler.history[best - 1]["val_loss"])


# ============================================================================================
# NaN, inf, missing, ties
# ============================================================================================
@pytest.mark.parametrize(
    ("mode", "scores", "expected"),
    [
        ("min", {1: 3.0, 2: math.nan, 3: -math.inf, 5: 4.0},
         {"ep001.pth": ["best score=3 (rank 1/1)"], "ep005.pth": ["newest"]}),
        ("max", {1: 3.0, 2: math.nan, 3: math.inf, 5: 4.0},
         {"ep005.pth": ["best score=4 (rank 1/1)"]}),
        ("min", {1: math.nan, 2: math.nan, 3: math.nan, 4: math.nan, 5: math.nan},
         {"ep005.pth": ["newest"]}),
    ],
    ids=["min", "max", "all-nan"],
)
def test_nan_inf_and_missing_values_are_never_best(
    mode: str, scores: dict[int, float], expected: dict[str, list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = new_handler(keep_best=1, monitor="score", mode=mode)
    handler.add_callback(Score(scores))
    with caplog.at_level(logging.DEBUG, logger="nnhandler"):
        train(handler, epochs=5)
    assert kept_reasons() == expected
    assert files() == sorted(expected)
    # said once per kind (missing / not finite), never an error
    assert len(warnings_with(caplog, "is not a finite number")) == 1
    assert len(warnings_with(caplog, "is missing")) == (0 if len(scores) == 5 else 1)


def test_ties_go_to_the_earlier_epoch() -> None:
    handler = new_handler(keep_best=1, monitor="score")
    handler.add_callback(Score({1: 2.0, 2: 1.0, 3: 1.0, 4: 3.0}))
    train(handler, epochs=4)
    assert kept_reasons() == {"ep002.pth": ["best score=1 (rank 1/1)"], "ep004.pth": ["newest"]}


def test_epochs_that_do_not_validate_are_no_best_candidates(
    caplog: pytest.LogCaptureFixture
) -> None:
    handler = new_handler(keep_best=1, monitor="val_loss")
    train(handler, epochs=4, validate_every=2)
    reasons = kept_reasons()
    assert "ep001.pth" not in reasons and "ep003.pth" not in reasons
    assert any(r.startswith("best val_loss=") for rs in reasons.values() for r in rs)
    assert len(warnings_with(caplog, "monitor 'val_loss' is missing")) == 1


# ============================================================================================
# the decision against a reference model (hypothesis)
# ============================================================================================
@dataclass(frozen=True)
class Save:
    name: str
    epoch: int
    value: float | None


def kept_by_rules(history: list[Save], rules: RetentionRules) -> set[str]:
    """What the rules keep after ``history`` (oldest first): written independently of
    ``decide``, as docs/retention.md states the rules."""
    kept: set[str] = set()
    if rules.keep_last:
        kept |= {save.name for save in history[-rules.keep_last:]}
    if rules.keep_best:
        finite = [s for s in history if s.value is not None and math.isfinite(s.value)]
        # a stable sort: among equal values the earlier epoch stays first, also with reverse
        ordered = sorted(finite, key=lambda s: s.value or 0.0, reverse=rules.mode == "max")
        kept |= {save.name for save in ordered[: rules.keep_best]}
    if rules.keep_every:
        kept |= {save.name for save in history if save.epoch % rules.keep_every == 0}
    return kept


def reference(history: list[Save], rules: RetentionRules) -> set[str]:
    """The rules' set plus the newest file, which is always kept."""
    return kept_by_rules(history, rules) | {history[-1].name}


values = st.one_of(st.none(), st.just(math.nan), st.just(math.inf), st.just(-math.inf),
                   st.sampled_from([0.0, 1.0, 2.0]),  # ties
                   st.floats(-1e6, 1e6))
rule_sets = st.builds(
    lambda last, best, mode, every: RetentionRules(
        keep_last=last, keep_best=best, monitor="m" if best else None, mode=mode,
        keep_every=every),
    st.one_of(st.none(), st.integers(1, 4)), st.one_of(st.none(), st.integers(1, 3)),
    st.sampled_from(["min", "max"]), st.one_of(st.none(), st.integers(1, 4)))
histories = st.lists(st.tuples(st.integers(1, 3), values), min_size=1, max_size=25)


def as_saves(steps: list[tuple[int, float | None]]) -> list[Save]:
    saves, epoch = [], 0
    for gap, value in steps:
        epoch += gap
        saves.append(Save(f"ep{epoch:04d}.pth", epoch, value))
    return saves


@hypothesis_settings(max_examples=300)
@given(histories, rule_sets)
def test_decide_equals_the_reference_model(steps: list[tuple[int, float | None]],
                                           rules: RetentionRules) -> None:
    saves = as_saves(steps)
    entries = [IndexEntry(s.name, s.epoch, s.epoch * 2, seq, retention_module.monitored_value(
        {"m": s.value} if s.value is not None else {}, rules.monitor))
        for seq, s in enumerate(saves, start=1)]
    kept = decide(entries, rules)
    assert set(kept) == reference(saves, rules)
    assert all(reasons for reasons in kept.values())
    # "newest" is the reason exactly when no rule keeps the newest file, and only for it
    newest = saves[-1].name
    assert (kept[newest] == ("newest",)) == (newest not in kept_by_rules(saves, rules))
    assert not any("newest" in reasons for name, reasons in kept.items() if name != newest)


@pytest.mark.slow  # dozens of hypothesis examples, each training or writing files
@hypothesis_settings(max_examples=60)
@given(histories, rule_sets, st.lists(st.sampled_from(["x.pth", "other.dcp", "notes.txt",
                                                        "ep9999.pth"]), unique=True))
def test_saves_on_disk_keep_exactly_the_reference_set(
    steps: list[tuple[int, float | None]], rules: RetentionRules, foreign: list[str]
) -> None:
    """A sequence of saves through the bookkeeping with real files: after every save the
    callback's files on disk are the reference set, the newest is there, and files that are not
    its own are never touched."""
    logger = logging.getLogger("nnhandler.test")
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        for other in foreign:
            if other.endswith(".dcp"):
                (directory / other).mkdir()
                (directory / other / "shard").write_bytes(b"foreign")
            else:
                (directory / other).write_bytes(b"foreign")
        retention = Retention()
        guard = RemovalGuard(directory, "ep{epoch:04d}", "run:1", logger)
        saves = as_saves(steps)
        for count, save in enumerate(saves, start=1):
            logs = {} if save.value is None else {"m": save.value}
            plan = retention.plan(rules, save.name, save.epoch, save.epoch * 2, logs,
                                  lineage="run:1", is_main=True, logger=logger)
            own_checkpoint(directory / save.name, "run:1")  # "durable" before the commit
            retention.commit(plan.after, guard, "k", rules)
            expected = reference(saves[:count], rules)
            assert set(files(directory)) == expected | set(foreign)
            assert {entry.name for entry in retention.state.files} == expected
            assert retention.state.removing == ()
        index = read_index(directory)
        assert index is not None
        assert {entry.name for entry in index["k"].checkpoints} == reference(saves, rules)


# ============================================================================================
# the index: atomic, after the checkpoint; removals after the index
# ============================================================================================
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_files_are_removed_only_once_the_new_checkpoint_and_the_index_are_durable(
    removals: list[Removal], async_save: bool
) -> None:
    train(new_handler(keep_last=1, async_save=async_save), epochs=4)
    assert files() == ep(4)
    assert [r.name for r in removals] == ep(1, 2, 3)
    assert all(r.newest_verifies and r.index_lists_newest for r in removals)
    threads = {r.thread for r in removals}
    assert threads == ({"nnhandler-checkpoint-writer"} if async_save else {"MainThread"})
    assert not [p for p in CK.iterdir() if p.name.startswith(".")]  # no temp files left


def test_the_index_has_a_format_version_and_one_section_per_callback() -> None:
    handler = new_handler(keep_last=1)
    handler.add_callback(AutoSaveCallback(1, CK, name="every_ep{epoch:03d}", keep_every=2))
    train(handler, epochs=3)
    document = json.loads((CK / INDEX_FILE).read_text())
    assert document["format"] == {"name": INDEX_FORMAT, "version": INDEX_VERSION}
    assert sorted(document["callbacks"]) == ["autosave:ck/ep{epoch:03d}",
                                             "autosave:ck/every_ep{epoch:03d}"]
    section = document["callbacks"][KEY]
    assert section["rules"] == {"keep_last": 1, "keep_best": None, "monitor": None,
                                "mode": "min", "keep_every": None}
    assert section["lineage"] == handler.progress.lineage
    assert section["lineage"].startswith("run:")  # the run's id, not its (shared) seed
    assert [c["name"] for c in section["checkpoints"]] == ep(3) and section["removing"] == []
    assert section["checkpoints"][0]["epoch"] == 3 and section["checkpoints"][0]["step"] == 6


def test_a_removal_that_fails_is_a_warning_and_is_tried_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_remove = removal_module.remove_checkpoint_path
    refused = {"ep001.pth"}

    def refuse_once(path: Path) -> None:
        if path.name in refused:
            refused.discard(path.name)
            raise PermissionError(13, "Permission denied", str(path))
        real_remove(path)

    monkeypatch.setattr(removal_module, "remove_checkpoint_path", refuse_once)
    handler = new_handler(keep_last=1)
    train(handler, epochs=2)
    assert files() == ep(1, 2)
    assert warnings_with(caplog, "could not remove ck/ep001.pth")
    index = read_index(CK)
    assert index is not None and index[KEY].removing == ("ep001.pth",)
    train(handler, epochs=1)
    assert files() == ep(3)
    index = read_index(CK)
    assert index is not None and index[KEY].removing == ()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_failed_save_removes_nothing_and_rolls_the_bookkeeping_back(
    monkeypatch: pytest.MonkeyPatch, async_save: bool
) -> None:
    real_open = open

    def no_space_for_ep002(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if ".ep002.pth" in os.fspath(file):
            raise OSError(28, "No space left on device", os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(writer_module, "open", no_space_for_ep002, raising=False)
    handler = new_handler(keep_last=1, async_save=async_save)
    callback = handler.auto_save_callback
    assert callback is not None
    train(handler, epochs=2)
    assert callback.failed_saves == 1
    assert files() == ep(1)
    assert [entry.name for entry in callback.retention.state.files] == ep(1)
    assert set(kept_reasons()) == set(ep(1))
    train(handler, epochs=1)
    assert files() == ep(3)


def test_an_index_write_that_fails_removes_nothing_and_training_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def full_disk(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(retention_module, "update_index", full_disk)
    handler = new_handler(keep_last=1)
    train(handler, epochs=3)
    assert handler.epoch == 3
    assert files() == ep(1, 2, 3)
    assert warnings_with(caplog, "could not write the index")
    monkeypatch.undo()
    train(handler, epochs=1)  # the index can be written again: the backlog goes
    assert files() == ep(4)


@pytest.mark.parametrize("damage", [b"{not json", b'{"format": {"name": "nnhandler.index", '
                                    b'"version": 99}, "callbacks": {}}', b'{"format": 1}'],
                         ids=["not-json", "newer-version", "wrong-structure"])
def test_a_corrupt_index_is_a_warning_and_is_rebuilt(
    damage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    handler = new_handler(keep_last=1)
    other = AutoSaveCallback(1, CK, name="every_ep{epoch:03d}", keep_every=2)
    handler.add_callback(other)
    train(handler, epochs=3)
    (CK / INDEX_FILE).write_bytes(damage)
    with pytest.raises(CheckpointIndexError, match=r"nnhandler-index\.json"):
        read_index(CK)
    train(handler, epochs=2)
    assert handler.epoch == 5
    assert warnings_with(caplog, "nnhandler-index.json")
    index = read_index(CK)
    assert index is not None and sorted(index) == [KEY, "autosave:ck/every_ep{epoch:03d}"]
    assert files() == sorted([*ep(5), "every_ep002.pth", "every_ep004.pth", "every_ep005.pth"])


def own_checkpoint(path: Path, lineage: str, epoch: int = 1) -> None:
    """A small real checkpoint (valid CRC) whose records name ``lineage``."""
    write_checkpoint(path, {}, build_meta(epoch=epoch, step=epoch, logs={}, world_size=1,
                                          lineage=lineage))


def write_manifest(directory: Path, lineage: str) -> None:
    """A minimal sharded-checkpoint manifest (valid CRC) that records ``lineage``."""
    body = json.dumps({"format": {"name": "nnhandler.sharded", "version": 1}, "epoch": 1,
                       "step": 1, "time": "t", "logs": {}, "world_size": 1,
                       "algorithm": "crc32", "lineage": lineage,
                       "files": {"nnhandler.pth": {"size": 0, "crc32": 0}}})
    outer = {"body": body, "crc32": crc32(body.encode())}
    (directory / "manifest.json").write_text(json.dumps(outer))


def test_removal_handles_sharded_checkpoint_directories(tmp_path: Path) -> None:
    logger = logging.getLogger("nnhandler.test")
    retention, rules = Retention(), RetentionRules(keep_last=1)
    guard = RemovalGuard(tmp_path, NAME, "run:1", logger)
    for epoch in (1, 2):
        name = f"ep{epoch:03d}.dcp"
        plan = retention.plan(rules, name, epoch, epoch, {}, lineage="run:1", is_main=True,
                              logger=logger)
        (tmp_path / name).mkdir()
        write_manifest(tmp_path / name, "run:1")
        retention.commit(plan.after, guard, "k", rules)
    assert files(tmp_path) == ["ep002.dcp"]


def test_names_that_are_not_plain_checkpoint_names_are_never_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An index edited by hand cannot make a callback remove files outside its folder."""
    logger = logging.getLogger("nnhandler.test")
    (tmp_path / "ck").mkdir()
    outside = tmp_path / "outside.pth"
    outside.write_bytes(b"precious")
    for name in ("notes.txt", ".hidden.pth"):
        (tmp_path / "ck" / name).write_bytes(b"precious")
    retention, rules = Retention(), RetentionRules(keep_last=1)
    retention.load_state_dict({"lineage": "run:1", "next_seq": 5, "files": [],
                               "removing": ["../outside.pth", "notes.txt", ".hidden.pth"]})
    plan = retention.plan(rules, "ep005.pth", 5, 5, {}, lineage="run:1", is_main=True,
                          logger=logger)
    (tmp_path / "ck" / "ep005.pth").write_bytes(b"checkpoint")
    retention.commit(plan.after, RemovalGuard(tmp_path / "ck", NAME, "run:1", logger), "k",
                     rules)
    assert outside.exists() and files(tmp_path / "ck") == [".hidden.pth", "ep005.pth",
                                                           "notes.txt"]
    for name in ("../outside.pth", "notes.txt", ".hidden.pth"):
        assert warnings_with(caplog, repr(name))


# ============================================================================================
# resuming
# ============================================================================================
def test_resume_from_the_middle_removes_the_right_files_and_never_a_foreign_one() -> None:
    handler = new_handler(keep_last=2, keep_every=3)
    train(handler, epochs=8)
    assert files() == ep(3, 6, 7, 8)
    foreign = {"foreign_ep001.pth": (CK / "ep007.pth").read_bytes(), "notes.txt": b"mine"}
    for name, data in foreign.items():
        (CK / name).write_bytes(data)
    # a crash is simulated by going back to an older checkpoint
    resumed = load(CK / "ep006.pth")
    train(resumed, until_epoch=10)
    assert files() == sorted([*ep(3, 6, 9, 10), *foreign])
    for name, data in foreign.items():
        assert (CK / name).read_bytes() == data
    assert set(kept_reasons()) == set(ep(3, 6, 9, 10))


def test_files_of_an_abandoned_future_stay_own_and_follow_the_rules() -> None:
    """Decision: saves the interrupted run made after the checkpoint we resume from are this
    lineage's files (the index records them); they are kept while a rule holds them and removed
    by the same rules as any other (here keep_every keeps ep006_a; keep_last drops ep005_a)."""
    handler = new_handler(name="ep{epoch:03d}_{run}", keep_last=2, keep_every=2)
    handler.add_callback(Marker("a"))
    train(handler, epochs=6)
    assert files() == ep(2, 4, 5, 6, suffix="_a")
    resumed = load(CK / "ep004_a.pth", callbacks=[Marker("b")])
    listing = Listing()
    resumed.add_callback(listing)
    train(resumed, until_epoch=7)
    assert listing.seen[5] == ep(2, 4, 5, 6, suffix="_a")  # nothing goes before a new save
    assert files() == sorted([*ep(2, 4, 6, suffix="_a"), *ep(6, 7, suffix="_b")])
    assert kept_reasons(MARKED)["ep006_a.pth"] == ["every 2 epochs"]


@pytest.mark.parametrize("index", ["deleted", "corrupt"])
def test_without_a_usable_index_a_resume_trusts_only_the_checkpointed_bookkeeping(
    index: str, caplog: pytest.LogCaptureFixture
) -> None:
    handler = new_handler(name="ep{epoch:03d}_{run}", keep_last=2, keep_every=2)
    handler.add_callback(Marker("a"))
    train(handler, epochs=6)
    if index == "deleted":
        (CK / INDEX_FILE).unlink()
    else:
        (CK / INDEX_FILE).write_text("garbage")
    resumed = load(CK / "ep004_a.pth", callbacks=[Marker("b")])
    train(resumed, until_epoch=7)
    # ep005_a and ep006_a were recorded only by the lost index: never touched
    assert files() == sorted([*ep(2, 4, 5, 6, suffix="_a"), *ep(6, 7, suffix="_b")])
    assert set(kept_reasons(MARKED)) == {*ep(2, 4, suffix="_a"), *ep(6, 7, suffix="_b")}
    assert bool(warnings_with(caplog, "nnhandler-index.json")) == (index == "corrupt")


def test_removals_decided_before_a_crash_are_finished_when_the_resumed_run_starts(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(removal_module, "remove_checkpoint_path", refuse)
    train(new_handler(keep_last=1), epochs=3)
    assert files() == ep(1, 2, 3)
    monkeypatch.undo()
    resumed = NNHandler.load_latest(CK, device="cpu")
    attach_loaders(resumed, n=N)
    listing = Listing()
    resumed.add_callback(listing)
    train(resumed, epochs=1)
    assert listing.seen[4] == ep(3)
    assert files() == ep(4)


def test_a_fresh_run_into_a_used_folder_never_removes_the_earlier_runs_files(
    caplog: pytest.LogCaptureFixture
) -> None:
    train(new_handler(keep_last=2), epochs=5)
    assert files() == ep(4, 5)
    train(new_handler(keep_last=2), epochs=3)  # same seed, same key: still another run
    assert files() == ep(2, 3, 4, 5)
    assert warnings_with(caplog, "from another run")
    assert set(kept_reasons()) == set(ep(2, 3))


def test_retention_settings_come_back_with_load() -> None:
    train(new_handler(keep_last=2, keep_best=1, monitor="val_loss", mode="max", keep_every=5),
          epochs=2)
    resumed = load(CK / "ep002.pth")
    callback = resumed.auto_save_callback
    assert callback is not None
    config = callback.config
    assert (config.keep_last, config.keep_best, config.monitor, config.mode,
            config.keep_every) == (2, 1, "val_loss", "max", 5)
    assert {entry.name for entry in callback.retention.state.files} == set(ep(1, 2))
    assert "keep_last=2" in repr(callback) and "mode='max'" in repr(callback)


def test_a_second_train_call_continues_its_own_files() -> None:
    handler = new_handler(keep_last=2)
    train(handler, epochs=2)
    train(handler, epochs=3)
    assert files() == ep(4, 5)


def test_moving_the_save_path_forgets_the_old_folders_files() -> None:
    handler = new_handler(keep_last=1)
    train(handler, epochs=2)
    handler.auto_save(1, "elsewhere", name=NAME, keep_last=1)
    train(handler, epochs=2)
    assert files() == ep(2)
    assert files(Path("elsewhere")) == ep(4)


def test_a_refused_reconfiguration_keeps_tracking_the_files() -> None:
    handler = new_handler(keep_last=1)
    handler.add_callback(AutoSaveCallback(None, "other", name=NAME))
    train(handler, epochs=2)
    with pytest.raises(DuplicateStateKeyError):
        handler.auto_save(1, "other", name=NAME, keep_last=1)
    train(handler, epochs=1)
    assert files() == ep(3)


# ============================================================================================
# several callbacks in one folder
# ============================================================================================
def test_two_callbacks_in_one_folder_each_keep_their_own() -> None:
    handler = new_handler(name="latest_ep{epoch:03d}", keep_last=1)
    handler.add_callback(AutoSaveCallback(1, CK, name=NAME, keep_every=3))
    train(handler, epochs=7)
    assert files() == sorted([*ep(3, 6, 7), "latest_ep007.pth"])
    assert kept_reasons("autosave:ck/latest_ep{epoch:03d}") == {
        "latest_ep007.pth": ["latest 1/1"]}
    assert kept_reasons() == {"ep003.pth": ["every 3 epochs"], "ep006.pth": ["every 3 epochs"],
                              "ep007.pth": ["newest"]}


def test_a_file_another_callback_keeps_is_never_removed(
    caplog: pytest.LogCaptureFixture
) -> None:
    """Two templates that render the same file name: each callback removes only what no other
    section of the index lists as kept."""
    handler = new_handler(keep_last=1)
    handler.add_callback(AutoSaveCallback(1, CK, name=NAME + ".pth", keep_every=2))
    train(handler, epochs=4)
    assert files() == ep(2, 4)
    assert warnings_with(caplog, "not removing ck/ep002.pth: the index lists it as kept by "
                                 "autosave:ck/ep{epoch:03d}.pth")


# ============================================================================================
# load_latest with an index
# ============================================================================================
def test_load_latest_prefers_the_indexed_checkpoint_of_an_equal_epoch() -> None:
    handler = new_handler(keep_last=2)
    train(handler, epochs=3)
    handler.save(CK / "zz_by_hand.pth")  # same epoch and step, saved later, later name
    assert NNHandler.load_latest(CK, device="cpu").epoch == 3
    chosen = []

    class Chosen(Callback):
        def on_checkpoint_loaded(self, path: Path, **kwargs: Any) -> None:
            chosen.append(Path(path).name)

    NNHandler.load_latest(CK, device="cpu", callbacks=[Chosen()])
    (CK / INDEX_FILE).unlink()
    NNHandler.load_latest(CK, device="cpu", callbacks=[Chosen()])
    assert chosen == ["ep003.pth", "zz_by_hand.pth"]


def test_load_latest_still_sees_a_newer_checkpoint_the_index_does_not_list() -> None:
    """Decision: a checkpoint not in the index (a save by hand, an auto-saver without keep_*
    rules) stays a candidate, so a folder shared with an overwrite=True "latest" saver resumes
    from the newest file."""
    handler = new_handler(interval=5, keep_every=5)
    handler.add_callback(AutoSaveCallback(1, CK, name="latest", overwrite=True))
    train(handler, epochs=7)
    assert files() == ["ep005.pth", "latest.pth"]
    assert NNHandler.load_latest(CK, device="cpu").epoch == 7


def test_load_latest_skips_a_damaged_listed_file_and_survives_a_corrupt_index(
    caplog: pytest.LogCaptureFixture
) -> None:
    train(new_handler(keep_last=3), epochs=3)
    data = bytearray((CK / "ep003.pth").read_bytes())
    data[len(data) // 2] ^= 0x01
    (CK / "ep003.pth").write_bytes(bytes(data))
    assert NNHandler.load_latest(CK, device="cpu").epoch == 2
    (CK / INDEX_FILE).write_text("[]")
    assert NNHandler.load_latest(CK, device="cpu").epoch == 2
    assert warnings_with(caplog, "ranking the checkpoints by their own records")


def test_resume_latest_in_a_retention_folder_equals_load_latest() -> None:
    train(new_handler(keep_last=1, keep_every=2), epochs=5)
    handler = new_handler(keep_last=1, keep_every=2)
    train(handler, until_epoch=6, resume="latest")
    assert handler.epoch == 6
    assert files() == ep(2, 4, 6)


# ============================================================================================
# validation
# ============================================================================================
Configure = Callable[..., object]


def by_callback(**kwargs: Any) -> object:
    return AutoSaveCallback(1, "ck", **kwargs)


def by_handler(**kwargs: Any) -> object:
    return make_handler(n=N).auto_save(1, "ck", **kwargs)


configure_both = pytest.mark.parametrize("configure", [by_callback, by_handler],
                                         ids=["AutoSaveCallback", "auto_save"])


@configure_both
@pytest.mark.parametrize("field", ["keep_last", "keep_best", "keep_every"])
@pytest.mark.parametrize("bad", [0, -1, True, "2", 2.0])
def test_keep_values_must_be_positive_ints(configure: Configure, field: str, bad: Any) -> None:
    extra = {"monitor": "val_loss"} if field == "keep_best" else {}
    with pytest.raises(ValueError, match=field):
        configure(**{field: bad}, **extra)


@configure_both
def test_keep_best_without_monitor_names_both(configure: Configure) -> None:
    with pytest.raises(ValueError, match=r"keep_best=2 needs monitor=.*monitor is None"):
        configure(keep_best=2)


@configure_both
@pytest.mark.parametrize("extra", [{"monitor": "val_loss"}, {"mode": "max"}])
def test_monitor_and_mode_without_keep_best_are_errors(configure: Configure,
                                                       extra: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="only used by keep_best"):
        configure(**extra)


@configure_both
@pytest.mark.parametrize("mode", ["median", "MIN", None])
def test_mode_is_min_or_max(configure: Configure, mode: Any) -> None:
    with pytest.raises(ValueError, match="mode"):
        configure(keep_best=1, monitor="val_loss", mode=mode)


@configure_both
@pytest.mark.parametrize("rule", [{"keep_last": 1}, {"keep_every": 3},
                                  {"keep_best": 1, "monitor": "val_loss"}])
def test_overwrite_with_a_keep_rule_is_an_error(configure: Configure,
                                                rule: dict[str, Any]) -> None:
    first = next(iter(rule))
    with pytest.raises(ValueError, match=rf"overwrite=True cannot be combined with.*{first}="):
        configure(overwrite=True, **rule)


@configure_both
def test_an_empty_monitor_is_an_error(configure: Configure) -> None:
    with pytest.raises(ValueError, match="monitor"):
        configure(keep_best=1, monitor="")


def test_a_bad_reconfiguration_keeps_the_previous_rules() -> None:
    handler = make_handler(n=N)
    callback = handler.auto_save(1, "ck", keep_last=2)
    with pytest.raises(ValueError, match="keep_best"):
        handler.auto_save(1, "ck", keep_best=1)
    assert callback.config.keep_last == 2 and callback.config.keep_best is None


# ============================================================================================
# index reading
# ============================================================================================
def test_read_index_names_what_is_wrong(tmp_path: Path) -> None:
    assert read_index(tmp_path) is None
    section = IndexSection(lineage="l", rules={}, next_seq=2,
                           checkpoints=(IndexEntry("a.pth", 1, 1, 1, 0.5, ("newest",)),))
    sections, problem = update_index(tmp_path, "k", section)
    assert problem is None and read_index(tmp_path) == {"k": section} == sections
    document = json.loads((tmp_path / INDEX_FILE).read_text())
    document["callbacks"]["k"]["checkpoints"][0]["epoch"] = "one"
    (tmp_path / INDEX_FILE).write_text(json.dumps(document))
    with pytest.raises(CheckpointIndexError,
                       match=r"callbacks\['k'\]\.checkpoints\[0\]\.epoch is 'one'"):
        read_index(tmp_path)
    sections, problem = update_index(tmp_path, "k", section)  # rebuilt, saying why
    assert problem is not None and "checkpoints[0].epoch is 'one'" in problem
    assert read_index(tmp_path) == {"k": section}


def test_index_updates_from_threads_lose_nothing(tmp_path: Path) -> None:
    def write(key: str) -> None:
        for seq in range(1, 21):
            update_index(tmp_path, key, IndexSection("l", {}, seq + 1,
                                                     (IndexEntry(f"{key}.pth", seq, seq, seq),)))

    threads = [threading.Thread(target=write, args=(f"k{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    index = read_index(tmp_path)
    assert index is not None
    assert sorted(index) == ["k0", "k1", "k2", "k3"]
    assert all(section.next_seq == 21 for section in index.values())


def test_the_checkpoint_records_the_bookkeeping_before_the_removals_happen() -> None:
    """The file written at epoch 3 lists itself as kept and ep002 as to be removed, so a run
    that crashes between the commit and the removal still removes ep002 when it resumes."""
    train(new_handler(keep_last=1), epochs=3)
    shutil.copy(CK / "ep003.pth", "copy.pth")
    state = NNHandler.load("copy.pth", device="cpu").auto_save_callback
    assert state is not None
    recorded = state.retention.state
    assert [entry.name for entry in recorded.files] == ep(3)
    assert recorded.removing == ("ep002.pth",)
    assert os.path.exists(CK / "ep003.pth")
