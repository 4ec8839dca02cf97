"""Rectified flow as pure functions on tensors: the objective SD3, Open-Sora 1.2+, Wan and HunyuanVideo train.

Like t2v.diffusion, nothing here knows the model: sampling takes any ``velocity(x_t, t) -> v`` callable.

Notation (Liu et al. 2022; Esser et al. 2024, "SD3"): t in [0, 1] is the noise level, x_t = (1 - t) x0 + t eps,
the model predicts the velocity v = dx_t/dt = eps - x0, and sampling integrates dx/dt = v from t = 1 (pure noise)
to t = 0. Training times come from SD3's logit-normal density, t = sigmoid(u), u ~ N(mean, std²), which spends
the steps in the middle, where the velocity is hardest to predict; the resolution shift
t -> shift t / (1 + (shift - 1) t) then moves them towards noise (every SNR ((1 - t) / t)² divided by shift²: the
same meaning diffusion.shift has for the DDPM schedule). Sampling walks a time grid shifted the same way, which is
what diffusers' FlowMatchEulerDiscreteScheduler does (tests/test_flow.py checks the grid and the Euler step
against it on the same inputs).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

METHODS = ("euler", "heun")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift: shift t / (1 + (shift - 1) t); 1 leaves t as it is, > 1 moves it towards noise."""
    if not shift > 0:
        raise ValueError(f"flow shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def training_times(generator: torch.Generator, n: int, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                   device="cpu") -> torch.Tensor:
    """(n,) training times: logit-normal (sigmoid of N(mean, std²)), then shifted; one randn draw of n."""
    u = torch.randn(n, generator=generator, device=device) * std + mean
    return shift_time(torch.sigmoid(u), shift)


def _per_sample(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(t.shape[0], *([1] * (ndim - 1)))  # b -> b 1 1 1 1 (for b t c h w)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, t (b,) in [0, 1]."""
    tt = _per_sample(t, x0.ndim).to(x0.dtype)
    return (1 - tt) * x0 + tt * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The training target: d x_t / dt = noise - x0 (the same for every t on the straight path)."""
    return noise - x0


def predict_x0(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Where the straight line through x_t with velocity v meets t = 0."""
    return x_t - _per_sample(t, x_t.ndim) * v


def clip_velocity(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The velocity whose x0 is clipped to [-1, 1] (bounded spaces: pixels), x_t kept: v + (x0 - clip(x0)) / t.
    At every point where x0 is in range it is v itself, so clipping only changes pixels that overshoot."""
    x0 = predict_x0(x_t, t, v)
    return v + (x0 - x0.clamp(-1.0, 1.0)) / _per_sample(t, x_t.ndim).clamp(min=1e-6)


def time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """steps + 1 times from 1 to 0: linspace(1, 0) shifted. diffusers' FlowMatchEulerDiscreteScheduler walks the
    same grid when given sigmas = linspace(1, 1/steps, steps) (it appends the final 0 itself)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_time(t, shift).tolist()


def euler_step(v: torch.Tensor, x_t: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """x at t_next < t along the velocity at t."""
    return x_t + (t_next - t) * v


def sample_loop(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: Sequence[int],
    steps: int = 50,
    shift: float = 1.0,
    method: str = "euler",
    generator: Optional[torch.Generator] = None,
    device="cpu",
    progress: bool = False,
    clip: bool = True,
    time_scale: float = 1000.0,
) -> torch.Tensor:
    """Draw x0 of ``shape`` from pure noise by integrating the velocity from t = 1 to 0 over time_grid(steps).

    ``velocity_fn(x_t, t)`` gets the model's time input: (b,) float, t * time_scale (the network sees the same
    [0, diffusion.timesteps] range a DDPM model sees). "euler" calls it ``steps`` times; "heun" (Karras et al.
    2022, the second-order correction of each step, Euler on the last step to t = 0) 2 steps - 1 times.
    ``clip``: keep every step's x0 in [-1, 1] (pixels)."""
    if method not in METHODS:
        raise ValueError(f"unknown flow sampling method {method!r}: expected one of {METHODS}")
    x = torch.randn(tuple(shape), generator=generator, device=device)
    b = x.shape[0]
    grid = time_grid(steps, shift)

    def v_at(x_t: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((b,), t, device=device)
        v = velocity_fn(x_t, tt * time_scale).float()
        return clip_velocity(x_t, tt, v) if clip else v

    pairs = list(zip(grid[:-1], grid[1:]))
    if progress:
        from t2v.progress import progress as progress_counter  # only when asked: this module imports torch alone

        pairs = progress_counter(pairs, desc=f"sampling ({method})", unit="step")
    for t, t_next in pairs:
        v = v_at(x, t)
        x_next = euler_step(v, x, t, t_next)
        if method == "heun" and t_next > 0:
            x_next = euler_step((v + v_at(x_next, t_next)) / 2, x, t, t_next)
        x = x_next
    return x
