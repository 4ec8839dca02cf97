"""Section ``latent``: what latent-space training buys, measured side by side in one run.

  1. a training step (t2v.step.train_step) of the same UNet (``base``) on 8-frame 256x256 clips, in pixel space
     (3 x 256 x 256 per frame) and in the SD VAE's latent space (4 x 32 x 32): clips/s, target >= 10x;
  2. reading a clip's posterior from the latent cache vs decoding the clip and encoding it with the VAE per
     sample (what training without the cache would do): clips/s, target >= 100x;
  3. VAE encode clips/s (8 frames at 256x256), i.e. what `python -m t2v.data latents` costs per clip.

The VAE is the architecture of stabilityai/sd-vae-ft-mse (its published config, below) with random weights: the
cost is the architecture's, and nothing is downloaded. The clips are MSR-VTT-shaped (bench/data_load.py).
``--quick``: a tiny VAE and tiny sizes, a smoke test whose numbers mean nothing.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from bench.common import Row, SectionResult, alternate, fmt_rate, fmt_s, log, median, per_round_ratios
from bench.data_load import msrvtt_like_dataset
from bench.harness import Inputs, TrainStep, build_ours, forward_ours
from t2v.data.latents import build_latents
from t2v.data.manifest import read_manifest
from t2v.data.video import decode_uint8, to_model
from t2v.vae import LatentSpace, encode

# stabilityai/sd-vae-ft-mse's config.json (the fields that shape the network)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              sample_size=256, scaling_factor=0.18215)
TINY_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                sample_size=32)
TARGET_TRAIN, TARGET_READ = 10.0, 100.0


def make_vae(spec: dict):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(in_channels=3, out_channels=3, **spec).eval().requires_grad_(False)


def bench_latent(args) -> SectionResult:
    res = SectionResult("latent")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16" if device.type == "cuda" else "fp32"
    quick = args.quick
    vae = make_vae(TINY_VAE if quick else SD_VAE).to(device)
    space = LatentSpace.of(vae)
    size, frames, model = (32, 4, "tiny") if quick else (256, 8, args.model_size)
    lat = size // space.factor
    res.data["config"] = {"size": size, "frames": frames, "model": model, "vae": "tiny" if quick else "SD VAE arch",
                          "latent": [space.channels, lat, lat], "device": str(device), "precision": precision}

    # 1. the same UNet's training step, pixels vs latents (batch 2, as the train section)
    inp = Inputs(batch=2, frames=frames, size=size, text_dim=512)
    pixel = TrainStep(build_ours(model, 512), forward_ours, inp.clip(device), inp.pooled(device), precision)
    z = torch.randn(2, frames, space.channels, lat, lat, generator=torch.Generator().manual_seed(1)).to(device)
    latent = TrainStep(build_ours(model, 512, in_channels=space.channels), forward_ours, z, inp.pooled(device),
                       precision)
    times = alternate({"pixel": pixel, "latent": latent}, args.repeats, label="latent train")
    ratio = median(per_round_ratios(times["pixel"], times["latent"]))
    px, lt = 2 / median(times["pixel"]), 2 / median(times["latent"])
    res.data["train"] = {"times": times, "ratio": ratio, "pixel_clips_per_s": px, "latent_clips_per_s": lt}
    res.rows.append(Row(f"Training step, {model} on {frames}x{size}x{size} clips: latent ({space.channels}x{lat}x{lat})"
                        f" vs pixel space ({precision}, batch 2)",
                        f"{ratio:.1f}x ({fmt_rate(lt)} vs {fmt_rate(px)} clips/s; {fmt_s(median(times['latent']))} vs "
                        f"{fmt_s(median(times['pixel']))} per step)", f">= {TARGET_TRAIN:g}x",
                        None if quick else ratio >= TARGET_TRAIN))
    del pixel, latent

    # 2 + 3. the latent cache vs decode + encode per sample; the cache's build times the VAE encode
    workdir = Path(args.workdir)
    n = 2
    manifest = msrvtt_like_dataset(workdir, n, seconds=2.0 if quick else 10.0)
    clips = read_manifest(manifest)
    t0 = time.perf_counter()
    cache = build_latents(clips, frames, size, workdir / "latent_cache", vae, f"bench-{res.data['config']['vae']}",
                          batch_frames=frames, progress=False)
    encode_s = (time.perf_counter() - t0) / n
    reads = 2000

    def from_cache():
        for i in range(reads):
            torch.from_numpy(np.array(cache.get(i % n), dtype=np.float32))  # what ClipDataset does per item

    def per_sample():
        u8 = decode_uint8(clips[0].video, frames, size, "even")
        encode(vae, to_model(np.ascontiguousarray(u8)), frames)

    times = alternate({"cache": from_cache, "decode+encode": per_sample}, args.repeats, label="latent read")
    read_rate, direct_rate = reads / median(times["cache"]), 1 / median(times["decode+encode"])
    res.data["read"] = {"times": times, "reads_per_round": reads, "cache_clips_per_s": read_rate,
                        "decode_encode_clips_per_s": direct_rate, "encode_s_per_clip": encode_s}
    res.rows.append(Row(f"Latent cache read vs decode + VAE encode per sample ({frames}x{size}x{size}, "
                        f"MSR-VTT-shaped clips, {device.type})",
                        f"{read_rate / direct_rate:,.0f}x ({fmt_rate(read_rate)} vs {fmt_rate(direct_rate)} clips/s)",
                        f">= {TARGET_READ:g}x", None if quick else read_rate / direct_rate >= TARGET_READ))
    res.rows.append(Row(f"VAE encode ({res.data['config']['vae']}, {frames} frames of {size}x{size}, {device.type})",
                        f"{fmt_rate(1 / encode_s)} clips/s ({fmt_s(encode_s)} per clip)", "-", None,
                        "what `python -m t2v.data latents` costs per clip, once"))
    log(f"latent: train {ratio:.1f}x, cache read {read_rate / direct_rate:,.0f}x, encode {fmt_s(encode_s)}/clip")
    return res
