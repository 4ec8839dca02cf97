"""Sampling through a diffusers scheduler: what a pretrained family's own pipeline samples with at inference, so
that a fine-tuned model samples here exactly as it will in diffusers (Wan: ``WanPipeline``'s UniPC multistep
solver over flow sigmas; AnimateDiff: DDIM as Stable Diffusion configures it). The scheduler is the library's, never a copy of it; this module only runs its loop.

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


def sd_ddim(timesteps: int, beta_start: float, beta_end: float, prediction: str = "eps", eta: float = 0.0):
    """DDIM as Stable Diffusion 1.5's repositories and AnimateDiff configure it: linear betas (AnimateDiff's
    0.00085 .. 0.012), evenly spaced steps ("linspace"), no clipping, the last step to ᾱ_0 (set_alpha_to_one=False).
    ``eta`` > 0 adds DDIM's noise (drawn from the loop's generator)."""
    from diffusers import DDIMScheduler

    if not (beta_start or beta_end):
        beta_start, beta_end = 1e-4 * 1000 / timesteps, 0.02 * 1000 / timesteps  # t2v.diffusion.linear_betas's
    sched = DDIMScheduler(num_train_timesteps=timesteps, beta_start=beta_start, beta_end=beta_end,
                          beta_schedule="linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          timestep_spacing="linspace", prediction_type="epsilon" if prediction == "eps" else
                          "v_prediction")
    sched.t2v_eta = eta
    return sched


def sample_loop(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler, shape: Sequence[int],
                steps: int, generator: Optional[torch.Generator] = None, device="cpu",
                progress: bool = False) -> torch.Tensor:
    """x0 of ``shape`` from pure float32 noise, ``steps`` scheduler steps. ``denoise(x_t, t)`` gets the scheduler's
    timesteps (the network's time input, (b,)); its output is what the scheduler's prediction_type says."""
    x = torch.randn(tuple(shape), generator=generator, device=device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    times = scheduler.timesteps
    extra = {"eta": scheduler.t2v_eta, "generator": generator} if getattr(scheduler, "t2v_eta", 0) else {}
    if progress:
        from t2v.progress import progress as progress_counter

        times = progress_counter(times, desc="sampling (unipc)", unit="step")
    for t in times:
        out = denoise(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        x = scheduler.step(out.float(), t, x, return_dict=False, **extra)[0]
    return x
