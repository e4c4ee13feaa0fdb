"""Worker for tests/test_object_storage_kills.py: trains with an auto-save to ``s3://`` every
epoch until the test SIGKILLs it (during an upload), resuming from the newest complete
checkpoint each time it is started.

    python tests/remote_sigkill_worker.py URL BALLAST_MIB UNTIL_EPOCH

``AWS_ENDPOINT_URL`` and credentials come from the environment (moto's server), the staging
folder of downloads from ``NNHANDLER_STAGING_DIR``. A ballast state provider makes each
checkpoint large enough for a multipart upload of several parts (the test watches the
bucket's incomplete uploads). A watchdog ends a hung run.
"""

from __future__ import annotations

import faulthandler
import sys
from typing import Any

faulthandler.dump_traceback_later(200, exit=True)  # inside the test's limit

import torch  # noqa: E402
from nnh_testing import make_handler  # noqa: E402


class Ballast:
    """A large tensor in every checkpoint (restored like any state)."""

    state_key = "ballast"

    def __init__(self, mib: int) -> None:
        self.tensor = torch.zeros(mib * 2**18, dtype=torch.int32)

    def state_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tensor = state["tensor"]


def main() -> None:
    url, mib, until = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    handler = make_handler(n=16, validation=False)
    ballast = Ballast(mib)
    handler.register_state_provider(ballast)
    handler.auto_save(1, url, name="ep{epoch:03d}", keep_last=2)
    handler.train(until_epoch=until, resume="latest", seed=7, progress_bar=False)
    print(f"DONE epoch={handler.epoch}", flush=True)


if __name__ == "__main__":
    main()
