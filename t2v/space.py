"""Where the model works: RGB pixels, or the latents of a frozen pretrained VAE (model.space). One object per
space, built once from the config by `build_space`, answers everything that differs between them:

  channels, sample_shape(b, frames, size)   what the model sees
  model_input(batch, ...)                   how a loader batch becomes the step's x0 (b t c h w)
  to_frames(x)                              how samples become frames in [-1, 1] (b t 3 H W)
  bounded                                   whether x0 lies in [-1, 1] (sampling clips its estimates there)
  identity, checkpoint_data()               what identifies it in a checkpoint beyond the config
  open_training_caches / val_x0             the caches it reads

The loop, sampling, validation and eval ask the space; none of them tests model.space, and nothing writes into
the config after it is resolved. A third space (a video VAE, say) is one more class with these members.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from t2v import config
from t2v import validate
from t2v.config_checks import frame_sides
from t2v.data.cache import build_cache, open_cache
from t2v.data.latents import latent_cells, open_latents
from t2v.data.sources import LATENTS_HINT, open_training_windows
from t2v.data.video import describe_size, frame_hw
from t2v.models.unet import resolve_size
from t2v.runlog import TrainingError
from t2v.step import draw_latents
from t2v.vae import LatentSpace, VAEError, decode, load_vae, vae_identity



@dataclass
class PixelSpace:
    """The UNet denoises RGB frames in [-1, 1]."""

    name = "pixel"
    channels = 3
    bounded = True
    identity = None  # nothing beyond the config identifies pixel space

    def sample_shape(self, b: int, frames: int, size: int | tuple[int, int]) -> tuple[int, ...]:
        return (b, frames, 3, *frame_hw(size))  # b t c h w

    def model_input(self, batch: dict, seed: int, step: int, rank: int, global_batch: int, device) -> torch.Tensor:
        return batch["video"].to(device, non_blocking=True)  # b t c h w, in [-1, 1]

    def to_frames(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-1, 1)

    def checkpoint_data(self) -> dict:
        return {"vae": None, "channels": self.channels}

    def open_training_caches(self, cfg: config.Config, clips, log) -> dict:
        """The ClipDataset arguments: the window cache (data.sampling=window) or the "even" clip cache, built here
        if missing; neither with data.cache=false (decoded per draw)."""
        if cfg.data.sampling == "window":
            return {"windows": open_training_windows(cfg, clips, log, None)}
        if not (cfg.data.cache and cfg.data.sampling == "even"):
            return {}
        where = config.cache_dir(cfg, "data")
        cache = open_cache(clips, cfg.data.frames, cfg.data.frame_size, where)
        if cache is None:
            log.line(f"building the clip cache in {where} (once; `python -m t2v.data cache`)")
            cache = build_cache(clips, cfg.data.frames, cfg.data.frame_size, where, progress=log.enabled)
        if cache.bad:
            log.warn(f"{len(cache.bad)} corrupt clips in the cache are skipped (see `python -m t2v.data check`)")
        return {"cache": cache}

    def val_x0(self, cfg: config.Config, path, all_clips: list, n: int) -> tuple[list, list | None, str]:
        """(x0 per clip, fps per clip or None, why not) of the first n validation clips, decoded."""
        return validate.pixel_x0(cfg, path, all_clips, n)


@dataclass
class VAESpace:
    """The UNet denoises the scaled latents of a frozen AutoencoderKL; frames are decoded through it."""

    vae: Any
    latent: LatentSpace
    identity: str  # t2v.vae.vae_identity: the latent caches' key, and what a resume must match
    batch_size: int  # frames per decode call

    name = "latent"
    bounded = False  # latents are not bounded: sampling does not clip them

    @property
    def channels(self) -> int:
        return self.latent.channels

    def sample_shape(self, b: int, frames: int, size: int | tuple[int, int]) -> tuple[int, ...]:
        cells = latent_cells(size, self.latent)  # h w
        return (b, self.latent.latent_frames(frames), self.latent.channels, *cells)  # b t c h w

    def model_input(self, batch: dict, seed: int, step: int, rank: int, global_batch: int, device) -> torch.Tensor:
        """The VAE posterior (b 2 t c h w) -> this step's latent draw, b t c h w (its own (seed, step) generator)."""
        return draw_latents(batch["latent"].to(device, non_blocking=True), self.latent.normalize, seed, step,
                            rank, global_batch)

    def to_frames(self, x: torch.Tensor) -> torch.Tensor:
        return decode(self.vae, x, self.latent, self.batch_size)

    def checkpoint_data(self) -> dict:
        return {"vae": self.identity, "channels": self.channels}

    def open_training_caches(self, cfg: config.Config, clips, log) -> dict:
        """The latent cache ("even") or the latent window cache; both must have been encoded ahead of time."""

        if cfg.data.sampling == "window":
            return {"windows": open_training_windows(cfg, clips, log, self.identity)}
        where = config.cache_dir(cfg, "data")
        latents = open_latents(clips, cfg.data.frames, cfg.data.frame_size, where, self.identity)
        if latents is None:
            raise TrainingError(f"{cfg.data.manifest}: no latent cache for these clips at {cfg.data.frames}x"
                                f"{describe_size(cfg.data.frame_size)} and the VAE {cfg.vae.name} in {where}.\n"
                                f"{LATENTS_HINT}")
        if latents.bad:
            log.warn(f"{len(latents.bad)} corrupt clips in the latent cache are skipped")
        return {"latents": latents}

    def val_x0(self, cfg: config.Config, path, all_clips: list, n: int) -> tuple[list, list | None, str]:
        """The first n validation clips' cached posterior means, scaled like the training draws."""
        if cfg.data.sampling == "window":
            return validate.window_x0(cfg, path, all_clips, n, self)
        videos, why = validate.latent_x0(cfg, path, all_clips, n, self.identity)
        return videos, None, why


def build_space(cfg: config.Config, device: torch.device | str = "cpu", vae=None,
                training: bool = True) -> PixelSpace | VAESpace:
    """The space cfg.model.space names. Latent space loads the frozen VAE (``vae``: one already loaded); for
    training it refuses settings its caches or the UNet cannot serve, before any data is read."""
    if cfg.model.space == "pixel":
        return PixelSpace()
    vae = vae if vae is not None else load_vae(cfg.vae, device)
    latent = LatentSpace.of(vae)
    if not training:  # sampling a checkpoint: its model was built for this space already
        return VAESpace(vae, latent, vae_identity(cfg.vae, vae), cfg.vae.batch_size)
    if cfg.model.in_channels not in (0, latent.channels):
        raise VAEError(f"model.in_channels={cfg.model.in_channels}, but the VAE {cfg.vae.name} has "
                       f"{latent.channels} latent channels (leave model.in_channels at 0)")
    problem = latent.frames_problem(cfg.data.frames)
    if problem:
        raise VAEError(problem)
    if latent.temporal > 1 and cfg.data.sampling == "window" and tuple(cfg.data.strides) != (1,):
        raise VAEError(f"data.strides={list(cfg.data.strides)}: the latents of a video VAE ({cfg.vae.name}) belong to "
                       "a whole window, encoded once at the cache's rate (data.latent_windows per clip); set "
                       "data.strides=1 and choose the rate with data.fps")
    if cfg.data.sampling == "random_window":  # decoded per sample: every draw would run the encoder
        raise VAEError("data.sampling='random_window' cannot train in latent space (its frames are decoded per "
                       "sample, and training never runs the VAE encoder); use data.sampling=window with data.fps, "
                       "whose latent window cache holds every frame, or data.sampling=even")
    try:  # a dit needs only the patch to divide the latent frame (t2v.config_checks); the UNet halves its patches
        halvings = (0 if cfg.model.arch != "unet" else
                    len(resolve_size(cfg.model.size, cfg.model.base_channels, cfg.model.channel_mults)[1]) - 1)
    except ValueError as e:
        raise VAEError(str(e)) from None
    patch = 1 if cfg.model.arch != "unet" else cfg.model.patch or 1  # the others' sizes: t2v.config_checks
    unit = patch * 2 ** halvings
    for key, side in frame_sides(cfg):
        if side % latent.factor or (side // latent.factor) % unit:
            raise VAEError(f"{key}={side}: latent frames are {side}/{latent.factor} cells, which the UNet halves "
                           f"{halvings} times (in patches of {patch}: model.patch); use a multiple of "
                           f"{latent.factor * unit}")
    return VAESpace(vae, latent, vae_identity(cfg.vae, vae), cfg.vae.batch_size)
