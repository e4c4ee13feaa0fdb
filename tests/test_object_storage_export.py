"""``export`` to fsspec URLs (issue 15): the weights file goes up whole, plain torch reads it
back, nnhandler's readers know it for an export and never take it for a checkpoint; on
``memory://`` and on moto's S3 server.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch
from nnh_testing import make_handler

from nnhandler import ConfigurationError, NNHandler
from nnhandler.checkpoint.remote_checkpoints import (
    list_remote_checkpoints,
    remote_integrity_record,
)
from nnhandler.checkpoint.storage import URL, store_for
from nnhandler.components import unwrap_model


@pytest.fixture(params=["memory", "s3"], ids=["memory", "s3"])
def root(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh folder on ``memory://`` or in a new bucket of the session's S3 server."""
    if request.param == "s3":
        yield f"s3://{request.getfixturevalue('s3_bucket')}/exports"
        return
    folder = f"memory://nnh-export-{id(object()):x}"
    yield folder
    fs = fsspec.filesystem("memory")
    if fs.exists(URL(folder).key):
        fs.rm(URL(folder).key, recursive=True)


def object_bytes(url: str) -> bytes:
    location = URL(url)
    return bytes(fsspec.filesystem(location.protocol, skip_instance_cache=True)
                 .cat_file(location.key))


@pytest.mark.parametrize("ema", [False, True], ids=["weights", "ema"])
def test_export_to_a_url_is_plain_torch_weights_beside_the_checkpoints(root: str,
                                                                       ema: bool) -> None:
    handler = make_handler(n=32)
    handler.train(epochs=2, seed=3, progress_bar=False, ema_decay=0.5 if ema else 0.0)
    handler.save(f"{root}/ep002.pth")
    returned = handler.export(f"{root}/weights.pth", ema=ema)
    assert returned == f"{root}/weights.pth" and isinstance(returned, URL)
    weights = torch.load(io.BytesIO(object_bytes(returned)), weights_only=True)
    source = handler.ema_model.module if ema and handler.ema_model else handler.module
    expected = unwrap_model(source).state_dict()
    assert weights.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(weights[key], value), key
    store = store_for(URL(root))
    assert remote_integrity_record(store, URL(returned))["kind"] == "export"
    # the export is no checkpoint: listing and load_latest pass it by
    assert [c.path.name for c in list_remote_checkpoints(store, URL(root))] == ["ep002.pth"]
    assert NNHandler.load_latest(root, device="cpu").epoch == 2


def test_export_to_a_url_that_is_a_folder_is_refused(root: str) -> None:
    handler = make_handler(n=32)
    handler.save(f"{root}/inside/ep000.pth")
    with pytest.raises(ConfigurationError, match=r"export path '.*/inside' is a directory"):
        handler.export(f"{root}/inside")


def test_export_to_a_local_path_refuses_storage_options(tmp_path: Path) -> None:
    handler = make_handler(n=32)
    with pytest.raises(ConfigurationError, match=r"storage_options=\{'anon': True\} were given "
                                                 r"for the local path"):
        handler.export(tmp_path / "w.pth", storage_options={"anon": True})
    assert not (tmp_path / "w.pth").exists()
