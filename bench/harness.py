"""One training step, t2v.train's own (``t2v.step.train_step``), for our UNet3DCond (pooled-caption FiLM, or with
caption cross-attention), diffusers' UNet3DConditionModel and video-diffusion-pytorch's Unet3D (lucidrains).

The step is the one training runs: the learning rate schedule, (t, noise, caption dropout) from the per-step
generator, q_sample, the forward under autocast (bf16 on a GPU, fp32 on CPU as t2v.train picks), the target of
``diffusion.prediction``, the loss in fp32, backward through the grad scaler, the one host sync, clipping, fused
AdamW and the EMA update. Only the forward differs per model (``forward_*`` below: each peer's own call).
The data pipeline is benchmarked separately (bench/data_load.py): here the clip is a fixed tensor.
"""
from __future__ import annotations

import copy
import importlib.util
import sys
import types
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from t2v import config
from t2v import diffusion
from t2v.models import build_model, count_params
from t2v.objective import build_objective
from t2v.step import StepState, train_step

# diffusers' UNet3DConditionModel configured to our parameter counts (cross_attention_dim = our text dim).
# attention_head_dim is, in diffusers' UNet3D, the number of heads (its documented naming bug); 8 is what
# Stable Diffusion 1.x and most configs use. A 4-level UNet is diffusers' own layout (the last level has no
# attention and no downsampling); channels must divide by norm_num_groups.
PEERS = {
    # ours base: 64 -> 128 -> 256, 9.60 M parameters  <->  10.17 M (+6 %)
    "base": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, attention_head_dim=8, norm_num_groups=32),
    # ours large: 128 -> 256 -> 512, 38.09 M  <->  38.68 M (+1.5 %); the configuration measured in the issue
    "large": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=1, attention_head_dim=8, norm_num_groups=32),
    # --quick only: not matched, just small
    "tiny": dict(block_out_channels=(32, 32), layers_per_block=1, attention_head_dim=2, norm_num_groups=8),
}
PEER_TOKENS = 8  # caption tokens given to diffusers as encoder_hidden_states (B, L, D); ours takes (B, D) pooled
# (and the same L tokens too with cross_attention=True)

# video-diffusion-pytorch's Unet3D configured to our parameter counts, cond_dim = our text dim. Its defaults
# otherwise (attn_heads=8, attn_dim_head=32, 7x7 first conv, spatial linear attention at every level, full
# spatial and temporal attention in the middle). Three levels like ours (64 -> 32 -> 16 pixels): at its default
# four, dim (a multiple of 8: its GroupNorm has 8 groups) 24 gives 7.52 M (-22 % of base) and 32 gives 12.0 M
# (+25 %), neither within ±15 %.
VDP_PEERS = {
    # ours base 9.60 M parameters  <->  Unet3D(dim=56, dim_mults=(1, 2, 4)) 10.05 M (+4.7 %)
    "base": dict(dim=56, dim_mults=(1, 2, 4)),
    # ours large 38.09 M  <->  dim=120: 37.54 M (-1.4 %)
    "large": dict(dim=120, dim_mults=(1, 2, 4)),
    # --quick only: not matched, just small
    "tiny": dict(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8),
}
# what installs it without replacing torch: its declared requirements (torchvision, transformers[torch]) make
# pip pull the newest torch, and PyPI's torchvision wheels are CUDA builds that do not load against a CPU torch
VDP_INSTALL = "pip install --no-deps video-diffusion-pytorch einops-exts rotary-embedding-torch"


def our_config(size: str, text_dim: int = 512, cross_attention: bool = False, in_channels: int = 0) -> config.Config:
    extra = ["model.cross_attention=true", "text.tokens=true"] if cross_attention else []
    return config.load_config(None, [f"model.size={size}", f"text.dim={text_dim}", f"model.in_channels={in_channels}",
                                *extra], env={})


def build_ours(size: str, text_dim: int = 512, seed: int = 0, cross_attention: bool = False,
               in_channels: int = 0) -> nn.Module:
    """Our UNet3DCond as t2v.train builds it; ``in_channels`` 0: RGB, else latent channels (model.space=latent)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(our_config(size, text_dim, cross_attention, in_channels))


def diffusers_available() -> str | None:
    """None if diffusers imports, else why not."""
    try:
        import diffusers  # noqa: F401
        from diffusers import UNet3DConditionModel  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"diffusers is not importable ({type(e).__name__}: {e}); `pip install -e .[bench]` installs it"
    return None


def peer_kwargs(spec: str | dict, text_dim: int, size: int) -> dict:
    p = dict(PEERS[spec]) if isinstance(spec, str) else dict(spec)
    n = len(p["block_out_channels"])
    return dict(
        sample_size=size, in_channels=3, out_channels=3,
        down_block_types=("CrossAttnDownBlock3D",) * (n - 1) + ("DownBlock3D",),
        up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (n - 1),
        cross_attention_dim=text_dim, **p,
    )


def build_peer(spec: str | dict, text_dim: int = 512, size: int = 64, seed: int = 0) -> nn.Module:
    from diffusers import UNet3DConditionModel
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet3DConditionModel(**peer_kwargs(spec, text_dim, size))


class _NoTorchvision(types.ModuleType):
    """Stands in for torchvision while video_diffusion_pytorch is imported. Its module imports torchvision's
    transforms and utils for its GIF Dataset, Trainer and GIF writer, and builds one transform (``T.ToTensor()``)
    as a default argument; Unet3D uses none of it. Every attribute is a constructor whose product raises if used."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def make(*args, **kwargs):
            def unavailable(*args, **kwargs):
                raise RuntimeError(f"torchvision is not installed ({self.__name__}.{name})")
            return unavailable
        return make


def import_vdp() -> tuple[types.ModuleType, str]:
    """video_diffusion_pytorch and how torchvision was satisfied for its import ("torchvision <version>", or the
    stand-in where torchvision is not installed: PyPI's torchvision wheels are CUDA builds, which do not load
    against a CPU torch). The stand-in is in sys.modules only during the import: nothing else here sees it."""
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision
        import video_diffusion_pytorch

        return video_diffusion_pytorch, f"torchvision {torchvision.__version__}"
    names = ("torchvision", "torchvision.transforms", "torchvision.utils")
    stub = _NoTorchvision("torchvision")
    stub.transforms, stub.utils = _NoTorchvision("torchvision.transforms"), _NoTorchvision("torchvision.utils")
    sys.modules.update(zip(names, (stub, stub.transforms, stub.utils)))
    try:
        import video_diffusion_pytorch
    finally:
        for n in names:
            sys.modules.pop(n, None)
    return video_diffusion_pytorch, "torchvision is not installed; a stand-in served its import, Unet3D does not use it"


def vdp_available() -> str | None:
    """None if video-diffusion-pytorch's Unet3D imports, else why not."""
    try:
        import_vdp()[0].Unet3D  # noqa: B018
    except Exception as e:  # ImportError, or a broken install (e.g. a torchvision built for another torch)
        return (f"video-diffusion-pytorch is not importable ({type(e).__name__}: {e}); `{VDP_INSTALL}` "
                "installs it without replacing torch")
    return None


def vdp_kwargs(spec: str | dict, text_dim: int) -> dict:
    return dict(channels=3, cond_dim=text_dim, **(VDP_PEERS[spec] if isinstance(spec, str) else spec))


def build_vdp(spec: str | dict, text_dim: int = 512, seed: int = 0) -> nn.Module:
    vdp = import_vdp()[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return vdp.Unet3D(**vdp_kwargs(spec, text_dim))


@dataclass
class Caption:
    """A caption as t2v.train gives a cross-attention model (text.tokens=true): pooled (b d) for FiLM, and the
    per-token embeddings (b l d) with their mask (b l) bool for cross-attention."""

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


# forward(model, x_t (b t c h w), t (b,), cond, keep (b,) bool) -> (b t c h w); cond is whatever that model's
# TrainStep holds: pooled (b d), tokens (b l d) or a Caption
Forward = Callable[[nn.Module, torch.Tensor, torch.Tensor, Any, torch.Tensor], torch.Tensor]


def forward_ours(model, x_t, t, text, keep):
    return model(x_t, t, text, cond_mask=keep)


def forward_ours_tokens(model, x_t, t, cap: Caption, keep):
    # what t2v.train calls with model.cross_attention=true: dropped rows lose their tokens and pooled caption
    return model(x_t, t, cap.pooled, tokens=cap.tokens, token_mask=cap.mask, cond_mask=keep)


def forward_vdp(model, x_t, t, text, keep):
    # caption dropout with the library's own learned null embedding, as its null_cond_prob does, but from our
    # per-step mask; null_cond_prob=0 then leaves every row as given (its torch.where still runs: same cost)
    cond = torch.where(keep[:, None], text, model.null_cond_emb.to(text.dtype))  # b d
    out = model(x_t.permute(0, 2, 1, 3, 4), t, cond=cond, null_cond_prob=0.0)  # b t c h w -> b c t h w
    return out.permute(0, 2, 1, 3, 4)  # b c t h w -> b t c h w


def forward_peer(model, x_t, t, tokens, keep):
    # diffusers has no caption dropout of its own: dropped rows get an all-zero context (same cost)
    ctx = tokens * keep.to(tokens.dtype)[:, None, None]
    out = model(x_t.permute(0, 2, 1, 3, 4), t, encoder_hidden_states=ctx).sample  # b c t h w
    return out.permute(0, 2, 1, 3, 4)


@dataclass
class Inputs:
    batch: int
    frames: int
    size: int
    text_dim: int
    tokens: int = PEER_TOKENS

    def clip(self, device, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(self.batch, self.frames, 3, self.size, self.size, generator=g) * 2 - 1).to(device)

    def pooled(self, device, seed: int = 2) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.batch, self.text_dim, generator=g).to(device)

    def token_states(self, device, seed: int = 3) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.batch, self.tokens, self.text_dim, generator=g).to(device)

    def caption(self, device) -> Caption:
        # the same pooled vector and tokens the other models get; every token valid, as diffusers (no mask) sees
        # them, but the mask is still passed, as t2v.train always does
        mask = torch.ones(self.batch, self.tokens, dtype=torch.bool, device=device)
        return Caption(self.pooled(device), self.token_states(device), mask)


class TrainStep:
    """Callable: one full training step (t2v.step.train_step) on a fixed clip; ``step(cond)`` overrides the
    conditioning."""

    def __init__(self, model: nn.Module, forward: Forward, x0: torch.Tensor, cond: Any,
                 precision: str = "fp32", channels_last: bool = False, fused_adamw: bool = True,
                 compile: bool = False, lr: float = 1e-4, grad_clip: float = 1.0, ema_decay: float = 0.999,
                 cond_dropout: float = 0.1, seed: int = 0, grad_accum: int = 1):
        self.device = x0.device
        self.model = model.to(self.device).train()
        if channels_last:  # exactly what t2v.train does with train.channels_last=true
            self.model = self.model.to(memory_format=torch.channels_last_3d)
            x0 = x0.contiguous(memory_format=torch.channels_last_3d)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        # t2v.train: AdamW(..., fused=True); fused_adamw=False is the previous default AdamW (bench/previous.py)
        kw = {"fused": True} if fused_adamw else {}
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.999), **kw)
        self.net = torch.compile(self.model) if compile else self.model
        self.x0, self.cond = x0, cond
        cfg = config.Config()  # the baseline's diffusion and training settings, with this benchmark's few changes
        cfg.train.lr, cfg.train.grad_clip, cfg.train.ema_decay, cfg.train.seed = lr, grad_clip, ema_decay, seed
        cfg.diffusion.cond_dropout = cond_dropout
        objective = build_objective(cfg.diffusion, self.device)
        scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.state = StepState(self.net, self.model, self.ema, self.opt, scaler, objective, cfg.diffusion, cfg.train,
                               precision, self.device, forward=forward, grad_accum=grad_accum)
        self.step = 0
        self.last_loss = float("nan")

    @property
    def params(self) -> int:
        return count_params(self.model)

    def __call__(self, cond: Any = None) -> float:
        self.last_loss = train_step(self.state, self.step, self.x0, self.cond if cond is None else cond).loss
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step += 1
        return self.last_loss


def count_train_flops(model: nn.Module, forward: Forward, x0: torch.Tensor, cond: Any,
                      precision: str = "fp32") -> dict:
    """Forward and backward FLOPs of one training step (torch.utils.flop_counter: 2 per multiply-add of
    matmuls, convolutions and attention; elementwise work is not counted, as is usual for MFU)."""
    from torch.utils.flop_counter import FlopCounterMode

    b = x0.shape[0]
    t = torch.full((b,), 500, dtype=torch.long, device=x0.device)
    keep = torch.ones(b, dtype=torch.bool, device=x0.device)
    noise = torch.randn_like(x0)
    autocast = torch.autocast(x0.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with FlopCounterMode(display=False) as fwd:
        with autocast:
            out = forward(model, x0, t, cond, keep)
        loss = diffusion.training_loss(out.float(), noise)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    model.zero_grad(set_to_none=True)
    f, bk = int(fwd.get_total_flops()), int(bwd.get_total_flops())
    return {"forward": f, "backward": bk, "total": f + bk, "per_clip": (f + bk) / b}
