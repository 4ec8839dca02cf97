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


VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLWan")  # an image VAE (frame by frame) and Wan 2.1's video VAE


@dataclass(frozen=True)
class LatentSpace:
    channels: int  # latent channels per frame (4 for the SD VAE)
    factor: int  # SIZE / factor = the latent's height and width (8 for the SD VAE)
    scaling_factor: float  # z = posterior sample * scaling_factor (0.18215 for the SD VAE)
    # A video VAE (Wan's AutoencoderKLWan) encodes whole clips: the first frame alone, then every `temporal` frames
    # into one latent frame, so a clip needs 1 + k * temporal frames. 1: an image VAE, frame by frame.
    temporal: int = 1
    # Per-channel normalisation, z = (sample - mean) / std, where the VAE's config has it (Wan's latents_mean and
    # latents_std, which the VAE does not apply itself); () = scaling_factor
    mean: tuple = ()
    std: tuple = ()

    @staticmethod
    def of(vae) -> "LatentSpace":
        cfg = vae.config
        if "z_dim" in cfg:  # AutoencoderKLWan: 8x in space, 4x in time (after the first frame)
            down = list(cfg.temperal_downsample)
            return LatentSpace(int(cfg.z_dim), 2 ** len(down), 1.0, 2 ** sum(bool(d) for d in down),
                               tuple(float(v) for v in cfg.latents_mean), tuple(float(v) for v in cfg.latents_std))
        return LatentSpace(int(cfg.latent_channels), 2 ** (len(cfg.block_out_channels) - 1),
                           float(cfg.scaling_factor))

    @staticmethod
    def from_dict(d: dict) -> "LatentSpace":
        return LatentSpace(**{**d, "mean": tuple(d.get("mean", ())), "std": tuple(d.get("std", ()))})

    def to_dict(self) -> dict:
        return {"channels": self.channels, "factor": self.factor, "scaling_factor": self.scaling_factor,
                "temporal": self.temporal, "mean": list(self.mean), "std": list(self.std)}

    def latent_frames(self, frames: int) -> int:
        """How many latent frames a clip of ``frames`` frames becomes."""
        return frames if self.temporal == 1 else 1 + (frames - 1) // self.temporal

    def frames_problem(self, frames: int) -> str | None:
        """Why a clip of ``frames`` frames cannot be encoded (None: it can), naming the nearest valid counts."""
        if self.temporal == 1 or frames >= 1 and (frames - 1) % self.temporal == 0:
            return None
        below = max(1, frames - (frames - 1) % self.temporal)
        return (f"data.frames={frames}: this video VAE encodes 1 + {self.temporal}k frames (the first alone, then "
                f"{self.temporal} per latent frame); the nearest are {below} and {below + self.temporal}")

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.channels, 1, 1)  # broadcast over ... t c h w
        return (torch.tensor(self.mean, dtype=z.dtype, device=z.device).view(shape),
                torch.tensor(self.std, dtype=z.dtype, device=z.device).view(shape))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """A posterior sample or mean (... t c h w) -> what the denoiser sees (about unit variance)."""
        if not self.mean:
            return z * self.scaling_factor
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of normalize: what the VAE decodes."""
        if not self.mean:
            return z / self.scaling_factor
        mean, std = self._stats(z)
        return z * std + mean


def load_vae(cfg: config.VAEConfig, device: torch.device | str = "cpu"):
    """The AutoencoderKL ``vae.name`` names (hub name or local folder), frozen, in eval mode, on ``device``."""
    try:
        from diffusers import AutoencoderKL, AutoModel
        from diffusers.utils import logging as dlogging
    except ImportError as e:  # a core dependency: only a broken install gets here
        raise VAEError(f"diffusers is not importable ({e}); `make install` installs it") from None
    dlogging.set_verbosity_error()
    options = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
    # AutoModel: the class the folder's config names (AutoencoderKL, or a video VAE such as AutoencoderKLWan)
    how = hf.how_to_fetch("VAE", hf.fetch_statement(AutoencoderKL, cfg.name, **options), "vae.name")
    vae = hf.load_pretrained(AutoModel, cfg.name, what="VAE", setting="vae.name", error=VAEError, how=how, **options)
    if type(vae).__name__ not in VAE_CLASSES:
        raise VAEError(f"vae.name={cfg.name}{f' (vae.subfolder={cfg.subfolder})' if cfg.subfolder else ''} is a "
                       f"{type(vae).__name__}, not a VAE this toolkit encodes with ({', '.join(VAE_CLASSES)})")
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
def encode_clip(vae, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A video VAE's posterior of one clip: video (t 3 H W) in [-1, 1] -> mean and std (t' c h w), float32,
    unnormalised. The whole clip goes in at once: a causal video VAE's latents depend on every frame before."""
    device = next(vae.parameters()).device
    x = video.to(device, torch.float32).permute(1, 0, 2, 3)[None]  # t 3 H W -> 1 3 t H W
    dist = vae.encode(x).latent_dist
    mean, std = (v[0].permute(1, 0, 2, 3).float().cpu() for v in (dist.mean, dist.std))  # 1 c t' h w -> t' c h w
    return mean, std


@torch.no_grad()
def decode(vae, z: torch.Tensor, space: LatentSpace, batch_size: int) -> torch.Tensor:
    """Normalised latents (b t c h w) -> videos (b T 3 H W) in [-1, 1]: an image VAE decodes ``batch_size``
    frames at a time, a video VAE one clip at a time (t latent frames -> T = 1 + temporal (t - 1) frames)."""
    device = next(vae.parameters()).device
    b, t = z.shape[:2]
    if space.temporal > 1:
        clips = [vae.decode(space.denormalize(z[i].float()).permute(1, 0, 2, 3)[None].to(device)).sample  # 1 3 T H W
                 for i in range(b)]
        return torch.cat(clips).float().cpu().clamp(-1, 1).permute(0, 2, 1, 3, 4)  # b 3 T H W -> b T 3 H W
    flat = space.denormalize(z.reshape(b * t, *z.shape[2:]))  # b t c h w -> (b t) c h w
    frames = [vae.decode(flat[i:i + batch_size].to(device, torch.float32)).sample.float().cpu()
              for i in range(0, flat.shape[0], batch_size)]
    video = torch.cat(frames).clamp(-1, 1)
    return video.reshape(b, t, *video.shape[1:])  # (b t) 3 H W -> b t 3 H W
