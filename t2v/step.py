"""One training step: what t2v.train runs for every batch, and what `make bench` times.

    state = StepState(net, model, ema, opt, scaler, objective, cfg.diffusion, cfg.train, precision, device, dist)
    result = train_step(state, step, x0, Cond(text))      # x0: b t c h w in [-1, 1]

A step is: the learning rate for this step; timesteps, noise and caption dropout drawn from a generator that is
a function of (seed, step) alone, for the whole global batch, keeping this rank's rows; the noisy input (the
objective's: t2v.objective, DDPM or rectified flow); the forward
under autocast; the loss in fp32; backward (through the grad scaler); one all-reduce of (loss, "stop"); then,
unless the loss is non-finite anywhere, unscale, clip, the optimizer step and the EMA update. Everything that
makes a run resumable bit for bit lives in those draws: nothing here reads the global RNG.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from t2v import config
from t2v import diffusion
from t2v import distributed
from t2v import objective as objectives
from t2v import parallel


def lr_at(step: int, cfg: config.TrainConfig) -> float:
    """Linear warmup, then constant (the baseline trained at a constant 1e-4); with train.lr_cooldown the last
    fraction of train.steps falls linearly towards 0 ("warmup-stable-decay", Hägele et al. 2024: a short run ends
    on a settled minimum instead of the noise of a constant rate, and a longer run can branch off before it)."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    cooldown = round(cfg.lr_cooldown * cfg.steps)
    if cooldown and step >= cfg.steps - cooldown:
        return cfg.lr * (cfg.steps - step) / (cooldown + 1)  # never 0: step < train.steps
    return cfg.lr


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The only source of randomness for one training step: a function of (seed, step)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + step)
    return g


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay warmed up from 0: with a fixed 0.999 the EMA of a short run is mostly its random
    initialisation (0.999^1000 = 0.37), and samples from it are noise."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # only what trains: a pretrained model's frozen base is shared with the EMA (t2v.models.ema_copy)
    pairs = [(e, m.detach()) for e, m in zip(ema.parameters(), model.parameters()) if m.requires_grad]
    e, m = [p for p, _ in pairs], [p for _, p in pairs]
    torch._foreach_lerp_(e, m, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


def autocast(device: torch.device, precision: str):
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return nullcontext()


def draw_latents(posterior: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor], seed: int, step: int,
                 rank: int, global_batch: int) -> torch.Tensor:
    """This rank's posteriors (b 2 t c h w: mean, std) -> z = normalize(mean + std * e), b t c h w (normalize: the
    latent space's, t2v.vae.LatentSpace.normalize: a scaling factor, or per-channel statistics).
    e comes from a generator of (seed, step) of its own, drawn for the whole global batch like the step's noise,
    so a resumed run and N ranks draw exactly what one uninterrupted process draws."""
    b = posterior.shape[0]
    g = torch.Generator(device=posterior.device)
    g.manual_seed(int(np.random.SeedSequence([seed, step, 2]).generate_state(1)[0]))  # not step_generator's stream
    e = torch.randn((global_batch, *posterior.shape[2:]), generator=g, device=posterior.device)[rank * b:(rank + 1) * b]
    mean, std = posterior[:, 0], posterior[:, 1]  # b t c h w each
    return normalize(mean + std * e)


@dataclass
class Cond:
    """A batch's captions as the UNet takes them: pooled (b d) for FiLM; per-token (b l d) and mask (b l) for
    cross-attention (None without it)."""

    text: torch.Tensor
    tokens: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    fps: torch.Tensor | None = None  # b: each clip's frame rate (model.fps_cond only)


def forward_t2v(net: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, keep: torch.Tensor):
    """Our UNet3DCond: x_t (b t c h w), t (b,), captions, keep (b,) bool (False = caption dropped)."""
    return net(x_t, t, cond.text, tokens=cond.tokens, token_mask=cond.token_mask, cond_mask=keep, fps=cond.fps)


# (net, x_t, t, cond, keep) -> prediction (b t c h w); bench/harness.py passes the peer models' own
Forward = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Any, torch.Tensor], torch.Tensor]


@dataclass
class StepState:
    """What a step needs, built once by t2v.train (or a benchmark)."""

    net: torch.nn.Module  # what the forward runs: the model, or its DDP / torch.compile wrapper
    model: torch.nn.Module  # the parameters clipped, stepped and averaged into the EMA
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    objective: objectives.Objective  # what x_t and the target are (DDPM or rectified flow)
    diffusion: config.DiffusionConfig  # cond_dropout
    train: config.TrainConfig  # seed, lr and warmup, grad_clip, ema_decay
    precision: str  # fp32 | bf16 | fp16
    device: torch.device
    dist: distributed.Dist = field(default_factory=distributed.Dist)
    global_batch: int = 0  # 0: this batch x the world size
    forward: Forward = forward_t2v
    grad_accum: int = 1  # micro-batches per step: this rank's batch is split in this many, one backward each


@dataclass
class StepResult:
    loss: float  # mean over ranks
    stop: bool  # a signal arrived on some rank
    grad_norm: torch.Tensor | None  # before clipping; None: the loss was non-finite and the update skipped


def _rows(cond: Any, rows: slice) -> Any:
    """A micro-batch of the captions: Cond fields (or a plain tensor) sliced along the batch."""
    if isinstance(cond, Cond):
        return Cond(*(None if v is None else v[rows] for v in (cond.text, cond.tokens, cond.token_mask, cond.fps)))
    return cond[rows] if torch.is_tensor(cond) else cond


def train_step(s: StepState, step: int, x0: torch.Tensor, cond: Any, stop_requested: bool = False) -> StepResult:
    """One optimizer step on this rank's batch x0 (b t c h w). A non-finite loss (on any rank) skips the update
    on every rank but consumes the step, so a resumed run stays exact; the caller counts and caps those.

    With grad_accum = k the batch goes through in k micro-batches of b/k, each loss scaled by 1/k, so the
    accumulated gradient is the full batch's mean; DDP all-reduces only on the last (no_sync on the others)."""
    for group in s.opt.param_groups:
        group["lr"] = lr_at(step, s.train)
    b, k = x0.shape[0], s.grad_accum
    if b % k:
        raise ValueError(f"a batch of {b} does not split into train.grad_accum={k} micro-batches")
    global_batch = s.global_batch or b * s.dist.world_size
    # Draw for the whole global batch and keep this rank's rows: N ranks x batch b (in any number of micro-batches)
    # then see exactly the noise, timesteps and caption dropout of one process with batch N*b, and resume on
    # another world size or split sees them too.
    g = step_generator(s.train.seed, step, s.device)
    rows = slice(s.dist.rank * b, (s.dist.rank + 1) * b)
    t = s.objective.draw_times(g, global_batch, s.device)[rows]
    noise = torch.randn((global_batch, *x0.shape[1:]), generator=g, device=s.device)[rows]  # b t c h w
    keep = (torch.rand(global_batch, generator=g, device=s.device) >= s.diffusion.cond_dropout)[rows]
    total = torch.zeros((), device=s.device)
    m = b // k
    for i in range(k):
        mb = slice(i * m, (i + 1) * m)
        x_t = s.objective.noisy(x0[mb], noise[mb], t[mb])
        target = s.objective.target(x0[mb], noise[mb], t[mb])
        # DDP and FSDP exchange gradients in the last micro-batch's backward only
        with parallel.gradient_sync(s.net, i == k - 1):
            with autocast(s.device, s.precision):
                out = s.forward(s.net, x_t, s.objective.model_time(t[mb]), _rows(cond, mb), keep[mb])
            loss = diffusion.training_loss(out.float(), target, s.objective.weight(t[mb])) / k
            s.scaler.scale(loss).backward()
        total = total + loss.detach()
    # One host sync per step: the mean loss over ranks and "did any rank get a signal".
    loss_value, stop = distributed.reduce_step(total, stop_requested, s.dist)
    if not math.isfinite(loss_value):
        s.opt.zero_grad(set_to_none=True)
        return StepResult(loss_value, stop, None)
    s.scaler.unscale_(s.opt)
    grad_norm = parallel.local(torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.train.grad_clip))
    s.scaler.step(s.opt)
    s.scaler.update()
    s.opt.zero_grad(set_to_none=True)
    ema_update(s.ema, s.model, ema_decay_at(step, s.train.ema_decay))
    return StepResult(loss_value, stop, grad_norm)
