"""Launch detection, SLURM host parsing, device choice, single-process runs under launcher
variables (``use_distributed=False``; one SLURM task) and the stop agreement hook."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from nnh_testing import free_port, make_handler
from torch import nn

from nnhandler import Callback, ConfigurationError, Event, distributed, read_checkpoint
from nnhandler.distributed import (
    DistributedContext,
    detect_launch_environment,
    first_host,
    local_cuda_index,
)
from nnhandler.events import EventDispatcher

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                    "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS",
                    "SLURM_JOB_NODELIST", "SLURM_NODELIST", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No launcher variables; whatever a test (or the handler's set-up, which fills in RANK,
    MASTER_ADDR …) adds is removed again afterwards."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.setenv(name, "")  # recorded, so the original state is restored at the end
        monkeypatch.delenv(name)
    yield monkeypatch
    if dist.is_initialized():
        dist.destroy_process_group()


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
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (0, 0, 1)),
        # srun torchrun ...: one SLURM task per node, torchrun's ranks win
        ({"SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "RANK": "9",
          "LOCAL_RANK": "1", "WORLD_SIZE": "16"}, (9, 1, 16)),
    ],
    ids=["nothing", "torchrun", "slurm", "slurm-single-task", "torchrun-under-srun"],
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


def _unreachable_rendezvous(clean_env: pytest.MonkeyPatch) -> None:
    # a rendezvous would fail fast here: nothing listens and the address does not resolve
    clean_env.setenv("MASTER_ADDR", "no-such-host.invalid")
    clean_env.setenv("MASTER_PORT", "1")


@pytest.mark.parametrize(
    "variables",
    [{"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"},
     {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
      "SLURM_JOB_NODELIST": "gpu[01-02]"}],
    ids=["torchrun", "slurm"],
)
def test_handler_with_use_distributed_false_trains_alone_under_launcher_variables(
    clean_env: pytest.MonkeyPatch, variables: dict[str, str],
) -> None:
    _unreachable_rendezvous(clean_env)
    for name, value in variables.items():
        clean_env.setenv(name, value)
    handler = make_handler(n=16, use_distributed=False)
    assert handler.distributed == DistributedContext.single()
    assert not isinstance(handler.model, nn.parallel.DistributedDataParallel)
    handler.auto_save(1, "ck", name="ep{epoch:03d}")
    handler.train(1, seed=0, progress_bar=False)
    assert not dist.is_initialized()
    assert read_checkpoint(Path("ck/ep001.pth")).meta["world_size"] == 1


def test_one_slurm_task_trains_as_a_single_process(clean_env: pytest.MonkeyPatch) -> None:
    """``srun -n1 python train.py`` (or a batch script with one task): no process group."""
    _unreachable_rendezvous(clean_env)
    for name, value in {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1",
                        "SLURM_JOB_NODELIST": "node1"}.items():
        clean_env.setenv(name, value)
    handler = make_handler(n=16)
    assert handler.distributed == DistributedContext.single()
    handler.train(1, seed=0, progress_bar=False)
    handler.save("one.pth")
    assert not dist.is_initialized()
    assert read_checkpoint(Path("one.pth")).meta["world_size"] == 1


def test_one_slurm_task_with_use_distributed_true_forms_a_group_of_one(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """End to end from SLURM's variables alone: MASTER_ADDR is derived from the node list, the
    ranks come from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, the model is DDP-wrapped."""
    for name, value in {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1",
                        "SLURM_JOB_NODELIST": "localhost,node7",
                        "MASTER_PORT": str(free_port())}.items():
        clean_env.setenv(name, value)
    handler = make_handler(n=16, use_distributed=True)
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    assert handler.distributed == DistributedContext(True, 0, 0, 1)
    assert isinstance(handler.model, nn.parallel.DistributedDataParallel)
    assert [dist.get_rank(), dist.get_world_size()] == [0, 1]
    assert (os.environ["MASTER_ADDR"], os.environ["RANK"], os.environ["WORLD_SIZE"]) == (
        "localhost", "0", "1")
    handler.auto_save(1, "ck", name="ep{epoch:03d}")
    handler.train(2, seed=0, progress_bar=False)
    assert read_checkpoint(Path("ck/ep002.pth")).meta["world_size"] == 1
    # the group nnhandler created is destroyed by its exit handler (while Python is whole)
    del handler
    distributed._destroy_own_group()
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("local_rank", "visible", "index"),
    [(0, 8, 0), (5, 8, 5), (7, 8, 7), (0, 1, 0), (3, 1, 0)],
    ids=["first-of-8", "sixth-of-8", "last-of-8", "only-one", "one-per-task"],
)
def test_each_local_rank_gets_its_gpu(local_rank: int, visible: int, index: int) -> None:
    assert local_cuda_index(local_rank, visible) == index


def test_more_local_ranks_than_gpus_is_an_error_not_a_shared_device() -> None:
    with pytest.raises(ConfigurationError, match=r"local rank 4 has no GPU of its own: .* 4 CUDA"):
        local_cuda_index(4, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_default_device_without_a_gpu_is_the_cpu() -> None:
    assert DistributedContext(True, 3, 1, 4).default_device() == torch.device("cpu")


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


def test_non_finite_epoch_loss_is_logged_and_training_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The single-process side of the NaN rule (the 2-rank side is in test_distributed.py)."""

    class NaNAtEpochTwo(Callback):
        def __init__(self) -> None:
            self.epoch = 0

        def on_epoch_begin(self, epoch: int, **kwargs: Any) -> None:
            self.epoch = epoch

    switch = NaNAtEpochTwo()

    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = nn.functional.mse_loss(output, target)
        return value * float("nan") if switch.epoch == 2 else value

    handler = make_handler(n=16, validation=False)
    handler.set_loss_fn(loss)
    handler.add_callback(switch)
    with caplog.at_level("WARNING", logger="nnhandler"):
        handler.train(3, seed=0, progress_bar=False)
    losses = handler.train_losses
    assert handler.epoch == 3 and math.isfinite(losses[0]) and math.isnan(losses[1])
    warnings = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
    assert len(warnings) == 2  # epochs 2 and 3 (the weights are NaN from epoch 2 on)
    assert warnings[0].startswith("epoch 2: loss=nan, mae=nan not finite; training continues")
    assert "every rank" not in warnings[0]  # one process: nothing was summed across ranks
