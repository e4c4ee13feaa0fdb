"""Fixtures for the nnhandler-sde tests (they run in the main suite: see the root pyproject's
``testpaths``/``pythonpath``)."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from nnh_testing import SDE_ENTRY_POINT, sde_plugin_installed, write_dist_info


@pytest.fixture
def sde_entry_point(tmp_path_factory: pytest.TempPathFactory,
                    monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The plugin's entry point is visible to ``importlib.metadata``: the installed one
    (``pip install -e plugins/nnhandler-sde``), or else a dist-info record written for the
    test — the same record pip would write — on ``sys.path``."""
    if not sde_plugin_installed():
        site = tmp_path_factory.mktemp("site")
        write_dist_info(site, "nnhandler-sde", dict([SDE_ENTRY_POINT]))
        monkeypatch.syspath_prepend(str(site))
        importlib.invalidate_caches()
    yield
    importlib.invalidate_caches()


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own directory, so relative save paths and logs stay there."""
    monkeypatch.chdir(tmp_path)
