"""The original NNHandler's MNIST notebook, ported: train, auto-save, load, continue.

    python examples/mnist_basic.py                  # writes models/ in the current folder
    python examples/mnist_basic.py --out /tmp/mnist

This is ``notebooks/mnist_basic_example.ipynb`` of the original NNHandler (rouzib/NNHandler)
with the import changed and the renames of the docs page "Coming from NNHandler" applied; each
changed line says what it was (``# was: ...``). The one change that is not a rename: torchvision
and a download are not needed, the digits are drawn here (28x28 seven-segment digits with
random placement, stroke width and noise, generated deterministically), so the batches are
smaller than the notebook's 1024.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.utils.data import TensorDataset

# was: from src.nn_handler import NNHandler, ModelType, LoggingMode
from nnhandler import LoggingMode, NNHandler

#: the seven segments of a digit as (row0, col0, row1, col1) in a 20x12 box
_SEGMENTS = {"a": (0, 0, 0, 11), "b": (0, 11, 9, 11), "c": (10, 11, 19, 11),
             "d": (19, 0, 19, 11), "e": (10, 0, 19, 0), "f": (0, 0, 9, 0), "g": (9, 0, 9, 11)}
_DIGITS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg",
           "abcdfg"]


def digits(n: int, seed: int) -> TensorDataset:
    """``n`` digit images (1x28x28, normalised as the notebook's MNIST) and their labels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, 28, 28)
    labels = torch.randint(0, 10, (n,), generator=generator)
    for index, label in enumerate(labels.tolist()):
        top, left = torch.randint(2, 7, (2,), generator=generator).tolist()
        left += 4
        width = int(torch.randint(1, 3, (1,), generator=generator))
        for segment in _DIGITS[label]:
            r0, c0, r1, c1 = _SEGMENTS[segment]
            images[index, 0, top + r0:top + r1 + width, left + c0:left + c1 + width] = 1.0
    images += 0.2 * torch.randn(images.shape, generator=generator)
    images = (images.clamp(0, 1) - 0.1307) / 0.3081
    return TensorDataset(images, labels)


# 1. Define a NN architecture (as in the notebook)
class Net(nn.Module):
    def __init__(self) -> None:
        super(Net, self).__init__()  # noqa: UP008 (the notebook's code, unchanged)
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models"))
    out = parser.parse_args().out

    # 2. Get training and validation datasets
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    training_data = digits(600, seed=0)  # was: datasets.MNIST(root=..., train=True, ...)
    test_data = digits(200, seed=1)      # was: datasets.MNIST(root=..., train=False, ...)

    # 3. Initialize the NNHandler
    model = NNHandler(Net, device=device, logger_mode=LoggingMode.FILE,
                      log_file=out / "training.log")
    # was: NNHandler(Net, model_type=ModelType.CLASSIFICATION, device=device,
    #                logger_mode=LoggingMode.FILE, logger_filename=".../training.log",
    #                logger_level=logging.INFO, save_model_code=False)
    model.logger.setLevel(logging.INFO)  # was: logger_level=logging.INFO
    model.set_optimizer(optim.Adamax, lr=0.01)
    model.set_loss_fn(nn.functional.nll_loss)
    model.auto_save(1, out, "model_epoch_{epoch:02d}.pth", overwrite=True)
    model.set_train_loader(training_data, batch_size=32, shuffle=True)  # was: batch_size=1024
    model.set_val_loader(test_data, batch_size=100, shuffle=False)      # was: batch_size=1024

    # 4. Train the model
    model.train(5, validate_every=1)

    # 5. Load the model
    # was: weights_only=False (the file holds only tensors, numbers, strings, lists, dicts)
    print("checkpoint keys:", sorted(
        torch.load(out / "model_epoch_05.pth", weights_only=True).keys()))
    model = NNHandler.load(out / "model_epoch_05.pth", device,
                           train_data=training_data, val_data=test_data)
    print(f"loaded epoch {model.epoch}: {len(model.train_losses)} epochs of history")
    model.train(2)  # continues: epochs 6 and 7, auto-saved as before
    print("files:", sorted(p.name for p in out.glob("*.pth")))

    # 6. Plot results
    if importlib.util.find_spec("matplotlib") is not None:
        # was: model.plot_losses(True), which showed the plot (log y axis) through pyplot
        print("loss plot:", model.plot_losses(out / "losses.png", log_y_scale=True))
    else:
        print("loss plot: matplotlib is not installed (pip install 'nnhandler[plot]')")

    images, labels = next(iter(torch.utils.data.DataLoader(test_data, batch_size=20)))
    model.eval()
    with torch.no_grad():
        images = images.to(device)
        outputs = model(images)
    _, predicted = torch.max(outputs, 1)
    print("predicted:", predicted.tolist())
    print("labels:   ", labels.tolist())
    print(f"final validation loss {model.val_losses[-1]:.3f}; "
          f"{int((predicted.cpu() == labels).sum())}/20 of these digits right")
    # was: model.model_code; a checkpoint records the class by import path, never code
    config = torch.load(out / "model_epoch_07.pth", weights_only=True)["state"]["config"]
    print("model class:", config["model_class"])


if __name__ == "__main__":
    main()
