"""Wan 2.1 (diffusers' ``WanTransformer3DModel``) as a t2v denoiser: ``model.arch=wan``, ``model.pretrained=`` a hub
name (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``) or a local diffusers folder.

What this family supplies, so that the loop, ``train_step``, checkpoints, DDP and tracking need no special case:

  load_base(cfg)       the pretrained transformer, offline first through t2v.hf (the whole repository is resolved
                       to one local folder, so the weights a run starts from can be hashed)
  WanDenoiser          our forward (``b t c h w`` clips, model times, per-token captions) around it; its
                       ``state_dict`` is what trains (the LoRA, or every weight with train.finetune=full) and its
                       ``base`` the identity of what does not (t2v.models.pretrained)
  add_lora             (t2v.models.pretrained) by default on every attention projection, self and cross

Wan's conventions, as ``WanPipeline`` applies them at inference (and so must training):
  * rectified flow, x_t = (1 - t) x0 + t eps, the network predicts eps - x0 and sees t * 1000 (t2v.objective.Flow);
  * captions are UMT5 token embeddings with the padding set to zero, padded to TEXT_LEN = 512 tokens. The
    cross-attention has no mask, so the padding length is part of the conditioning: a caption padded to 20
    tokens is not the same input as one padded to 512 (t2v.text stores each caption at its real length);
  * a dropped caption (classifier-free guidance) is the empty caption's embedding, WanPipeline's default negative
    prompt, which sampling uses too.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from t2v.models.pretrained import (PretrainedDenoiser, PretrainedError, add_lora, check_fits, model_folder,
                                    weights_digest)

TEXT_LEN = 512  # WanPipeline's max_sequence_length: every caption is zero-padded to it
HUB_EXAMPLE = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
CLASS = "WanTransformer3DModel"


def load_base(name: str):
    """(the WanTransformer3DModel model.pretrained names, in fp32, frozen; its identity dict)."""
    if importlib.util.find_spec("accelerate") is None:  # diffusers' own error ("low_cpu_mem_usage cannot be False
        # when keep_in_fp32_modules is True") does not say what is missing
        raise PretrainedError("model.arch=wan needs the accelerate package (diffusers loads Wan's fp32 layers "
                              "through it): pip install 'accelerate>=1.0' (`make install` does)")
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    folder = model_folder(name, "model.pretrained", CLASS, "transformer", HUB_EXAMPLE)
    try:
        transformer = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{folder}: the Wan transformer does not load ({str(e).splitlines()[0][:300]})") from None
    identity = {"name": name, "folder": str(folder), "sha256": weights_digest(folder)}
    return transformer.requires_grad_(False), identity


class WanDenoiser(PretrainedDenoiser):
    """A Wan transformer behind the interface every t2v denoiser has: ``(x b t c h w, model time (b,), pooled
    captions, tokens=, token_mask=, cond_mask=) -> b t c h w``; what trains, what a checkpoint holds and a dropped
    caption: t2v.models.pretrained."""

    def __init__(self, transformer, base: dict, text_len: int = TEXT_LEN):
        super().__init__(base)
        self.transformer = transformer
        self.text_len = text_len
        self.in_channels = int(transformer.config.in_channels)
        self.text_dim = int(transformer.config.text_dim)

    def captions(self, tokens: torch.Tensor | None, token_mask: torch.Tensor | None,
                 cond_mask: torch.Tensor | None) -> torch.Tensor:
        """(b l d) token embeddings -> Wan's (b TEXT_LEN d) context: padding zero, dropped captions the empty one."""
        if tokens is None:
            raise ValueError("model.arch=wan is conditioned on per-token caption embeddings: set text.tokens=true and "
                             "rerun `python -m t2v.text embed`")
        if tokens.shape[-1] != self.text_dim:
            raise ValueError(f"caption tokens are {tokens.shape[-1]}-d but the Wan transformer takes {self.text_dim}-d "
                             "(text.dim and text.encoder must be the base's own text encoder)")
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if token_mask is None else (
            token_mask.bool())  # b l
        tokens, mask = self.drop_captions(tokens, mask, cond_mask)
        tokens = tokens * mask[..., None].to(tokens.dtype)  # b l d
        if tokens.shape[1] > self.text_len:
            tokens = tokens[:, :self.text_len]  # WanPipeline truncates at the tokenizer: nothing real lies past it
        return F.pad(tokens, (0, 0, 0, self.text_len - tokens.shape[1]))  # b TEXT_LEN d

    def fsdp_units(self):  # t2v.parallel: one sharded unit a transformer block
        return list(self.transformer.blocks)

    def forward(self, x, t, text=None, tokens=None, token_mask=None, cond_mask=None, fps=None):
        context = self.captions(tokens, token_mask, cond_mask).to(x.dtype)
        h = rearrange(x, "b t c h w -> b c t h w")
        with self.compute(x):
            out = self.transformer(hidden_states=h, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
        return rearrange(out, "b c t h w -> b t c h w").to(x.dtype)


def build(cfg, in_channels: int) -> WanDenoiser:
    """The WanDenoiser ``cfg`` describes: model.pretrained's transformer with train.finetune's trainable part.
    ``in_channels`` (what the space gives: 3 for pixels, 16 for Wan's VAE) must be what the transformer takes."""
    transformer, identity = load_base(cfg.model.pretrained)
    check_fits(cfg, "transformer", int(transformer.config.in_channels), int(transformer.config.text_dim), in_channels)
    if cfg.model.checkpointing:
        transformer.enable_gradient_checkpointing()
    t = cfg.train
    if t.finetune == "full":
        transformer.requires_grad_(True)
    elif t.finetune == "lora":
        add_lora(transformer, t.lora_rank, t.lora_alpha, t.lora_targets)
    else:
        raise PretrainedError(f"train.finetune={t.finetune}: Wan trains 'full' or 'lora' (train.finetune=motion "
                              "trains AnimateDiff's motion modules, which Wan does not have)")
    model = WanDenoiser(transformer, identity)
    model.set_trainable()
    model.cast_base(cfg.model.base_dtype)
    return model


# --- export (python -m t2v.export) -------------------------------------------------------------------------------
EXPORTS = ("lora", "full")
LORA_FILE = "pytorch_lora_weights.safetensors"


def export(model: WanDenoiser, fmt: str, out: Path) -> tuple[Path, str]:
    """lora: out/pytorch_lora_weights.safetensors with its adapter metadata (rank, alpha, targets) for
    ``WanPipeline.load_lora_weights``; full: a pipeline folder, the transformer (LoRA merged) written with
    save_pretrained and the base's other parts linked beside it (where the base is a pipeline folder; a transformer
    folder gives the transformer alone). Returns (what was written, how to load it)."""
    transformer = model.transformer
    if fmt == "lora":
        from diffusers import WanPipeline
        from peft.utils import get_peft_model_state_dict

        WanPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                      transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
        load = f"pipe = WanPipeline.from_pretrained('{model.base['name']}'); pipe.load_lora_weights('{out}')"
        written = out / LORA_FILE
    else:
        if getattr(transformer, "peft_config", None):
            transformer.fuse_lora()
            transformer.unload_lora()
        transformer.save_pretrained(out / "transformer")
        base = Path(model.base["folder"])
        root = base.parent if base.name == "transformer" else None
        if root is not None and (root / "model_index.json").is_file():
            for entry in sorted(root.iterdir()):  # the base's VAE, text encoder, tokenizer, scheduler: linked
                if entry.name == "model_index.json":
                    shutil.copyfile(entry, out / entry.name)
                elif entry.name != "transformer" and not entry.name.startswith("."):
                    os.symlink(entry.resolve(), out / entry.name)
            load = f"pipe = WanPipeline.from_pretrained('{out}')"
        else:  # the base was a transformer folder: there is no pipeline to complete
            load = (f"pipe = WanPipeline.from_pretrained('<the Wan repository>', transformer="
                    f"WanTransformer3DModel.from_pretrained('{out / 'transformer'}'))")
        written = out
    return written, load
