"""Checkpoints in object storage: auto-save to ``s3://``, resume from the newest, export weights.

    python examples/remote_checkpoints.py                  # a local S3 server (moto), in-process
    python examples/remote_checkpoints.py --endpoint http://127.0.0.1:9000 --bucket my-bucket

Needs ``pip install "nnhandler[remote]"`` (fsspec, s3fs). Without ``--endpoint`` the script
starts moto's S3 server on 127.0.0.1 itself (``pip install "moto[server]"``), so it runs with
nothing else; with ``--endpoint`` it uses that server (MinIO, Ceph, …) and the credentials of
the environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``).

What it does is what a preemptible cloud job does: the first run auto-saves every epoch to
``s3://BUCKET/PREFIX`` in the background (``async_save``), keeping the last two; ``nnhandler
list`` shows the objects; a second run (the restarted job) continues from the newest one with
``train(resume="latest")``; the final weights are exported to the bucket and read back with
plain torch. The endpoint is given the standard way, ``AWS_ENDPOINT_URL``: no code names it,
and a handler restored by ``load`` finds the store again (``storage_options`` are never saved).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import TensorDataset

from nnhandler import NNHandler
from nnhandler.cli import main as nnhandler_cli


def regression_data(n: int = 256) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=generator)
    return TensorDataset(x, x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1,
                                                                          generator=generator))


class Regressor(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def make_handler() -> NNHandler:
    handler = NNHandler(Regressor, device="cpu", seed=0)
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_loss_fn(nn.MSELoss)
    handler.set_train_loader(regression_data(), batch_size=32, shuffle=True)
    return handler


@contextmanager
def s3_endpoint(endpoint: str | None) -> Iterator[str]:
    """``endpoint``, or that of a moto S3 server started here (with test credentials)."""
    if endpoint is not None:
        yield endpoint
        return
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        sys.exit('no --endpoint given and moto is not installed: pip install "moto[server]"')
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(name, value)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def object_names(url: str) -> list[str]:
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    return sorted(path.rsplit("/", 1)[-1] for path in fs.ls(url, detail=False))


def run(bucket: str, prefix: str, epochs: int) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    url = f"s3://{bucket}/{prefix}"

    first = make_handler()  # the first job: auto-saves every epoch, uploads in the background
    first.auto_save(1, url, name="ep{epoch:03d}", keep_last=2, async_save=True)
    first.train(epochs=epochs, progress_bar=False)
    print(f"first run: {first.epoch} epochs, objects {object_names(url)}")

    nnhandler_cli(["list", url])  # what load_latest would take, each object verified

    second = make_handler()  # the restarted job: the same script, resumed from the newest
    second.auto_save(1, url, name="ep{epoch:03d}", keep_last=2, async_save=True)
    second.train(until_epoch=epochs + 2, resume="latest", progress_bar=False)
    print(f"second run resumed: epoch {second.epoch}, {len(second.train_losses)} epochs of "
          f"history, objects {object_names(url)}")

    latest = NNHandler.load_latest(url, device="cpu")
    exported = latest.export(f"{url}/final-weights.pth")
    weights = torch.load(io.BytesIO(fs.cat_file(exported)), weights_only=True)
    model = Regressor()  # the user's own model, no nnhandler needed
    model.load_state_dict(weights)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 latest.module.state_dict().values(),
                                                 strict=True))
    print(f"exported {exported}: plain torch loads it, same weights as epoch {latest.epoch}: "
          f"{same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", help="S3 endpoint URL (default: start moto's server)")
    parser.add_argument("--bucket", default="nnhandler-example")
    parser.add_argument("--prefix", default="run")
    parser.add_argument("--epochs", type=int, default=3)
    arguments = parser.parse_args()
    with s3_endpoint(arguments.endpoint) as endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint  # the standard configuration: no code needed
        print(f"S3 endpoint: {endpoint}")
        run(arguments.bucket, arguments.prefix, arguments.epochs)


if __name__ == "__main__":
    main()
