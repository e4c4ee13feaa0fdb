from __future__ import annotations

from pathlib import Path

import torch
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
