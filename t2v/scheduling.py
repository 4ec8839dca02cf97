"""Sampling through a diffusers scheduler: what a pretrained family's own pipeline samples with at inference, so
that a fine-tuned model samples here exactly as it will in diffusers (Wan: ``WanPipeline``'s UniPC multistep
solver over flow sigmas). The scheduler is the library's, never a copy of it; this module only runs its loop.

    x0 = sample_loop(denoise, unipc_flow(shift=3.0), shape, steps, generator=g)
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def unipc_flow(shift: float, timesteps: int = 1000):
    """Wan 2.1's sampler as its diffusers repositories configure it: UniPC (Zhao et al. 2023), flow prediction over
    shifted flow sigmas (diffusers' documented flow_shift: 3.0 at 480p, 5.0 at 720p)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                   num_train_timesteps=timesteps)


def sample_loop(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler, shape: Sequence[int],
                steps: int, generator: Optional[torch.Generator] = None, device="cpu",
                progress: bool = False) -> torch.Tensor:
    """x0 of ``shape`` from pure float32 noise, ``steps`` scheduler steps. ``denoise(x_t, t)`` gets the scheduler's
    timesteps (the network's time input, (b,)); its output is what the scheduler's prediction_type says."""
    x = torch.randn(tuple(shape), generator=generator, device=device)
    scheduler.set_timesteps(steps, device=device)
    times = scheduler.timesteps
    if progress:
        from t2v.progress import progress as progress_counter

        times = progress_counter(times, desc="sampling (unipc)", unit="step")
    for t in times:
        out = denoise(x, t.expand(x.shape[0]))
        x = scheduler.step(out.float(), t, x, return_dict=False)[0]
    return x
