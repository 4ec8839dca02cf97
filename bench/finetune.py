"""Section ``finetune``: what fine-tuning a pretrained Wan costs here, side by side in one run.

  1. our LoRA fine-tuning step (t2v.step.train_step on t2v.models.wan.WanDenoiser, as t2v.train builds it: the
     adapter's AdamW, its EMA, clipping, the step's own generator) against a plain PyTorch loop over the same
     cached tensors and the same diffusers model: steps/s, target >= 0.95x (the harness costs nothing);
  2. the latent window cache build with Wan's VAE (AutoencoderKLWan): windows of 4k+1 frames at 16 fps inside
     shots, each encoded as one video: windows/s and bytes per window and clip.

The transformer is Wan's architecture at a reduced width and depth with random weights (the real 1.3B does not fit
a CPU benchmark); the captions are Wan's 512 tokens of 4096 values; the VAE is diffusers' default AutoencoderKLWan
config (Wan 2.1's). ``--quick``: tiny sizes, a smoke test whose numbers mean nothing.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.common import Row, SectionResult, alternate, fmt_rate, fmt_s, log, median, per_round_ratios
from bench.data_load import msrvtt_like_dataset
from t2v import config
from t2v.data.latents import build_latent_windows, open_latent_windows
from t2v.data.manifest import read_manifest
from t2v.data.windows import Rate
from t2v.models import count_params, ema_copy
from t2v.models.pretrained import add_lora
from t2v.models.wan import TEXT_LEN, WanDenoiser
from t2v.objective import build_objective
from t2v.step import Cond, StepState, train_step

TARGET = 0.95
# Wan 2.1 1.3B: dim 1536 (12 heads x 128), ffn 8960, 30 layers. Here: 4 heads x 64, ffn 1024, 4 layers.
WAN_BENCH = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
                 text_dim=4096, freq_dim=256, ffn_dim=1024, num_layers=4, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", rope_max_seq_len=1024)
WAN_QUICK = dict(WAN_BENCH, num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=32, num_layers=2)
TINY_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])


def transformer(spec: dict):
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return WanTransformer3DModel(**spec)


def lora_model(spec: dict, rank: int) -> torch.nn.Module:
    t = transformer(spec).requires_grad_(False)
    add_lora(t, rank, rank, ())
    return t


def plain_loop(model, x0, tokens, lr: float):
    """A 30-line fine-tuning step as people write it: the cached caption tokens padded to Wan's 512, flow draws,
    forward, MSE, backward, clipping, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, fused=True)
    x = x0.permute(0, 2, 1, 3, 4)  # b t c h w -> b c t h w, what the diffusers model takes
    step = [0]

    def run():
        g = torch.Generator(device=x.device).manual_seed(step[0])
        sigma = torch.sigmoid(torch.randn(x.shape[0], generator=g, device=x.device))  # logit-normal times
        noise = torch.randn(x.shape, generator=g, device=x.device)
        s = sigma.view(-1, 1, 1, 1, 1)
        context = torch.nn.functional.pad(tokens, (0, 0, 0, TEXT_LEN - tokens.shape[1]))  # b 512 d
        out = model(hidden_states=(1 - s) * x + s * noise, timestep=sigma * 1000, encoder_hidden_states=context,
                    return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), noise - x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step[0] += 1
        return float(loss)

    return run


def flow_step_state(model: WanDenoiser, device: torch.device, precision: str, lr: float) -> StepState:
    """The StepState t2v.train builds for a Wan fine-tune: rectified flow at shift 3, fused AdamW over what trains,
    the EMA sharing the frozen base. A caption dropped for guidance (diffusion.cond_dropout, 10%) becomes the empty
    caption, one token here, as t2v.models.set_null_caption gives it from the caption cache in a real run."""
    g = torch.Generator().manual_seed(1)
    model.null = torch.randn(1, model.transformer.config.text_dim, generator=g).to(device)
    cfg = config.Config()
    cfg.diffusion.objective, cfg.diffusion.shift, cfg.train.lr = "flow", 3.0, lr
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.999),
                            weight_decay=0.0, fused=True)
    return StepState(model, model, ema_copy(model), opt, torch.amp.GradScaler(device.type, enabled=False),
                     build_objective(cfg.diffusion, device), cfg.diffusion, cfg.train, precision, device)


def our_step(model: WanDenoiser, x0, tokens, mask, lr: float):
    state = flow_step_state(model, x0.device, "fp32", lr)
    cond = Cond(torch.zeros(x0.shape[0], tokens.shape[-1]), tokens, mask)
    step = [0]

    def run():
        loss = train_step(state, step[0], x0, cond).loss
        step[0] += 1
        return loss

    return run


def bench_finetune(args) -> SectionResult:
    res = SectionResult("finetune")
    quick = args.quick
    spec = WAN_QUICK if quick else WAN_BENCH
    frames, side, rank, batch, real_tokens = (2, 4, 4, 1, 5) if quick else (5, 16, 16, 2, 14)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, frames, 16, side, side, generator=g)  # b t c h w: cached latents
    d = spec["text_dim"]
    tokens = torch.randn(batch, real_tokens, d, generator=g)  # the cache's real tokens; both pad them to 512
    mask = torch.ones(batch, real_tokens, dtype=torch.bool)

    ours = WanDenoiser(lora_model(spec, rank), {"name": "bench", "sha256": "-"})
    ours.set_trainable()
    plain = lora_model(spec, rank)
    res.data["config"] = {"transformer": spec, "latent": [frames, 16, side, side], "batch": batch, "lora_rank": rank,
                          "parameters": count_params(ours), "trained": count_params(ours, trainable=True)}
    times = alternate({"plain": plain_loop(plain, x0, tokens, 1e-4),
                       "ours": our_step(ours, x0, tokens, mask, 1e-4)}, args.repeats, label="finetune step")
    ratio = median(per_round_ratios(times["ours"], times["plain"]))  # plain time / ours time = our relative speed
    speed = 1 / ratio
    res.data["step"] = {"times": times, "ours_vs_plain": speed}
    res.rows.append(Row(f"LoRA fine-tuning step (rank {rank}) of a {count_params(ours) / 1e6:.1f} M Wan transformer "
                        f"on {frames}x{side}x{side} latents, batch {batch}: ours vs a plain PyTorch loop",
                        f"{speed:.2f}x the plain loop's steps/s ({fmt_s(median(times['ours']))} vs "
                        f"{fmt_s(median(times['plain']))} per step)", f">= {TARGET:g}x",
                        None if quick else speed >= TARGET))

    # 2. the latent window cache with Wan's VAE: its build rate and bytes per window and clip
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = (AutoencoderKLWan(**TINY_VAE) if quick else AutoencoderKLWan()).eval().requires_grad_(False)
    workdir = Path(args.workdir)
    n, vframes, size, per_clip = (2, 5, 16, 2) if quick else (2, 9, 128, 2)
    clips = read_manifest(msrvtt_like_dataset(workdir, n, seconds=2.0 if quick else 10.0))
    rate, where = Rate(fps=16.0), workdir / "wan_latent_cache"
    t0 = time.perf_counter()
    build_latent_windows(clips, size, rate, where, vae, "bench-wan-vae", progress=False, frames=vframes,
                         per_clip=per_clip)
    seconds = time.perf_counter() - t0
    cache = open_latent_windows(clips, size, rate, where, "bench-wan-vae", vframes, per_clip)
    windows = sum(len(s) for s in cache.starts)
    per_window, row_bytes = seconds / windows, cache.array[0].nbytes
    res.data["latent_cache"] = {"s_per_window": per_window, "bytes_per_window": row_bytes, "windows": windows,
                                "clips": n, "frames": vframes, "size": size, "shape": list(cache.array.shape[1:])}
    res.rows.append(Row(f"Latent window cache build with Wan's VAE ({'tiny' if quick else 'Wan 2.1 architecture'}, "
                        f"{per_clip} windows of {vframes} frames at 16 fps a clip, {size}x{size}, CPU)",
                        f"{fmt_rate(1 / per_window)} windows/s ({fmt_s(per_window)} a window), {row_bytes:,} bytes a "
                        f"window, {row_bytes * per_clip:,} a clip", "-", None,
                        "decoding and cut detection included; bytes: mean and std of 1 + (F - 1)/4 latent frames in "
                        "float16"))
    log(f"finetune: ours {speed:.2f}x the plain loop; Wan VAE window cache {fmt_s(per_window)}/window, "
        f"{row_bytes:,} B/window")
    return res


# Wan 2.1 T2V-1.3B's transformer config (diffusers' Wan-AI/Wan2.1-T2V-1.3B-Diffusers): 1,418,996,800 parameters
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def wan_at_real_size(rehearse: bool = False, steps: int = 4) -> dict:
    """What `make gpu-check`'s wan check measures: the 1.3B transformer (random weights, made on the GPU), bf16
    autocast with activation checkpointing (the LoRA's frozen base in bf16, model.base_dtype), 17 x 240 x 320 clips
    (MSR-VTT's own frames, configs/wan_lora.yaml) as Wan's latents (5 x 16 x 30 x 40), captions of 14 real tokens; a
    LoRA (rank 16) and then a full fine-tune, each ``steps`` steps of our train_step: peak memory and clips/s (the
    first step, compile and allocator warm-up, excluded). ``rehearse``: the tiny config on CPU."""
    device = torch.device("cpu" if rehearse else "cuda")
    spec = WAN_QUICK if rehearse else WAN_1_3B
    frames, (h, w) = (2, (4, 6)) if rehearse else (5, (30, 40))
    out = {"config": "tiny (CPU rehearsal)" if rehearse else "Wan 2.1 T2V-1.3B", "latent": [frames, 16, h, w]}
    for mode in ("lora", "full"):
        from diffusers import WanTransformer3DModel

        with torch.device("meta"):
            t = WanTransformer3DModel(**spec)
        t = t.to_empty(device=device)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for p in t.parameters():
                p.normal_(0.0, 0.02)
        t.rope.__init__(t.rope.attention_head_dim, t.rope.patch_size, t.rope.max_seq_len)  # buffers made on meta
        t.rope.to(device)
        t.enable_gradient_checkpointing()
        t.requires_grad_(mode == "full")
        if mode == "lora":
            add_lora(t, 16, 16, ())
        model = WanDenoiser(t, {"name": "random", "sha256": "-"})
        model.set_trainable()
        model.cast_base("bf16" if mode == "lora" else "fp32")  # configs/wan_lora.yaml's model.base_dtype
        state = flow_step_state(model, device, "fp32" if rehearse else "bf16", 1e-4)  # t2v.train's default lr
        x0 = torch.randn(1, frames, 16, h, w, device=device)  # b t c h w
        d = spec["text_dim"]
        cond = Cond(torch.zeros(1, d, device=device), torch.randn(1, 14, d, device=device),
                    torch.ones(1, 14, dtype=torch.bool, device=device))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            loss = train_step(state, i, x0, cond).loss
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        out[mode] = {"parameters": count_params(model), "trained": count_params(model, trainable=True),
                     "clips_per_s": (steps - 1) / sum(times[1:]), "peak_gib": peak, "loss": loss}
        del model, state, t
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


if __name__ == "__main__":  # tools/gpu_check.py's wan check: one JSON line
    import json
    import sys

    print(json.dumps(wan_at_real_size(rehearse="--rehearse" in sys.argv)))
