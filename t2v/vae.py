"""The frozen pretrained VAE of latent-space training: diffusers' AutoencoderKL, loaded offline first.

Latent diffusion (Rombach et al. 2022; Open-Sora, Latte, AnimateDiff on the Stable Diffusion VAE) trains the UNet
on each frame's VAE latent instead of its pixels: the SD VAE turns a 256x256 RGB frame into 4x32x32 values, fewer
than a 64x64 RGB frame. The VAE is a well-kept library model (diffusers), not ours: it is only loaded, never
trained. Every frame is encoded once, ahead of training (t2v.data.latents); training draws z from the stored
posterior and never runs the encoder. Samples are decoded here, in bounded batches.

Everything about the latent space comes from the VAE's own config, never from constants: its channels
(``latent_channels``), its spatial factor (2 per down block after the first) and its scaling factor
(``scaling_factor``, which brings the latents to about unit variance, as the noise schedule assumes).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from t2v import config
from t2v import hf


class VAEError(RuntimeError):
    pass


@dataclass(frozen=True)
class LatentSpace:
    channels: int  # latent channels per frame (4 for the SD VAE)
    factor: int  # SIZE / factor = the latent's height and width (8 for the SD VAE)
    scaling_factor: float  # z = posterior sample * scaling_factor (0.18215 for the SD VAE)

    @staticmethod
    def of(vae) -> "LatentSpace":
        cfg = vae.config
        return LatentSpace(int(cfg.latent_channels), 2 ** (len(cfg.block_out_channels) - 1),
                           float(cfg.scaling_factor))


def load_vae(cfg: config.VAEConfig, device: torch.device | str = "cpu"):
    """The AutoencoderKL ``vae.name`` names (hub name or local folder), frozen, in eval mode, on ``device``."""
    try:
        from diffusers import AutoencoderKL
        from diffusers.utils import logging as dlogging
    except ImportError as e:  # a core dependency: only a broken install gets here
        raise VAEError(f"diffusers is not importable ({e}); `make install` installs it") from None
    dlogging.set_verbosity_error()
    options = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
    vae = hf.load_pretrained(AutoencoderKL, cfg.name, what="VAE", setting="vae.name", error=VAEError, **options)
    return vae.to(device).eval().requires_grad_(False)


def vae_identity(cfg: config.VAEConfig, vae) -> str:
    """What a latent cache depends on: the VAE's name, subfolder, full config and a digest of its weights (a
    fine-tuned VAE at the same path must not reuse another's latents)."""
    weights = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        weights.update(name.encode())
        # a sample, its first 1024 values: distinct enough, and no copy of the whole 330 MB model per start
        weights.update(t.detach().reshape(-1)[:1024].cpu().float().numpy().tobytes())
        weights.update(str(tuple(t.shape)).encode())
    blob = {"name": cfg.name, "subfolder": cfg.subfolder, "config": dict(vae.config), "weights": weights.hexdigest()}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def encode(vae, frames: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """frames (n 3 H W) in [-1, 1] -> the posterior's mean and std (n c h w), float32, unscaled."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for i in range(0, frames.shape[0], batch_size):
        dist = vae.encode(frames[i:i + batch_size].to(device, torch.float32)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def decode(vae, z: torch.Tensor, space: LatentSpace, batch_size: int) -> torch.Tensor:
    """Scaled latents (b t c h w) -> videos (b t 3 H W) in [-1, 1], decoded ``batch_size`` frames at a time."""
    device = next(vae.parameters()).device
    b, t = z.shape[:2]
    flat = z.reshape(b * t, *z.shape[2:]) / space.scaling_factor  # b t c h w -> (b t) c h w
    frames = [vae.decode(flat[i:i + batch_size].to(device, torch.float32)).sample.float().cpu()
              for i in range(0, flat.shape[0], batch_size)]
    video = torch.cat(frames).clamp(-1, 1)
    return video.reshape(b, t, *video.shape[1:])  # (b t) 3 H W -> b t 3 H W
