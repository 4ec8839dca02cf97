"""Every configuration setting's range, as messages that name the key: t2v.config.validate raises them.

Torch-free and free of t2v.config itself (it checks any object shaped like t2v.config.Config), so the config
module stays about reading and writing settings, and this one about what they may be.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass


def _int_list(values) -> tuple[int, ...] | None:
    """``values`` as a tuple of ints (``train.val_timesteps=100,500`` arrives as strings), or None if one is not."""
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        return None
    return out if all(float(v) == o for v, o in zip(values, out)) else None


SAMPLINGS = ("even", "window", "random_window")
WANDB_MODES = ("off", "offline", "online")
OBJECTIVES = ("ddpm", "flow")
SAMPLERS = {"ddpm": ("ddim", "ddpm", "sd-ddim"), "flow": ("euler", "heun", "unipc")}  # t2v.objective's methods
ARCHS = ("unet", "dit", "wan", "animatediff")
PRETRAINED = ("wan", "animatediff")  # the families of t2v/models that load model.pretrained
FINETUNES = ("full", "lora", "motion")
PARALLELS = ("ddp", "fsdp")  # t2v.parallel
TEXT_ENCODERS = ("clip", "hash", "tiny", "umt5", "sd_clip")  # t2v.text.encoders builds each


@dataclass(frozen=True)
class SpaceFacts:
    """What the checks need to know of a model.space without building it (t2v.space builds the real one, with its
    VAE, and checks the real factor): how many pixels on a side one cell the model sees spans, and whether a VAE
    makes the cells."""

    cell: int
    vae: bool


# the spaces by name: this table and t2v/space.py are the only places that name them
SPACES = {"pixel": SpaceFacts(cell=1, vae=False), "latent": SpaceFacts(cell=8, vae=True)}  # 8: SD's and Wan's VAEs


def space_facts(cfg) -> SpaceFacts:
    """model.space described (an unknown name as pixels: the range check in ``problems`` names it)."""
    return SPACES.get(cfg.model.space, SPACES["pixel"])


def _window_checks(cfg) -> list[tuple[bool, str]]:
    """data.sampling=window's settings: one rate, in range, and a window that fits in data.max_seconds."""
    d = cfg.data
    strides = _int_list(d.strides)
    if strides is not None:
        d.strides = strides
    checks = [
        (d.fps >= 0 and math.isfinite(d.fps), f"data.fps must be >= 0 frames per second, got {d.fps}"),
        (d.frame_interval >= 0, f"data.frame_interval must be >= 0, got {d.frame_interval}"),
        (strides is not None and len(strides) >= 1 and all(s >= 1 for s in strides),
         f"data.strides must be whole numbers >= 1, got {list(d.strides)}"),
        (d.max_seconds > 0, f"data.max_seconds must be > 0, got {d.max_seconds}"),
        (d.cut_threshold > 0, f"data.cut_threshold must be > 0, got {d.cut_threshold}"),
        (d.short_clips in ("skip", "pad"), f"data.short_clips must be 'skip' or 'pad', got {d.short_clips!r}"),
        (d.latent_windows >= 1, f"data.latent_windows must be >= 1, got {d.latent_windows}"),
        (d.sampling == "window" or not cfg.model.fps_cond,
         "model.fps_cond needs data.sampling=window (the frame rate is known only for windows)"),
    ]
    if d.sampling != "window":
        return checks + [(not (d.fps or d.frame_interval),
                          f"data.fps and data.frame_interval apply to data.sampling=window only (it is {d.sampling!r})")]
    checks.append((bool(d.fps) != bool(d.frame_interval),
                   "data.sampling=window needs exactly one of data.fps and data.frame_interval: set data.fps=8 "
                   "(frames per second the model sees) or data.frame_interval=K (every K-th source frame); got "
                   f"fps={d.fps:g}, frame_interval={d.frame_interval}"))
    if d.fps > 0 and strides:
        seconds = (d.frames - 1) * max(strides) / d.fps + 1 / d.fps
        checks.append((seconds <= d.max_seconds + 1e-9,
                       f"a window of data.frames={d.frames} at {d.fps:g} fps (stride {max(strides)}) lasts {seconds:g} s,"
                       f" longer than data.max_seconds={d.max_seconds:g}: raise data.max_seconds or data.fps"))
    return checks


def _pretrained_checks(cfg) -> list[tuple[bool, str]]:
    """A pretrained family (model.arch=wan or animatediff): its weights, the objective and captions they were trained
    with, and the options of the networks trained from scratch, which its weights fix."""
    m, t, d = cfg.model, cfg.train, cfg.diffusion
    checks = [
        (t.finetune in FINETUNES, f"train.finetune must be one of {', '.join(FINETUNES)}, got {t.finetune!r}"),
        (t.lora_rank >= 1 and t.lora_alpha >= 0, "train.lora_rank must be >= 1 and train.lora_alpha >= 0 (0 = rank)"),
        (d.beta_start == d.beta_end == 0 or 0 < d.beta_start < d.beta_end < 1,
         f"diffusion.beta_start and diffusion.beta_end must both be 0 (Ho et al.'s 1e-4 and 0.02) or 0 < beta_start < beta_end "
         f"< 1, got {d.beta_start:g} and {d.beta_end:g}"),
        (d.beta_start == d.beta_end == 0 or (d.objective == "ddpm" and d.schedule == "linear"),
         "diffusion.beta_start and diffusion.beta_end apply to diffusion.objective=ddpm with diffusion.schedule=linear"),
        (t.sample_method != "sd-ddim" or (d.schedule == "linear" and d.shift == 1),
         "train.sample_method=sd-ddim is diffusers' DDIM over linear betas: it needs diffusion.schedule=linear and "
         "diffusion.shift=1"),
        (cfg.text.encoder != "sd_clip" or cfg.text.max_tokens == 77,
         f"text.encoder=sd_clip conditions on all 77 of CLIP's positions, as Stable Diffusion: set text.max_tokens=77 "
         f"(got {cfg.text.max_tokens})"),
    ]
    if m.arch not in PRETRAINED:
        return checks + [(not m.pretrained and not m.motion_adapter and m.base_dtype == "fp32",
                          f"model.pretrained, model.motion_adapter and model.base_dtype apply to model.arch="
                          f"{' or '.join(PRETRAINED)} only (it is {m.arch!r})")]
    fixed = [(not getattr(m, k), f"model.{k} applies to model.arch=unet or dit; model.arch={m.arch}'s network is "
                                 "fixed by its weights")
             for k in ("cross_attention", "temporal_attention", "coords", "frame_cond", "fps_cond", "downsample_time",
                       "patch", "hidden", "depth", "heads", "base_channels", "channel_mults")]
    example = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" if m.arch == "wan" else "runwayml/stable-diffusion-v1-5"
    checks += [(bool(m.pretrained.strip()), f"model.arch={m.arch} needs model.pretrained: a hub name ({example}) "
                                            "or a local diffusers folder"),
               (cfg.text.tokens, f"model.arch={m.arch} is conditioned on per-token caption embeddings: set "
                                 "text.tokens=true"), *fixed, *_base_dtype_checks(cfg)]
    if m.arch == "animatediff":
        return checks + [
            (d.objective == "ddpm" and d.prediction == "eps",
             "model.arch=animatediff was trained with DDPM predicting the noise: set diffusion.objective=ddpm and "
             "diffusion.prediction=eps"),
            *[(side % 8 == 0, f"{key} must be a multiple of 8 (the SD UNet halves it three times), got {side}")
              for key, side in frame_sides(cfg)],
        ]
    cell = space_facts(cfg).cell
    return checks + [
        (not m.motion_adapter, "model.motion_adapter applies to model.arch=animatediff"),
        (t.finetune != "motion", "train.finetune=motion trains AnimateDiff's motion modules, which Wan does not have: "
                                 "use train.finetune=lora or full"),
        (d.objective == "flow", "model.arch=wan was trained with rectified flow: set diffusion.objective=flow"),
        *[(side % cell == 0 and side // cell % 2 == 0, f"{key}={side} must give latent frames ({side}/{cell} cells) "
                                                       "divisible by Wan's 2x2 patches")
          for key, side in frame_sides(cfg)],
    ]


def _base_dtype_checks(cfg) -> list[tuple[bool, str]]:
    """model.base_dtype=bf16: the frozen weights in bf16, computed under bf16 autocast; what trains stays fp32."""
    m, t = cfg.model, cfg.train
    if m.base_dtype != "bf16":
        return [(m.base_dtype == "fp32", f"model.base_dtype must be fp32 or bf16, got {m.base_dtype!r}")]
    return [
        (t.finetune != "full", "model.base_dtype=bf16 stores the frozen base in bf16, and train.finetune=full freezes "
                               "nothing (its weights train in fp32): use train.finetune=lora or motion, or "
                               "model.base_dtype=fp32"),
        (t.precision in ("auto", "bf16"), f"model.base_dtype=bf16 computes the base in bf16 autocast: set "
                                          f"train.precision=bf16 or auto (got {t.precision})"),
        (t.parallel != "fsdp", "model.base_dtype=bf16 with train.parallel=fsdp: FSDP shards one dtype per unit and "
                               "already divides the base's memory by the world size; use model.base_dtype=fp32"),
    ]


def frame_sides(cfg) -> list[tuple[str, int]]:
    """The frame's sides to check, by the key that sets each: data.size, and data.width where it differs."""
    return [("data.size", cfg.data.size)] + ([("data.width", cfg.data.width)]
                                             if cfg.data.width not in (0, cfg.data.size) else [])


def dit_patch(cfg) -> int:
    """The dit's patch (t2v.models.dit.resolve_patch): model.patch, or for 0 one cell where a frame is 16 cells or
    fewer on its longer side, else 2."""
    return cfg.model.patch or (1 if max(cfg.data.size, cfg.data.width) // space_facts(cfg).cell <= 16 else 2)


def _arch_checks(cfg) -> list[tuple[bool, str]]:
    """The frame size each architecture takes, and the options that belong to the other one."""
    m, space = cfg.model, space_facts(cfg)
    if m.arch in PRETRAINED:  # their sizes are fixed by their weights: _pretrained_checks
        return []
    if m.arch != "dit":  # latent frames (SIZE / 8) are checked against the UNet by t2v.space, with the VAE at hand
        unit = space.cell if space.vae else 8 * (m.patch or 1)
        after = f" after patches of {m.patch} pixels (model.patch)" if m.patch > 1 else ""
        return [*[(side >= unit and side % unit == 0, f"{key} must be a multiple of {unit} (the UNet halves it "
                                                      f"twice{after}), got {side}")
                  for key, side in frame_sides(cfg)],
                (not m.downsample_time or cfg.data.frames % 4 == 0,
                 f"data.frames must be a multiple of 4 with model.downsample_time (the UNet halves the frames with "
                 f"the frame size, up to twice), got {cfg.data.frames}"),
                (not (m.downsample_time and m.frame_cond),
                 "model.frame_cond and model.downsample_time do not go together: one conditioning per frame needs "
                 "every frame at every level")]
    patch = dit_patch(cfg)
    return [
        *[(side >= 8 and side % space.cell == 0,
           f"{key} must be >= 8, and a multiple of 8 for model.space=latent (the VAE downsamples 8x), got {side}")
          for key, side in frame_sides(cfg)],
        *[(side // space.cell % patch == 0, f"{key}={side} must give frames ({side // space.cell} cells) divisible by "
                                            f"the dit's patch {patch} (model.patch)")
          for key, side in frame_sides(cfg)],
        *[(not getattr(m, k), f"model.{k} applies to model.arch=unet only; a dit has {why}") for k, why in
          (("coords", "position embeddings"), ("frame_cond", "a frame position embedding"),
           ("temporal_attention", "temporal attention blocks"), ("downsample_time", "no downsampling"))],
        (m.depth % 2 == 0, f"model.depth must be even for a dit (spatial + temporal pairs), got {m.depth}"),
        (not (m.hidden and m.heads) or m.hidden % m.heads == 0,
         f"model.hidden ({m.hidden}) must be divisible by model.heads ({m.heads})"),
    ]


def shown(value) -> str:
    """A value as it is written in YAML or key=value."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else '""'


def with_undo(message: str, cfg, origin: dict, default_of) -> str:
    """For each key a refusal names that the config file (or the environment) set away from its default, where it
    was set and how to undo it on the command line: a switch made there (model.arch=dit on top of a UNet config)
    leaves keys of the file that no longer apply, and the message says which one to put back. ``origin``: key ->
    where its value came from (file:line, environment variable, argument); ``default_of(key)``: its default."""
    hints = []
    for key in dict.fromkeys(re.findall(r"\b(?:data|text|model|diffusion|train|vae)\.[a-z_]+\b", message)):
        where = origin.get(key, "")
        if not where or where.startswith("argument"):
            continue
        value = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        if value == default_of(key):
            continue
        if where.startswith("environment"):
            hints.append(f"{where} sets {key}={shown(value)}: unset it")
        else:
            hints.append(f"{where} sets {key}={shown(value)}: add {key}=null to put back its default "
                         f"({shown(default_of(key))})")
    return message + "".join(f"\n    ({h})" for h in hints)


def problems(cfg, valid_keys: list[str]) -> list[str]:
    """What is wrong with a resolved t2v.config.Config, one message per problem naming the key (empty: nothing).
    Coerces train.val_timesteps and data.strides to tuples of ints on the way."""
    timesteps = _int_list(cfg.train.val_timesteps)
    if timesteps is not None:
        cfg.train.val_timesteps = timesteps
    t, d = cfg.train, cfg.diffusion
    checks = [
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (cfg.data.max_bad_clips >= 0, "data.max_bad_clips must be >= 0"),
        (cfg.text.dim >= 1, "text.dim must be >= 1"),
        (cfg.text.max_tokens >= 1, "text.max_tokens must be >= 1"),
        (cfg.model.base_channels >= 0, "model.base_channels must be >= 0 (0 = from model.size)"),
        (cfg.model.space in SPACES, f"model.space must be one of {', '.join(SPACES)}, got {cfg.model.space!r}"),
        (cfg.model.in_channels >= 0, "model.in_channels must be >= 0 (0 = from the space: RGB or the VAE)"),
        (cfg.vae.batch_size >= 1, "vae.batch_size must be >= 1"),
        (bool(cfg.vae.name.strip()) or not space_facts(cfg).vae,
         f"vae.name must name a VAE for model.space={cfg.model.space}"),
        (0 <= cfg.model.dropout < 1, "model.dropout must be in [0, 1)"),
        (d.timesteps >= 2, "diffusion.timesteps must be >= 2"),
        (t.log_every >= 1, "train.log_every must be >= 1"),
        (t.warmup >= 0, "train.warmup must be >= 0"),
        (0 <= t.lr_cooldown <= 1, f"train.lr_cooldown must be in [0, 1] (a fraction of train.steps), got {t.lr_cooldown}"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (t.grad_clip > 0, "train.grad_clip must be > 0"),
        (0 <= t.ema_decay < 1, "train.ema_decay must be in [0, 1)"),
        (t.seed >= 0, "train.seed must be >= 0"),
        (1 <= t.sample_steps <= d.timesteps, f"train.sample_steps must be in [1, diffusion.timesteps={d.timesteps}]"),
        (t.guidance >= 0, "train.guidance must be >= 0 (1 = no guidance)"),
        (t.max_nan_steps >= 0, "train.max_nan_steps must be >= 0"),
        (t.max_restarts >= 0, "train.max_restarts must be >= 0"),
        (t.wandb in WANDB_MODES, f"train.wandb must be one of {', '.join(WANDB_MODES)}, got {t.wandb!r}"),
        (bool(t.wandb_project.strip()), "train.wandb_project must not be empty"),
        (t.dist_timeout_s > 0, "train.dist_timeout_s must be > 0 (seconds a collective waits for the other ranks)"),
        (cfg.data.frames >= 1, "data.frames must be >= 1"),
        (cfg.data.sampling in SAMPLINGS, f"data.sampling must be one of {', '.join(SAMPLINGS)}"),
        (cfg.data.width >= 0, "data.width must be >= 0 (0 = data.size, a square frame)"),
        (0 < cfg.data.window <= 1, "data.window must be in (0, 1]"),
        *_window_checks(cfg),
        (cfg.text.encoder in TEXT_ENCODERS, f"text.encoder must be one of {', '.join(TEXT_ENCODERS)}"),
        (cfg.diffusion.prediction in ("eps", "v"), "diffusion.prediction must be 'eps' or 'v'"),
        (d.objective in OBJECTIVES, f"diffusion.objective must be one of {', '.join(OBJECTIVES)}, got {d.objective!r}"),
        (not t.sample_method or t.sample_method in SAMPLERS.get(d.objective, ()),
         f"train.sample_method must be one of diffusion.objective={d.objective}'s samplers "
         f"({', '.join(SAMPLERS.get(d.objective, ()))}) or empty, got {t.sample_method!r}"),
        (d.logit_std > 0 and math.isfinite(d.logit_mean), "diffusion.logit_std must be > 0 and logit_mean finite"),
        (d.objective == "ddpm" or d.snr_gamma == 0, "diffusion.snr_gamma applies to diffusion.objective=ddpm only"),
        (d.objective == "ddpm" or d.prediction == "eps",
         "diffusion.prediction applies to diffusion.objective=ddpm only (a flow model predicts eps - x0); leave it eps"),
        (cfg.model.arch in ARCHS, f"model.arch must be one of {', '.join(ARCHS)}, got {cfg.model.arch!r}"),
        (cfg.model.patch >= 0 and cfg.model.hidden >= 0 and cfg.model.depth >= 0 and cfg.model.heads >= 0,
         "model.patch, model.hidden, model.depth and model.heads must be >= 0 (0 = from model.size)"),
        *_arch_checks(cfg),
        *_pretrained_checks(cfg),
        (cfg.diffusion.schedule in ("cosine", "linear"), "diffusion.schedule must be 'cosine' or 'linear'"),
        (0 <= cfg.diffusion.cond_dropout < 1, "diffusion.cond_dropout must be in [0, 1)"),
        (cfg.train.steps >= 0, "train.steps must be >= 0"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be >= 1 (1 = no accumulation)"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (cfg.train.ckpt_every >= 1, "train.ckpt_every must be >= 1"),
        (cfg.train.keep_last >= 1, "train.keep_last must be >= 1"),
        (t.val_every >= 0, "train.val_every must be >= 0 (0 = off)"),
        (t.sample_every >= 0, "train.sample_every must be >= 0 (0 = off)"),
        (t.val_clips >= 1, "train.val_clips must be >= 1"),
        (timesteps is not None and len(timesteps) >= 1 and all(0 <= v < d.timesteps for v in timesteps),
         f"train.val_timesteps must be integers in [0, diffusion.timesteps={d.timesteps}), got {list(t.val_timesteps)}"),
        (d.shift > 0, "diffusion.shift must be > 0 (1 = the plain schedule)"),
        (d.snr_gamma >= 0, "diffusion.snr_gamma must be >= 0 (0 = off)"),
        (cfg.train.precision in ("auto", "bf16", "fp16", "fp32"), "train.precision must be auto, bf16, fp16 or fp32"),
        (t.parallel in PARALLELS, f"train.parallel must be one of {', '.join(PARALLELS)}, got {t.parallel!r}"),
        (t.parallel != "fsdp" or t.precision != "fp16",
         "train.precision=fp16 needs a gradient scaler over sharded gradients, which train.parallel=fsdp does not "
         "have: use train.precision=bf16 (or auto, bf16 on every GPU FSDP runs on here) or fp32"),
        (t.peak_tflops >= 0, "train.peak_tflops must be >= 0 (0 = the card's from t2v.flops' table)"),
        *[(k in valid_keys, f"train.allow_changes: {k!r} is not a config key") for k in t.allow_changes],
    ]
    return [msg for ok, msg in checks if not ok]
