"""examples/custom_saver.py: a third-party saver on the public seam (best weights as
safetensors, a full checkpoint every N steps, an emergency checkpoint on SIGTERM), restored by
``NNHandler.load``, in the background, and on 2 gloo ranks."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_testing import DISTRIBUTED_MARKS, launch_scenario

from nnhandler import Callback, CheckpointSchemaError, NNHandler, Trainer, read_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from custom_saver import BestAndEveryN, build, dataset

safetensors_torch = pytest.importorskip("safetensors.torch")
OUT = Path("saver")
WORKER = Path(__file__).resolve().parent / "custom_saver_worker.py"


def saver_of(handler: NNHandler) -> BestAndEveryN:
    return next(c for c in handler.callbacks if isinstance(c, BestAndEveryN))


def test_it_writes_best_weights_and_a_checkpoint_every_n_steps() -> None:
    handler = build(OUT, background=False)
    handler.train(6, seed=0, progress_bar=False)  # 16 steps per epoch
    assert sorted(p.name for p in OUT.glob("step*.pth")) == ["step000040.pth", "step000080.pth"]
    assert read_checkpoint(OUT / "step000080.pth").meta["step"] == 80
    saver = saver_of(handler)
    best = safetensors_torch.load_file(str(OUT / "best.safetensors"))
    assert saver.best == min(handler.val_losses)
    assert saver.best_epoch == 1 + handler.val_losses.index(min(handler.val_losses))
    if saver.best_epoch == 6:  # the best weights are the final ones
        for name, tensor in handler.module.state_dict().items():
            assert torch.equal(best[name], tensor), name
    assert set(best) == set(handler.module.state_dict())


def test_the_file_brings_the_saver_back_and_a_passed_one_takes_its_state() -> None:
    handler = build(OUT, background=False)
    handler.train(6, seed=0, progress_bar=False)
    original = saver_of(handler)
    restored = saver_of(NNHandler.load(OUT / "step000080.pth"))  # through its factory
    assert (restored.best, restored.step_saves, restored.settings) == (
        read_checkpoint(OUT / "step000080.pth").state[original.state_key]["best"], 2,
        original.settings)
    mine = BestAndEveryN(OUT, every_n_steps=10)  # same key: replaces the file's, gets its state
    loaded = NNHandler.load(OUT / "step000080.pth", callbacks=[mine])
    assert saver_of(loaded) is mine and mine.step_saves == 2
    assert mine.settings.every_n_steps == 10  # its own configuration stays


def test_a_crafted_saver_state_is_refused_naming_the_field() -> None:
    handler = build(OUT, background=False)
    handler.train(3, seed=0, progress_bar=False)
    saver = saver_of(handler)
    state = handler.state_dict()
    state[saver.state_key] = {**state[saver.state_key], "every_n_steps": "often"}
    from nnhandler.checkpoint.envelope import write_checkpoint

    meta = read_checkpoint(OUT / "step000040.pth").meta
    write_checkpoint(Path("crafted.pth"), state, meta)
    with pytest.raises(CheckpointSchemaError, match="every_n_steps"):
        NNHandler.load("crafted.pth")


def test_background_writes_equal_synchronous_ones() -> None:
    for background in (False, True):
        handler = build(Path(f"run_{background}"), background)
        handler.train(6, seed=0, progress_bar=False)
    for name in ("step000040.pth", "step000080.pth"):
        sync, background = (read_checkpoint(Path(f"run_{b}") / name) for b in (False, True))
        assert sync.meta["step"] == background.meta["step"]
        for key, tensor in sync.state["model"].items():
            assert torch.equal(tensor, background.state["model"][key]), key


class SigtermAt(Callback):
    """Sends this process SIGTERM after optimizer step ``step`` (as a scheduler would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, handler: Trainer, **kwargs: Any) -> None:
        if handler.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_writes_an_emergency_checkpoint_that_resumes_exactly() -> None:
    uninterrupted = build(Path("full"), background=False)
    uninterrupted.train(3, seed=0, progress_bar=False)

    interrupted = build(OUT, background=False)
    interrupted.add_callback(SigtermAt(20))  # epoch 2, after its 4th batch
    interrupted.train(3, seed=0, progress_bar=False)
    assert interrupted.preempted
    emergency = OUT / "preempted_ep002_b00004.pth"
    assert emergency.is_file()

    resumed = NNHandler.load(emergency)
    resumed.set_train_loader(dataset(256, seed=0))  # datasets are never in the file
    resumed.set_val_loader(dataset(64, seed=1))
    resumed.train(until_epoch=3, seed=0, progress_bar=False)
    assert resumed.train_losses == uninterrupted.train_losses
    for name, tensor in uninterrupted.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], tensor), name


@DISTRIBUTED_MARKS[0]
@DISTRIBUTED_MARKS[1]
@pytest.mark.parametrize("mode", ["sync", "background"])
def test_it_runs_on_two_gloo_ranks(mode: str, tmp_path: Path) -> None:
    rank0, rank1 = launch_scenario(WORKER, mode, tmp_path / mode, 2, 120)
    assert rank0["state"] == rank1["state"]  # every rank decides alike
    assert rank0["files"] == rank1["files"] == ["best.safetensors", "step000040.pth"]
    assert rank0["group_still_works"] == rank1["group_still_works"] == 2.0
    assert read_checkpoint(tmp_path / mode / "saver" / "step000040.pth").meta["world_size"] == 2
