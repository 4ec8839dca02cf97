"""One object per training objective (diffusion.objective): what the training step, the validation loss, sampling
and the probes ask of it, so none of them tests which objective it is.

    obj = build_objective(cfg.diffusion, device)
    t = obj.draw_times(g, n, device)          # (n,): training times, from the step's generator
    x_t, target = obj.noisy(x0, noise, t), obj.target(x0, noise, t)
    out = model(x_t, obj.model_time(t), ...)  # the network's time input, in [0, diffusion.timesteps]
    loss = training_loss(out, target, obj.weight(t))
    x0 = obj.sample(denoise, shape, steps, method, ...)

DDPM wraps t2v.diffusion (times are integer timesteps of the schedule), Flow wraps t2v.flow (times in [0, 1]); the
math stays in those two modules, pure and model-free. ``fixed_times`` turns train.val_timesteps into this
objective's times for the validation loss (flow: timestep / diffusion.timesteps, so t = 500 is the midpoint of both).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from t2v import config
from t2v import config_checks
from t2v import diffusion
from t2v import flow
from t2v import scheduling

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DDPM:
    """Gaussian diffusion on a discrete schedule; the model predicts eps or v (diffusion.prediction)."""

    sched: diffusion.Schedule
    prediction: str = "eps"
    snr_gamma: float = 0.0
    beta_start: float = 0.0  # the linear schedule's ends, for sd-ddim's scheduler (0: Ho et al.'s)
    beta_end: float = 0.0
    name = "ddpm"
    # ddim, ddpm: t2v.diffusion; sd-ddim: diffusers' DDIMScheduler as Stable Diffusion and AnimateDiff run it
    methods = ("ddim", "ddpm", "sd-ddim")

    def draw_times(self, g: torch.Generator, n: int, device) -> torch.Tensor:
        return torch.randint(0, self.sched.num_timesteps, (n,), generator=g, device=device)

    def fixed_times(self, timestep: int, n: int, device) -> torch.Tensor:
        return torch.full((n,), timestep, dtype=torch.long, device=device)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def noisy(self, x0, noise, t):
        return diffusion.q_sample(self.sched, x0, t, noise)

    def target(self, x0, noise, t):
        return diffusion.training_target(self.sched, x0, noise, t, self.prediction)

    def weight(self, t) -> Optional[torch.Tensor]:
        return diffusion.min_snr_weight(self.sched, t, self.snr_gamma, self.prediction) if self.snr_gamma > 0 else None

    def predict_x0(self, x_t, t, out, clip: bool = False):
        return diffusion.predict_x0(self.sched, x_t, t, out, self.prediction, clip=clip)

    def sample(self, denoise: Denoise, shape: Sequence[int], steps: int, method: str = "", *,
               generator=None, device="cpu", eta: float = 0.0, progress: bool = False, clip: bool = True):
        if method == "sd-ddim":  # no clipping of x0 (clip_sample=False): the library's sampler, as the pipeline runs it
            linear = diffusion.linear_betas(self.sched.num_timesteps, self.beta_start, self.beta_end).float()
            if not torch.allclose(self.sched.betas.cpu(), linear, rtol=1e-5, atol=1e-9):
                raise ValueError("sd-ddim is diffusers' DDIM over linear betas (diffusion.schedule=linear, "
                                 "diffusion.shift=1); this model was trained on another schedule: use ddim")
            sched = scheduling.sd_ddim(self.sched.num_timesteps, self.beta_start, self.beta_end, self.prediction, eta)
            return scheduling.sample_loop(denoise, sched, shape, steps, generator=generator, device=device,
                                          progress=progress)
        return diffusion.sample_loop(denoise, shape, self.sched.to(device), method=method or "ddim", steps=steps,
                                     prediction=self.prediction, generator=generator, device=device, eta=eta,
                                     progress=progress, clip=clip)


@dataclass(frozen=True)
class Flow:
    """Rectified flow: x_t = (1 - t) x0 + t eps, the model predicts eps - x0; logit-normal training times."""

    timesteps: int = 1000  # the network sees t * timesteps
    shift: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    name = "flow"
    # euler and heun: t2v.flow; unipc: diffusers' UniPC over flow sigmas, Wan's own sampler (t2v.scheduling)
    methods = (*flow.METHODS, "unipc")

    def draw_times(self, g: torch.Generator, n: int, device) -> torch.Tensor:
        return flow.training_times(g, n, self.logit_mean, self.logit_std, self.shift, device)

    def fixed_times(self, timestep: int, n: int, device) -> torch.Tensor:
        return torch.full((n,), timestep / self.timesteps, device=device)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.timesteps

    def noisy(self, x0, noise, t):
        return flow.interpolate(x0, noise, t)

    def target(self, x0, noise, t):
        return flow.velocity(x0, noise)

    def weight(self, t) -> Optional[torch.Tensor]:
        return None  # the logit-normal density already weights the times

    def predict_x0(self, x_t, t, out, clip: bool = False):
        x0 = flow.predict_x0(x_t, t, out)
        return x0.clamp(-1.0, 1.0) if clip else x0

    def sample(self, denoise: Denoise, shape: Sequence[int], steps: int, method: str = "", *,
               generator=None, device="cpu", eta: float = 0.0, progress: bool = False, clip: bool = True):
        if eta:
            raise ValueError("eta is a DDIM setting; flow sampling (euler, heun, unipc) is deterministic")
        if method == "unipc":  # no clipping of x0: the library's solver, as the family's pipeline runs it
            return scheduling.sample_loop(denoise, scheduling.unipc_flow(self.shift, self.timesteps), shape, steps,
                                          generator=generator, device=device, progress=progress)
        return flow.sample_loop(denoise, shape, steps, self.shift, method or "euler", generator=generator,
                                device=device, progress=progress, clip=clip, time_scale=self.timesteps)


Objective = Union[DDPM, Flow]


def build_objective(d: config.DiffusionConfig, device="cpu") -> Objective:
    """The objective diffusion.objective names, its tables on ``device``."""
    if d.objective == "flow":
        return Flow(d.timesteps, d.shift, d.logit_mean, d.logit_std)
    if d.objective != "ddpm":
        raise ValueError(f"unknown diffusion.objective {d.objective!r}: expected one of {config_checks.OBJECTIVES}")
    return DDPM(diffusion.make_schedule(d.timesteps, d.schedule, d.shift, d.beta_start, d.beta_end).to(device),
                d.prediction, d.snr_gamma, d.beta_start, d.beta_end)
