"""Every denoiser, behind one builder. Each takes and returns ``b t c h w`` clips:
``model(x_t, model_time, pooled_captions, tokens=, token_mask=, cond_mask=, fps=)``.

  unet.py     UNet3DCond (model.arch=unet, the baseline), trained from scratch
  dit.py      VideoDiT (model.arch=dit), trained from scratch
  layers.py   what those two share
  pretrained.py  what every pretrained family's denoiser shares
  wan.py      Wan 2.1's transformer from pretrained weights (model.arch=wan: full or LoRA fine-tuning)
  animatediff.py  an SD 1.5 UNet inflated with motion modules (model.arch=animatediff: motion, LoRA or full)

A pretrained family's module also says what of it trains: its ``state_dict`` holds only that (a LoRA run's
checkpoints are megabytes), and its ``base`` names the frozen rest, which a checkpoint records and a resume or a
sampler must find unchanged (``check_base``). Its dropped caption is the empty caption's embedding
(``set_null_caption``, from the caption cache).
"""
from __future__ import annotations

import copy

import torch.nn as nn

from t2v.models.pretrained import set_null_caption  # noqa: F401 (t2v.train: the dropped caption of a family)
from t2v.models.unet import build_unet

def build_model(cfg, in_channels: int = 3) -> nn.Module:
    """The denoiser cfg.model.arch names, for a space that gives ``in_channels`` channels (t2v.space: 3 for RGB,
    the VAE's latent channels) unless model.in_channels says."""
    arch = cfg.model.arch
    if arch == "dit":
        from t2v.models.dit import build_dit

        return build_dit(cfg, in_channels)
    if arch == "wan":  # imported here: they load diffusers' model classes
        from t2v.models.wan import build

        return build(cfg, cfg.model.in_channels or in_channels)
    if arch == "animatediff":
        from t2v.models.animatediff import build

        return build(cfg, cfg.model.in_channels or in_channels)
    return build_unet(cfg, in_channels)


def count_params(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def identity(model: nn.Module) -> dict:
    """What a checkpoint's data section records of the model beyond its config: a pretrained base's name and
    weight digest ({} for a model trained from scratch)."""
    base = getattr(model, "base", None)
    return {"base": base} if base else {}


def check_base(saved: dict, model: nn.Module, where) -> str | None:
    """Why the checkpoint at ``where`` (its data section ``saved``) cannot go on ``model``'s base weights, or None."""
    was, now = saved.get("base"), identity(model).get("base")
    if was is None or now is None or was.get("sha256") == now.get("sha256"):
        return None
    return (f"{where}: trained from the base {was['name']} (weights sha256 {was['sha256'][:12]}), but "
            f"model.pretrained={now['name']} has other weights (sha256 {now['sha256'][:12]}); use the same base "
            "weights, or a new OUTDIR to start over from these")


def ema_copy(model: nn.Module) -> nn.Module:
    """The EMA model: a copy of what trains that shares every frozen parameter with ``model`` (a LoRA run's EMA
    costs the adapter's size, not a second base), in eval mode and frozen."""
    shared = {id(p): p for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, memo=shared).eval().requires_grad_(False)
