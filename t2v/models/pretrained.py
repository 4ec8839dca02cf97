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

import torch
import torch.nn as nn
import torch.nn.functional as F

NULL_KEY = "null_tokens"


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
