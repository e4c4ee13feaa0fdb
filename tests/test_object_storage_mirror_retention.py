"""The mirror's retention after the local folder is lost (issue 15 item 5): a run whose
``save_path`` is wiped resumes from the mirror, trains on, and the mirror then holds exactly
what the same run keeps when its folder survives: the same objects, the same index entries.

The mirror's index is data from a store: a section of another lineage, or entries whose
objects are not this lineage's own, are never adopted, and nothing the mirror's index says
removes a local file. On ``memory://``; nothing of nnhandler is mocked.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import fsspec
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from memory_store import drop_memory_root, memory_object_names
from nnh_testing import make_handler

from nnhandler import NNHandler
from nnhandler.checkpoint.index import INDEX_FILE
from nnhandler.checkpoint.storage import URL

_COUNTER = itertools.count()


def fresh_mirror() -> str:
    return f"memory://nnh-mirror-retention-{next(_COUNTER)}-{id(object()):x}"


def mirror_entries(root: str) -> list[tuple[str, int, int, tuple[str, ...]]]:
    """The mirror index's kept entries (name, epoch, step, reasons), lineage aside."""
    raw = fsspec.filesystem("memory").cat_file(f"{URL(root).key}/{INDEX_FILE}")
    sections = json.loads(raw)["callbacks"]
    return sorted((entry["name"], entry["epoch"], entry["step"], tuple(entry["reasons"]))
                  for section in sections.values() for entry in section["checkpoints"])


def run(local: Path, mirror: str, saver: dict[str, Any], first: int, total: int, *,
        wipe: bool) -> NNHandler:
    """``first`` epochs, the local folder wiped (or not), then a new process's handler
    resumes with ``train(resume="latest")`` up to epoch ``total``."""
    handler = make_handler(n=16)
    handler.auto_save(save_path=local, mirror=mirror, **saver)
    handler.train(epochs=first, seed=1, progress_bar=False)
    if wipe:
        shutil.rmtree(local)
    again = make_handler(n=16)
    again.auto_save(save_path=local, mirror=mirror, **saver)
    again.train(until_epoch=total, resume="latest", seed=1, progress_bar=False)
    return again


def check_same_as_surviving(saver: dict[str, Any], first: int, total: int) -> None:
    survived, wiped = fresh_mirror(), fresh_mirror()
    with tempfile.TemporaryDirectory() as folder:
        kept_local, lost_local = Path(folder) / "kept", Path(folder) / "lost"
        try:
            reference = run(kept_local, survived, saver, first, total, wipe=False)
            resumed = run(lost_local, wiped, saver, first, total, wipe=True)
            assert resumed.train_losses == reference.train_losses  # the same run
            assert memory_object_names(wiped) == memory_object_names(survived)
            assert mirror_entries(wiped) == mirror_entries(survived)
            # locally: what the surviving folder keeps of the files written after the wipe
            reference_local = {p.name for p in kept_local.iterdir()}
            written_after = {p.name for p in lost_local.iterdir()}
            assert written_after <= reference_local
            assert set(mirror_entries(survived)) and INDEX_FILE in written_after
        finally:
            drop_memory_root(survived)
            drop_memory_root(wiped)


@pytest.mark.parametrize(("saver", "first", "total"), [
    ({"interval": 1, "name": "ep{epoch:03d}", "keep_last": 2}, 3, 5),
    ({"interval": 1, "name": "ep{epoch:03d}", "keep_best": 1, "monitor": "val_loss"}, 3, 6),
    ({"interval": 1, "name": "ep{epoch:03d}", "keep_last": 1, "keep_every": 2}, 3, 6),
    ({"interval": None, "every_n_steps": 3, "name": "s{step:04d}", "keep_last": 1,
      "keep_every_n_steps": 6}, 3, 6),
], ids=["keep_last", "keep_best", "keep_every", "keep_every_n_steps"])
def test_a_wiped_folder_leaves_the_mirror_as_the_surviving_one_does(
        saver: dict[str, Any], first: int, total: int) -> None:
    check_same_as_surviving(saver, first, total)


@pytest.mark.slow
@hypothesis_settings(max_examples=12)
@given(keep_last=st.sampled_from([None, 1, 2, 3]), keep_best=st.sampled_from([None, 1, 2]),
       monitor=st.sampled_from(["val_loss", "loss"]), mode=st.sampled_from(["min", "max"]),
       keep_every=st.sampled_from([None, 2, 3]),
       steps=st.sampled_from([None, (3, None), (3, 4)]),
       first=st.integers(1, 3), more=st.integers(1, 3))
def test_mirror_retention_after_a_wipe_equals_the_surviving_run(
        keep_last: int | None, keep_best: int | None, monitor: str, mode: str,
        keep_every: int | None, steps: tuple[int, int | None] | None, first: int,
        more: int) -> None:
    saver: dict[str, Any] = {"interval": 1, "name": "ep{epoch:03d}_s{step:04d}",
                             "keep_last": keep_last, "keep_every": keep_every}
    if keep_best is not None:
        saver.update(keep_best=keep_best, monitor=monitor, mode=mode)
    if steps is not None:
        saver.update(every_n_steps=steps[0], keep_every_n_steps=steps[1])
    if not any(saver.get(rule) for rule in ("keep_last", "keep_best", "keep_every",
                                            "keep_every_n_steps")):
        saver["keep_last"] = 2
    check_same_as_surviving(saver, first, first + more)


def mirrored_run_index(tmp_path: Path, mirror: str) -> tuple[Any, str, dict[str, Any]]:
    """Three epochs saved under ``tmp_path/ck`` with ``mirror`` (keep_last=2); the memory
    filesystem, the key of the mirror's index and its parsed document."""
    handler = make_handler(n=16)
    handler.auto_save(1, tmp_path / "ck", name="ep{epoch:03d}", keep_last=2, mirror=mirror)
    handler.train(epochs=3, seed=1, progress_bar=False)
    fs = fsspec.filesystem("memory")
    index_key = f"{URL(mirror).key}/{INDEX_FILE}"
    return fs, index_key, json.loads(fs.cat_file(index_key))


# -- the trust rule ------------------------------------------------------------------------------
def test_the_mirrors_index_never_removes_a_local_file_nor_adopts_another_lineage(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mirror = fresh_mirror()
    try:
        fs, index_key, document = mirrored_run_index(tmp_path, mirror)
        (section,) = document["callbacks"].values()
        # a crafted index: the local ep002 "to be removed", an entry for ep001 (which another
        # run's object now holds on the mirror), a newer write order
        section["removing"] = ["ep002.pth"]
        section["checkpoints"] = [{"name": "ep001.pth", "epoch": 1, "step": 2, "seq": 90,
                                   "value": None, "reasons": ["latest 1/2"]}]
        section["next_seq"] = 91
        fs.pipe_file(index_key, json.dumps(document).encode())
        other = make_handler(n=16)
        other.train(epochs=1, seed=2, progress_bar=False)
        other.save(f"{mirror}/ep001.pth")  # another lineage's object under our name
        (tmp_path / "ck" / "ep003.pth").unlink()  # something is missing locally
        again = make_handler(n=16)  # keep_last=3: only the crafted index says "remove ep002"
        again.auto_save(1, tmp_path / "ck", name="ep{epoch:03d}", keep_last=3, mirror=mirror)
        with caplog.at_level(logging.WARNING, "nnhandler"):
            again.train(until_epoch=4, resume="latest", seed=1, progress_bar=False)
        assert again.epoch == 4  # resumed from the mirror's ep003
        assert sorted(p.name for p in (tmp_path / "ck").glob("*.pth")) == [
            "ep002.pth", "ep004.pth"]  # the local ep002 stands
        assert "belongs to another run" in caplog.text  # the crafted ep001 was not adopted
        assert NNHandler.load(f"{mirror}/ep001.pth").progress.lineage == \
            other.progress.lineage
        assert memory_object_names(mirror) == ["ep001.pth", "ep002.pth", "ep003.pth", "ep004.pth",
                                        INDEX_FILE]
        assert [name for name, *_ in mirror_entries(mirror)] == [
            "ep002.pth", "ep003.pth", "ep004.pth"]
    finally:
        drop_memory_root(mirror)


def test_another_lineages_section_on_the_mirror_is_left_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mirror = fresh_mirror()
    try:
        fs, index_key, document = mirrored_run_index(tmp_path, mirror)
        for section in document["callbacks"].values():
            section["lineage"] = "0" * 32  # no longer this run's
        fs.pipe_file(index_key, json.dumps(document).encode())
        shutil.rmtree(tmp_path / "ck")
        again = make_handler(n=16)
        again.auto_save(1, tmp_path / "ck", name="ep{epoch:03d}", keep_last=2, mirror=mirror)
        with caplog.at_level(logging.WARNING, "nnhandler"):
            again.train(until_epoch=4, resume="latest", seed=1, progress_bar=False)
        assert "from another run" in caplog.text
        # the checkpoint's own bookkeeping (ep002, ep003: its lineage on the mirror) still
        # decides: keep_last=2 keeps ep003 and ep004, as if the folder had survived
        assert memory_object_names(mirror) == ["ep003.pth", "ep004.pth", INDEX_FILE]
    finally:
        drop_memory_root(mirror)
