from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_testing import torchrun
from nnh_testing import attach_loaders, checkpoint_files, make_handler

from nnhandler import NNHandler


def test_train_save_load_resume_is_bit_exact(tmp_path: Path) -> None:
    full = make_handler()
    full.train(6, seed=3, ema_decay=0.9, gradient_accumulation_steps=3, progress_bar=False)

    part = make_handler()
    part.auto_save(2, "ck", name="m_ep{epoch:03d}")
    part.train(4, seed=3, ema_decay=0.9, gradient_accumulation_steps=3, progress_bar=False)
    assert checkpoint_files(tmp_path / "ck") == ["m_ep002.pth", "m_ep004.pth"]

    resumed = NNHandler.load("ck/m_ep004.pth")
    attach_loaders(resumed)
    resumed.train(2, seed=3, progress_bar=False)
    assert resumed.train_losses == full.train_losses
    for key, value in full.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[key]), key


def test_a_torch_distributed_launch_needs_the_distributed_marker() -> None:
    """The conftest hook names this (unmarked) test as the current one: building a torchrun
    command from it fails, so no multi-process run hides in the quick subset."""
    with pytest.raises(pytest.fail.Exception, match="not marked distributed"):
        torchrun(2, Path("worker.py"))
