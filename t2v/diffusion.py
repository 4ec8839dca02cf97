"""Gaussian diffusion (DDPM / DDIM) as pure functions on tensors.

Nothing here knows about the model: the training loop asks for ``q_sample`` and ``training_target``
and feeds the model itself; sampling takes any ``denoise(x_t, t) -> model_out`` callable, so the
caller decides how to run the network and classifier-free guidance (see ``cfg_combine``).

Notation follows Ho et al. 2020 and Nichol & Dhariwal 2021: ``acp`` = alphas_cumprod = ᾱ_t,
x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) eps, v = sqrt(ᾱ_t) eps - sqrt(1 - ᾱ_t) x0 (Salimans & Ho 2022).
Every tensor argument named ``t`` is a ``(B,)`` integer tensor of timesteps in [0, num_timesteps).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

PREDICTIONS = ("eps", "v")


@dataclass(frozen=True)
class Schedule:
    """Per-timestep constants, each a float32 tensor of shape ``(num_timesteps,)``."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def to(self, device) -> "Schedule":
        """A copy on ``device``, so ``extract`` does not copy the table on every call."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    acp = f / f[0]
    # clipped because ᾱ(T) = 0 would make the last beta 1 and the posterior singular near t = T
    return (1 - acp[1:] / acp[:-1]).clamp(max=max_beta)


def linear_betas(timesteps: int, start: float = 0.0, end: float = 0.0) -> torch.Tensor:
    """Ho et al. 2020: 1e-4 .. 0.02 over 1000 steps, rescaled so other lengths keep the same ᾱ_T; or ``start`` ..
    ``end`` as given (AnimateDiff's 0.00085 .. 0.012, what its pretrained weights were trained on)."""
    if start or end:
        return torch.linspace(start, end, timesteps, dtype=torch.float64)
    scale = 1000 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


def shift_betas(betas: torch.Tensor, shift: float) -> torch.Tensor:
    """The schedule with every SNR divided by shift² (Hoogeboom et al. 2023, "simple diffusion": log-SNR shifted
    by -2 log shift). shift > 1 spends more timesteps at high noise, where sampling decides layout and motion;
    large, smooth content (the demo's blobs, a VAE's low-resolution latents) stays legible at a plain schedule's
    SNRs far into the chain, so without a shift few training steps teach the model to draw it from the caption."""
    acp = torch.cumprod(1.0 - betas, dim=0)
    snr = acp / (1.0 - acp) / shift**2
    acp = snr / (1.0 + snr)
    prev = torch.cat([torch.ones(1, dtype=acp.dtype), acp[:-1]])
    return 1.0 - acp / prev


def make_schedule(timesteps: int = 1000, kind: str = "cosine", shift: float = 1.0, beta_start: float = 0.0,
                  beta_end: float = 0.0) -> Schedule:
    if kind == "cosine":
        betas = cosine_betas(timesteps)
    elif kind == "linear":
        betas = linear_betas(timesteps, beta_start, beta_end)
    else:
        raise ValueError(f"unknown schedule {kind!r}: expected 'cosine' or 'linear'")
    if not shift > 0:
        raise ValueError(f"schedule shift must be > 0, got {shift}")
    if shift != 1.0:
        betas = shift_betas(betas, shift)
    # everything in float64 first: 1 - ᾱ_t near t = 0 is ~1e-5 and loses digits in float32
    alphas = 1.0 - betas
    acp = torch.cumprod(alphas, dim=0)
    acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
    # the posterior variance is 0 at t = 0; log of it is clipped to the t = 1 value (as in Ho et al.)
    log_var = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
    tables = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=acp,
        alphas_cumprod_prev=acp_prev,
        sqrt_alphas_cumprod=acp.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1.0 - acp).sqrt(),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=log_var,
        posterior_mean_coef1=betas * acp_prev.sqrt() / (1.0 - acp),
        posterior_mean_coef2=(1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp),
    )
    return Schedule(**{k: v.float() for k, v in tables.items()})


def extract(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``a[t]`` for each sample, shaped ``(B, 1, ..., 1)`` with ``ndim`` dims to broadcast over x."""
    out = a.to(t.device)[t]  # b
    return out.reshape(t.shape[0], *([1] * (ndim - 1)))  # b -> b 1 1 1 1 (for b t c h w)


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}: expected one of {PREDICTIONS}")


def q_sample(s: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x0) with the given noise."""
    return extract(s.sqrt_alphas_cumprod, t, x0.ndim) * x0 + extract(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise


def training_target(s: Schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction: str = "eps") -> torch.Tensor:
    """What the model is trained to output at x_t = q_sample(s, x0, t, noise)."""
    _check_prediction(prediction)
    if prediction == "eps":
        return noise
    return extract(s.sqrt_alphas_cumprod, t, x0.ndim) * noise - extract(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0


def snr(s: Schedule, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) of each timestep: (b,)."""
    acp = s.alphas_cumprod.to(t.device)[t]
    return acp / (1.0 - acp)


def min_snr_weight(s: Schedule, t: torch.Tensor, gamma: float, prediction: str = "eps") -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), (b,): the x0-space loss weight min(SNR, gamma), written
    for the target the model predicts (eps: divided by SNR; v: by SNR + 1). Low-noise steps, where the x0 loss
    is tiny but its weight is huge, stop dominating the gradient."""
    _check_prediction(prediction)
    r = snr(s, t)
    return r.clamp(max=gamma) / (r if prediction == "eps" else r + 1.0)


def training_loss(model_out: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE, optionally weighted per sample by ``weight`` (b,)."""
    # in float32 even under autocast: a bf16 MSE of near-equal tensors is mostly rounding error
    if weight is None:
        return torch.nn.functional.mse_loss(model_out.float(), target.float())
    per_sample = (model_out.float() - target.float()).pow(2).flatten(1).mean(1)  # b
    return (per_sample * weight).mean()


def predict_x0(
    s: Schedule, x_t: torch.Tensor, t: torch.Tensor, model_out: torch.Tensor, prediction: str = "eps", clip: bool = False
) -> torch.Tensor:
    _check_prediction(prediction)
    a = extract(s.sqrt_alphas_cumprod, t, x_t.ndim)
    b = extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    # eps: invert x_t = a x0 + b eps.  v: a x_t - b v = (a² + b²) x0 = x0.
    x0 = (x_t - b * model_out) / a if prediction == "eps" else a * x_t - b * model_out
    return x0.clamp(-1.0, 1.0) if clip else x0


def predict_eps(
    s: Schedule, x_t: torch.Tensor, t: torch.Tensor, model_out: torch.Tensor, prediction: str = "eps"
) -> torch.Tensor:
    _check_prediction(prediction)
    if prediction == "eps":
        return model_out
    # a v + b x_t = (a² + b²) eps = eps
    return extract(s.sqrt_alphas_cumprod, t, x_t.ndim) * model_out + extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t


def eps_from_x0(s: Schedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The noise consistent with x_t and a (possibly clipped) x0."""
    return (x_t - extract(s.sqrt_alphas_cumprod, t, x_t.ndim) * x0) / extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)


def q_posterior(s: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0) (Ho et al. eq. 6-7)."""
    n = x_t.ndim
    mean = extract(s.posterior_mean_coef1, t, n) * x0 + extract(s.posterior_mean_coef2, t, n) * x_t
    return mean, extract(s.posterior_variance, t, n), extract(s.posterior_log_variance_clipped, t, n)


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ddpm_step(
    s: Schedule,
    model_out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    prediction: str = "eps",
    generator: Optional[torch.Generator] = None,
    clip: bool = True,
) -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t); the mean alone at t == 0."""
    x0 = predict_x0(s, x_t, t, model_out, prediction, clip=clip)
    mean, _, log_var = q_posterior(s, x0, x_t, t)
    # noise is drawn for every row (so the generator's stream does not depend on t) and masked at t == 0
    nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))  # b -> b 1 1 1 1
    return mean + nonzero * (0.5 * log_var).exp() * _randn_like(x_t, generator)


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps, descending, starting at num_timesteps - 1 and ending at 0."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    # rounding keeps both ends (T-1 and 0) for any step count, unlike a fixed stride
    ts = torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()
    return ts.tolist()


def ddim_step(
    s: Schedule,
    model_out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    prediction: str = "eps",
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    clip: bool = True,
) -> torch.Tensor:
    """DDIM (Song et al. 2021 eq. 12) from t to t_prev < t; t_prev == -1 means x0 itself (ᾱ = 1).

    eta = 0 is deterministic; eta = 1 matches DDPM's ancestral variance on the strided schedule.
    """
    n = x_t.ndim
    x0 = predict_x0(s, x_t, t, model_out, prediction)
    eps = predict_eps(s, x_t, t, model_out, prediction)
    if clip:
        # keep eps consistent with x_t and the clipped x0: eps' = (x_t - a x0') / b = eps + a/b (x0 - x0').
        # Written as a correction so unclipped pixels keep the exact eps; recomputing (x_t - a x0') / b
        # would amplify float error by 1/b near t = 0 after it was amplified by 1/a near t = T.
        x0_clipped = x0.clamp(-1.0, 1.0)
        ratio = extract(s.sqrt_alphas_cumprod, t, n) / extract(s.sqrt_one_minus_alphas_cumprod, t, n)
        eps = eps + ratio * (x0 - x0_clipped)
        x0 = x0_clipped
    acp = extract(s.alphas_cumprod, t, n)
    # t_prev = -1 would index the last entry: clamp, then replace by ᾱ = 1 (no noise left)
    acp_prev = torch.where(
        (t_prev >= 0).reshape(-1, *([1] * (n - 1))),  # b -> b 1 1 1 1
        extract(s.alphas_cumprod, t_prev.clamp(min=0), n),
        torch.ones((), dtype=acp.dtype, device=acp.device),
    )
    sigma = eta * ((1 - acp_prev) / (1 - acp) * (1 - acp / acp_prev)).clamp(min=0).sqrt()
    x_prev = acp_prev.sqrt() * x0 + (1 - acp_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        x_prev = x_prev + sigma * _randn_like(x_t, generator)
    return x_prev


def cfg_combine(cond_out: torch.Tensor, uncond_out: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): scale 1 = conditional, 0 = unconditional."""
    return uncond_out + scale * (cond_out - uncond_out)


def sample_loop(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: Sequence[int],
    s: Schedule,
    method: str = "ddim",
    steps: int = 50,
    prediction: str = "eps",
    generator: Optional[torch.Generator] = None,
    device="cpu",
    eta: float = 0.0,
    progress: bool = False,
    clip: bool = True,
) -> torch.Tensor:
    """Draw x0 of ``shape`` starting from pure noise.

    ``denoise(x_t, t)`` gets x_t and a ``(B,)`` long tensor of the current timestep and returns the
    model output (eps or v). method "ddim" walks ``steps`` strided timesteps; "ddpm" walks every one
    of the schedule's timesteps (``steps`` is ignored; use ddim with eta=1 for a short stochastic chain).
    """
    _check_prediction(prediction)
    s = s.to(device)
    x = torch.randn(tuple(shape), generator=generator, device=device)
    b = x.shape[0]
    if method == "ddpm":
        ts = list(range(s.num_timesteps - 1, -1, -1))
    elif method == "ddim":
        ts = ddim_timesteps(s.num_timesteps, steps)
    else:
        raise ValueError(f"unknown sampling method {method!r}: expected 'ddim' or 'ddpm'")
    it = ts
    if progress:
        from t2v.progress import progress as progress_counter  # only when asked: this module imports torch alone

        it = progress_counter(ts, desc=f"sampling ({method})", unit="step")
    prev = ts[1:] + [-1]
    for i, t_int in enumerate(it):
        t = torch.full((b,), t_int, device=device, dtype=torch.long)
        out = denoise(x, t)
        if method == "ddpm":
            x = ddpm_step(s, out, x, t, prediction, generator=generator, clip=clip)
        else:
            t_prev = torch.full((b,), prev[i], device=device, dtype=torch.long)
            x = ddim_step(s, out, x, t, t_prev, prediction, eta=eta, generator=generator, clip=clip)
    return x
