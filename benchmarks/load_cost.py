"""Load: ``NNHandler.load`` (integrity verified) against ``torch.load`` plus building the model
and optimizer by hand from a plain ``torch.save`` of the same state dicts, at torch threads 1
and 2; wall-time medians, and the least CPU time of the rounds (what a shared machine moves
least). ``load`` does not draw the random initial values the file overwrites
(``nnhandler.skipped_init``), so two more rows show what is left without that: against a
by-hand load that skips them too (the model built on the meta device, the file's tensors
assigned) and against ``load(verify=False)`` (the cost of the CRC-32 itself).

Both files sit in the page cache (as right after training), so this is CPU cost.

    python -m benchmarks.load_cost [--rounds 9]
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from nnhandler import NNHandler
from nnhandler.checkpoint.content import check_config, check_envelope
from nnhandler.checkpoint.integrity import read_integrity_record
from nnhandler.checkpoint.ziplayout import check_zip_layout
from nnhandler.components.rng import RNGState

from ._common import Row, interleaved_medians, section_main
from .end_to_end import torch_threads

__all__ = ["WideMLP", "run"]


class WideMLP(nn.Module):
    """~8.4 M parameters: with Adam's two moments about 100 MB of state."""

    def __init__(self, width: int = 2048, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _trained_handler(log_dir: Path) -> NNHandler:
    torch.manual_seed(0)
    handler = NNHandler(WideMLP, device="cpu", logger_mode=NNHandler.LoggingMode.FILE,
                        log_file=log_dir / "bench.log", use_distributed=False)
    handler.set_optimizer(torch.optim.Adam, lr=1e-3)
    handler.set_loss_fn(nn.MSELoss)
    x = torch.randn(16, 2048)
    handler.set_train_loader(torch.utils.data.TensorDataset(x, x), batch_size=16)
    handler.train(1, seed=0, progress_bar=False)  # so the optimizer has its moments
    return handler


def _trust_boundary_checks(path: Path, envelope: dict[str, object],
                           loaded: NNHandler) -> None:
    """Everything ``load`` checks because a file is untrusted data, on a file already read:
    the zip layout, the integrity record's, envelope's and configuration's schemas, and every
    component's ``check_state`` (model and optimizer against the live ones)."""
    check_zip_layout(path)
    read_integrity_record(path)
    check_envelope(envelope, str(path))
    state = envelope["state"]
    assert isinstance(state, dict)
    check_config(state["config"], str(path))
    for key, value in state.items():
        provider = loaded.state_registry.get(key) if key != "rng" else None
        check = getattr(provider, "check_state", None)
        if check is not None:
            check(value)
    RNGState.check_state(state["rng"])


def _cpu_minimums(actions: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Least process CPU seconds (all threads) per action over ``rounds`` interleaved rounds:
    on a shared machine the figure other jobs move least (wall time waits for a core)."""
    names = list(actions)
    best = dict.fromkeys(names, float("inf"))
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            started = time.process_time()
            actions[name]()
            best[name] = min(best[name], time.process_time() - started)
    return best


def run(rounds: int = 9) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        handler = _trained_handler(folder)
        ours_path = handler.save(folder / "nnhandler.pth")
        optimizer = handler.optimizer
        assert optimizer is not None
        plain_path = folder / "plain.pth"
        torch.save({"model": handler.module.state_dict(),
                    "optimizer": optimizer.state_dict()}, plain_path)
        size_mb = ours_path.stat().st_size / 1e6

        def by_hand() -> object:
            state = torch.load(plain_path, weights_only=True)
            model = WideMLP()
            model.load_state_dict(state["model"])
            built = torch.optim.Adam(model.parameters(), lr=1e-3)
            built.load_state_dict(state["optimizer"])
            return model, built

        def by_hand_without_init() -> object:
            state = torch.load(plain_path, weights_only=True)
            with torch.device("meta"):  # no random initial values: the file's are assigned
                model = WideMLP()
            model.load_state_dict(state["model"], assign=True)
            built = torch.optim.Adam(model.parameters(), lr=1e-3)
            built.load_state_dict(state["optimizer"])
            return model, built

        quiet = {"logger_mode": NNHandler.LoggingMode.FILE, "log_file": folder / "bench.log"}
        actions: dict[str, Callable[[], object]] = {
            "by hand": by_hand,
            "by hand, no init": by_hand_without_init,
            "NNHandler.load": lambda: NNHandler.load(ours_path, device="cpu", **quiet),
            "NNHandler.load(verify=False)": lambda: NNHandler.load(ours_path, device="cpu",
                                                                   verify=False, **quiet),
        }
        loaded = NNHandler.load(ours_path, device="cpu", verify=False, **quiet)
        envelope = torch.load(ours_path, weights_only=True, mmap=True)
        checks = {"trust-boundary checks": lambda: _trust_boundary_checks(
            ours_path, envelope, loaded)}
        case = f"{size_mb:.0f} MB (8.4 M params + Adam)"
        for threads in (1, 2):
            with torch_threads(threads):
                medians = interleaved_medians(actions, rounds)
                # apart from the loads: right after one, whatever runs first pays the first
                # touch of the memory it freed (transparent huge pages: ~2-3 ms on this VM),
                # which a load pays anyway, checks or not
                medians.update(interleaved_medians(checks, rounds))
                cpu = _cpu_minimums(actions, rounds)
            at = f"{case}, torch threads {threads}"
            if threads == 1:
                unchecked = (medians["NNHandler.load(verify=False)"]
                             - medians["trust-boundary checks"])
                rows.append(Row("load", f"{at}, schema checks",
                                "load(verify=False) less its checks", unchecked,
                                medians["NNHandler.load(verify=False)"], target=1.02))
            rows += [
                Row("load", at, "torch.load + build by hand", medians["by hand"],
                    medians["NNHandler.load"], target=1.1),
                Row("load", f"{at}, CPU time (min of {rounds})", "torch.load + build by hand",
                    cpu["by hand"], cpu["NNHandler.load"], target=1.1),
                Row("load", f"{at}, verify=False", "torch.load + build by hand",
                    medians["by hand"], medians["NNHandler.load(verify=False)"]),
                Row("load", f"{at}, against a model built on meta",
                    "torch.load + meta model, assign=True", medians["by hand, no init"],
                    medians["NNHandler.load"]),
                Row("load", f"{at}, verify=True against verify=False",
                    "NNHandler.load(verify=False)", medians["NNHandler.load(verify=False)"],
                    medians["NNHandler.load"]),
            ]
    return rows


def main() -> None:
    section_main(__doc__, run, default_rounds=9)


if __name__ == "__main__":
    main()
