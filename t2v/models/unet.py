"""A small text-conditioned 3D UNet for pixel-space video diffusion.

Shapes: the public interface is ``b t c h w`` (frames first, like the data loader); inside, the
network works on ``b c t h w`` because that is what Conv3d wants.

Design choices, each for CPU speed at equal quality:
  * (2+1)D convolutions: a spatial (1,3,3) kernel followed by a temporal (3,1,1) kernel. 12·C² weights
    instead of 27·C², and faster than a full 3x3x3 Conv3d per fwd+bwd on CPU (the gap grows at the low
    resolutions where channels are wide); used by Make-A-Video and others.
  * Downsampling is spatial only by default: clips have ~8 frames. ``downsample_time`` halves the frames with
    the frame size (8 -> 4 below the first level): the levels below cost half, and the demo's model learns its
    shapes, colours and motion as well in 2,000 steps (docs/recipe.md, "Frames halved").
  * One ResBlock per level on each side keeps ``base`` (64 -> 128 -> 256 channels) at a few seconds
    per training step on CPU; the middle has two.
  * Zero-initialised last conv of every residual branch, of every attention output and of the
    network's output: each block starts as the identity and the model starts by predicting 0,
    which keeps early diffusion training stable (Dhariwal & Nichol 2021, DiT).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from t2v.models.layers import caption_conditioning, run_block, timestep_embedding, zero_

# name -> (base_channels, channel_mults). "base" is the baseline: 64 channels scaling to 128 and 256.
SIZES = {
    "tiny": (16, (1, 2)),
    "small": (32, (1, 2, 4)),
    "base": (64, (1, 2, 4)),
    "large": (128, (1, 2, 4)),
}


def num_groups(channels: int) -> int:
    """GroupNorm groups that divide ``channels``: up to 32, with at least 4 channels per group."""
    g = max(1, min(32, channels // 4))
    while channels % g:
        g -= 1
    return g


def space_time_grid(x: torch.Tensor) -> torch.Tensor:
    """(b, 3, t, h, w) frame, row and column coordinates in [-1, 1] for a b c t h w tensor.

    Convolutions are translation-equivariant and FiLM is one scale and shift per channel for the whole clip,
    so without these a caption can only say *where* and *when* through the zero padding at the borders:
    "moving left" means a blob whose column falls with the frame index, which is one linear function
    of these channels."""
    b, _, t, h, w = x.shape
    axes = [torch.linspace(-1.0, 1.0, n, device=x.device, dtype=x.dtype) if n > 1 else
            torch.zeros(1, device=x.device, dtype=x.dtype) for n in (t, h, w)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # 3 t h w
    return grid.expand(b, -1, -1, -1, -1)  # b 3 t h w


def to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """b t c h w -> b (c p1 p2) t h/p w/p: every p x p block of pixels becomes one position (space-to-depth)."""
    return rearrange(x, "b t c (h p1) (w p2) -> b (c p1 p2) t h w", p1=p, p2=p)


def from_patches(h: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of to_patches: b (c p1 p2) t h w -> b t c (h p1) (w p2)."""
    return rearrange(h, "b (c p1 p2) t h w -> b t c (h p1) (w p2)", p1=p, p2=p)


class Conv2Plus1D(nn.Module):
    """A 3x3 spatial conv then a 3-tap temporal conv. Both are held as Conv3d (the checkpoints' layout); the
    temporal one runs as a (3, 1) Conv2d over t and the flattened h·w, the same sums without a copy, because
    oneDNN's Conv3d with a (3, 1, 1) kernel is slow on CPU: 2.7x slower per fwd+bwd at 4x4 with 48 channels,
    1.2x at 8x8 with 24, timed alone (the demo's whole step: `make bench`, section exp). The spatial one stays
    Conv3d: as a Conv2d it needs b c t -> (b t) c copies and was slower."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.spatial = nn.Conv3d(c_in, c_out, (1, 3, 3), padding=(0, 1, 1))
        self.temporal = nn.Conv3d(c_out, c_out, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x):  # b c t h w -> b c' t h w
        h = self.spatial(x)
        b, c, t, hh, ww = h.shape
        h = F.conv2d(h.reshape(b, c, t, hh * ww), self.temporal.weight.squeeze(-1), self.temporal.bias,
                     padding=(1, 0))  # b c t (h w): the kernel (3, 1) spans frames only
        return h.view(b, c, t, hh, ww)


class ResBlock(nn.Module):
    """GroupNorm -> FiLM(cond) -> SiLU -> conv -> GroupNorm -> SiLU -> dropout -> conv, plus skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups(c_in), c_in)
        self.film = nn.Linear(emb_dim, 2 * c_in)
        self.conv1 = Conv2Plus1D(c_in, c_out)
        self.norm2 = nn.GroupNorm(num_groups(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2Plus1D(c_out, c_out)
        zero_(self.conv2.temporal)  # the branch's last conv: the block starts as the identity
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):  # x: b c t h w, emb: b e (one for the clip) or b t e (one per frame)
        film = self.film(F.silu(emb))
        if film.ndim == 2:
            scale, shift = rearrange(film, "b (two c) -> two b c 1 1 1", two=2)
        else:
            scale, shift = rearrange(film, "b t (two c) -> two b c t 1 1", two=2)
        h = self.norm1(x) * (1 + scale) + shift  # b c t h w
        h = self.conv1(F.silu(h))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class TemporalAttention(nn.Module):
    """Self-attention over frames, independently at every spatial location."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(num_groups(channels), channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_(nn.Linear(channels, channels))

    def forward(self, x):  # b c t h w
        b, c, t, h, w = x.shape
        seq = rearrange(self.norm(x), "b c t h w -> (b h w) t c")
        # attention is order-blind; a fixed sinusoidal frame position tells it which frame is which
        seq = seq + timestep_embedding(torch.arange(t, device=x.device), c).to(seq.dtype)  # t c broadcast
        q, k, v = rearrange(self.qkv(seq), "n t (three k d) -> three n k t d", three=3, k=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # n k t d
        out = self.proj(rearrange(out, "n k t d -> n t (k d)"))
        return x + rearrange(out, "(b h w) t c -> b c t h w", b=b, h=h, w=w)


class CrossAttention(nn.Module):
    """Every (frame, pixel) position attends to the caption tokens."""

    def __init__(self, channels: int, context_dim: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(num_groups(channels), channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = zero_(nn.Linear(channels, channels))

    def forward(self, x, context, context_mask):  # x: b c t h w, context: b l d, context_mask: b l bool
        b, c, t, h, w = x.shape
        q = rearrange(self.q(rearrange(self.norm(x), "b c t h w -> b (t h w) c")), "b n (k d) -> b k n d", k=self.heads)
        k, v = rearrange(self.kv(context), "b l (two k d) -> two b k l d", two=2, k=self.heads)
        mask = rearrange(context_mask, "b l -> b 1 1 l")  # broadcast over heads and queries; True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # b k n d
        out = self.proj(rearrange(out, "b k n d -> b n (k d)"))
        return x + rearrange(out, "b (t h w) c -> b c t h w", t=t, h=h, w=w)


class Block(nn.Module):
    """A ResBlock, optionally followed by temporal self-attention and caption cross-attention."""

    def __init__(self, c_in, c_out, emb_dim, dropout, temporal_attention, cross_attention, text_dim, heads):
        super().__init__()
        self.res = ResBlock(c_in, c_out, emb_dim, dropout)
        self.tattn = TemporalAttention(c_out, heads) if temporal_attention else None
        self.xattn = CrossAttention(c_out, text_dim, heads) if cross_attention else None

    def forward(self, x, emb, context=None, context_mask=None):
        x = self.res(x, emb)
        if self.tattn is not None:  # fixed at construction: no data-dependent branching
            x = self.tattn(x)
        if self.xattn is not None:
            x = self.xattn(x, context, context_mask)
        return x


class UNet3DCond(nn.Module):
    """Predicts the noise (or v) of a noisy clip given the timestep and a caption embedding.

    forward(x (b t 3 h w), t (b,), text (b d), tokens (b l d) = None, token_mask (b l) = None,
    cond_mask (b,) = None, fps (b,) = None) -> (b t 3 h w). Rows with cond_mask False see a learned null caption
    (classifier-free guidance's unconditional branch and caption dropout).
    """

    def __init__(
        self,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 4),
        text_dim: int = 512,
        temporal_attention: bool = False,
        cross_attention: bool = False,
        dropout: float = 0.0,
        num_res_blocks: int = 1,
        heads: int = 4,
        in_channels: int = 3,
        coords: bool = False,
        frame_cond: bool = False,
        checkpointing: bool = False,
        fps_cond: bool = False,
        patch: int = 1,
        downsample_time: bool = False,
    ):
        super().__init__()
        if frame_cond and downsample_time:  # t2v.config_checks says so by key name first
            raise ValueError("frame_cond needs every frame at every level: it cannot be combined with downsample_time")
        self.checkpointing = checkpointing
        self.patch = patch
        self.cross_attention = cross_attention
        self.coords = coords
        self.frame_cond = frame_cond
        ch = [base_channels * m for m in channel_mults]
        emb_dim = 4 * base_channels
        self.base_channels = base_channels
        last = len(ch) - 1

        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.text_mlp = nn.Sequential(nn.Linear(text_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # frame_cond: an MLP of (clip embedding, frame position) gives every frame its own FiLM, so "where the
        # shape is in frame k" can be a function of the caption and k rather than something each conv must infer
        self.frame_mlp = (nn.Sequential(nn.Linear(2 * emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                          if frame_cond else None)
        self.emb_dim = emb_dim
        # fps_cond: the clip's frame rate, embedded like the timestep and added to it (ModelScope, VideoCrafter), so
        # one model learns how far things move per frame at several rates; zeroed out layer: it starts as a no-op
        self.fps_mlp = (nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), zero_(nn.Linear(emb_dim, emb_dim)))
                        if fps_cond else None)
        # the "no caption" embedding; small random init so it differs from any real caption from step 0
        self.null_text = nn.Parameter(torch.randn(text_dim) * 0.02)
        # one learned token that every row can attend to: it is the only key for unconditional rows
        # (so their output ignores the caption) and an attention sink for conditional ones
        self.null_token = nn.Parameter(torch.randn(text_dim) * 0.02) if cross_attention else None

        def block(c_in, c_out, level):
            lowest = level == last  # attention only at the lowest resolution, where it is cheap
            return Block(
                c_in, c_out, emb_dim, dropout, temporal_attention and lowest, cross_attention and lowest, text_dim, heads
            )

        # patch: every p x p pixel block becomes one position with p²·c channels (space-to-depth, as in "simple
        # diffusion", Hoogeboom et al. 2023): the full-resolution level, the costliest (the most positions, the
        # narrowest convs), runs at 1/p² of the positions (configs/demo.yaml: a 1.9x cheaper step).
        # coords: three extra input channels holding each voxel's (frame, row, column) in [-1, 1]
        self.stem = nn.Conv3d(in_channels * patch ** 2 + 3 * coords, ch[0], (1, 3, 3), padding=(0, 1, 1))
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c = ch[0]
        skips = []
        for i, c_out in enumerate(ch):
            for _ in range(num_res_blocks):
                self.down.append(block(c, c_out, i))
                c = c_out
                skips.append(c)
            # spatial stride 2; with downsample_time the frames too, through a 3x3x3 kernel so that no frame is
            # skipped (the levels below see every other frame's position, with its neighbours mixed in)
            down = (nn.Conv3d(c, c, 3, stride=2, padding=1) if downsample_time else
                    nn.Conv3d(c, c, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)))
            self.downsample.append(down if i < last else nn.Identity())
        self.mid1 = block(c, c, last)
        self.mid2 = Block(c, c, emb_dim, dropout, False, False, text_dim, heads)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(ch))):
            for _ in range(num_res_blocks):
                self.up.append(block(c + skips.pop(), ch[i], i))
                c = ch[i]
            self.upsample.append(nn.Conv3d(c, ch[i - 1], (1, 3, 3), padding=(0, 1, 1)) if i > 0 else nn.Identity())
            c = ch[i - 1] if i > 0 else c
        self.num_res_blocks = num_res_blocks
        self.factor = 2 ** last  # total spatial downsampling
        self.time_stride = 2 if downsample_time else 1  # of each downsampling
        self.time_factor = self.time_stride ** last  # total temporal downsampling
        self.out_norm = nn.GroupNorm(num_groups(c), c)
        self.out_conv = zero_(nn.Conv3d(c, in_channels * patch ** 2, (1, 3, 3), padding=(0, 1, 1)))

    def fsdp_units(self):  # t2v.parallel: one sharded unit a residual block
        return [*self.down, self.mid1, self.mid2, *self.up]

    def _block(self, blk: nn.Module, h, emb, context, context_mask):
        return run_block(blk, self.checkpointing, h, emb, context, context_mask)

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
        b, _, _, height, width = x.shape
        p = self.patch
        if height % (self.factor * p) or width % (self.factor * p):  # shapes are static: no graph break
            halvings = self.factor.bit_length() - 1
            raise ValueError(f"frame size {height}x{width} must be divisible by {self.factor * p} (patches of {p} "
                             f"pixels, which the UNet halves {halvings} times)")
        if x.shape[1] % self.time_factor:
            raise ValueError(f"{x.shape[1]} frames must be divisible by {self.time_factor}: model.downsample_time "
                             f"halves them {self.time_factor.bit_length() - 1} times")
        text, context, context_mask = caption_conditioning(text, tokens, token_mask, cond_mask, self.null_text,
                                                           self.null_token)
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(text.dtype)) + self.text_mlp(text)  # b e
        if self.fps_mlp is not None:
            if fps is None:
                raise ValueError("model.fps_cond=True needs each clip's frame rate (fps=, shape (b,))")
            emb = emb + self.fps_mlp(timestep_embedding(fps, self.base_channels).to(text.dtype))  # b e
        if self.frame_cond:
            frames = x.shape[1]
            pos = timestep_embedding(torch.arange(frames, device=x.device), self.emb_dim).to(emb.dtype)  # t e
            pair = torch.cat([emb[:, None].expand(-1, frames, -1), pos[None].expand(b, -1, -1)], dim=-1)  # b t (2e)
            emb = emb[:, None] + self.frame_mlp(pair)  # b t e


        h = to_patches(x, p)  # b (c p p) t h/p w/p
        if self.coords:
            h = torch.cat([h, space_time_grid(h)], dim=1)  # b (c+3) t h w
        h = self.stem(h)
        skips = []
        n = self.num_res_blocks
        for i, blk in enumerate(self.down):
            h = self._block(blk, h, emb, context, context_mask)
            skips.append(h)
            if i % n == n - 1:
                h = self.downsample[i // n](h)
        h = self._block(self.mid2, self._block(self.mid1, h, emb, context, context_mask), emb, None, None)
        for i, blk in enumerate(self.up):
            h = self._block(blk, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)  # b (c+c_skip) t h w
            if i % n == n - 1:
                up = self.upsample[i // n]
                if not isinstance(up, nn.Identity):
                    # nearest x2 in space (and time, where the way down halved it), then a conv to smooth the
                    # blockiness
                    h = up(F.interpolate(h, scale_factor=(self.time_stride, 2, 2), mode="nearest"))
        h = self.out_conv(F.silu(self.out_norm(h)))
        return from_patches(h, p)  # b t c h w


def resolve_size(size: str, base_channels: int = 0, channel_mults: Sequence[int] = ()) -> tuple[int, tuple[int, ...]]:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}: expected one of {sorted(SIZES)}")
    base, mults = SIZES[size]
    return (base_channels or base), tuple(int(m) for m in (channel_mults or mults))


def build_unet(cfg, in_channels: int = 3) -> UNet3DCond:
    """The UNet3DCond a t2v.config.Config describes (model section, conditioning dim from text.dim); ``in_channels``:
    what its space gives it (t2v.space: 3 for RGB, the VAE's latent channels) unless model.in_channels says."""
    m = cfg.model
    base, mults = resolve_size(m.size, m.base_channels, m.channel_mults)
    return UNet3DCond(
        in_channels=m.in_channels or in_channels,
        base_channels=base,
        channel_mults=mults,
        text_dim=cfg.text.dim,
        temporal_attention=m.temporal_attention,
        cross_attention=m.cross_attention,
        dropout=m.dropout,
        coords=m.coords,
        frame_cond=m.frame_cond,
        checkpointing=m.checkpointing,
        fps_cond=m.fps_cond,
        patch=m.patch or 1,
        downsample_time=m.downsample_time,
    )
