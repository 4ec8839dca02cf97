"""A video diffusion transformer (``model.arch=dit``): DiT blocks over patch tokens, alternating space and time.

Layout (Latte, Ma et al. 2024, "variant 1": interleaved spatial and temporal blocks):

    x (b t c h w) -> p x p patches of every frame -> Linear -> + fixed 2D sin-cos (row, column) and 1D sin-cos
    (frame) position embeddings -> depth blocks, even ones attend within a frame ((b t) n d), odd ones across
    frames at one patch location ((b n) t d) -> LayerNorm + adaLN + Linear -> patches back to b t c h w.

Why variant 1: of Latte's four ways to factor space-time attention, the paper found the interleaved one best at
equal FLOPs, and it keeps every block a plain DiT block (only the attention's token grouping differs), so
adaLN-Zero conditioning, activation checkpointing and scaled_dot_product_attention apply to all blocks alike.

Conditioning: c = MLP(sinusoidal(t)) + MLP(pooled caption) (+ MLP(sinusoidal(fps))) drives adaLN-Zero in
every block (shift, scale and gate for attention and for the MLP; DiT's best variant). With
``cross_attention`` every block also attends to the caption tokens after its self-attention. DiT's
initialisation: modulation linears and the final linear zeroed (every block starts as the identity and the
model predicts 0), xavier-uniform elsewhere; cross-attention has no adaLN gate, so its output projection starts
at zero instead (PixArt-alpha's choice).

The position embeddings are computed for the input's shape at every forward (a few sin/cos, negligible next
to attention): they are not parameters and not in the state_dict, so one set of weights runs at any frame
count or frame size.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from t2v.config_checks import dit_patch
from t2v.models.layers import caption_conditioning, run_block, timestep_embedding, zero_

# name -> (hidden, depth, heads). depth counts blocks (half spatial, half temporal), so it is even; heads keep
# 64 channels each from small up (flash attention's favourite head size). Parameters at 3 input channels, text
# dim 512, no cross-attention (the UNet of the same name in brackets): tiny 0.11 M (0.20 M), small 2.54 M (2.44 M),
# base 9.94 M (9.60 M), large 39.27 M (38.09 M); tests/test_dit.py checks these are within ±15 % of the UNet's.
SIZES = {
    "tiny": (32, 4, 2),
    "small": (128, 8, 2),
    "base": (256, 8, 4),
    "large": (512, 8, 8),
}
FREQ_DIM = 256  # sinusoidal features of the timestep and the frame rate, as DiT


def resolve_size(size: str, hidden: int = 0, depth: int = 0, heads: int = 0) -> tuple[int, int, int]:
    """(hidden, depth, heads): model.hidden/depth/heads where set (non-zero), else the size registry's."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}: expected one of {sorted(SIZES)}")
    h, d, k = SIZES[size]
    return hidden or h, depth or d, heads or k


def resolve_patch(cfg) -> int:
    """model.patch, or for 0: 1 where a frame (in pixels, or latent cells: data.size / 8) is 16 or smaller on its
    longer side, else 2.
    The rule lives in t2v.config_checks (torch-free), which checks it divides the frame before anything is built."""
    return dit_patch(cfg)


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin-cos embedding of positions (n,) -> (n, dim), as DiT/MAE (frequencies 1 / 10000^(i / half))."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, device=pos.device, dtype=torch.float32) / max(half, 1))
    args = pos.float()[:, None] * omega[None]  # n half
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # n (2 half)
    return F.pad(emb, (0, dim - 2 * half))


def sincos_2d(h: int, w: int, dim: int, device) -> torch.Tensor:
    """(h w, dim): half the channels embed the row, the other half the column."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    half = dim // 2
    emb = torch.cat([sincos_1d(rows.flatten(), half), sincos_1d(cols.flatten(), dim - half)], dim=-1)  # (h w) dim
    return emb


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (b t n d) normalised, then one scale and shift per clip (b d) broadcast over frames and patches."""
    return x * (1 + scale[:, None, None]) + shift[:, None, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention over one axis of the b t n d token grid: ``space`` (the n patches of a frame) or
    ``time`` (the t frames at one patch location). One fused qkv Linear; the axis is fixed at construction, so the
    forward has no data-dependent branch."""

    def __init__(self, dim: int, heads: int, axis: str):
        super().__init__()
        assert axis in ("space", "time")
        self.heads, self.axis = heads, axis
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # b t n d
        qkv = self.qkv(x)  # b t n (three k e)
        if self.axis == "space":
            # (b t) is a view (adjacent dims): the only copy is the one SDPA needs anyway
            q, k, v = rearrange(qkv, "b t n (three k e) -> three (b t) k n e", three=3, k=self.heads)
            out = F.scaled_dot_product_attention(q, k, v)  # (b t) k n e
            out = rearrange(out, "(b t) k n e -> b t n (k e)", b=x.shape[0])
        else:
            q, k, v = rearrange(qkv, "b t n (three k e) -> three (b n) k t e", three=3, k=self.heads)
            out = F.scaled_dot_product_attention(q, k, v)  # (b n) k t e
            out = rearrange(out, "(b n) k t e -> b t n (k e)", b=x.shape[0])
        return self.proj(out)


class CrossAttention(nn.Module):
    """Every token of the clip attends to the caption tokens. Queries are the clip's t*n tokens in one sequence,
    so the l keys and values are computed once per clip and shared by all frames (no t-times repeat)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, context_mask):  # x: b t n d, context: b l c, context_mask: b l bool
        b, t, n, _ = x.shape
        q = rearrange(self.q(self.norm(x)), "b t n (k e) -> b k (t n) e", k=self.heads)
        k, v = rearrange(self.kv(context), "b l (two k e) -> two b k l e", two=2, k=self.heads)
        mask = rearrange(context_mask, "b l -> b 1 1 l")  # broadcast over heads and queries; True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # b k (t n) e
        return self.proj(rearrange(out, "b k (t n) e -> b t n (k e)", t=t))


class DiTBlock(nn.Module):
    """adaLN-Zero DiT block: x + gate * attn(modulate(norm(x))), [+ cross-attention], x + gate * mlp(...)."""

    def __init__(self, dim: int, heads: int, axis: str, mlp_ratio: float = 4.0, context_dim: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, axis)
        self.xattn = CrossAttention(dim, context_dim, heads) if context_dim else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # zeroed by VideoDiT.init_weights

    def forward(self, x, c, context=None, context_mask=None):  # x: b t n d, c: b d
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # 6 x (b d)
        x = x + gate1[:, None, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.xattn is not None:  # fixed at construction: no data-dependent branching
            x = x + self.xattn(x, context, context_mask)
        return x + gate2[:, None, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out)

    def forward(self, x, c):  # b t n d -> b t n out
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class VideoDiT(nn.Module):
    """Predicts the noise (or v, or flow velocity) of a noisy clip; UNet3DCond's interface and semantics:

    forward(x (b t c h w), t (b,), text (b d), tokens (b l d) = None, token_mask (b l) = None, cond_mask (b,) = None,
    fps (b,) = None) -> (b t c h w). Rows with cond_mask False see a learned null caption (classifier-free guidance).
    """

    def __init__(self, in_channels: int = 3, hidden: int = 256, depth: int = 8, heads: int = 4, patch: int = 2,
                 text_dim: int = 512, cross_attention: bool = False, checkpointing: bool = False,
                 fps_cond: bool = False, mlp_ratio: float = 4.0):
        super().__init__()
        if depth < 2 or depth % 2:
            raise ValueError(f"a dit's depth must be even and >= 2 (pairs of spatial + temporal blocks), got {depth}")
        if hidden % heads:
            raise ValueError(f"model.hidden={hidden} must be divisible by model.heads={heads}")
        self.in_channels, self.hidden, self.patch = in_channels, hidden, patch
        self.cross_attention, self.checkpointing = cross_attention, checkpointing
        # one patch (p p c) -> one token: a Linear on flattened patches is a stride-p Conv2d
        self.patch_embed = nn.Linear(patch * patch * in_channels, hidden)
        self.time_mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.text_mlp = nn.Sequential(nn.Linear(text_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        # fps_cond: the clip's frame rate embedded like the timestep (ModelScope, VideoCrafter); its last layer is
        # zeroed (after init_weights' xavier) so it starts as a no-op
        self.fps_mlp = (nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                        if fps_cond else None)
        # the "no caption" embedding; small random init so it differs from any real caption from step 0
        self.null_text = nn.Parameter(torch.randn(text_dim) * 0.02)
        # one learned token every row can attend to: the only key of unconditional rows, a sink for the others
        self.null_token = nn.Parameter(torch.randn(text_dim) * 0.02) if cross_attention else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden, heads, "space" if i % 2 == 0 else "time", mlp_ratio, text_dim if cross_attention else 0)
            for i in range(depth))
        self.final = FinalLayer(hidden, patch * patch * in_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """DiT's: xavier-uniform linears with zero bias, then the adaLN modulations and the output zeroed, so
        every block starts as the identity and the model predicts exactly 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_mlp[0].weight, std=0.02)  # DiT's timestep MLP init
        nn.init.normal_(self.time_mlp[2].weight, std=0.02)
        for blk in self.blocks:
            zero_(blk.ada[-1])
            if blk.xattn is not None:  # ungated, so its output projection starts at zero instead (as PixArt-alpha)
                zero_(blk.xattn.proj)
        zero_(self.final.ada[-1])
        zero_(self.final.linear)
        if self.fps_mlp is not None:
            zero_(self.fps_mlp[-1])

    def fsdp_units(self):  # t2v.parallel: one sharded unit a transformer block
        return list(self.blocks)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        tokens: Optional[torch.Tensor] = None,
        token_mask: Optional[torch.Tensor] = None,
        cond_mask: Optional[torch.Tensor] = None,
        fps: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        b, frames, _, height, width = x.shape
        p = self.patch
        if height % p or width % p:  # shapes are static: no graph break
            raise ValueError(f"frame size {height}x{width} must be divisible by the patch size {p}")
        text, context, context_mask = caption_conditioning(text, tokens, token_mask, cond_mask, self.null_text,
                                                           self.null_token)
        c = self.time_mlp(timestep_embedding(t, FREQ_DIM).to(text.dtype)) + self.text_mlp(text)  # b hidden
        if self.fps_mlp is not None:
            if fps is None:
                raise ValueError("model.fps_cond=True needs each clip's frame rate (fps=, shape (b,))")
            c = c + self.fps_mlp(timestep_embedding(fps, FREQ_DIM).to(text.dtype))  # b hidden

        gh, gw = height // p, width // p
        h = self.patch_embed(rearrange(x, "b t c (h p1) (w p2) -> b t (h w) (p1 p2 c)", p1=p, p2=p))  # b t n d
        # attention is blind to order: fixed sin-cos embeddings say which row, column and frame a token is
        # (added once here, like DiT; Latte adds the frame one before its first temporal block, the same thing
        # up to the first spatial block, which sees it as a per-frame bias)
        pos = sincos_2d(gh, gw, self.hidden, x.device)[None] + sincos_1d(
            torch.arange(frames, device=x.device), self.hidden)[:, None]  # t n d
        h = h + pos.to(h.dtype)
        for blk in self.blocks:
            h = run_block(blk, self.checkpointing, h, c, context, context_mask)
        h = self.final(h, c)  # b t n (p1 p2 c)
        return rearrange(h, "b t (h w) (p1 p2 c) -> b t c (h p1) (w p2)", h=gh, p1=p, p2=p)


def build_dit(cfg, in_channels: int = 3) -> VideoDiT:
    """The VideoDiT a t2v.config.Config describes (model.size or model.hidden/depth/heads, model.patch, text.dim);
    ``in_channels`` from the space (3 for RGB, the VAE's latent channels) unless model.in_channels says."""
    m = cfg.model
    hidden, depth, heads = resolve_size(m.size, m.hidden, m.depth, m.heads)
    return VideoDiT(
        in_channels=m.in_channels or in_channels,
        hidden=hidden,
        depth=depth,
        heads=heads,
        patch=resolve_patch(cfg),
        text_dim=cfg.text.dim,
        cross_attention=m.cross_attention,
        checkpointing=m.checkpointing,
        fps_cond=m.fps_cond,
    )
