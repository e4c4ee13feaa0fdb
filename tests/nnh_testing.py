"""Shared test helpers: small models, datasets and a ready-to-train handler factory.

Classes here live at module level so that checkpoints can reference them by import path
("nnh_testing:TinyNet"); subprocess tests put this directory on PYTHONPATH.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from nnhandler import NNHandler
from nnhandler.checkpoint.io import WRITER_ENV, checkpoint_io

#: the writer checkpoints are written with in this run (``NNHANDLER_WRITER``; see
#: nnhandler/checkpoint/io.py): tests of the fast writer's own layout skip under the other
FAST_WRITER_IN_USE = checkpoint_io().name == "fast"
fast_writer_only = pytest.mark.skipif(
    not FAST_WRITER_IN_USE,
    reason=f"asserts the fast writer's own file layout or write path; {WRITER_ENV} chose "
           "torch.save, which writes its own (zip64 end records, data descriptors, no O_DIRECT)")


class TinyNet(nn.Module):
    """4 -> hidden -> 1 regression net with dropout, so random streams matter."""

    def __init__(self, hidden: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BatchNormNet(nn.Module):
    """A net with buffers (BatchNorm running stats), for EMA with buffers."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mae(output: torch.Tensor, target: torch.Tensor) -> float:
    return float((output - target).abs().mean())


def regression_dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=generator)
    return TensorDataset(x, y)


def make_handler(
    *,
    model_class: type[nn.Module] = TinyNet,
    n: int = 64,
    batch_size: int = 8,
    validation: bool = True,
    scheduler: bool = True,
    metric: bool = True,
    init_seed: int = 0,
    **model_kwargs: Any,
) -> NNHandler:
    """A CPU handler with Adam, StepLR, MSE loss, an MAE metric and train/val loaders."""
    torch.manual_seed(init_seed)
    handler = NNHandler(model_class, device="cpu", log_file=Path("nnhandler.log"),
                        **model_kwargs)
    handler.set_optimizer(torch.optim.Adam, lr=1e-2)
    if scheduler:
        handler.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)
    handler.set_loss_fn(nn.MSELoss)
    if metric:
        handler.add_metric("mae", mae)
    handler.set_train_loader(regression_dataset(n), batch_size=batch_size, shuffle=True)
    if validation:
        handler.set_val_loader(regression_dataset(n // 2, seed=1), batch_size=16)
    return handler


def attach_loaders(handler: NNHandler, n: int = 64) -> None:
    """Datasets are never saved: a loaded handler gets them again (arguments remembered)."""
    handler.set_train_loader(regression_dataset(n))
    handler.set_val_loader(regression_dataset(n // 2, seed=1))


def checkpoint_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".pth")


def assert_same_tensors(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


#: keys that name *which run* wrote a state (drawn once per fresh run): an uninterrupted run and
#: a resumed one are two runs, so these differ by design while everything else is equal
RUN_IDENTITY_KEYS = frozenset({"run_id", "lineage"})


def without_run_identity(value: Any) -> Any:
    """``value`` with every dict key of :data:`RUN_IDENTITY_KEYS` removed (for comparing the
    files of two runs that must be equal apart from which run wrote them)."""
    if isinstance(value, dict):
        return type(value)((k, without_run_identity(v)) for k, v in value.items()
                           if k not in RUN_IDENTITY_KEYS)
    if isinstance(value, list):
        return [without_run_identity(item) for item in value]
    return value


def assert_deep_equal(a: Any, b: Any, where: str = "state") -> None:
    """Bitwise: tensors by dtype, shape and content; floats by exact equality. Dict keys in
    :data:`RUN_IDENTITY_KEYS` must be present on both sides; their values are not compared."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for key in a:
            if key in RUN_IDENTITY_KEYS:
                continue
            assert_deep_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_deep_equal(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def tensors_of(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value`` (nested dicts, lists, tuples), in traversal order."""
    found: list[torch.Tensor] = []

    def walk(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, dict):
            for child in item.values():
                walk(child)
        elif isinstance(item, (list, tuple)):
            for child in item:
                walk(child)

    walk(value)
    return found


class Ballast:
    """A state provider holding one large tensor."""

    state_key = "ballast"

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def state_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tensor = state["tensor"]


def free_port() -> int:
    """A TCP port that was free a moment ago (for a MASTER_PORT of a test's process group)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
# -- plugins -----------------------------------------------------------------------------------
PLUGIN_SRC = Path(__file__).resolve().parents[1] / "plugins" / "nnhandler-sde" / "src"
SDE_ENTRY_POINT = ("sde", "nnhandler_sde.plugin:register")


def write_dist_info(directory: Path, distribution: str, entry_points: dict[str, str],
                    group: str = "nnhandler.plugins", version: str = "0.0.0") -> Path:
    """A real (minimal) installed-distribution record in ``directory``: ``METADATA`` and
    ``entry_points.txt``, as pip writes them. With ``directory`` on ``sys.path`` (or
    PYTHONPATH), ``importlib.metadata.entry_points`` finds the entry points."""
    info = directory / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n", encoding="utf-8")
    lines = [f"[{group}]", *(f"{name} = {value}" for name, value in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def sde_plugin_installed() -> bool:
    """Whether the nnhandler-sde plugin's entry point is installed (``pip install -e
    plugins/nnhandler-sde``); tests register it through a temporary dist-info otherwise."""
    import importlib.metadata

    found = importlib.metadata.entry_points(group="nnhandler.plugins", name=SDE_ENTRY_POINT[0])
    return any(ep.value == SDE_ENTRY_POINT[1] for ep in found)
