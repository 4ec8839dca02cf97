"""What training reads of a window cache (data.sampling=window): opened, or built like the clip cache, with the
clips it cannot use reported by manifest line; and the frame rate the model is trained at."""
from __future__ import annotations

import numpy as np

from t2v.config import Config, cache_dir
from t2v.runlog import TrainingError
from t2v.data.latents import open_latent_windows
from t2v.data.video import describe_size
from t2v.data.window_build import build_windows
from t2v.data.windows import Rate, open_windows, report_short

LATENTS_HINT = ("Run once: python -m t2v.data latents with this run's --config and key=value arguments (GPU if there is "
                "one; training never runs the VAE encoder)")


def open_training_windows(cfg: Config, clips, log, vae_id: str | None):
    """data.sampling=window: the window cache (built here if missing, like the clip cache; in latent space it must
    have been encoded), its too-short clips reported by line; None with data.cache=false (decoded per draw)."""
    rate, where = Rate.of(cfg.data), cache_dir(cfg, "data")
    if vae_id is not None:
        windows = open_latent_windows(clips, cfg.data.frame_size, rate, where, vae_id, cfg.data.frames,
                                      cfg.data.latent_windows)
        if windows is None:
            raise TrainingError(f"{cfg.data.manifest}: no latent window cache for these clips at "
                                f"{describe_size(cfg.data.frame_size)}, {rate.describe()} and the VAE {cfg.vae.name} "
                                f"in {where}.\n{LATENTS_HINT}")
    elif not cfg.data.cache:
        return None
    else:
        windows = open_windows(clips, cfg.data.frame_size, rate, where)
        if windows is None:
            log.line(f"building the window cache in {where} (once; `python -m t2v.data cache`)")
            windows = build_windows(clips, cfg.data.frame_size, rate, where, progress=log.enabled)
    short = report_short(windows, clips, cfg.data.manifest, cfg.data.frames, cfg.data.strides,
                         cfg.data.short_clips == "pad")
    if windows.bad or short:
        log.warn(f"window cache: {len(windows.bad)} corrupt clips skipped, {len(short)} with no shot as long as a "
                 f"window {'padded' if cfg.data.short_clips == 'pad' else 'skipped'} (first: "
                 f"{short[0] if short else sorted(windows.bad)[0]}); `python -m t2v.data check` lists them")
    if len(windows.too_short(cfg.data.frames, cfg.data.strides)) + len(windows.bad) == len(clips) and \
            cfg.data.short_clips == "skip":
        raise TrainingError(f"{cfg.data.manifest}: no clip has room for a window of {cfg.data.frames} frames at "
                            f"{rate.describe()}: lower data.frames or data.fps, or set data.short_clips=pad")
    return windows


def trained_fps(cfg: Config, windows) -> float | None:
    """The frame rate the model was trained at (its first stride), which samples play at; None for "even"."""
    if cfg.data.sampling != "window":
        return None
    if cfg.data.fps:
        return cfg.data.fps / cfg.data.strides[0]
    rates = windows.fps[windows.fps > 0] if windows is not None else np.zeros(0)
    return float(np.median(rates)) / cfg.data.strides[0] if len(rates) else None
