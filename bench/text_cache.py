"""Section ``text``: cached caption embeddings vs running the text encoder every step (the baseline's design).

The encoder is ``t2v.text.build_clip_b32_random()``: CLIP ViT-B/32's text tower at its exact size (63 M
parameters, 12 layers, 512-d) with random weights and a word-hash tokenizer, so no download is needed; its
cost is that of the real one. Per step: (encode the batch's 2 captions + a training step of ``base``) vs
(EmbeddingCache lookup + the same training step), alternating, on one shared model.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.common import Row, SectionResult, alternate, fmt_s, log, median, per_round_ratios
from bench.data_load import demo_dataset
from bench.harness import Inputs, TrainStep, build_ours, forward_ours
from bench.train_bench import device_and_precision
from t2v import config
from t2v.data.manifest import read_manifest
from t2v.text import build_clip_b32_random, build_tiny, embed_captions

TARGET_RATIO = 1.5


def bench_text(args) -> SectionResult:
    res = SectionResult("text")
    device, precision = device_and_precision()
    if args.quick:
        size, inp = "tiny", Inputs(batch=2, frames=4, size=16, text_dim=64)
        encoder = build_tiny(dim=64, device=device)
    else:
        size, inp = args.model_size, Inputs(batch=2, frames=8, size=64, text_dim=512)
        encoder = build_clip_b32_random(device=device)
    enc_params = sum(p.numel() for p in encoder.model.parameters())
    clips = read_manifest(demo_dataset(args.workdir, 8 if args.quick else 48))
    captions = sorted({c for clip in clips for c in clip.captions})
    text_cfg = config.TextConfig(encoder="clip", dim=encoder.dim, max_tokens=encoder.max_tokens)
    t0 = time.perf_counter()
    cache = embed_captions(text_cfg, captions, Path(args.workdir) / "text_cache", progress=False, encoder=encoder,
                           device=device)
    embed_all = time.perf_counter() - t0
    log(f"text: embedded {len(captions)} captions once in {embed_all:.1f} s with a {enc_params / 1e6:.1f} M encoder")

    step = TrainStep(build_ours(size, inp.text_dim), forward_ours, inp.clip(device), inp.pooled(device), precision)
    k = {"i": 0}

    def next_captions():
        i = k["i"]
        k["i"] += inp.batch
        return [captions[(i + j) % len(captions)] for j in range(inp.batch)]

    def with_encoder():
        text = encoder.encode(next_captions())[0].to(device)  # pooled (B, D), under no_grad, as embed does
        step(text)

    def with_cache():
        text = cache.get_batch(next_captions()).to(device)
        step(text)

    times = alternate({"encoder_per_step": with_encoder, "cached": with_cache}, args.repeats, warmup=1, label="text")
    t_enc, t_cache = median(times["encoder_per_step"]), median(times["cached"])
    ratio = t_enc / t_cache
    rounds = per_round_ratios(times["encoder_per_step"], times["cached"])

    # the text part alone, to show where the time goes
    def clock(fn, n):
        fn()
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return median(out)

    enc_only = clock(lambda: encoder.encode(next_captions()), 5 if args.quick else 10)
    lookup_only = clock(lambda: cache.get_batch(next_captions()), 200)
    train_only = clock(step, 1) if args.quick else median(times["cached"]) - lookup_only
    res.data["config"] = {"encoder": encoder.key, "encoder_params": enc_params, "captions": len(captions),
                          "model": size, "input": vars(inp), "device": str(device), "precision": precision}
    res.data.update({"seconds_per_step": times, "median_s": {"encoder_per_step": t_enc, "cached": t_cache},
                     "ratio": ratio, "per_round_ratio": rounds, "encode_batch_s": enc_only,
                     "lookup_batch_s": lookup_only, "train_step_s": train_only, "embed_all_once_s": embed_all,
                     "encoder_share_of_step": enc_only / (enc_only + train_only)})
    ok = None if args.quick else ratio >= TARGET_RATIO
    res.rows.append(Row(
        f"Cached caption embeddings vs text encoder every step ({size}, batch {inp.batch})",
        f"{ratio:.3f}x ({fmt_s(t_cache)} vs {fmt_s(t_enc)} per step)",
        f">= {TARGET_RATIO:g}x", ok,
        f"encode {fmt_s(enc_only)} vs lookup {fmt_s(lookup_only)} per batch ({enc_only / lookup_only:,.0f}x); "
        f"the training step itself is {fmt_s(train_only)}, so the encoder is "
        f"{enc_only / (enc_only + train_only):.1%} of an uncached step; per-round {', '.join(f'{r:.3f}' for r in rounds)}"))
    return res
