"""ScoreSDE as a state provider: what every checkpoint records, re-creation by NNHandler.load
through the plugin's entry point, and a resume that samples exactly like the uninterrupted run."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import nnhandler_sde
import pytest
import torch
from nnh_testing import SDE_ENTRY_POINT, sde_plugin_installed
from nnhandler_sde import (
    VESDE,
    VPSDE,
    DenoisingScoreMatchingLoss,
    EulerMaruyamaSampler,
    NoisedDataset,
    ScoreSDE,
    find_score_sde,
)
from torch import nn
from torch.utils.data import TensorDataset

from nnhandler import NNHandler, read_checkpoint

SDE = VPSDE(0.1, 20.0)
SAMPLER = EulerMaruyamaSampler(steps=10, corrector_steps=1)


class TinyScore(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Dropout(0.1),
                                 nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], dim=1))


def dataset() -> NoisedDataset:
    clean = torch.randn(96, 2, generator=torch.Generator().manual_seed(0)) * 0.5 + 1.0
    return NoisedDataset(TensorDataset(clean), SDE)


def new_handler(**score_sde: Any) -> tuple[NNHandler, ScoreSDE]:
    torch.manual_seed(0)
    handler = NNHandler(TinyScore, device="cpu")
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    handler.set_loss_fn(DenoisingScoreMatchingLoss)
    handler.set_train_loader(dataset(), batch_size=32, shuffle=True)
    callback = ScoreSDE(SDE, (2,), SAMPLER, **{"seed": 11, "sample_every": 1,
                                                "num_samples": 8, **score_sde})
    handler.add_callback(callback)
    return handler, callback


def test_every_checkpoint_records_configuration_generator_and_count() -> None:
    handler, callback = new_handler()
    handler.auto_save(1, "ck", name="ep{epoch}")
    handler.train(2, seed=0, progress_bar=False)
    saved = read_checkpoint("ck/ep2.pth").state["sde"]
    assert saved["sde"] == {"kind": "vp", "beta_min": 0.1, "beta_max": 20.0}
    assert saved["sampler"] == {"steps": 10, "eps": 1e-3, "corrector_steps": 1, "snr": 0.16}
    assert (saved["data_shape"], saved["seed"], saved["sample_every"]) == ([2], 11, 1)
    assert saved["samples_drawn"] == 16 == callback.samples_drawn
    assert torch.equal(saved["generator"], callback.generator.get_state())
    first = read_checkpoint("ck/ep1.pth").state["sde"]
    assert first["samples_drawn"] == 8
    assert not torch.equal(first["generator"], saved["generator"])
    assert all(math.isfinite(entry["sample_mean"]) and math.isfinite(entry["sample_std"])
               for entry in handler.history)
    assert len(handler.history) == 2


@pytest.mark.usefixtures("sde_entry_point")
def test_load_recreates_it_through_the_entry_point_and_the_resume_is_exact() -> None:
    full, full_sde = new_handler()
    full.train(4, seed=0, progress_bar=False)

    part, _ = new_handler()
    part.auto_save(2, "ck", name="ep{epoch}")
    part.train(2, seed=0, progress_bar=False)
    resumed = NNHandler.load("ck/ep2.pth")  # no callbacks passed
    restored = find_score_sde(resumed)
    assert (restored.sde, restored.sampler, restored.samples_drawn) == (SDE, SAMPLER, 16)
    assert restored.options == full_sde.options
    resumed.set_train_loader(dataset())
    resumed.train(2, seed=0, progress_bar=False)

    assert resumed.history == full.history  # sample_mean / sample_std of every epoch included
    assert restored.samples_drawn == full_sde.samples_drawn == 32
    assert torch.equal(restored.generator.get_state(), full_sde.generator.get_state())
    assert torch.equal(restored.sample(resumed, 5), full_sde.sample(full, 5))


@pytest.mark.usefixtures("sde_entry_point")
def test_named_instances_come_back_under_their_names() -> None:
    handler, _ = new_handler(name="vp")
    handler.add_callback(ScoreSDE(VESDE(0.01, 5.0), (2,), seed=3, name="ve"))
    handler.train(1, seed=0, progress_bar=False)
    handler.save("both.pth")
    loaded = NNHandler.load("both.pth")
    assert find_score_sde(loaded, "vp").sde == SDE
    assert find_score_sde(loaded, "ve").sde == VESDE(0.01, 5.0)
    with pytest.raises(LookupError, match="no ScoreSDE on"):
        find_score_sde(loaded)


def test_the_checkpoints_configuration_replaces_a_different_one_with_a_warning() -> None:
    handler, callback = new_handler()
    handler.train(1, seed=0, progress_bar=False)
    handler.save("vp.pth")
    other = ScoreSDE(VESDE(), (2,), seed=99)
    with pytest.warns(UserWarning, match="the checkpoint's configuration replaces"):
        NNHandler.load("vp.pth", callbacks=[other])
    assert (other.sde, other.sampler, other.options) == (SDE, SAMPLER, callback.options)
    assert torch.equal(other.generator.get_state(), callback.generator.get_state())


def test_sampling_uses_the_ema_weights_and_restores_the_training_mode() -> None:
    handler, callback = new_handler(sample_every=None)
    handler.train(2, seed=0, ema_decay=0.5, progress_bar=False)
    state = callback.generator.get_state()
    with_ema = callback.sample(handler, 4)
    callback.generator.set_state(state)
    raw = callback.sample(handler, 4, use_ema=False)
    assert not torch.equal(with_ema, raw)
    assert handler.module.training
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        callback.sample(handler, 0)


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"sde": "vp"}, TypeError, "sde must be a VPSDE or VESDE"),
        ({"data_shape": ()}, ValueError, "data_shape"),
        ({"data_shape": (0,)}, ValueError, "data_shape"),
        ({"name": "a:b"}, ValueError, "name"),
        ({"sample_every": 0}, ValueError, "sample_every"),
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"sampler": "euler"}, TypeError, "sampler must be an EulerMaruyamaSampler"),
    ],
    ids=["sde", "empty-shape", "zero-dim", "colon-name", "sample-every", "num-samples",
         "sampler"],
)
def test_bad_arguments(arguments: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ScoreSDE(**{"sde": SDE, "data_shape": (2,), **arguments})


def test_the_plugin_uses_only_nnhandlers_public_api() -> None:
    source = Path(nnhandler_sde.__file__).parent
    for module in source.glob("*.py"):
        text = module.read_text()
        assert not re.search(r"^\s*(from|import) nnhandler\.", text, re.MULTILINE), module
    imported = re.findall(r"^from nnhandler import (.+)$",
                          "\n".join(m.read_text() for m in source.glob("*.py")), re.MULTILINE)
    import nnhandler

    names = {name.strip() for line in imported for name in line.split(",")}
    assert names and names <= set(nnhandler.__all__)


def test_the_installed_plugin_is_registered_under_nnhandler_plugins() -> None:
    if not sde_plugin_installed():
        pytest.skip("nnhandler-sde is not installed: pip install -e plugins/nnhandler-sde")
    from importlib.metadata import entry_points

    (entry_point,) = entry_points(group="nnhandler.plugins", name=SDE_ENTRY_POINT[0])
    assert entry_point.load() is nnhandler_sde.plugin.register
