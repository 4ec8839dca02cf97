"""Small building blocks both networks use (t2v.models's UNet and t2v.models.dit's transformer)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


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


def caption_conditioning(text: torch.Tensor, tokens: torch.Tensor | None, token_mask: torch.Tensor | None,
                         cond_mask: torch.Tensor | None, null_text: torch.Tensor, null_token: torch.Tensor | None):
    """What both networks condition on: (pooled text b d, context b (1+l) d | None, context mask b (1+l) | None).

    Rows with cond_mask False (classifier-free guidance's unconditional branch, caption dropout) get the learned
    ``null_text`` instead of their caption; with cross-attention (``null_token`` given) a learned null token leads
    the caption tokens, always visible (no row has an all-masked softmax), and a dropped row's tokens are masked.
    torch.where, not indexing: the same graph whatever the mask holds (compile-friendly)."""
    b = text.shape[0]
    if cond_mask is None:
        cond_mask = torch.ones(b, dtype=torch.bool, device=text.device)
    keep = cond_mask.bool()[:, None]  # b 1
    text = torch.where(keep, text, null_text.to(text.dtype))  # b d
    if null_token is None:
        return text, None, None
    if tokens is None:
        raise ValueError("cross_attention=True needs tokens (b, l, d); set text.tokens=true")
    if token_mask is None:
        token_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    null = null_token.to(tokens.dtype).expand(b, 1, -1)  # b 1 d
    context = torch.cat([null, tokens], dim=1)  # b (1+l) d
    return text, context, torch.cat([torch.ones_like(keep), token_mask.bool() & keep], dim=1)  # b (1+l)


def run_block(block: nn.Module, checkpointing: bool, *args):
    """``block(*args)``; with checkpointing (while training with gradients) its activations are recomputed in
    backward instead of kept (torch.utils.checkpoint, non-reentrant: dropout's RNG is replayed, so the result is
    the same)."""
    if checkpointing and block.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)
