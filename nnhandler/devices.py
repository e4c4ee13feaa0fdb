"""Devices a handler may train and load on: parsed and checked before anything is read or
created, so a device this machine does not have is one clear error naming it and the devices
available (never a torch assertion or "cannot read checkpoint")."""

from __future__ import annotations

import torch

from .distributed import DistributedContext
from .errors import ConfigurationError

__all__ = ["available_devices", "parse_device", "resolve_device"]


def parse_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device`` that this machine has (``None`` stays ``None``: each
    rank's own device). Anything else is an error naming the device and what is available,
    raised before anything is read or created."""
    if device is None:
        return None
    if isinstance(device, torch.device):
        parsed = device
    elif isinstance(device, str):
        try:
            parsed = torch.device(device)
        except RuntimeError as error:
            raise ConfigurationError(f"unknown device {device!r}: {error} (available here: "
                                     f"{', '.join(available_devices())})") from None
    else:
        raise TypeError(f"device must be a str, torch.device or None, got {device!r}")
    _check_device_available(parsed, str(device))
    return parsed


def _check_device_available(device: torch.device, given: str) -> None:
    available = f"available here: {', '.join(available_devices())}"
    kind = device.type
    if kind == "cpu":
        if device.index not in (None, 0):
            raise ConfigurationError(f"device {given!r}: there is one CPU device, 'cpu' (or "
                                     f"'cpu:0'); {available}")
    elif kind == "meta":
        raise ConfigurationError(f"device {given!r} holds no data (tensors without storage): "
                                 f"a handler trains and loads on a real device; {available}")
    elif kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError(f"device {given!r} requested but CUDA is not available "
                                     f"({available})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigurationError(f"device {given!r}: only {count} CUDA device(s) visible "
                                     f"({available})")
    elif kind in ("mps", "xpu"):
        if not _backend_available(kind):
            raise ConfigurationError(f"device {given!r}: the {kind} backend is not available "
                                     f"in this PyTorch build or on this machine ({available})")
        if kind == "mps" and device.index not in (None, 0):
            raise ConfigurationError(f"device {given!r}: there is one MPS device, 'mps'; "
                                     f"{available}")
        if kind == "xpu" and device.index is not None and device.index >= torch.xpu.device_count():
            raise ConfigurationError(f"device {given!r}: only {torch.xpu.device_count()} XPU "
                                     f"device(s) visible ({available})")
    else:
        raise ConfigurationError(f"device {given!r} is not supported (cpu, cuda, mps, xpu); "
                                 f"{available}")


def _backend_available(kind: str) -> bool:
    if kind == "mps":
        return bool(torch.backends.mps.is_available())
    xpu = getattr(torch, "xpu", None)
    return xpu is not None and bool(xpu.is_available())


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if _backend_available("mps"):
        devices.append("mps")
    if _backend_available("xpu"):
        devices += [f"xpu:{index}" for index in range(torch.xpu.device_count())]
    return devices


def resolve_device(device: str | torch.device | None,
                    context: DistributedContext) -> torch.device:
    parsed = parse_device(device)
    if parsed is None:
        return context.default_device()
    if parsed.type == "cuda" and parsed.index is None:
        parsed = torch.device("cuda", context.cuda_index())
        _check_device_available(parsed, f"{device} (this rank's {parsed})")
    return parsed
