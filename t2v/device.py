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


CUBLAS_WORKSPACE = ":4096:8"  # cuBLAS's deterministic setting (its docs: one of two workspace configurations)


def set_deterministic(on: bool) -> None:
    """train.deterministic: deterministic kernels only, so that a GPU run and its resume can be compared bit for bit
    (a kernel that sums in a different order each time makes them differ in the last bits even though the state was
    restored exactly). cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts, so this runs before the first kernel;
    cuDNN stops autotuning (its choice could differ between runs) and picks deterministic algorithms."""
    import os

    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    if on:
        torch.backends.cudnn.benchmark = False


def no_deterministic_kernel(e: BaseException) -> str | None:
    """The op an error of torch.use_deterministic_algorithms(True) names ("X does not have a deterministic
    implementation, but you set ..."), else None."""
    text = str(e)
    marker = " does not have a deterministic implementation"
    if marker not in text:
        return None
    return text.split(marker)[0].strip().splitlines()[-1]
