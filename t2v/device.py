"""Which device a process computes on: one rule for training, sampling, caption embedding and evaluation."""
from __future__ import annotations

import torch


class DeviceError(ValueError):
    pass


def pick_device(name: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU. Anything else is taken as given, but a CUDA
    device on a machine without one fails here, with the setting, rather than deep inside the first kernel."""
    if str(name) == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {str(name)!r} asked for, but no CUDA device is available here")
    return device
