"""Loop overhead: ``NNHandler.train`` against a hand-written PyTorch loop doing the same work.

Both train the same architecture from the same initial weights on the same data with the same
optimizer; the handler has six callbacks registered (epoch-level hooks, as typical loggers and
monitors have), no validation, no progress bar and logs to a file. The hand-written loop keeps
its epoch loss on the device and reads it once per epoch, as the handler does. Rounds alternate
which loop runs first; the table shows medians.

    python -m benchmarks.loop_overhead [--rounds 11]
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nnhandler import Callback, NNHandler

from ._common import Row, interleaved_medians, section_main

__all__ = ["ManyLayers", "MidMLP", "TinyMLP", "run"]


class TinyMLP(nn.Module):
    """The worst case for overhead: a step takes about a hundred microseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MidMLP(nn.Module):
    """A step of a few milliseconds on a CPU core."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                                 nn.ReLU(), nn.Linear(1024, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ManyLayers(nn.Module):
    """Many small parameter tensors: ``layers`` residual ``Linear(width, width)`` blocks — 1,250
    parameter tensors by default (5,000 state tensors with Adam, ~12 MB), where any per-step
    cost proportional to the number of parameters shows."""

    def __init__(self, width: int = 40, layers: int = 625) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x)) + x
        return x


class EpochRecorder(Callback):
    """A typical epoch-level callback: keeps the last logs it saw."""

    def __init__(self) -> None:
        self.last: dict[str, Any] = {}

    def on_epoch_end(self, logs: dict[str, Any], **kwargs: Any) -> None:
        self.last = dict(logs)


CASES: dict[str, dict[str, Any]] = {
    "tiny MLP (32-64-1, batch 64)": dict(
        model=TinyMLP, features=32, targets=1, samples=8192, batch=64, epochs=8),
    "mid MLP (512-1024-1024-10, batch 128)": dict(
        model=MidMLP, features=512, targets=10, samples=4096, batch=128, epochs=2),
    "1,250 parameter tensors (625 x Linear(40, 40), batch 64)": dict(
        model=ManyLayers, features=40, targets=40, samples=640, batch=64, epochs=1,
        progress_bar=False),
}


def _dataset(features: int, targets: int, samples: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, features, generator=generator)
    if targets == 1:
        return TensorDataset(x, x.sum(dim=1, keepdim=True))
    return TensorDataset(x, torch.randint(0, targets, (samples,), generator=generator))


def _loss(targets: int) -> type[nn.Module]:
    return nn.MSELoss if targets == 1 else nn.CrossEntropyLoss


def hand_written(case: dict[str, Any]) -> Callable[[], object]:
    """A plain PyTorch loop over ``case``; each call trains ``case['epochs']`` more epochs."""
    torch.manual_seed(0)
    model = case["model"]()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = _loss(case["targets"])()
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(_dataset(case["features"], case["targets"], case["samples"]),
                        batch_size=case["batch"], shuffle=True, generator=generator)
    epoch_losses: list[float] = []

    def train() -> None:
        for _ in range(case["epochs"]):
            model.train()
            total = torch.zeros((), dtype=torch.float64)
            count = 0
            for x, y in loader:
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                total += loss.detach().double() * len(y)
                count += len(y)
            epoch_losses.append(float(total) / count)

    return train


def with_handler(case: dict[str, Any], log_dir: Path, callbacks: int = 6,
                 progress_bar: bool = False,
                 configure: Callable[[NNHandler], object] | None = None) -> Callable[[], object]:
    """The same work through ``NNHandler.train`` (``configure``: more set-up of the handler,
    e.g. an auto-saver)."""
    torch.manual_seed(0)
    handler = NNHandler(case["model"], device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
                        log_file=log_dir / "bench.log", use_distributed=False)
    handler.set_optimizer(torch.optim.Adam, lr=1e-3)
    handler.set_loss_fn(_loss(case["targets"]))
    handler.set_train_loader(_dataset(case["features"], case["targets"], case["samples"]),
                             batch_size=case["batch"], shuffle=True)
    for _ in range(callbacks):
        handler.add_callback(EpochRecorder())
    if configure is not None:
        configure(handler)

    def train() -> None:
        handler.train(case["epochs"], seed=0, progress_bar=progress_bar)

    return train


def run(rounds: int = 11) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name, case in CASES.items():
            contenders: dict[str, Callable[[], object]] = {
                "plain": hand_written(case),
                "handler": with_handler(case, Path(directory)),
            }
            with_bar = case.get("progress_bar", True)
            if with_bar:
                contenders["handler+bar"] = with_handler(case, Path(directory),
                                                         progress_bar=True)
            medians = interleaved_medians(contenders, rounds)
            target = {TinyMLP: 1.03, MidMLP: 1.01, ManyLayers: 1.02}[case["model"]]
            rows.append(Row("loop overhead", f"{name}, 6 callbacks", "hand-written loop",
                            medians["plain"], medians["handler"], target=target))
            if with_bar:
                rows.append(Row("loop overhead", f"{name}, 6 callbacks, progress bar",
                                "hand-written loop", medians["plain"],
                                medians["handler+bar"]))
    return rows


def main() -> None:
    section_main(__doc__, run, default_rounds=11)


if __name__ == "__main__":
    main()
