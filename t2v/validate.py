"""Validation loss at fixed timesteps: a learning signal that needs no judge of the samples.

Every ``train.val_every`` steps the EMA model's loss (the MSE of its training target, eps or v) is measured on
a fixed subset of the validation manifest at fixed timesteps with fixed noise. The clips, captions, timesteps
and noise are the same at every evaluation, across restarts and across runs with the same data and seed, so
the curves compare like with like: the training loss mixes random timesteps (whose losses differ by orders of
magnitude) and cannot show that. Its randomness is its own generator: measuring never moves the training RNG,
so resume stays bit-exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from t2v import config
from t2v.data.manifest import ManifestError, read_manifest
from t2v.data.video import VideoError, decode_uint8, to_model
from t2v.objective import Objective

NOISE_SEED = 20_231_101  # fixed: the same noise for every run on the same data


@dataclass
class ValSet:
    videos: torch.Tensor  # n t c h w in [-1, 1]
    text: torch.Tensor  # n d, the first caption's cached embedding
    tokens: torch.Tensor | None  # n l d (cross-attention models only)
    token_mask: torch.Tensor | None  # n l
    timesteps: tuple[int, ...]
    noise: torch.Tensor  # k n t c h w: one fixed draw per timestep
    manifest: Path
    fps: torch.Tensor | None = None  # n: each window's frame rate (data.sampling=window)


def load_val_set(cfg: config.Config, emb, space=None) -> tuple[ValSet | None, str]:
    """The fixed validation subset, or None and the reason it is skipped (no manifest, captions not cached). Its
    clips are what ``space`` (t2v.space; None: pixels) makes of them: frames decoded here, or in latent space the
    cached posterior means, scaled."""
    path = config.val_manifest(cfg)
    if not path.is_file():
        return None, f"no validation manifest {path} (data.val_manifest): validation loss off"
    try:
        all_clips = read_manifest(path, cfg.data.video_root)
        clips = all_clips[: cfg.train.val_clips]
    except ManifestError as e:
        return None, f"validation manifest unusable, validation loss off: {e}"
    captions = [clip.captions[0] for clip in clips]
    missing = emb.missing(captions)
    if missing:
        return None, (f"{len(missing)} captions of {path} have no cached embedding (e.g. {missing[0]!r}): validation "
                      "loss off; `python -m t2v.text embed` embeds them")
    videos, fps, why_not = (space.val_x0 if space is not None else pixel_x0)(cfg, path, all_clips, len(clips))
    if why_not:
        return None, why_not
    if not videos:
        return None, f"{path}: no clips: validation loss off"
    x0 = torch.stack(videos)  # n t c h w
    tokens = mask = None
    if config.uses_tokens(cfg):
        pairs = [emb.get_tokens(c) for c in captions]
        tokens, mask = torch.stack([t for t, _ in pairs]), torch.stack([m for _, m in pairs])
    g = torch.Generator().manual_seed(NOISE_SEED)
    timesteps = tuple(cfg.train.val_timesteps)  # ints: t2v.config.validate coerced them
    noise = torch.randn((len(timesteps), *x0.shape), generator=g)  # k n t c h w
    return ValSet(x0, torch.stack([emb.get(c) for c in captions]), tokens, mask, timesteps, noise, path,
                  None if fps is None else torch.tensor(fps, dtype=torch.float32)), ""


def pixel_x0(cfg: config.Config, path: Path, all_clips: list, n: int) -> tuple[list, list | None, str]:
    """(x0 per clip, fps per clip or None, why not) of the first n clips in pixel space: decoded here."""
    if cfg.data.sampling == "window":
        return window_x0(cfg, path, all_clips, n, None)
    videos, why = decoded_x0(cfg, path, all_clips[:n])
    return videos, None, why


def decoded_x0(cfg: config.Config, path: Path, clips: list) -> tuple[list[torch.Tensor], str]:
    """The clips' "even" frames (t c h w in [-1, 1]), decoded; or why validation is off."""
    videos = []
    for clip in clips:
        try:
            videos.append(to_model(decode_uint8(clip.video, cfg.data.frames, cfg.data.frame_size, start=clip.start,
                                                end=clip.end)))
        except VideoError as e:
            return [], f"{path}:{clip.line}: {e}: validation loss off"
    return videos, ""


def window_x0(cfg: config.Config, path: Path, all_clips: list, n: int, space=None):
    """(x0 list, fps list, why not): one fixed window per validation clip at the trained rate (the first stride),
    drawn from a generator of its own: pixels decoded here, latents from the manifest's latent window cache. A clip
    with no room for a window gives its longest shot, padded (data.short_clips=pad), so every clip counts."""
    import numpy as np

    from t2v.data.windows import Rate, fixed_window

    rate, d = Rate.of(cfg.data), cfg.data
    cache = None
    if space is not None:  # latent space: its cached posterior means
        from t2v.data.latents import open_latent_windows

        cache = open_latent_windows(all_clips, d.frame_size, rate, config.cache_dir(cfg, "data"), space.identity,
                                    d.frames, d.latent_windows)
        if cache is None:
            return [], [], f"no latent window cache for {path}: validation loss off; `python -m t2v.data latents` builds it"
    videos, fps = [], []
    for i, clip in enumerate(all_clips[:n]):
        if cache is not None:
            got = cache.window(i, d.frames, d.strides[:1], np.random.default_rng([NOISE_SEED, i]), pad=True)
            if got is None:
                return [], [], f"{path}:{clip.line}: clip {i} could not be read into the cache: validation loss off"
            rows, clip_fps = got
            videos.append(cache.space.normalize(torch.from_numpy(cache.item(rows)[0].astype("float32"))))  # mean
        else:
            try:
                u8, clip_fps = fixed_window(clip, d, NOISE_SEED, i)
            except VideoError as e:
                return [], [], f"{path}:{clip.line}: {e}: validation loss off"
            videos.append(to_model(u8))
        fps.append(clip_fps)
    return videos, fps, ""


def latent_x0(cfg: config.Config, path: Path, all_clips: list, n: int, vae_id: str) -> tuple[list[torch.Tensor], str]:
    """The first n validation clips in latent space: their cached posterior means (t c h w), scaled like the
    training draws; fixed, so every evaluation measures the same x0."""
    from t2v.data.latents import open_latents  # latent space only

    # the cache is keyed by every clip of the manifest, of which the first n are used
    cache = open_latents(all_clips, cfg.data.frames, cfg.data.frame_size, config.cache_dir(cfg, "data"), vae_id)
    if cache is None:
        return [], f"no latent cache for {path}: validation loss off; `python -m t2v.data latents` builds it"
    if cache.bad & set(range(n)):
        return [], f"{path}: clip {min(cache.bad & set(range(n)))} could not be encoded: validation loss off"
    return [cache.space.normalize(torch.from_numpy(cache.get(i)[0].astype("float32"))) for i in range(n)], ""


@torch.no_grad()
def val_loss(model, objective: Objective, valset: ValSet, device, batch_size: int = 16) -> dict[int, float]:
    """{timestep: MSE of the model's target} over the validation subset, conditional on the captions. A flow
    model is measured at t = timestep / diffusion.timesteps (t2v.objective.Flow.fixed_times)."""
    was_training = model.training
    model.eval()
    out: dict[int, float] = {}
    n = valset.videos.shape[0]
    for k, t_int in enumerate(valset.timesteps):
        total = 0.0
        for i in range(0, n, batch_size):
            rows = slice(i, i + batch_size)
            x0 = valset.videos[rows].to(device)  # b t c h w
            noise = valset.noise[k, rows].to(device)
            t = objective.fixed_times(t_int, x0.shape[0], device)
            tokens = valset.tokens[rows].to(device) if valset.tokens is not None else None
            mask = valset.token_mask[rows].to(device) if valset.token_mask is not None else None
            fps = valset.fps[rows].to(device) if valset.fps is not None else None
            pred = model(objective.noisy(x0, noise, t), objective.model_time(t), valset.text[rows].to(device), tokens=tokens,
                         token_mask=mask, fps=fps)
            target = objective.target(x0, noise, t)
            total += float((pred.float() - target.float()).pow(2).sum())
        out[t_int] = total / valset.noise[k].numel()
    model.train(was_training)
    return out
