"""Export the model's weights alone, as a plain state dict that plain ``torch`` loads.

``torch.load(path, weights_only=True)`` gives ``{parameter/buffer name: tensor}`` on the CPU,
ready for ``model.load_state_dict(...)`` on the user's own model — no nnhandler needed, no
wrapper prefixes (``module.`` of DDP or of the EMA's ``AveragedModel``, ``_orig_mod.`` of
``torch.compile``), no EMA bookkeeping (``n_averaged``). The file also carries nnhandler's
integrity record, of kind ``"export"``: ``nnhandler verify`` checks its CRC-32 and says what it
is, and ``load_latest`` never takes it for a checkpoint. ``path`` may be an fsspec URL: the file
is written locally and published whole, as a checkpoint is (:mod:`.checkpoint.remote`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint.envelope import write_with_record
from .checkpoint.storage import URL, location_of, store_for
from .components import unwrap_model
from .distributed import run_on_rank_zero
from .errors import ConfigurationError

if TYPE_CHECKING:
    from .handler import NNHandler

__all__ = ["export_weights", "model_weights"]


def model_weights(handler: NNHandler, ema: bool = False) -> dict[str, torch.Tensor]:
    """The unwrapped model's state dict on the CPU: the raw training weights, or with
    ``ema=True`` the EMA weights (a :class:`~nnhandler.ConfigurationError` without an EMA)."""
    if ema:
        averaged = handler.ema_model
        if averaged is None:
            raise ConfigurationError(
                "export(ema=True): this handler has no EMA model; train with ema_decay > 0 "
                "(or load a checkpoint that has one), or export the raw weights with ema=False"
            )
        module = averaged.module  # the averaged copy itself: no "module." prefix, no n_averaged
    else:
        module = handler.module
    return {name: tensor.detach().to("cpu") for name, tensor in
            unwrap_model(module).state_dict().items()}


def export_weights(handler: NNHandler, path: str | os.PathLike[str], ema: bool = False,
                   storage_options: Mapping[str, Any] | None = None) -> Path | URL:
    """Write :func:`model_weights` to ``path`` atomically (rank 0 under DDP; every rank returns
    once the file is there, or raises rank 0's error). A URL (``storage_options`` for fsspec)
    is published by the store (:meth:`~.checkpoint.remote.FsspecStore.publish`: streamed into a
    multipart upload on S3, a local staging file uploaded whole elsewhere): never visible
    partially."""
    target = location_of(path)
    store = store_for(target, storage_options)  # local: options are refused, naming them
    if isinstance(target, Path) and target.is_dir():
        raise ConfigurationError(f"export path {str(target)!r} is a directory")
    weights = model_weights(handler, ema)

    def write() -> None:
        if isinstance(target, URL):  # rank 0 alone asks the store
            if store.is_dir(target):
                raise ConfigurationError(f"export path {str(target)!r} is a directory")
            store.publish(target, lambda local: write_with_record(local, weights,
                                                                  {"kind": "export"}))
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        write_with_record(target, weights, {"kind": "export"})

    run_on_rank_zero(handler.distributed, write)
    return target
