"""A checkpoint can never make us delete what we did not write, and a fresh run never replaces
another run's files (issue 11, items 3 and 4; item 7's "no earlier checkpoint" message).

Crafted checkpoints are written with our own writer (valid CRCs) from a real handler's state
with its auto-save bookkeeping edited. | every removal route (overwrite's pending_removal and
last_saved_path, retention's removing and files, the index's removing, stale temp clean-up) x
every kind of victim (outside save_path, ``../``, a directory, a symlink, a foreign name,
another lineage) x both ways in (``NNHandler.load`` + ``train``, a user's own ``auto_save`` +
``train(resume="latest")``): no victim is touched, a warning names it | the legitimate removals
still happen | the name rules as a table and a property | ``-v<N>`` instead of replacing another
run's file, with and without keep rules, sync and async, and the same-lineage resume unchanged |
the auto-save state schema |
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from nnh_testing import attach_loaders, make_handler

import nnhandler.checkpoint.removal as removal_module
from nnhandler import AutoSaveCallback, CheckpointError, NNHandler
from nnhandler.checkpoint.envelope import build_meta, read_checkpoint, write_checkpoint
from nnhandler.checkpoint.index import INDEX_FILE, IndexEntry, read_index, update_index
from nnhandler.checkpoint.integrity import read_integrity_record
from nnhandler.checkpoint.removal import (
    RemovalGuard,
    is_own_name,
    recorded_lineage,
    remove_stale_temp_files,
    versioned,
)
from nnhandler.checkpoint.sharded import sharded_name
from nnhandler.errors import CheckpointSchemaError
from nnhandler.naming import render_name

CK = Path("ck")
NAME = "ep{epoch:03d}"
N = 16
SEED = 3


# ============================================================================================
# helpers
# ============================================================================================
@pytest.fixture(autouse=True)
def _in_run_dir(tmp_path: Path) -> Iterator[Path]:
    """Run one level below the test's folder, so that ``../x.pth`` stays inside it."""
    run = tmp_path / "run"
    run.mkdir()
    previous = Path.cwd()
    os.chdir(run)
    try:
        yield run
    finally:
        os.chdir(previous)


def new_handler(**autosave: Any) -> NNHandler:
    handler = make_handler(n=N, batch_size=8)
    handler.auto_save(1, CK, name=autosave.pop("name", NAME), **autosave)
    return handler


def train(handler: NNHandler, **kwargs: Any) -> None:
    handler.train(progress_bar=False, **kwargs)


def files(directory: Path = CK) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != INDEX_FILE)


def warnings_naming(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and text in r.getMessage()]


def foreign_checkpoint(path: Path, epoch: int = 1) -> None:
    """A valid checkpoint of another run (another lineage)."""
    write_checkpoint(path, {}, build_meta(epoch=epoch, step=epoch, logs={}, world_size=1,
                                          lineage="run:another0run0id"))


@pytest.fixture
def attempts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Every path the removal door actually removes (after its checks)."""
    seen: list[Path] = []
    real_remove = removal_module.remove_checkpoint_path

    def observe(path: Path) -> None:
        seen.append(Path(os.path.realpath(path)))
        real_remove(path)

    monkeypatch.setattr(removal_module, "remove_checkpoint_path", observe)
    yield seen


@dataclass(frozen=True)
class Victim:
    """What a crafted record points at: the value as a path (overwrite's bookkeeping, relative
    to the working directory) and as a name in the folder (retention, index), the entries that
    must survive, and what a warning must name."""

    as_path: str
    as_name: str
    survivors: tuple[Path, ...]


VICTIM_KINDS = ["outside", "dotdot", "directory", "symlink", "foreign-name", "other-lineage"]


def own_checkpoint(path: Path, lineage: str) -> None:
    """A valid checkpoint of ``lineage`` (this very run), older than the run's newest."""
    write_checkpoint(path, {}, build_meta(epoch=1, step=1, logs={}, world_size=1,
                                          lineage=lineage))


def make_victim(kind: str, lineage: str) -> Victim:
    """Plant the victim of ``kind``; where it helps it is a checkpoint of this very run
    (``lineage``), so that only the check under test stands between the record and a
    deletion."""
    root = Path.cwd().parent
    if kind == "outside":
        target = root / "outside.pth"
        own_checkpoint(target, lineage)
        return Victim(str(target), str(target), (target,))
    if kind == "dotdot":  # ../x.pth: from the working directory and from the folder
        above_cwd, above_ck = root / "x.pth", Path.cwd() / "x.pth"
        for target in (above_cwd, above_ck):
            own_checkpoint(target, lineage)
        return Victim("../x.pth", "../x.pth", (above_cwd, above_ck))
    if kind == "directory":  # the rmtree route
        target = root / "precious.dcp"
        (target / "data").mkdir(parents=True)
        (target / "data" / "keep.txt").write_text("precious")
        return Victim(str(target), str(target), (target, target / "data" / "keep.txt"))
    if kind == "symlink":  # a matching name inside save_path that links to a file outside
        target = root / "linked.pth"
        own_checkpoint(target, lineage)
        link = CK / "ep777.pth"
        link.symlink_to(target)
        return Victim(str(link), link.name, (target, link))
    if kind == "foreign-name":  # inside save_path, this run's lineage, not the template's name
        target = CK / "notes.pth"
        own_checkpoint(target, lineage)
        return Victim(str(target), target.name, (target,))
    assert kind == "other-lineage"  # the template's name, another run's file
    target = CK / "ep900.pth"
    foreign_checkpoint(target)
    return Victim(str(target), target.name, (target,))


def craft(path: Path, handler: NNHandler, **edits: Any) -> None:
    """Rewrite ``path`` as ``handler``'s checkpoint with its auto-save state edited."""
    callback = handler.auto_save_callback
    assert callback is not None
    state = handler.state_dict()
    entry = dict(state[callback.state_key])
    retention = dict(entry["retention"])
    for field, value in edits.items():
        if field.startswith("retention."):
            retention[field.removeprefix("retention.")] = value
        else:
            entry[field] = value
    entry["retention"] = retention
    state[callback.state_key] = entry
    write_checkpoint(path, state, build_meta(epoch=handler.epoch, step=handler.global_step,
                                             logs={}, world_size=1,
                                             lineage=handler.progress.lineage))


ROUTES = ["pending_removal", "last_saved_path", "retention.removing", "retention.files",
          "index.removing"]


def record_index_removal(handler: NNHandler, name: str) -> None:
    """The index section of ``handler``'s auto-saver, rewritten to record ``name`` for
    removal (as a hand-edited or crafted index would)."""
    callback = handler.auto_save_callback
    assert callback is not None
    index = read_index(CK)
    assert index is not None
    section = index[callback.state_key]
    update_index(CK, callback.state_key, type(section)(
        lineage=section.lineage, rules=section.rules, next_seq=section.next_seq,
        checkpoints=section.checkpoints, removing=(name,)))


def autosave_options(route: str) -> dict[str, Any]:
    return {"overwrite": True} if route in ("pending_removal", "last_saved_path") else {
        "keep_last": 1}


def plant(route: str, kind: str) -> tuple[NNHandler, Victim]:
    """Train a run, plant the victim and point the route's bookkeeping at it in the newest
    checkpoint (``ck/ep002.pth``) or, for the index route, in the index."""
    handler = new_handler(**autosave_options(route))
    train(handler, epochs=2, seed=SEED)
    newest = CK / "ep002.pth"
    victim = make_victim(kind, handler.progress.lineage)
    if route == "pending_removal":
        craft(newest, handler, pending_removal=victim.as_path)
    elif route == "last_saved_path":
        craft(newest, handler, last_saved_path=victim.as_path)
    elif route == "retention.removing":
        craft(newest, handler, **{"retention.removing": [victim.as_name]})
    elif route == "retention.files":
        entries = handler.state_dict()[handler.auto_save_callback.state_key][  # type: ignore[union-attr]
            "retention"]["files"]
        crafted = IndexEntry(victim.as_name, epoch=1, step=2, seq=0).to_json()
        craft(newest, handler, **{"retention.files": [crafted, *entries]})
    else:
        record_index_removal(handler, victim.as_name)
    return handler, victim


def resume(route: str, way: str) -> None:
    """Continue from the crafted newest checkpoint one epoch, the ``way`` a user would."""
    if way == "load":
        resumed = NNHandler.load(CK / "ep002.pth", device="cpu")
        attach_loaders(resumed, n=N)
        train(resumed, epochs=1)
    else:
        own = new_handler(**autosave_options(route))
        train(own, epochs=1, resume="latest", seed=SEED)


# ============================================================================================
# item 3: every removal route x every victim x both ways in
# ============================================================================================
@pytest.mark.parametrize("way", ["load", "resume-latest"], ids=["load+train", "resume-latest"])
@pytest.mark.parametrize("kind", VICTIM_KINDS, ids=VICTIM_KINDS)
@pytest.mark.parametrize("route", ROUTES, ids=ROUTES)
def test_a_crafted_checkpoint_never_makes_train_delete_a_victim(
    route: str, kind: str, way: str, attempts: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    _, victim = plant(route, kind)
    attempts.clear()  # the run that wrote the files removed its own; count from here
    resume(route, way)
    for survivor in victim.survivors:
        assert os.path.lexists(survivor), f"{survivor} was deleted"
    targets = {Path(os.path.realpath(s)) for s in victim.survivors}
    assert not targets & set(attempts)  # deletions attempted on crafted records: 0
    # the resumed run still saved, and removed its own superseded file as usual (unless the
    # crafted record took that file's place: then it is left over, never a victim)
    assert "ep003.pth" in files()
    assert ("ep002.pth" in files()) == (route == "last_saved_path")
    assert warnings_naming(caplog, victim.as_path if route in ROUTES[:2] else victim.as_name)


@pytest.mark.parametrize("route", ROUTES, ids=ROUTES)
def test_the_legitimate_removal_of_each_route_still_happens(route: str,
                                                            attempts: list[Path]) -> None:
    """The same routes pointing at this run's own superseded file: it is removed."""
    handler = new_handler(**autosave_options(route))
    train(handler, epochs=2, seed=SEED)
    spare = CK / "ep001.pth"
    shutil.copyfile(CK / "ep002.pth", spare)  # this run's lineage, the template's name
    if route == "pending_removal":
        craft(CK / "ep002.pth", handler, pending_removal=str(spare))
    elif route == "last_saved_path":
        craft(CK / "ep002.pth", handler, last_saved_path=str(spare))
        shutil.copyfile(CK / "ep002.pth", CK / "keep.pth")  # resume from it, not from ep002
    elif route == "retention.removing":
        craft(CK / "ep002.pth", handler, **{"retention.removing": [spare.name]})
    elif route == "retention.files":
        callback = handler.auto_save_callback
        assert callback is not None
        entries = handler.state_dict()[callback.state_key]["retention"]["files"]
        crafted = IndexEntry(spare.name, epoch=1, step=2, seq=0).to_json()
        craft(CK / "ep002.pth", handler, **{"retention.files": [crafted, *entries]})
    else:
        record_index_removal(handler, spare.name)
    attempts.clear()
    resumed = NNHandler.load(CK / "ep002.pth", device="cpu")
    attach_loaders(resumed, n=N)
    train(resumed, epochs=1)
    assert not spare.exists()
    assert Path(os.path.realpath(spare)) in attempts


def test_a_resumed_run_finishes_its_own_pending_removal() -> None:
    """A crash between writing ep003 and removing ep002 (overwrite): the resumed run removes
    ep002, its own lineage's file."""
    handler = new_handler(overwrite=True)
    train(handler, epochs=2, seed=SEED)
    kept = CK / "kept.pth"
    shutil.copyfile(CK / "ep002.pth", kept)
    train(handler, epochs=1)
    shutil.copyfile(kept, CK / "ep002.pth")  # "the removal never happened"
    kept.unlink()
    state = read_checkpoint(CK / "ep003.pth").state[handler.auto_save_callback.state_key]  # type: ignore[union-attr]
    assert state["pending_removal"] == str(CK / "ep002.pth")
    resumed = NNHandler.load(CK / "ep003.pth", device="cpu")
    attach_loaders(resumed, n=N)
    train(resumed, epochs=1)
    assert files() == ["ep004.pth"]


# ============================================================================================
# stale temp clean-up
# ============================================================================================
def dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True, timeout=60)
    return int(finished.stdout)


@pytest.mark.parametrize("way", ["load", "resume-latest"], ids=["load+train", "resume-latest"])
def test_stale_temp_look_alikes_that_are_symlinks_are_never_followed(
    way: str, caplog: pytest.LogCaptureFixture
) -> None:
    handler = new_handler(keep_last=1)
    train(handler, epochs=2, seed=SEED)
    root, pid = Path.cwd().parent, dead_pid()
    outside_file = root / "precious.pth"
    outside_file.write_bytes(b"precious")
    outside_dir = root / "precious_dir"
    (outside_dir / "sub").mkdir(parents=True)
    (outside_dir / "sub" / "keep.txt").write_text("precious")
    file_link = CK / f".ep003.pth.tmp-{pid}-0123abcd"
    file_link.symlink_to(outside_file)
    dir_link = CK / f".ep003.dcp.tmp-{pid}-0123abcd"
    dir_link.symlink_to(outside_dir, target_is_directory=True)
    real_stale = CK / f".ep004.pth.tmp-{pid}-0123abcd"
    real_stale.write_bytes(b"left by a crash")
    resume("retention.removing", way)
    assert outside_file.read_bytes() == b"precious"
    assert (outside_dir / "sub" / "keep.txt").read_text() == "precious"
    assert file_link.is_symlink() and dir_link.is_symlink()
    assert not real_stale.exists()  # a genuine stale temp file is still cleaned up
    for link in (file_link, dir_link):
        assert warnings_naming(caplog, link.name)


@pytest.mark.parametrize(
    "name",
    [".ep001.pth.tmp-{pid}-abcd", ".ep001.pth.tmp-{pid}-0123abcd.pth",
     "ep001.pth.tmp-{pid}-0123abcd", ".ep001.pth.tmp-x{pid}-0123abcd"],
    ids=["short-hex", "trailing-suffix", "not-hidden", "non-numeric-pid"],
)
def test_only_exact_temp_names_are_stale_temp_files(tmp_path: Path, name: str) -> None:
    entry = tmp_path / name.format(pid=dead_pid())
    entry.write_bytes(b"not ours")
    assert remove_stale_temp_files(tmp_path) == []
    assert entry.exists()


# ============================================================================================
# the name rules
# ============================================================================================
@pytest.mark.parametrize(
    ("template", "name", "expected"),
    [
        (NAME, "ep001.pth", True),
        (NAME, "ep001-v2.pth", True),
        (NAME, "ep001.dcp", True),
        (NAME, "ep001-v1.dcp", True),
        (NAME, "notes.pth", False),
        (NAME, "ep001.txt", False),
        (NAME, "ep001", False),
        (NAME, "../ep001.pth", False),
        (NAME, "preempted_ep003_b00012.pth", True),
        (NAME, "exception_ep003_b00000-v1.pth", True),
        (NAME, "preempted_ep3_b12.pth", False),
        ("latest", "latest.pth", True),
        ("latest", "latest-v1.pth", True),
        ("latest", "latest-v0.pth", False),
        ("latest", "latestx.pth", False),
        ("latest", "lat~0123abcd.pth", True),
        ("latest", "lax~0123abcd.pth", False),
        ("latest", "lat~0123abc.pth", False),
        ("latest.pth", "latest.pth", True),
        ("ck_{val_loss:.4f}", "ck_0.1234.pth", True),
        ("ck_{val_loss:.4f}", "ck_0.12~89abcdef.dcp", True),
        (".hidden{epoch}", "_hidden3.pth", True),
        ("a.b{epoch}", "a.b1.pth", True),
        ("a.b{epoch}", "axb1.pth", False),
    ],
    ids=lambda value: str(value),
)
def test_names_of_the_template(template: str, name: str, expected: bool) -> None:
    assert is_own_name(name, template) is expected


field_values = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                         st.text(max_size=12))


@hypothesis_settings(max_examples=200)
@given(literal=st.text(st.characters(blacklist_characters="{}/\\\x00:", codec="utf-8"),
                       min_size=1, max_size=12),
       value=field_values, number=st.integers(1, 10_000), sharded=st.booleans())
def test_every_name_the_callback_renders_is_its_own(literal: str, value: Any, number: int,
                                                     sharded: bool) -> None:
    """Whatever the logs, the rendered name (and its -v<N>, and its .dcp) matches the template
    it came from."""
    template = f"{literal}{{x}}{literal}"
    name = render_name(template, {"x": value}).name
    if sharded:
        name = sharded_name(name)
    assert is_own_name(name, template)
    assert is_own_name(versioned(Path(name), number).name, template)


def test_a_guard_names_each_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "ck"
    directory.mkdir()
    own = directory / "ep001.pth"
    write_checkpoint(own, {}, build_meta(epoch=1, step=1, logs={}, world_size=1,
                                         lineage="run:me"))
    (directory / "plain.pth").write_bytes(b"no record")
    (directory / "ep002.pth").write_bytes(b"no record")
    (directory / "ep003.pth").mkdir()
    foreign_checkpoint(directory / "ep004.pth")
    guard = RemovalGuard(directory, NAME, "run:me", logging.getLogger("nnhandler.test"))
    reasons = {name: guard.refusal(name, in_directory=True) for name in (
        "ep001.pth", "plain.pth", "ep002.pth", "ep003.pth", "ep004.pth", "../ep001.pth",
        "gone.pth", "..", "")}
    assert reasons["ep001.pth"] is None and reasons["gone.pth"] is None
    assert "name template" in str(reasons["plain.pth"])
    assert "records no lineage" in str(reasons["ep002.pth"])
    assert "a directory" in str(reasons["ep003.pth"])
    assert "another run" in str(reasons["ep004.pth"])
    assert "not directly inside save_path" in str(reasons["../ep001.pth"])
    assert "not a file name" in str(reasons[".."]) and "not a file name" in str(reasons[""])
    assert recorded_lineage(own) == "run:me"


# ============================================================================================
# the lineage in every record
# ============================================================================================
def test_every_checkpoint_records_the_runs_lineage() -> None:
    handler = new_handler()
    train(handler, epochs=1, seed=SEED)
    lineage = handler.progress.lineage
    assert lineage == f"run:{handler.progress.run_id}"
    path = CK / "ep001.pth"
    assert read_checkpoint(path).meta["lineage"] == lineage
    assert read_integrity_record(path)["lineage"] == lineage
    other = new_handler()
    train(other, epochs=1, seed=SEED)  # the same seed: still another run
    assert other.progress.lineage != lineage


def test_a_resume_with_another_seed_stays_the_same_lineage() -> None:
    handler = new_handler(overwrite=True)
    train(handler, epochs=1, seed=SEED)
    lineage = handler.progress.lineage
    resumed = NNHandler.load(CK / "ep001.pth", device="cpu")
    attach_loaders(resumed, n=N)
    train(resumed, epochs=1, seed=SEED + 1)  # re-seeds, warns, still continues the run
    assert resumed.progress.lineage == lineage
    assert files() == ["ep002.pth"]  # so overwrite removed its own ep001


# ============================================================================================
# item 4: never replace another run's file
# ============================================================================================
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_fresh_run_writes_v1_beside_another_runs_files(
    async_save: bool, caplog: pytest.LogCaptureFixture
) -> None:
    train(new_handler(async_save=async_save), epochs=2, seed=SEED)
    before = {name: (CK / name).read_bytes() for name in files()}
    caplog.clear()
    fresh = new_handler(async_save=async_save)
    train(fresh, epochs=3, seed=SEED)
    assert files() == ["ep001-v1.pth", "ep001.pth", "ep002-v1.pth", "ep002.pth", "ep003.pth"]
    assert {name: (CK / name).read_bytes() for name in before} == before
    assert read_checkpoint(CK / "ep002-v1.pth").meta["lineage"] == fresh.progress.lineage
    told = warnings_naming(caplog, "is not this run's checkpoint")
    assert len(told) == 1  # once per callback
    assert "ck/ep001.pth" in told[0] and "ep001-v1.pth" in told[0]
    for option in ("save_path", "resume=\"latest\"", "remove the old files"):
        assert option in told[0]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_with_keep_rules_a_fresh_run_removes_only_its_own_versioned_files(
    async_save: bool
) -> None:
    train(new_handler(keep_last=1, async_save=async_save), epochs=3, seed=SEED)
    assert files() == ["ep003.pth"]
    earlier = (CK / "ep003.pth").read_bytes()
    fresh = new_handler(keep_last=1, async_save=async_save)
    train(fresh, epochs=4, seed=SEED)
    assert files() == ["ep003.pth", "ep004.pth"]
    assert (CK / "ep003.pth").read_bytes() == earlier
    fresh = new_handler(keep_last=2, async_save=async_save)
    train(fresh, epochs=4, seed=SEED)  # a third run: ep003 and ep004 are both taken
    assert files() == ["ep003-v1.pth", "ep003.pth", "ep004-v1.pth", "ep004.pth"]
    index = read_index(CK)
    assert index is not None
    assert [entry.name for entry in index[fresh.auto_save_callback.state_key].checkpoints] == [  # type: ignore[union-attr]
        "ep003-v1.pth", "ep004-v1.pth"]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_overwrite_with_a_fixed_name_keeps_overwriting_its_own_v1(async_save: bool) -> None:
    train(new_handler(name="latest", overwrite=True, async_save=async_save), epochs=1,
          seed=SEED)
    earlier = (CK / "latest.pth").read_bytes()
    fresh = new_handler(name="latest", overwrite=True, async_save=async_save)
    train(fresh, epochs=3, seed=SEED)
    assert files() == ["latest-v1.pth", "latest.pth"]
    assert (CK / "latest.pth").read_bytes() == earlier
    assert read_checkpoint(CK / "latest-v1.pth").epoch == 3


def test_a_file_that_is_not_a_checkpoint_is_never_replaced() -> None:
    CK.mkdir()
    (CK / "latest.pth").write_bytes(b"the user's notes")
    train(new_handler(name="latest"), epochs=1, seed=SEED)
    assert (CK / "latest.pth").read_bytes() == b"the user's notes"
    assert read_checkpoint(CK / "latest-v1.pth").epoch == 1


@pytest.mark.parametrize("keep_last", [None, 2], ids=["no-keep-rule", "keep-last-2"])
def test_a_resumed_run_rewrites_its_abandoned_future_in_place(
    keep_last: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    train(new_handler(keep_last=keep_last), epochs=4, seed=SEED)
    before = files()
    resumed = NNHandler.load(CK / ("ep003.pth" if keep_last else "ep002.pth"), device="cpu")
    attach_loaders(resumed, n=N)
    caplog.clear()
    train(resumed, epochs=2)
    assert files() == (["ep005.pth", "ep004.pth"][::-1] if keep_last else before)
    assert not [name for name in files() if "-v" in name]
    assert not warnings_naming(caplog, "is not this run's checkpoint")


# ============================================================================================
# the auto-save state schema; item 7's message
# ============================================================================================
def saved_autosave_state() -> tuple[str, dict[str, Any]]:
    handler = new_handler(keep_last=2)
    train(handler, epochs=1, seed=SEED)
    callback = handler.auto_save_callback
    assert callback is not None
    return callback.state_key, callback.state_dict()


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"save_count": "x"}, "save_count"),
        ({"pending_removal": 5}, "pending_removal"),
        ({"last_saved_path": ["ck/ep001.pth"]}, "last_saved_path"),
        ({"last_saved_epoch": -1}, "last_saved_epoch"),
        ({"unknown": 1}, "unknown"),
        ({"retention": {"lineage": "run:x", "next_seq": 2, "removing": [],
                        "files": [{"name": "ep001.pth", "epoch": "abc", "step": 1,
                                   "seq": 1}]}}, "retention.files[0].epoch"),
        ({"retention": {"lineage": "run:x", "next_seq": 2, "removing": [7], "files": []}},
         "retention.removing[0]"),
    ],
    ids=["save_count", "pending_removal", "last_saved_path", "negative-epoch", "unknown-field",
         "retention-epoch", "retention-removing"],
)
def test_off_schema_autosave_state_names_the_field(edit: dict[str, Any], field: str) -> None:
    key, state = saved_autosave_state()
    callback = AutoSaveCallback(1, CK, name=NAME, keep_last=2)
    with pytest.raises(CheckpointSchemaError, match=field.replace("[", r"\[").replace(
            "]", r"\]")) as raised:
        callback.load_state_dict({**state, **edit})
    assert raised.value.field == f"state[{key!r}].{field}"
    assert callback.save_count == 0 and callback.last_saved_path is None  # nothing applied


def test_an_off_schema_autosave_state_in_a_file_is_a_checkpoint_error() -> None:
    handler = new_handler(keep_last=2)
    train(handler, epochs=1, seed=SEED)
    craft(CK / "ep001.pth", handler, save_count="x")
    with pytest.raises(CheckpointError, match="save_count"):
        NNHandler.load(CK / "ep001.pth", device="cpu")


def test_autosave_state_written_before_retention_existed_still_loads() -> None:
    _, state = saved_autosave_state()
    del state["retention"], state["failed_saves"], state["pending_removal"]
    callback = AutoSaveCallback(1, CK, name=NAME)
    callback.load_state_dict(state)
    assert callback.save_count == 1 and callback.last_saved_path == str(CK / "ep001.pth")


class FailsOnce:
    """A state provider whose first ``state_dict`` raises: the first save fails."""

    state_key = "fails_once"

    def __init__(self) -> None:
        self.calls = 0

    def state_dict(self) -> dict[str, Any]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("simulated provider failure")
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def test_a_failed_first_save_says_no_earlier_checkpoint_exists(
    caplog: pytest.LogCaptureFixture
) -> None:
    handler = new_handler()
    handler.register_state_provider(FailsOnce())
    with caplog.at_level(logging.ERROR, logger="nnhandler"):
        train(handler, epochs=2, seed=SEED)
    failed = [r.getMessage() for r in caplog.records if "AUTO-SAVE FAILED" in r.getMessage()]
    assert len(failed) == 1
    assert "no earlier checkpoint exists" in failed[0] and "None" not in failed[0]
    assert files() == ["ep002.pth"]
