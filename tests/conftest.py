from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "nnhandler", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile("nnhandler")


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path: Path) -> Iterator[Path]:
    """Every test runs in its own directory, so relative save paths and log files stay there."""
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(previous)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tell the launcher (``dist_testing``) which test is running, before its fixtures run (a
    module fixture may launch): a torch.distributed launch from a test not marked
    ``distributed`` fails it. Only where ``dist_testing`` is imported already."""
    import sys

    launcher = sys.modules.get("dist_testing")
    if launcher is not None:
        launcher.current_test = item


# -- object storage (issue 15): moto's S3 server for the session, a bucket per test ------------
from s3_testing import s3_bucket, s3_endpoint, silent_endpoint  # noqa: E402, F401
