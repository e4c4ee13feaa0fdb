"""SIGKILL during uploads to S3 (issue 15): a training process that auto-saves every epoch to
moto's S3 server is killed with SIGKILL while a checkpoint is being uploaded, at least 20
times. After every kill nothing partial is listed as a checkpoint (every listed object's
integrity record is complete), the next run resumes from the newest complete checkpoint, and
the multipart uploads the kills left incomplete are aborted at the next start.

Each run is a real subprocess (``tests/remote_sigkill_worker.py``) bounded by timeouts; the
test watches the bucket's incomplete multipart uploads: the checkpoint is written straight into
one (its parts go up while the rest is written), so an upload listed for the epoch is the
upload phase, which ends when the upload is completed after the integrity record.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dist_testing import TESTS_DIR, child_environment, communicate_bounded
from s3_testing import s3_filesystem

from nnhandler.checkpoint.remote_checkpoints import list_remote_checkpoints
from nnhandler.checkpoint.storage import URL, store_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")]

WORKER = TESTS_DIR / "remote_sigkill_worker.py"
KILLS = 20
MAX_RUNS = 45
#: several parts (nnhandler.checkpoint.multipart.PART_SIZE): every upload is a multipart upload
BALLAST_MIB = 104
RUN_TIMEOUT_S = 180
_UPLOADED = re.compile(r"run/ep(?P<epoch>[0-9]{3})\.pth")


def uploads_in_progress(fs: Any, bucket: str, epoch: int) -> set[str]:
    """The upload ids of the incomplete multipart uploads of epoch ``epoch`` or later."""
    fs.invalidate_cache()
    return {upload["UploadId"] for upload in fs.list_multipart_uploads(bucket)
            if (match := _UPLOADED.fullmatch(upload["Key"])) and int(match["epoch"]) >= epoch}


def upload_in_progress(fs: Any, bucket: str, process: subprocess.Popen[str],
                       epoch: int, earlier: set[str]) -> set[str]:
    """The upload ids of :func:`uploads_in_progress` but the ``earlier`` ones (left by the
    previous kill, aborted when the run starts) once there is one (empty if the process ended
    first). Bounded by :data:`RUN_TIMEOUT_S`."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        found = uploads_in_progress(fs, bucket, epoch) - earlier
        if found:
            return found
        time.sleep(0.02)  # the server shares this process: do not flood it
    return set()


def test_sigkill_during_uploads_never_lists_a_partial_checkpoint(s3_bucket: str,
                                                                 tmp_path: Path) -> None:
    url = URL(f"s3://{s3_bucket}/run")
    staging = tmp_path / "staging"
    environment = {**child_environment(), "NNHANDLER_STAGING_DIR": str(staging)}
    store, fs, rng = store_for(url), s3_filesystem(), random.Random(15)
    kills = multipart_in_flight = resumed = runs = 0
    while kills < KILLS:
        assert runs < MAX_RUNS, f"only {kills} kills landed in an upload in {runs} runs"
        runs += 1
        listed = list_remote_checkpoints(store, url)
        newest = max((c.record["epoch"] for c in listed if c.record), default=None)
        earlier = uploads_in_progress(fs, s3_bucket, 0)
        process = subprocess.Popen([sys.executable, str(WORKER), url, str(BALLAST_MIB), "999"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=environment, cwd=tmp_path, start_new_session=True)
        # every other run lets its first upload complete: the runs make progress
        epoch = (newest or 0) + 1 + runs % 2
        begun = upload_in_progress(fs, s3_bucket, process, epoch, earlier)
        if begun:
            time.sleep(rng.uniform(0.0, 0.4))
            in_upload = bool(begun & uploads_in_progress(fs, s3_bucket, epoch))
            os.kill(process.pid, signal.SIGKILL)
        else:
            in_upload = False
        _, output = communicate_bounded(process, "a training run", RUN_TIMEOUT_S)
        assert process.returncode == -signal.SIGKILL, output[-3000:]
        fs.invalidate_cache()
        incomplete = {upload["Key"].rsplit("/", 1)[-1]
                      for upload in fs.list_multipart_uploads(s3_bucket)}
        if in_upload:
            kills += 1
            multipart_in_flight += bool(incomplete)
        if newest is not None:  # the run resumed from the newest complete checkpoint
            assert re.search(rf"loaded\s+{re.escape(url)}/ep{newest:03d}\.pth\s+\(epoch "
                             rf"{newest}\)", output), output[-3000:]
            resumed += 1
        for leftover in staging.iterdir() if staging.is_dir() else ():
            leftover.unlink()  # downloads of a killed process (it could not remove its own)
        # nothing partial is ever listed: every object's integrity record is complete
        after = list_remote_checkpoints(store, url)
        assert all(c.record is not None for c in after), after
        assert not incomplete & {c.path.name for c in after}, (incomplete, after)
    final = subprocess.Popen(
        [sys.executable, str(WORKER), url, str(BALLAST_MIB),
         str(max((c.record["epoch"] for c in after if c.record), default=0) + 1)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
        cwd=tmp_path, start_new_session=True)
    status, output = communicate_bounded(final, "the final run", RUN_TIMEOUT_S)
    assert status == 0 and "DONE" in output, output[-3000:]
    fs.invalidate_cache()
    assert fs.list_multipart_uploads(s3_bucket) == []  # the kills' uploads were aborted
    print(f"\nSIGKILL during upload: {kills} kills in {runs} runs ({multipart_in_flight} "
          f"with a multipart upload left incomplete, aborted at the next start); "
          f"{resumed} runs resumed from the newest complete checkpoint; every listing "
          "complete")
    assert multipart_in_flight >= 1
