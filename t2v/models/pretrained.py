"""What every pretrained family's denoiser shares (t2v.models.wan, t2v.models.animatediff): a library network
behind our interface, of which only a part trains.

  * ``state_dict`` holds what trains (``trainable``, fixed when training is set up, so an EMA copy whose
    parameters are all frozen saves the same keys) and the empty caption's embedding; the frozen rest is the base,
    which ``base`` names (its name and a digest of its weight files).
  * A dropped caption (classifier-free guidance) is the empty caption's embedding, what the family's pipeline
    samples with as its default negative prompt; it comes from the caption cache (which always holds "") through
    ``set_null_caption`` and travels in the checkpoint, so sampling does not need the cache for it.
  * ``cast_base("bf16")`` (model.base_dtype) stores the frozen base in bf16; ``compute`` then runs the forward under
    bf16 autocast wherever its caller has none (sampling, validation in fp32).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from t2v import hf
from t2v.runlog import TrainingError

NULL_KEY = "null_tokens"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' attention projections (every family's LoRA tests)


class PretrainedError(TrainingError):
    """A pretrained base cannot be loaded, or does not fit the run's settings."""


WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # what from_pretrained reads


def loaded_files(folder: Path) -> list[Path]:
    """The files ``from_pretrained(folder)`` reads: its config and the default weights (safetensors first, one file
    or the shards its index names), never the fp16, non-EMA or other variants beside them."""
    for name in WEIGHT_NAMES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as e:
                raise PretrainedError(f"{index}: unreadable shard index ({e})") from None
            return [folder / "config.json", index, *(folder / s for s in shards)]
        if (folder / name).is_file():
            return [folder / "config.json", folder / name]
    raise PretrainedError(f"{folder}: no weights ({' or '.join(WEIGHT_NAMES)}, or their sharded index)")


def weights_digest(folder: Path) -> str:
    """sha256 over the config and weight files ``from_pretrained(folder)`` loads (names and bytes): what a checkpoint
    records of the base it was trained from. Reads them once per start, about a second per GB."""
    h = hashlib.sha256()
    for p in loaded_files(folder):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def how_to_fetch(name: str, setting: str, example: str) -> str:
    """How to get a pretrained repository onto compute nodes: ``name`` (or ``example`` where it is a folder)."""
    hub = name if hf.looks_like_hub_name(name) else example
    return ("How to get the weights onto a compute node without internet:\n"
            "  1. On a login node (which has internet), with HF_HOME on a shared scratch folder, run once:\n"
            "       export HF_HOME=/scratch/$USER/hf\n"
            f"       python -c \"from huggingface_hub import snapshot_download; snapshot_download('{hub}')\"\n"
            "  2. In the job script: export HF_HOME=/scratch/$USER/hf HF_HUB_OFFLINE=1\n"
            f"  Or set {setting}=/path/to/a/diffusers/folder (a pipeline's save_pretrained writes one).")


def model_folder(name: str, setting: str, cls: str, sub: str, example: str) -> Path:
    """The local folder holding the ``cls`` config of ``name`` (a hub name, resolved offline first through t2v.hf, or
    a folder): the repository itself, or its ``sub`` folder. Anything else is refused, saying what it holds."""
    how = how_to_fetch(name, setting, example)
    root = hf.snapshot(name, what=f"pretrained {cls}", setting=setting, error=PretrainedError, how=how)
    for folder in (root, root / sub):
        cfg = folder / "config.json"
        if cfg.is_file():
            try:
                found = json.loads(cfg.read_text()).get("_class_name")
            except (OSError, ValueError) as e:
                raise PretrainedError(f"{cfg}: unreadable ({e})") from None
            if found == cls:
                return folder
            if folder == root / sub or found:
                raise PretrainedError(f"{cfg}: a {found or 'model without _class_name'}, not a {cls} "
                                      f"({setting}={name})")
    held = ", ".join(sorted(p.name for p in root.iterdir())[:12]) or "nothing"
    raise PretrainedError(f"{setting}={name} holds no {cls} (no config.json naming it in {root} or {root / sub}; "
                          f"it holds: {held}). A repository downloaded in part (allow_patterns) lacks it: fetch "
                          f"{sub}/ too.\n" + how)


def check_fits(cfg, what: str, channels: int, text_dim: int, in_channels: int) -> None:
    """Refuse a base whose input ``channels`` differ from what the space gives (``in_channels``) or whose caption
    width ``text_dim`` differs from text.dim, naming the settings to change."""
    if channels != in_channels:
        raise PretrainedError(f"model.pretrained={cfg.model.pretrained}: its {what} takes {channels}-channel inputs "
                              f"but model.space={cfg.model.space} gives {in_channels}")
    if text_dim != cfg.text.dim:
        raise PretrainedError(f"model.pretrained={cfg.model.pretrained}: its {what} takes {text_dim}-d caption "
                              f"tokens; set text.dim={text_dim} and the base's own text encoder (text.encoder)")


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
        self.base_dtype = "fp32"  # model.base_dtype, once cast_base has run
        self._register_state_dict_hook(self._keep_trained)
        self._register_load_state_dict_pre_hook(self._take_null)
        self.register_load_state_dict_post_hook(self._base_not_missing)

    def set_trainable(self) -> None:
        self.trainable = tuple(n for n, p in self.named_parameters() if p.requires_grad)

    def cast_base(self, dtype: str) -> None:
        """model.base_dtype=bf16: every frozen weight in bf16, half the base's memory (2.8 of Wan 1.3B's 5.7 GB),
        except the modules the library keeps in fp32 at inference too (diffusers' ``_keep_in_fp32_modules``: Wan's
        norms, time embedding and modulation table). What trains (a LoRA, the motion modules) stays fp32 for AdamW.
        A bf16 matmul under autocast casts an fp32 weight to bf16 anyway, so the step computes almost the same."""
        self.base_dtype = dtype
        if dtype == "fp32":
            return
        keep = {k for m in self.modules() for k in (getattr(type(m), "_keep_in_fp32_modules", None) or ())}
        for name, module in self.named_modules():
            if keep & set(name.split(".")):
                continue
            for p in module.parameters(recurse=False):
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)

    def compute(self, x: torch.Tensor):
        """The forward's context: bf16 autocast for a bf16 base where the caller has no autocast of its own (a
        sampler or validation in fp32), so that bf16 weights meet bf16 inputs; nothing otherwise."""
        if self.base_dtype != "bf16" or torch.is_autocast_enabled(x.device.type):
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=torch.bfloat16)

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
    # Hooks rather than overridden methods, so that the same holds when a wrapper (DDP, torch.compile) or any parent
    # module saves or loads it: the frozen base is left out of the state dict, and is not missing when loading.
    def _keep_trained(self, module, state_dict, prefix, local_metadata) -> None:
        for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in self.trainable]:
            del state_dict[key]
        if self.null is not None:
            state_dict[prefix + NULL_KEY] = self.null.detach().clone()

    def _take_null(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        null = state_dict.pop(prefix + NULL_KEY, None)
        if null is not None:
            self.null = null.float().to(next(self.parameters()).device)
        self._load_prefix = prefix

    def _base_not_missing(self, module, incompatible) -> None:
        prefix = getattr(self, "_load_prefix", "")
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                        if not k.startswith(prefix) or k[len(prefix):] in self.trainable]


def set_null_caption(model: nn.Module, captions) -> None:
    """Give a pretrained family its dropped caption: the empty caption's tokens from the caption cache ``captions``
    (t2v.text.EmbeddingCache). A model trained from scratch learns its own null: nothing to do."""
    if isinstance(model, PretrainedDenoiser):
        if not (captions.has_tokens and "" in captions):
            raise PretrainedError(f"{captions.path} has no per-token embedding of the empty caption \"\", which a "
                                  "dropped caption and guidance use: rerun `python -m t2v.text embed` with this run's "
                                  "--config and key=value arguments (it always embeds \"\")")
        tokens, mask = captions.get_tokens("")
        model.null = tokens[mask].float().to(next(model.parameters()).device)
