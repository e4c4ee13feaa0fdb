"""FSDP2 for the handler's model, and the test for "this model's state is sharded".

A model whose parameters are DTensors (FSDP2's ``fully_shard``, or a model that places its own
DTensors) is saved as a sharded checkpoint directory through ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn

from .distributed import DistributedContext
from .errors import ConfigurationError

__all__ = ["apply_fsdp", "has_dtensor_parameters"]


def has_dtensor_parameters(module: nn.Module) -> bool:
    """True when any parameter of ``module`` is a ``DTensor`` (FSDP2, tensor parallelism)."""
    # a DTensor exists only once torch.distributed.tensor is imported; not importing it here
    # keeps `import nnhandler` from paying for it
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    if dtensor_module is None:
        return False
    DTensor = dtensor_module.DTensor
    # each module's own parameter dict: module.parameters() costs ~1 us per parameter (its
    # generator chain and duplicate tracking), and this runs at every save
    return any(isinstance(parameter, DTensor)
               for submodule in module.modules() for parameter in submodule._parameters.values())


def apply_fsdp(module: nn.Module, units: Sequence[type[nn.Module]], device: torch.device,
               context: DistributedContext) -> nn.Module:
    """Shard ``module`` with FSDP2 over every rank: each submodule that is an instance of one of
    ``units`` becomes its own FSDP unit (its parameters are gathered only around its forward and
    backward), then the root takes the remaining parameters. Returns ``module``, now an
    ``FSDPModule`` (``fully_shard`` changes it in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not context.enabled:
        raise ConfigurationError(
            "parallelism='fsdp' needs torch.distributed: launch with torchrun (or pass "
            "use_distributed=True); to read a sharded checkpoint in one process, load it with "
            "parallelism='none'"
        )
    mesh = init_device_mesh(device.type, (context.world_size,))
    unit_types = tuple(units)
    if unit_types:
        submodules = [m for name, m in module.named_modules()
                      if name and isinstance(m, unit_types)]
        if not submodules:
            raise ConfigurationError(
                f"fsdp_units={[u.__qualname__ for u in unit_types]} match no submodule of "
                f"{type(module).__qualname__}"
            )
        for submodule in reversed(submodules):  # inner units before the units holding them
            fully_shard(submodule, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module
