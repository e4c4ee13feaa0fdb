"""``NNHandler.load(..., train_data=, val_data=)`` (and ``load_latest``), the seed's resume
snippet run as a second script, and the one error that lists every piece ``train`` lacks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from nnh_testing import make_handler, regression_dataset
from torch import nn
from torch.utils.data import DataLoader

from nnhandler import ConfigurationError, NNHandler

ROOT = Path(__file__).resolve().parents[1]


def saved(tmp_path: Path, **handler_options: Any) -> tuple[NNHandler, Path]:
    handler = make_handler(**handler_options)
    handler.train(2, seed=3, progress_bar=False)
    return handler, handler.save(tmp_path / "ck.pth")


def test_load_with_datasets_trains_on_with_the_remembered_loader_arguments(
    tmp_path: Path,
) -> None:
    original, path = saved(tmp_path)
    loaded = NNHandler.load(path, device="cpu", train_data=regression_dataset(),
                            val_data=regression_dataset(32, seed=1))
    for which in ("train", "val"):
        spec, before = loaded.loaders.spec(which), original.loaders.spec(which)
        assert spec is not None and before is not None
        assert spec.config == before.config  # batch size, shuffle ... as recorded
    loaded.train(2, progress_bar=False)
    assert loaded.epoch == 4
    assert len(loaded.val_losses) == 4


def test_load_latest_forwards_the_datasets(tmp_path: Path) -> None:
    handler = make_handler()
    handler.auto_save(1, tmp_path / "auto")
    handler.train(2, seed=3, progress_bar=False)
    loaded = NNHandler.load_latest(tmp_path / "auto", device="cpu",
                                   train_data=regression_dataset())
    assert loaded.epoch == 2 and "train" in loaded.loaders and "val" not in loaded.loaders
    loaded.train(1, progress_bar=False)
    assert loaded.epoch == 3


@pytest.mark.parametrize(
    ("arguments", "pattern"),
    [
        ({"train_data": DataLoader(regression_dataset())},
         r"train_data=<DataLoader>\): pass the dataset"),
        ({"val_data": 5}, r"val_data=5\): not a map-style dataset"),
    ],
    ids=["dataloader", "int"],
)
@pytest.mark.parametrize("call", ["load", "load_latest"], ids=["load", "load_latest"])
def test_bad_load_data_is_refused_before_any_file_is_read(
    tmp_path: Path, arguments: dict[str, Any], pattern: str, call: str
) -> None:
    missing = tmp_path / "never-written"  # a read would be a different error
    with pytest.raises(TypeError, match=rf"NNHandler\.{call}\({pattern}"):
        getattr(NNHandler, call)(missing, **arguments)


def test_train_after_load_names_every_missing_piece_and_why(tmp_path: Path) -> None:
    handler = make_handler()
    handler.set_loss_fn(lambda output, target: nn.functional.mse_loss(output, target))
    handler.train(1, seed=0, progress_bar=False)
    path = handler.save(tmp_path / "lambda.pth")
    loaded = NNHandler.load(path, device="cpu")
    with pytest.raises(ConfigurationError) as info:
        loaded.train(1, progress_bar=False)
    message = str(info.value)
    assert message.startswith(f"cannot train without (loaded from {str(path)!r}):")
    assert "set_optimizer" not in message  # the optimizer came back
    assert "handler.set_loss_fn(loss) (the checkpoint's run trained with a loss function " \
           "that a checkpoint cannot record: a lambda" in message
    assert "NNHandler.load(path, train_data=dataset) or handler.set_train_loader(dataset" \
           in message
    assert loaded.epoch == 1


def test_a_fresh_handler_names_every_setter_at_once() -> None:
    handler = NNHandler(nn.Linear, device="cpu", in_features=4, out_features=1)
    with pytest.raises(ConfigurationError) as info:
        handler.train(1, progress_bar=False)
    lines = str(info.value).splitlines()
    assert lines == [
        "cannot train without:",
        "  - an optimizer (set_optimizer): handler.set_optimizer(torch.optim.Adam, lr=...)",
        "  - a loss function (set_loss_fn): handler.set_loss_fn(loss)",
        "  - a training dataset (set_train_loader): "
        "handler.set_train_loader(dataset, batch_size=...)",
    ]


# -- the seed's snippet, as two scripts -----------------------------------------------------------
_DEFINITIONS = """
import sys
import torch
from torch import nn
from torch.utils.data import TensorDataset
from nnhandler import NNHandler


class MyModel(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x)


def my_loss(output, target):
    return nn.functional.mse_loss(output, target)


def accuracy_fn(output, target):
    return float(((output - target).abs() < 0.5).float().mean())


def dataset(n, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


train_dataset, val_dataset = dataset(64, 0), dataset(32, 1)
"""

_FIRST = """
handler = NNHandler(model_class=MyModel, device="cpu",
                    logger_mode=NNHandler.LoggingMode.CONSOLE, hidden=64)
handler.set_optimizer(torch.optim.Adam, lr=1e-4)
handler.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=10)
handler.set_loss_fn(my_loss)
handler.set_train_loader(train_dataset, batch_size=16)
handler.set_val_loader(val_dataset, batch_size=64)
handler.add_metric("accuracy", accuracy_fn)
handler.auto_save(interval=10, save_path="checkpoints",
                  name="my_model_autosave_ep{epoch:03d}", overwrite=False)
handler.train(epochs=100)
"""

_RESUMES = {
    "set-train-loader": """
resumed = NNHandler.load("checkpoints/my_model_autosave_ep050.pth", device="cpu",
                         skip_optimizer=False)
resumed.set_train_loader(train_dataset, batch_size=16)
print("history", len(resumed.train_losses))
resumed.train(epochs=10)
print("epoch", resumed.epoch)
""",
    "load-train-data": """
resumed = NNHandler.load("checkpoints/my_model_autosave_ep050.pth", device="cpu",
                         train_data=train_dataset, val_data=val_dataset)
print("history", len(resumed.train_losses))
resumed.train(epochs=10)
print("epoch", resumed.epoch)
""",
}


def run_script(source: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = cwd / "script.py"
    script.write_text(textwrap.dedent(_DEFINITIONS) + textwrap.dedent(source), encoding="utf-8")
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The snippet's first script: 100 epochs, a checkpoint every 10."""
    directory = tmp_path_factory.mktemp("seed-snippet")
    completed = run_script(_FIRST, directory)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return directory


@pytest.mark.parametrize("resume", sorted(_RESUMES), ids=sorted(_RESUMES))
def test_the_seeds_resume_snippet_continues_training_in_a_second_script(
    first_run: Path, tmp_path: Path, resume: str
) -> None:
    shutil.copytree(first_run / "checkpoints", tmp_path / "checkpoints")
    uninterrupted = torch.load(tmp_path / "checkpoints" / "my_model_autosave_ep060.pth",
                               weights_only=True)["state"]["model"]
    completed = run_script(_RESUMES[resume], tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "history 50" in completed.stdout and "epoch 60" in completed.stdout
    resumed = torch.load(tmp_path / "checkpoints" / "my_model_autosave_ep060.pth",
                         weights_only=True)
    assert resumed["meta"]["epoch"] == 60
    # the loss came back by name (the script defines my_loss), the order of the data too:
    # epochs 51..60 equal the uninterrupted run's, bit for bit
    for key, tensor in uninterrupted.items():
        assert torch.equal(resumed["state"]["model"][key], tensor), key


def test_the_snippet_without_data_fails_with_the_one_error(first_run: Path,
                                                           tmp_path: Path) -> None:
    shutil.copytree(first_run / "checkpoints", tmp_path / "checkpoints")
    completed = run_script("""
resumed = NNHandler.load("checkpoints/my_model_autosave_ep050.pth", device="cpu")
resumed.train(epochs=100)
""", tmp_path)
    assert completed.returncode != 0
    assert "ConfigurationError: cannot train without (loaded from" in completed.stderr
    assert "a training dataset (set_train_loader): NNHandler.load(path, train_data=dataset)" \
           in completed.stderr
    assert "set_loss_fn" not in completed.stderr  # my_loss came back by name
