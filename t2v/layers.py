"""Small building blocks both networks use (t2v.model's UNet and t2v.dit's transformer)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (b,) -> (b, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # b half
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # b (2 half)
    return F.pad(emb, (0, dim % 2))  # b dim


def zero_(module: nn.Module) -> nn.Module:
    """Every parameter of ``module`` set to 0: a residual branch that starts as a no-op, an output that starts at 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
