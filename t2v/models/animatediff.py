"""AnimateDiff as a t2v denoiser: ``model.arch=animatediff``, ``model.pretrained=`` a Stable Diffusion 1.5 repository
or folder (its ``unet/``), inflated into diffusers' ``UNetMotionModel`` with a motion adapter: ``model.motion_adapter=``
a published one (``guoyww/animatediff-motion-adapter-v1-5-2``) or "" for a fresh one, zero-initialised.

What this family supplies (the rest of the toolkit asks nothing else of it):

  load_base(cfg)         the SD UNet2D and the adapter, offline first through t2v.hf, and their identity (names and
                         sha256 of their weight files)
  fresh_adapter(unet)    a MotionAdapter shaped for that UNet whose every motion module's output projection is zero,
                         as the original AnimateDiff initialises it (zero_initialize: true): the inflated model is the
                         image model run frame by frame until the motion modules learn. diffusers' own MotionAdapter
                         keeps PyTorch's default init there, which moves every frame (max 1.11 on a tiny model)
  AnimateDiffDenoiser    our forward around it: ``b t c h w`` clips, the caption's tokens repeated for every frame (as
                         AnimateDiffPipeline passes them)
  train.finetune         motion (the motion modules only: AnimateDiff's own training), lora (peft on the attention
                         projections, spatial and temporal), or full

Its conventions, as AnimateDiffPipeline applies them: DDPM with eps-prediction on `linear` betas 0.00085 -> 0.012
(diffusion.schedule=linear, diffusion.beta_start, diffusion.beta_end), the SD VAE's latents (model.space=latent), the
CLIP ViT-L text encoder's 77 tokens without a mask (text.encoder=sd_clip), and diffusers' DDIM to sample.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
from einops import rearrange

from t2v.models.pretrained import (PretrainedDenoiser, PretrainedError, add_lora, check_fits, model_folder,
                                    weights_digest)

UNET = "UNet2DConditionModel"
HUB_EXAMPLE = "runwayml/stable-diffusion-v1-5"
ADAPTER_EXAMPLE = "guoyww/animatediff-motion-adapter-v1-5-2"


def fresh_adapter(unet2d):
    """A MotionAdapter for ``unet2d`` (same block widths, layers and groups), every motion module's output zero. Its
    other weights come from a fixed seed, so every build is the same model."""
    from diffusers import MotionAdapter

    c = unet2d.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        heads = max(1, min(8, c.block_out_channels[0] // 8))
        adapter = MotionAdapter(block_out_channels=tuple(c.block_out_channels),
                                motion_layers_per_block=c.layers_per_block, motion_norm_num_groups=c.norm_num_groups,
                                motion_num_attention_heads=heads)
    for name, module in adapter.named_modules():
        if name.endswith("proj_out"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    return adapter


def load_base(pretrained: str, motion_adapter: str):
    """(the UNetMotionModel inflated from the SD UNet and the adapter, frozen, in fp32; its identity dict)."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    unet_dir = model_folder(pretrained, "model.pretrained", UNET, "unet", HUB_EXAMPLE)
    try:
        unet2d = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32)
        if motion_adapter:
            adapter_dir = model_folder(motion_adapter, "model.motion_adapter", "MotionAdapter", "motion_adapter",
                                       ADAPTER_EXAMPLE)
            adapter = MotionAdapter.from_pretrained(adapter_dir, torch_dtype=torch.float32)
        else:
            adapter_dir, adapter = None, fresh_adapter(unet2d)
        model = UNetMotionModel.from_unet2d(unet2d, adapter)
    except (OSError, ValueError, RuntimeError) as e:
        raise PretrainedError(f"model.pretrained={pretrained}, model.motion_adapter={motion_adapter or '(fresh)'}: "
                              f"the UNet and the adapter do not load together ({str(e).splitlines()[0][:300]})") from None
    digest = weights_digest(unet_dir) + (weights_digest(adapter_dir) if adapter_dir else "fresh")
    identity = {"name": pretrained, "folder": str(unet_dir), "adapter": motion_adapter or "fresh",
                "sha256": hashlib.sha256(digest.encode()).hexdigest()}
    return model.float().requires_grad_(False), identity


class AnimateDiffDenoiser(PretrainedDenoiser):
    """An inflated SD UNet (UNetMotionModel) behind the t2v denoiser interface; what trains, what a checkpoint
    holds and a dropped caption: t2v.models.pretrained."""

    def __init__(self, unet, base: dict):
        super().__init__(base)
        self.unet = unet
        self.text_dim = int(unet.config.cross_attention_dim)
        self.max_frames = int(unet.config.motion_max_seq_length)

    def fsdp_units(self):  # t2v.parallel: one sharded unit a resolution level of the UNet
        return [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]

    def forward(self, x, t, text=None, tokens=None, token_mask=None, cond_mask=None, fps=None):
        if tokens is None:
            raise ValueError("model.arch=animatediff is conditioned on the caption's tokens: set text.tokens=true and "
                             "rerun `python -m t2v.text embed`")
        if tokens.shape[-1] != self.text_dim:
            raise ValueError(f"caption tokens are {tokens.shape[-1]}-d but the UNet's cross-attention takes "
                             f"{self.text_dim}-d (text.encoder=sd_clip with the base's own text encoder)")
        b, frames = x.shape[:2]
        if frames > self.max_frames:
            raise ValueError(f"{frames} frames: the motion modules' positions reach {self.max_frames}")
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if token_mask is None else (
            token_mask.bool())
        tokens, _ = self.drop_captions(tokens, mask, cond_mask)  # SD reads every one of its 77 tokens: no mask
        context = tokens.to(x.dtype).repeat_interleave(frames, dim=0)  # b l d -> (b t) l d, as AnimateDiffPipeline
        with self.compute(x):
            out = self.unet(rearrange(x, "b t c h w -> b c t h w"), t, encoder_hidden_states=context).sample
        return rearrange(out, "b c t h w -> b t c h w").to(x.dtype)


def build(cfg, in_channels: int) -> AnimateDiffDenoiser:
    """The AnimateDiffDenoiser ``cfg`` describes, with train.finetune's trainable part."""
    unet, identity = load_base(cfg.model.pretrained, cfg.model.motion_adapter)
    check_fits(cfg, "UNet", int(unet.config.in_channels), int(unet.config.cross_attention_dim), in_channels)
    if cfg.data.frames > int(unet.config.motion_max_seq_length):
        raise PretrainedError(f"data.frames={cfg.data.frames}: the motion adapter's positions reach "
                              f"{unet.config.motion_max_seq_length} frames")
    if cfg.model.checkpointing:
        unet.enable_gradient_checkpointing()
    finetune = cfg.train.finetune
    if finetune == "full":
        unet.requires_grad_(True)
    elif finetune == "motion":
        unet.freeze_unet2d_params()  # leaves the motion modules trainable, AnimateDiff's own training
    else:
        if importlib.util.find_spec("peft") is None:
            raise PretrainedError("train.finetune=lora needs the peft package: pip install 'peft>=0.17' "
                                  "(`make install` does)")
        add_lora(unet, cfg.train.lora_rank, cfg.train.lora_alpha, cfg.train.lora_targets)
    model = AnimateDiffDenoiser(unet, identity)
    model.set_trainable()
    model.cast_base(cfg.model.base_dtype)
    return model


# --- export (python -m t2v.export) -------------------------------------------------------------------------------
EXPORTS = ("motion", "lora", "full")


def export(model: AnimateDiffDenoiser, fmt: str, out: Path) -> tuple[Path, str]:
    """motion: the motion modules as a MotionAdapter folder (what AnimateDiff users load); lora: the adapter's
    pytorch_lora_weights.safetensors with its metadata, for AnimateDiffPipeline.load_lora_weights; full: the
    UNetMotionModel (a LoRA merged) with save_pretrained. Returns (what was written, how to load it)."""
    unet = model.unet
    base = f"'{model.base['name']}'"
    if fmt == "motion":
        unet.save_motion_modules(str(out))
        return out, (f"adapter = MotionAdapter.from_pretrained('{out}'); pipe = AnimateDiffPipeline.from_pretrained("
                     f"{base}, motion_adapter=adapter)")
    if fmt == "lora":
        from diffusers import AnimateDiffPipeline
        from peft.utils import get_peft_model_state_dict

        AnimateDiffPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
        adapter = model.base["adapter"]
        motion = (f"MotionAdapter.from_pretrained('{adapter}')" if adapter != "fresh" else
                  f"t2v.models.animatediff.fresh_adapter(UNet2DConditionModel.from_pretrained({base}, subfolder='unet'))")
        return out / "pytorch_lora_weights.safetensors", (
            f"pipe = AnimateDiffPipeline.from_pretrained({base}, motion_adapter={motion}); "
            f"pipe.load_lora_weights('{out}')")
    if getattr(unet, "peft_config", None):
        unet.fuse_lora()
        unet.unload_lora()
    unet.save_pretrained(out)
    return out, (f"unet = UNetMotionModel.from_pretrained('{out}'); pipe = AnimateDiffPipeline.from_pretrained({base}, "
                 "unet=unet, motion_adapter=None)")
