"""Sampling: `python -m t2v.sample --ckpt PATH_OR_RUN_DIR --prompt "..." [--prompt ...]`.

Full multi-step sampling (DDIM with few steps, or DDPM ancestral) from the EMA weights, with classifier-free
guidance, written as a frame-grid PNG (one row per prompt) and a GIF or MP4 per prompt.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np
import torch

from t2v import checkpoint as ckpt
from t2v import config
from t2v import diffusion
from t2v.data.video import write_mp4
from t2v.device import DeviceError, pick_device
from t2v.files import slug
from t2v.models import build_model, check_base
from t2v.objective import build_objective
from t2v.runlog import TrainingError
from t2v.space import build_space
from t2v.vae import VAEError


@torch.no_grad()
def generate(model, cfg: config.Config, text: torch.Tensor, tokens=None, token_mask=None, steps: int = 50, guidance: float = 3.0, seed: int = 0,
             device="cpu", method: str = "", eta: float = 0.0, progress: bool = False, space=None,
             fps: float | None = None) -> torch.Tensor:
    """text: b d cached caption embeddings -> videos b t c h w in [-1, 1]. Uses its own generator, so it never
    disturbs the training RNG (previews keep resume bit-exact). ``space`` (t2v.space; built from the config once per
    process if not given) says what is sampled and how it becomes frames: a latent-space model's latents are decoded
    through its VAE. ``fps``: the frame rate a model.fps_cond model is asked for. ``method``: one of the objective's
    samplers (ddim, ddpm or sd-ddim for diffusion.objective=ddpm, euler, heun or unipc for flow); "" = its first (ddim, euler)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    b = text.shape[0]
    objective = build_objective(cfg.diffusion, device)
    if method and method not in objective.methods:
        raise ValueError(f"sampling method {method!r} is not one of diffusion.objective={objective.name}'s: "
                         f"{', '.join(objective.methods)}")
    text = text.to(device)
    if tokens is not None:
        tokens, token_mask = tokens.to(device), token_mask.to(device)
    # Conditional and unconditional halves in one batch: rows b.. use the model's learned null embedding.
    text2 = torch.cat([text, text])  # (2b) d
    tokens2 = torch.cat([tokens, tokens]) if tokens is not None else None  # (2b) l d
    mask2 = torch.cat([token_mask, token_mask]) if tokens is not None else None  # (2b) l
    cond_mask = torch.cat([torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)]).to(device)
    if cfg.model.fps_cond and not fps:
        raise ValueError("this model is conditioned on the frame rate (model.fps_cond): give the fps to sample at")
    rate = torch.full((2 * b,), float(fps), device=device) if cfg.model.fps_cond else None  # (2b): both halves

    def denoise(x_t, t):
        if guidance == 1.0:
            return model(x_t, t, text, tokens=tokens, token_mask=token_mask, cond_mask=cond_mask[:b],
                         fps=None if rate is None else rate[:b])
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), text2, tokens=tokens2, token_mask=mask2,
                    cond_mask=cond_mask, fps=rate)  # (2b) t c h w
        cond, uncond = out.chunk(2)
        return diffusion.cfg_combine(cond, uncond, guidance)

    g = torch.Generator(device=device).manual_seed(seed)
    space = space or _shared_space(cfg.model.space, cfg.vae.name, cfg.vae.subfolder, cfg.vae.batch_size, str(device))
    # x0 is clipped to [-1, 1] at every step only where the space is bounded (pixels; latents are not)
    shape = space.sample_shape(b, cfg.data.frames, cfg.data.frame_size)  # b t c h w
    x = objective.sample(denoise, shape, steps, method, generator=g,
                         device=device, eta=eta, progress=progress, clip=space.bounded)
    model.train(was_training)
    return space.to_frames(x)


@functools.lru_cache(maxsize=2)
def _shared_space(space: str, vae: str, subfolder: str, batch_size: int, device: str):
    """One space (one loaded VAE) per process for callers that sample again and again (previews, eval batches)."""
    cfg = config.Config(model=config.ModelConfig(space=space),
                        vae=config.VAEConfig(name=vae, subfolder=subfolder, batch_size=batch_size))
    return space_for_sampling(cfg, device)


def space_for_sampling(cfg: config.Config, device="cpu"):
    """The space a checkpoint's model samples in (t2v.space.build_space without the training-data checks)."""
    return build_space(cfg, device, training=False)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """t c h w in [-1, 1] -> t h w c uint8."""
    v = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(0, 2, 3, 1).numpy()  # t c h w -> t h w c


def save_grid(videos: torch.Tensor, path: str | Path, captions=None, scale: int | None = None) -> Path:
    """One row per video (b t c h w), frames left to right, the caption above each row."""
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    b, t, _, h, w = videos.shape
    scale = scale or max(1, 96 // h)
    pad, label = 2, 12 if captions else 0
    H, W = h * scale, w * scale
    grid = Image.new("RGB", (t * (W + pad) + pad, b * (H + pad + label) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(b):
        frames = to_uint8(videos[i])
        y = pad + i * (H + pad + label)
        if captions:
            draw.text((pad, y), str(captions[i])[: 8 * t], fill=(0, 0, 0))
        for j in range(t):
            img = Image.fromarray(frames[j]).resize((W, H), Image.NEAREST)
            grid.paste(img, (pad + j * (W + pad), y + label))
    grid.save(path)
    return path


DEFAULT_FPS = 8.0  # what files play at when the training rate is unknown ("even" sampling spreads frames out)


def save_gif(video: torch.Tensor, path: str | Path, fps: float = DEFAULT_FPS, scale: int = 2) -> Path:
    from PIL import Image

    frames = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)
              for f in to_uint8(video)]
    # GIF delays are whole 1/100 s: 8 fps (12.5) is written as 12, 8.3 fps; the closest a GIF can say
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(100 / fps) * 10, loop=0)
    return Path(path)


def save_mp4(video: torch.Tensor, path: str | Path, fps: float = DEFAULT_FPS) -> Path:
    return write_mp4(path, to_uint8(video), fps)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint (a file or a sharded folder), or a run folder (its newest checkpoint that verifies)."""
    p = Path(path)
    if ckpt.is_checkpoint(p):
        return p
    if p.is_dir():
        for _, c in reversed(ckpt.list_checkpoints(p)):
            try:
                ckpt.load_checkpoint(c)
                return c
            except ckpt.CheckpointError as e:
                print(f"warning: {e}; trying the previous checkpoint", file=sys.stderr)
        raise ckpt.CheckpointError(f"{p}: no valid checkpoint (ckpt_NNNNNN.pt) in this folder")
    raise ckpt.CheckpointError(f"{p}: no such checkpoint file or run folder")


def load_ema(path: str | Path, device="cpu", base_dtype: str = ""):
    """(config, EMA model in eval mode, step) from a checkpoint file or run folder; ``base_dtype`` instead of the
    run's model.base_dtype (export writes from an fp32 base)."""
    cfg, model, step, _ = load_ema_and_rate(path, device, base_dtype)
    return cfg, model, step


def load_ema_and_rate(path: str | Path, device="cpu", base_dtype: str = ""):
    """load_ema's (config, model, step) and the frame rate it was trained at (None: unknown, "even" sampling)."""
    state = ckpt.load_checkpoint(resolve_checkpoint(path))
    cfg = config.from_dict(state["config"])
    cfg.model.base_dtype = base_dtype or cfg.model.base_dtype
    model = build_model(cfg, state["data"].get("channels", 3))  # older checkpoints: model.in_channels says it
    changed_base = check_base(state["data"], model, path)
    if changed_base:
        raise ckpt.CheckpointError(changed_base)
    model.load_state_dict(state["ema"])  # a pretrained model: its trained part; the base came from model.pretrained
    return cfg, model.to(device).eval(), int(state["step"]), state["data"].get("fps")


def embed_prompts(cfg: config.Config, prompts: list[str]):
    """(pooled b d, tokens b l d | None, mask b l | None): cached embeddings where present, the frozen
    encoder only for prompts never seen before. Tokens only for models with cross-attention."""
    from t2v.text import EmbeddingCache, build_encoder, embed_captions, encoder_key

    cache = EmbeddingCache.load(config.cache_dir(cfg, "text"), encoder_key(cfg.text))
    if cache.missing(prompts) or (config.uses_tokens(cfg) and not cache.has_tokens):
        cache_dir = config.cache_dir(cfg, "text")
        try:
            cache = embed_captions(cfg.text, prompts, cache_dir, progress=False)
        except OSError:  # a read-only cache folder: encode without keeping them
            pooled, tokens, mask = build_encoder(cfg.text).encode(prompts)
            return pooled.float(), (tokens if config.uses_tokens(cfg) else None), mask
    pooled = torch.stack([cache.get(p) for p in prompts]).float()
    if not config.uses_tokens(cfg):
        return pooled, None, None
    pairs = [cache.get_tokens(p) for p in prompts]
    return pooled, torch.stack([t for t, _ in pairs]), torch.stack([m for _, m in pairs])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m t2v.sample", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint file or run folder (newest valid checkpoint)")
    p.add_argument("--prompt", action="append", required=True, help="caption to sample (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/samples/<ckpt name>)")
    p.add_argument("--method", choices=("ddim", "ddpm", "sd-ddim", "euler", "heun", "unipc"), default=None,
                   help="ddim, ddpm or sd-ddim (AnimateDiff's) for a diffusion.objective=ddpm model; euler, heun or "
                        "unipc (Wan's own) for flow (default: the run's train.sample_method, else ddim or euler)")
    p.add_argument("--steps", type=int, default=50,
                   help="DDIM, Euler, Heun or UniPC steps (DDPM always uses all timesteps; Heun calls the model 2 x steps - 1 times)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: config)")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("gif", "mp4", "both"), default="gif")
    p.add_argument("--fps", type=float, default=None,
                   help="frames per second the files play at and a model.fps_cond model is asked for "
                        "(default: the rate it was trained at)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
        path = resolve_checkpoint(args.ckpt)
        cfg, model, step, trained = load_ema_and_rate(path, device)
        if args.fps is not None and not args.fps > 0:
            raise ValueError(f"--fps must be > 0, got {args.fps}")
        space = space_for_sampling(cfg, device)  # a latent model's VAE decodes its samples
        methods = build_objective(cfg.diffusion).methods
        method = args.method or cfg.train.sample_method or methods[0]
        if method not in methods:
            raise ValueError(f"--method {method}: {path} was trained with diffusion.objective="
                             f"{cfg.diffusion.objective}, which samples with {' or '.join(methods)}")
    except (ckpt.CheckpointError, DeviceError, VAEError, TrainingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else path.parent / "samples" / path.stem
    out.mkdir(parents=True, exist_ok=True)
    text, tokens, token_mask = embed_prompts(cfg, args.prompt)
    guidance = cfg.train.guidance if args.guidance is None else args.guidance
    steps = cfg.diffusion.timesteps if method == "ddpm" else args.steps
    fps = args.fps or trained or DEFAULT_FPS
    videos = generate(model, cfg, text, tokens=tokens, token_mask=token_mask, steps=steps, guidance=guidance,
                      seed=args.seed, device=device, method=method, eta=args.eta, progress=True, space=space, fps=fps)
    grid = save_grid(videos, out / "grid.png", args.prompt)
    why = ("--fps" if args.fps else f"the rate it was trained at, {cfg.data.sampling} sampling" if trained else
           "the training rate is unknown: data.sampling=even spreads the frames over each clip")
    print(f"step {step} | {method} {steps} steps | guidance {guidance:g} | {fps:g} fps ({why})")
    print(f"grid {grid}")
    for prompt, video in zip(args.prompt, videos):
        if args.format in ("gif", "both"):
            print(f"gif  {save_gif(video, out / (slug(prompt.lower(), 60, 'prompt') + '.gif'), fps)} ({fps:g} fps)")
        if args.format in ("mp4", "both"):
            print(f"mp4  {save_mp4(video, out / (slug(prompt.lower(), 60, 'prompt') + '.mp4'), fps)} ({fps:g} fps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
