"""Launch detection, SLURM host parsing and the stop agreement hook (no process group)."""

from __future__ import annotations

from typing import Any

import pytest

from nnhandler import Callback, Event
from nnhandler.distributed import DistributedContext, detect_launch_environment, first_host
from nnhandler.events import EventDispatcher

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID",
                    "SLURM_NTASKS", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "MASTER_ADDR",
                    "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("node1", "node1"),
        ("gpu[003-005,010],cpu1", "gpu003"),
        ("gpu[003-005,010]", "gpu003"),
        ("a,b", "a"),
        ("x-y[1,2]", "x-y1"),
        ("n[7]", "n7"),
    ],
    ids=["single", "ranges-then-host", "ranges", "plain-list", "dash-in-name", "one-index"],
)
def test_first_host_of_a_slurm_node_list(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, None),
        ({"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}, (1, 0, 4)),
        ({"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"}, (3, 1, 4)),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),  # one SLURM task: not distributed
    ],
    ids=["nothing", "torchrun", "slurm", "slurm-single-task"],
)
def test_launch_detection(clean_env: pytest.MonkeyPatch, variables: dict[str, str],
                          expected: tuple[int, int, int] | None) -> None:
    for name, value in variables.items():
        clean_env.setenv(name, value)
    launch = detect_launch_environment()
    if expected is None:
        assert launch is None
    else:
        assert launch is not None
        assert (launch.rank, launch.local_rank, launch.world_size) == expected


def test_use_distributed_false_forces_one_process(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    assert DistributedContext.setup(False, None) == DistributedContext.single()


def test_use_distributed_true_without_a_launcher_is_an_error(
    clean_env: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError, match="use_distributed=True"):
        DistributedContext.setup(True, None)


def test_slurm_without_master_address_or_node_list_is_a_clear_error(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "2")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        DistributedContext.setup(None, None)


class _Recorder(Callback):
    def __init__(self, name: str, log: list[str], writer: bool = False) -> None:
        self.name, self.log = name, log
        self.is_checkpoint_writer = writer  # type: ignore[misc]

    def on_epoch_end(self, **kwargs: Any) -> None:
        self.log.append(self.name)


def test_before_writers_runs_between_ordinary_callbacks_and_writers() -> None:
    log: list[str] = []
    callbacks = [_Recorder("writer", log, writer=True), _Recorder("a", log), _Recorder("b", log)]
    dispatcher = EventDispatcher(callbacks)
    dispatcher.fire(Event.EPOCH_END, before_writers=lambda: log.append("agree"), epoch=1)
    assert log == ["a", "b", "agree", "writer"]
    log.clear()
    EventDispatcher([_Recorder("a", log)]).fire(
        Event.EPOCH_END, before_writers=lambda: log.append("agree"), epoch=1)
    assert log == ["a", "agree"]
