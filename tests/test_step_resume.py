"""Exact resume from a step checkpoint, over many shapes of run: for (batches per epoch,
gradient accumulation steps, ``every_n_steps``, which step checkpoint is "the last one before
the kill"), training straight through equals loading that step checkpoint into a fresh handler
and training on, bit for bit (parameters, optimizer and EMA state, history, step count), on
CPU with a seed. The step saves themselves change nothing: the same run without them ends
identically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from nnh_testing import assert_deep_equal, attach_loaders, make_handler

from nnhandler import NNHandler

BATCH = 4
EPOCHS = 2
SEED = 11
#: every case run here, for the report (examples of the property and the fixed ones)
CASES: list[tuple[int, int, int, int]] = []


def _train(directory: Path | None, batches: int, accumulation: int,
           every: int | None) -> NNHandler:
    handler = make_handler(n=BATCH * batches, batch_size=BATCH)
    if every is not None:
        assert directory is not None
        handler.auto_save(None, directory, name="s{step:04d}", every_n_steps=every)
    handler.train(EPOCHS, seed=SEED, progress_bar=False, ema_decay=0.5,
                  gradient_accumulation_steps=accumulation)
    return handler


def _final_state(handler: NNHandler) -> dict[str, Any]:
    ema = handler.ema_model
    return {"model": handler.module.state_dict(),
            "optimizer": handler.optimizer.state_dict() if handler.optimizer else None,
            "ema": None if ema is None else ema.state_dict(),
            "history": handler.history, "step": handler.global_step, "epoch": handler.epoch}


def _mid_epoch_steps(batches: int, accumulation: int, every: int) -> list[int]:
    """The steps saved inside an epoch (an epoch's last step is saved at its end)."""
    steps_per_epoch = -(-batches // accumulation)
    return [s for s in range(every, EPOCHS * steps_per_epoch + 1, every) if s % steps_per_epoch]


def _check(tmp: Path, batches: int, accumulation: int, every: int, kill: int) -> None:
    CASES.append((batches, accumulation, every, kill))
    directory = tmp / f"b{batches}-a{accumulation}-n{every}-k{kill}"
    reference = _train(directory, batches, accumulation, every)
    files = sorted(directory.glob("s*.pth"))
    mid_epoch = [f for f in files if torch.load(f, weights_only=True)["state"]["position"][
        "partial"] is not None]
    assert [int(f.stem[1:]) for f in mid_epoch] == _mid_epoch_steps(batches, accumulation, every)
    chosen = mid_epoch[kill % len(mid_epoch)]
    resumed = NNHandler.load(chosen, device="cpu")
    assert resumed.stopped_mid_epoch
    attach_loaders(resumed, n=BATCH * batches)
    resumed.train(until_epoch=EPOCHS, progress_bar=False)
    assert_deep_equal(_final_state(resumed), _final_state(reference), where=chosen.name)
    plain = _train(None, batches, accumulation, None)
    assert_deep_equal(_final_state(plain), _final_state(reference), where="without saves")


@settings(max_examples=20, deadline=None)
@given(batches=st.integers(2, 7), accumulation=st.integers(1, 3), every=st.integers(1, 4),
       kill=st.integers(0, 20))
def test_a_step_checkpoint_resumes_bit_exactly(tmp_path_factory: Any, batches: int,
                                              accumulation: int, every: int,
                                              kill: int) -> None:
    assume(_mid_epoch_steps(batches, accumulation, every))  # a step checkpoint to resume
    _check(tmp_path_factory.mktemp("steps"), batches, accumulation, every, kill)


def test_a_short_last_accumulation_group_and_a_save_in_it(tmp_path: Path) -> None:
    """7 batches in groups of 3: steps after batches 3, 6 and 7 (a group of one); saving every
    2 steps puts a checkpoint after batch 6 of epoch 1 and after batch 3 of epoch 2."""
    _check(tmp_path, 7, 3, 2, 1)
