"""The implementations t2v shipped BEFORE the speed-ups that bench/ measured and t2v then adopted (commit
c6ca601), kept here so that every benchmark run can still measure before -> after on this machine:

  to_model      t2v.data.video.to_model: ``u8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()``
                (5 passes over the float clip); now one conversion copy and in-place scaling (bit-identical)
  verify_state  t2v.checkpoint.verify_state: one ``torch.isfinite(v).all()`` per tensor; now numpy
  ADAMW_KWARGS  t2v.train's optimizer: ``torch.optim.AdamW`` with its default (for-each) implementation; now
                ``fused=True`` (see bench.harness.TrainStep's ``fused_adamw``)
  conv2plus1d_forward_previous  t2v.models.Conv2Plus1D.forward: the temporal (3, 1, 1) Conv3d called as such;
                now the same weights as a (3, 1) Conv2d over t and the flattened h·w (same sums)

This module imports nothing heavy, so that a t2v.train subprocess can be patched with it at no extra start-up
cost. t2v/ itself is never edited from bench/.
"""
from __future__ import annotations

import numpy as np
import torch

from t2v import checkpoint as ckpt

ADAMW_KWARGS: dict = {}  # before: AdamW(...) with no `fused`; after (shipped): AdamW(..., fused=True)


def to_model_previous(u8):
    """The previous t2v.data.video.to_model: same numpy copy and checks, then permute, float, div, sub and a
    final contiguous copy."""
    if isinstance(u8, np.ndarray):
        u8 = torch.from_numpy(np.array(u8))  # a copy: cache memmaps are read-only
    if u8.dtype != torch.uint8 or u8.ndim != 4 or u8.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (T, H, W, 3) array, got {tuple(u8.shape)} {u8.dtype}")
    return u8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def verify_state_previous(state, path) -> None:
    """The previous t2v.checkpoint.verify_state: the same checks and messages, with the finiteness test done
    by one multi-threaded ``torch.isfinite(v).all()`` per tensor (~290 of them for base's model + EMA)."""
    if not isinstance(state, dict):
        raise ckpt.CheckpointError(f"{path}: not a checkpoint dict")
    missing = [k for k in ckpt.REQUIRED_KEYS if k not in state]
    if missing:
        raise ckpt.CheckpointError(f"{path}: missing {', '.join(missing)} (not a resumable t2v checkpoint)")
    m = ckpt.CKPT_RE.match(path.name)
    if m and int(m.group(1)) != int(state["step"]):
        raise ckpt.CheckpointError(f"{path}: file name says step {int(m.group(1))} but it holds step {state['step']}")
    for name in ("model", "ema"):
        bad = [k for k, v in state[name].items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ckpt.CheckpointError(f"{path}: non-finite values in {name} ({bad[0]})")


def conv2plus1d_forward_previous(self, x):
    """The previous t2v.models.Conv2Plus1D.forward (bind it to a module with types.MethodType)."""
    return self.temporal(self.spatial(x))
