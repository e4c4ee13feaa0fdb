"""Training history (losses, metrics, per-epoch logs) and progress counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import Field

from ..checkpoint.schema import LogValue, Schema, validate

__all__ = ["History", "Progress"]




class HistoryRecord(Schema):
    """What a checkpoint's ``history`` state may hold."""

    train_losses: list[float]
    val_losses: list[float]
    train_metrics: dict[str, list[float]]
    val_metrics: dict[str, list[float]]
    epoch_logs: list[dict[str, LogValue]]


class ProgressRecord(Schema):
    """What a checkpoint's ``progress`` state may hold."""

    epoch: Annotated[int, Field(ge=0)]
    step: Annotated[int, Field(ge=0)]
    run_seed: Annotated[int, Field(ge=0, lt=2**63)] | None
    run_id: Annotated[str, Field(pattern=r"^[0-9a-f]{1,64}$")] | None = None


@dataclass
class History:
    """Per-epoch results as plain Python floats, identical on every rank.

    ``val_losses`` and ``val_metrics`` get an entry only on epochs that validate; ``epoch_logs``
    holds every epoch's full log dict (with its ``epoch`` number) for alignment.
    """

    state_key: str = "history"
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    train_metrics: dict[str, list[float]] = field(default_factory=dict)
    val_metrics: dict[str, list[float]] = field(default_factory=dict)
    epoch_logs: list[dict[str, Any]] = field(default_factory=list)

    def record(self, logs: dict[str, Any], metric_names: list[str]) -> None:
        self.train_losses.append(float(logs["loss"]))
        for name in metric_names:
            if name in logs:
                self.train_metrics.setdefault(name, []).append(float(logs[name]))
        if "val_loss" in logs:
            self.val_losses.append(float(logs["val_loss"]))
            for name in metric_names:
                if f"val_{name}" in logs:
                    self.val_metrics.setdefault(name, []).append(float(logs[f"val_{name}"]))
        self.epoch_logs.append({k: v for k, v in logs.items() if is_plain(v)})

    def update_last(self, logs: dict[str, Any]) -> None:
        """Merge the (plain) values of ``logs`` into the latest epoch's entry: keys that
        epoch-end callbacks added after :meth:`record` reach the history too."""
        self.epoch_logs[-1].update({k: v for k, v in logs.items() if is_plain(v)})

    def state_dict(self) -> dict[str, Any]:
        return {
            "train_losses": list(self.train_losses),
            "val_losses": list(self.val_losses),
            "train_metrics": {k: list(v) for k, v in self.train_metrics.items()},
            "val_metrics": {k: list(v) for k, v in self.val_metrics.items()},
            "epoch_logs": [dict(logs) for logs in self.epoch_logs],
        }

    @staticmethod
    def check_state(state: Any) -> None:
        validate(HistoryRecord, state, where="")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_losses = [float(x) for x in state["train_losses"]]
        self.val_losses = [float(x) for x in state["val_losses"]]
        self.train_metrics = {k: [float(x) for x in v] for k, v in state["train_metrics"].items()}
        self.val_metrics = {k: [float(x) for x in v] for k, v in state["val_metrics"].items()}
        self.epoch_logs = [dict(logs) for logs in state["epoch_logs"]]


def is_plain(value: Any) -> bool:
    """Whether a log value is kept in the history (and in CSV rows): None, bool, int, float, str."""
    return value is None or isinstance(value, (int, float, str, bool))


@dataclass
class Progress:
    """Absolute counters: completed epochs, optimizer steps, the run's seed and its id.

    ``run_id`` is drawn once when a fresh run starts (``train`` on a handler with no run yet)
    and restored by every resume: it names the run's *lineage*, which is how auto-save tells
    its own files from another run's files of the same name (two fresh runs with one seed
    still get different ids).
    """

    state_key: str = "progress"
    epoch: int = 0
    step: int = 0
    run_seed: int | None = None
    run_id: str | None = None

    @property
    def lineage(self) -> str:
        """The run's lineage as checkpoints record it: ``run:<run_id>``; ``seed:<run_seed>``
        for progress restored from a file written before run ids existed; ``""`` before the
        first ``train`` (no run yet: no file is ever this lineage's)."""
        if self.run_id is not None:
            return f"run:{self.run_id}"
        return f"seed:{self.run_seed}" if self.run_seed is not None else ""

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "run_seed": self.run_seed,
                "run_id": self.run_id}

    @staticmethod
    def check_state(state: Any) -> None:
        validate(ProgressRecord, state, where="")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.run_seed = None if state["run_seed"] is None else int(state["run_seed"])
        self.run_id = state.get("run_id")  # files written before run ids existed have none
