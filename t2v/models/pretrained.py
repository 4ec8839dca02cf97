"""What every pretrained family's denoiser shares (t2v.models.wan, t2v.models.animatediff): a library network
behind our interface, of which only a part trains.

  * ``state_dict`` holds what trains (``trainable``, fixed when training is set up, so an EMA copy whose
    parameters are all frozen saves the same keys) and the empty caption's embedding; the frozen rest is the base,
    which ``base`` names (its name and a digest of its weight files).
  * A dropped caption (classifier-free guidance) is the empty caption's embedding, what the family's pipeline
    samples with as its default negative prompt; it comes from the caption cache (which always holds "") through
    ``set_null_caption`` and travels in the checkpoint, so sampling does not need the cache for it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from t2v.runlog import TrainingError

NULL_KEY = "null_tokens"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' attention projections (every family's LoRA tests)


class PretrainedError(TrainingError):
    """A pretrained base cannot be loaded, or does not fit the run's settings."""


def weights_digest(folder: Path) -> str:
    """sha256 over the weight files of ``folder`` (names and bytes, in name order): what a checkpoint records of
    the base it was trained from. A few seconds for the 1.3B model's 5.7 GB, once per start."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise PretrainedError(f"{folder}: no weight files (*.safetensors, *.bin)")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def add_lora(model, rank: int, alpha: float, targets) -> None:
    """A LoRA adapter (peft) on the modules of a diffusers model that ``targets`` names (module-name suffixes, or one
    regular expression that must match whole names; () = every attention projection); only its weights train."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise PretrainedError("train.finetune=lora needs the peft package: pip install 'peft>=0.17' "
                              "(`make install` does)") from None
    targets = list(targets) or list(LORA_TARGETS)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets[0] if len(targets) == 1 and
                        any(c in targets[0] for c in "*[]()|^$\\") else targets, init_lora_weights=True)
    try:
        model.add_adapter(config)
    except ValueError as e:
        if "not found" not in str(e) and "match" not in str(e):
            raise
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise PretrainedError(f"train.lora_targets={','.join(targets)} matches no module of {type(model).__name__}; "
                              f"its Linear layers are named like {', '.join(names[:6])}, ... ({len(names)} in all): "
                              "give name suffixes (to_q,to_k,to_v,to_out.0) or one regular expression") from None




class PretrainedDenoiser(nn.Module):
    def __init__(self, base: dict):
        super().__init__()
        self.base = base
        self.trainable: tuple[str, ...] = ()
        self.null: torch.Tensor | None = None  # the empty caption's real tokens (n d)

    def set_trainable(self) -> None:
        self.trainable = tuple(n for n, p in self.named_parameters() if p.requires_grad)

    def drop_captions(self, tokens: torch.Tensor, mask: torch.Tensor,
                      cond_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows whose cond_mask is False become the empty caption: tokens (b l d) and mask (b l), l grown to fit."""
        if cond_mask is None or bool(cond_mask.all()):
            return tokens, mask
        if self.null is None:
            raise ValueError("this model has no empty-caption embedding for dropped captions: t2v.models."
                             "set_null_caption(model, caption_cache) (training and checkpoints set it)")
        n = self.null.shape[0]
        length = max(tokens.shape[1], n)
        tokens = F.pad(tokens, (0, 0, 0, length - tokens.shape[1]))  # b l d
        mask = F.pad(mask, (0, length - mask.shape[1]))  # b l
        null = F.pad(self.null.to(tokens), (0, 0, 0, length - n))  # l d
        null_mask = torch.arange(length, device=mask.device) < n  # l
        drop = ~cond_mask.bool()
        return (torch.where(drop[:, None, None], null[None], tokens),
                torch.where(drop[:, None], null_mask[None], mask))

    # --- what a checkpoint holds: the trained part and the empty caption ------------------------------------
    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        out = type(full)((k, v) for k, v in full.items() if k[len(prefix):] in self.trainable)
        if self.null is not None:
            out[prefix + NULL_KEY] = self.null.detach().clone()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = dict(state_dict)
        null = state_dict.pop(NULL_KEY, None)
        missing = sorted(set(self.trainable) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(self.trainable))
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n  missing: "
                               f"{missing[:3]} ({len(missing)}), unexpected: {unexpected[:3]} ({len(unexpected)})")
        if null is not None:
            self.null = null.float().to(next(self.parameters()).device)
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def set_null_caption(model: nn.Module, captions) -> None:
    """Give a pretrained family its dropped caption: the empty caption's tokens from the caption cache ``captions``
    (t2v.text.EmbeddingCache). A model trained from scratch learns its own null: nothing to do."""
    if isinstance(model, PretrainedDenoiser) and captions.has_tokens and "" in captions:
        tokens, mask = captions.get_tokens("")
        model.null = tokens[mask].float().to(next(model.parameters()).device)
