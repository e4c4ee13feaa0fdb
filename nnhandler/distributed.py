"""Rank and world detection (torchrun, SLURM), process-group set-up, reductions and the
rank-0-does-it-and-everyone-learns-the-outcome pattern used by checkpoint writes."""

from __future__ import annotations

import atexit
import datetime as _dt
import gc
import os
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from .errors import CheckpointError, ConfigurationError

__all__ = [
    "DistributedContext",
    "PipelinedAgreement",
    "all_gather_objects",
    "detect_launch_environment",
    "first_host",
    "local_cuda_index",
    "run_on_rank_zero",
    "side_group",
]

T = TypeVar("T")


#: MASTER_PORT used under SLURM when none is exported (torchrun's default too).
DEFAULT_MASTER_PORT = 29500


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[003-005,010],cpu1"`` -> ``"gpu003"``."""
    match = re.match(r"\s*([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"cannot read a host from SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix.strip()
    return prefix + ranges.split(",", 1)[0].split("-", 1)[0]


def local_cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device index of the process with ``local_rank`` on its node.

    Every GPU of the node visible (torchrun; ``srun`` with ``--gpus-per-node``): device
    ``local_rank``. Exactly one visible (``srun --gpus-per-task=1``, or CUDA_VISIBLE_DEVICES set
    per process): device 0. More processes than visible GPUs is an error rather than two ranks
    silently sharing one device.
    """
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise ConfigurationError(
        f"local rank {local_rank} has no GPU of its own: this process sees {visible} CUDA "
        "device(s); start one process per GPU (torchrun --nproc_per_node, srun "
        "--ntasks-per-node) or pass device='cpu'"
    )


@dataclass(frozen=True)
class LaunchEnvironment:
    rank: int
    local_rank: int
    world_size: int


def detect_launch_environment() -> LaunchEnvironment | None:
    """Ranks from torchrun's (RANK, LOCAL_RANK, WORLD_SIZE) or SLURM's variables, else None.

    torchrun's variables win, so ``srun torchrun ...`` (one SLURM task per node) uses the ranks
    torchrun assigns. Under SLURM alone: rank SLURM_PROCID, local rank SLURM_LOCALID, world size
    SLURM_NTASKS (a world of one is still reported; :meth:`DistributedContext.setup` decides).
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnvironment(
            int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])), int(env["WORLD_SIZE"])
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchEnvironment(
            int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), int(env["SLURM_NTASKS"])
        )
    return None


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank, the world size and whether collectives are used."""

    enabled: bool
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls) -> DistributedContext:
        return cls(enabled=False)

    @classmethod
    def setup(cls, use_distributed: bool | None, device: torch.device | None) -> DistributedContext:
        """Join (or create from the launch environment) the default process group.

        ``use_distributed=None`` auto-detects: an existing process group, or torchrun/SLURM
        variables with a world size above one. ``False`` forces a single process. ``True``
        without a group or launch variables is an error.
        """
        if use_distributed is False:
            return cls.single()
        if dist.is_available() and dist.is_initialized():
            return cls._from_group()
        launch = detect_launch_environment()
        if launch is None or (use_distributed is None and launch.world_size <= 1):
            if use_distributed:
                raise ValueError(
                    "use_distributed=True but no process group exists and neither torchrun "
                    "(RANK, WORLD_SIZE) nor SLURM (SLURM_PROCID, SLURM_NTASKS) variables are set"
                )
            return cls.single()
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this PyTorch build")
        master = os.environ.get("MASTER_ADDR")
        if master is None:
            nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
            if not nodelist:
                raise ValueError("MASTER_ADDR is not set and no SLURM node list to derive it "
                                 "from: launch with torchrun or export MASTER_ADDR/MASTER_PORT")
            master = first_host(nodelist)
        os.environ.setdefault("MASTER_ADDR", master)
        os.environ.setdefault("MASTER_PORT", str(DEFAULT_MASTER_PORT))
        os.environ.setdefault("RANK", str(launch.rank))
        os.environ.setdefault("WORLD_SIZE", str(launch.world_size))
        os.environ.setdefault("LOCAL_RANK", str(launch.local_rank))
        use_cuda = (device is None or device.type == "cuda") and torch.cuda.is_available()
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_cuda_index(launch.local_rank, torch.cuda.device_count()))
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=30))
        atexit.unregister(_destroy_own_group)  # once, however often a group is created
        atexit.register(_destroy_own_group)
        return cls._from_group()

    @classmethod
    def _from_group(cls) -> DistributedContext:
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
        return cls(True, dist.get_rank(), local, dist.get_world_size())

    def default_device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.cuda_index())
        return torch.device("cpu")

    def cuda_index(self) -> int:
        """This rank's CUDA device (:func:`local_cuda_index`; the current one without DDP)."""
        if not self.enabled:
            return torch.cuda.current_device()
        return local_cuda_index(self.local_rank, torch.cuda.device_count())

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: T) -> T:
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _destroy_own_group() -> None:
    """At exit, destroy the process group :meth:`DistributedContext.setup` created (unless the
    script did) and collect garbage while the interpreter is still whole. Left to the
    interpreter's teardown, gloo's finished work objects (which hold tensors) are freed when
    Python can no longer take the GIL, and the process aborts ("terminate called without an
    active exception", SIGABRT) after training went well — about one run in ten with torch 2.13
    on CPU, even with ``destroy_process_group()`` at the end of the script."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def all_gather_objects(context: DistributedContext, obj: T) -> list[T]:
    """``obj`` of every rank, in rank order (a one-element list without distribution)."""
    if not context.enabled:
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def run_on_rank_zero(
    context: DistributedContext, action: Callable[[], T], *, share_result: bool = True
) -> T:
    """Run ``action`` on rank 0; every rank returns its result or raises its error.

    The other ranks wait in a broadcast that carries either the result or the error message, so
    a failure on rank 0 reaches every rank as an exception instead of a hang at a barrier.
    With ``share_result=False`` only the outcome is broadcast: rank 0 returns the result, the
    other ranks ``None`` (for results that are large or cannot be pickled).
    """
    outcome: tuple[bool, Any]
    error: BaseException | None = None
    result: Any = None
    if context.is_main:
        try:
            result = action()
            outcome = (True, result if share_result else None)
        except BaseException as raised:  # KeyboardInterrupt too: the others must not hang
            error = raised
            outcome = (False, f"{type(raised).__name__}: {raised}")
    else:
        outcome = (False, None)
    outcome = context.broadcast_object(outcome)
    if error is not None:
        raise error
    ok, payload = outcome
    if not ok:
        raise CheckpointError(f"rank 0 failed: {payload}")
    return cast(T, payload if share_result or not context.is_main else result)


#: gloo groups for the ranks' small agreements, one per (owner, purpose) (see side_group)
_SIDE_GROUPS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def side_group(owner: Any, purpose: str) -> Any:
    """A gloo group over every rank for ``purpose`` (``"stop"``, ``"save-time"`` …), created
    once per ``owner`` (a handler; weakly held) and reused by its later ``train`` calls.
    Creating it is a collective: every rank must ask at the same point. Its own group keeps
    each agreement's collectives out of the order of the training collectives and of the
    other agreements'."""
    groups = _SIDE_GROUPS.setdefault(owner, {})
    group = groups.get(purpose)
    if group is None:
        group = groups[purpose] = dist.new_group(backend="gloo")
    return group


class PipelinedAgreement:
    """The MAX of every rank's integer flag, agreed on a gloo group of its own (CPU tensors:
    no device sync, and no ordering with the training collectives).

    :meth:`pipelined` answers for the *previous* call's flags while this call's travel, so a
    training step never waits for the reduction it started (one non-blocking all-reduce per
    call; the previous one has normally long finished). Every rank gets the same answer at
    the same call, which is what lets every rank stop, or save, at the same step.
    :meth:`exchange` is the same without the stickiness (any value, a new reduction every
    call); :meth:`settle` answers for everything up to now (blocking); :meth:`drain` waits for
    the reduction in flight and returns its answer. Used by ``save_on_signal`` (stop flags)
    and by the auto-saver's ``every_seconds`` (rank 0's clock and cadence decide).
    """

    __slots__ = ("_buffers", "_group", "_next", "_work")

    def __init__(self, group: Any) -> None:
        self._group = group
        self._buffers = (torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
        self._next = 0
        self._work: Any = None

    def _collect(self) -> int:
        if self._work is None:
            return 0
        self._work.wait()
        self._work = None
        return int(self._buffers[self._next ^ 1])

    def pipelined(self, flag: int) -> int:
        """The agreed flag of the previous call (0 at the first); this call's ``flag`` starts
        travelling unless the answer is already non-zero."""
        agreed = self._collect()
        if agreed:
            return agreed
        buffer = self._buffers[self._next]
        buffer.fill_(flag)
        self._work = dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=self._group,
                                     async_op=True)
        self._next ^= 1
        return 0

    def exchange(self, value: int) -> int:
        """The agreed value of the previous call (0 at the first, or after :meth:`drain`);
        this call's ``value`` starts travelling."""
        previous = self._collect()
        buffer = self._buffers[self._next]
        buffer.fill_(value)
        self._work = dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=self._group,
                                     async_op=True)
        self._next ^= 1
        return previous

    def settle(self, flag: int) -> int:
        """The agreed flag of everything so far, this call's ``flag`` included (blocking)."""
        earlier = self._collect()
        buffer = self._buffers[self._next]
        buffer.fill_(flag)
        dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=self._group)
        return max(earlier, int(buffer))

    def drain(self) -> int:
        """Wait for the reduction in flight, if any, and return its answer (0: none)."""
        return self._collect()
