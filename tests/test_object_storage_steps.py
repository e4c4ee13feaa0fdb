"""Step triggers (issue 14) on object storage (issue 15): ``every_n_steps`` auto-saves to a URL
(``memory://`` and moto's S3 server) are named, kept and indexed as on a disk, and a run resumes
mid-epoch from them, by ``load`` of one object and by ``train(resume="latest")`` on the URL,
bit for bit equal to the run that was never interrupted.
"""

from __future__ import annotations

from collections.abc import Iterator

import fsspec
import pytest
import torch
from nnh_testing import attach_loaders, make_handler

from nnhandler import NNHandler
from nnhandler.checkpoint.index import INDEX_FILE
from nnhandler.checkpoint.storage import URL

#: 64 samples in batches of 8: 8 optimizer steps an epoch; every 5 steps saves inside epochs
EVERY = 5


@pytest.fixture(params=["memory", "s3"], ids=["memory", "s3"])
def root(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh folder on ``memory://`` or in a new bucket of the session's S3 server."""
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        yield f"s3://{bucket}/steps"
        return
    folder = f"memory://nnh-steps-{id(object()):x}"
    yield folder
    fs = fsspec.filesystem("memory")
    if fs.exists(URL(folder).key):
        fs.rm(URL(folder).key, recursive=True)


def listed(root: str) -> list[str]:
    url = URL(root)
    fs = fsspec.filesystem(url.protocol, skip_instance_cache=True)
    return sorted(path.rsplit("/", 1)[-1] for path in fs.ls(url.key, detail=False))


def assert_same_run(resumed: NNHandler, reference: NNHandler) -> None:
    for key, value in reference.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[key]), key
    assert resumed.history == reference.history
    assert resumed.global_step == reference.global_step


def test_step_saves_to_a_url_resume_mid_epoch_exactly(root: str) -> None:
    reference = make_handler()
    reference.auto_save(None, root, name="s{step:03d}", every_n_steps=EVERY, keep_last=3)
    reference.train(3, seed=3, progress_bar=False)
    # steps 5, 10, 15, 20 (none at an epoch's end: 8, 16, 24); keep_last=3 removed s005
    assert listed(root) == [INDEX_FILE, "s010.pth", "s015.pth", "s020.pth"]
    resumed = NNHandler.load(f"{root}/s010.pth", device="cpu")
    assert (resumed.epoch, resumed.global_step, resumed.stopped_mid_epoch) == (1, 10, True)
    attach_loaders(resumed)
    resumed.train(until_epoch=3, progress_bar=False)
    assert_same_run(resumed, reference)


def test_train_resume_latest_on_a_url_continues_inside_the_epoch(root: str) -> None:
    reference = make_handler()
    reference.train(3, seed=3, progress_bar=False)
    first = make_handler()
    first.auto_save(None, root, name="s{step:03d}", every_n_steps=EVERY)
    first.train(2, seed=3, progress_bar=False)
    assert listed(root) == ["s005.pth", "s010.pth", "s015.pth"]  # step 16 ends epoch 2
    second = make_handler()
    second.auto_save(None, root, name="s{step:03d}", every_n_steps=EVERY)
    # no seed: only the checkpoint's random streams can make this run equal the reference
    second.train(until_epoch=3, resume="latest", progress_bar=False)
    assert_same_run(second, reference)
    # the same lineage went on (a fresh run would have written s005-v1.pth and so on)
    assert listed(root) == ["s005.pth", "s010.pth", "s015.pth", "s020.pth"]
