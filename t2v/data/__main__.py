"""Data tools: ``python -m t2v.data {check,cache,latents,demo}``.

  check MANIFEST [--video-root R] [--frames N]   list every bad line and video; exit 1 if any
  cache [--config F] [key=value ...]            pre-decode cfg.data.manifest into the clip cache
  latents [--config F] [key=value ...]          encode the training and validation clips with vae.name (GPU if any)
  demo [--out DIR] [--seed S] [--n-train N ...] write the synthetic demo dataset
"""
from __future__ import annotations

import argparse
import collections
import logging
import sys
import time

from t2v.config import ConfigError, add_config_args, cache_dir, load_config, val_manifest
from t2v.data.cache import CacheError, shard_argument, shard_count
from t2v.data.manifest import ManifestError, Problem
from t2v.device import DeviceError
from t2v.table import text_table
from t2v.vae import VAEError


def print_table(problems: list[Problem], out=sys.stdout) -> None:
    rows = [(p.line, p.kind, p.message) for p in problems]
    print(text_table(("line", "kind", "message"), rows, sep=" | ", rule=True, right=[0]), file=out)


def cmd_check(args) -> int:
    from t2v.data.manifest import check_manifest

    problems = check_manifest(args.manifest, args.video_root, args.frames, progress=True)
    with open(args.manifest, "rb") as f:
        n_lines = sum(1 for raw in f if raw.strip())
    if not problems:
        print(f"{args.manifest}: {n_lines} line(s), no problems")
        return 0
    print_table(problems)
    kinds = collections.Counter(p.kind for p in problems)
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    bad_lines = len({p.line for p in problems})
    print(f"\n{args.manifest}: {bad_lines} bad line(s) out of {n_lines}: {summary}")
    print("Fix them, or skip them in training with data.skip_bad_lines=true "
          "(unreadable videos are skipped at train time).")
    return 1


def cmd_cache(args) -> int:
    from t2v.data.cache import build_cache, build_shard, merge_shards
    from t2v.data.manifest import read_manifest

    cfg = load_config(args.config, args.overrides)
    if cfg.data.sampling != "even":
        print(f"data.sampling={cfg.data.sampling!r} cannot be cached (each draw reads other frames); "
              "only 'even' sampling uses the clip cache", file=sys.stderr)
        return 2
    clips = read_manifest(cfg.data.manifest, cfg.data.video_root, skip_bad=cfg.data.skip_bad_lines)
    t0 = time.time()
    if args.shard:
        part = build_shard(clips, cfg.data.frames, cfg.data.size, cache_dir(cfg), *args.shard, workers=args.workers)
        print(f"clip cache shard {args.shard[0]}/{args.shard[1]}: {part} ({time.time() - t0:.1f} s); merge them with "
              f"`python -m t2v.data cache --merge {args.shard[1]}` and the same arguments")
        return 0
    if args.merge:
        cache = merge_shards(clips, cfg.data.frames, cfg.data.size, cache_dir(cfg), args.merge)
    else:
        cache = build_cache(clips, cfg.data.frames, cfg.data.size, cache_dir(cfg), progress=True, workers=args.workers)
    print(f"clip cache: {cache.npy} ({len(cache)} clips of {cfg.data.frames}x{cfg.data.size}, "
          f"{len(cache.bad)} bad, {time.time() - t0:.1f} s)")
    for i in sorted(cache.bad):
        print(f"  bad: {cfg.data.manifest}:{clips[i].line}: {clips[i].video}")
    return 0


def cmd_latents(args) -> int:
    from t2v.data.cache import open_cache
    from t2v.data.latents import build_latent_shard, build_latents, merge_latent_shards
    from t2v.data.manifest import read_manifest
    from t2v.device import pick_device
    from t2v.vae import load_vae, vae_identity

    cfg = load_config(args.config, args.overrides)
    if cfg.data.sampling != "even":
        raise CacheError(f"data.sampling={cfg.data.sampling!r}: the latent cache holds 'even' frames only")
    device = pick_device(cfg.train.device)
    vae = load_vae(cfg.vae, device)
    vae_id = vae_identity(cfg.vae, vae)
    manifests = [cfg.data.manifest] + ([val_manifest(cfg)] if val_manifest(cfg).is_file() else [])
    for manifest in manifests:
        clips = read_manifest(manifest, cfg.data.video_root, skip_bad=cfg.data.skip_bad_lines)
        t0 = time.time()
        clip_cache = open_cache(clips, cfg.data.frames, cfg.data.size, cache_dir(cfg))  # faster than decoding
        common = (clips, cfg.data.frames, cfg.data.size, cache_dir(cfg), vae, vae_id)
        if args.shard:  # each manifest's slice I of N (one array task), merged once all are done
            part = build_latent_shard(*common, *args.shard, cfg.vae.batch_size, clip_cache=clip_cache)
            print(f"latent cache shard {args.shard[0]}/{args.shard[1]} of {manifest}: {part} ({time.time() - t0:.1f} s)")
            continue
        if args.merge:
            cache = merge_latent_shards(*common, args.merge)
        else:
            cache = build_latents(*common, cfg.vae.batch_size, clip_cache=clip_cache, progress=True)
        s = cache.space
        print(f"latent cache: {cache.npy} ({len(cache)} clips of {manifest}, {cfg.data.frames}x{s.channels}x"
              f"{cfg.data.size // s.factor}x{cfg.data.size // s.factor} latents of {cfg.vae.name}, {len(cache.bad)} "
              f"bad, {time.time() - t0:.1f} s on {device})")
    return 0


def cmd_demo(args) -> int:
    from t2v.data.demo import make_demo

    t0 = time.time()
    paths = make_demo(args.out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed)
    for split, path in paths.items():
        print(f"{split}: {path}")
    print(f"demo dataset in {args.out} ({time.time() - t0:.1f} s)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t2v.data", description="Manifest checks, clip cache, demo data.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="list every bad line and unreadable or too short video in a manifest")
    p.add_argument("manifest")
    p.add_argument("--video-root", default="", help='relative video paths resolve here ("" = the manifest folder)')
    p.add_argument("--frames", type=int, default=8, help="videos with fewer frames are reported too short")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("cache", help="pre-decode the configured manifest into the clip cache")
    add_config_args(p)
    p.add_argument("--workers", type=int, default=1, help="decoding processes (the same bytes as one)")
    p.add_argument("--shard", type=shard_argument, default=None, metavar="I/N",
                   help="decode only shard I of N into its own part file (one Slurm array task)")
    p.add_argument("--merge", type=shard_count, default=0, metavar="N", help="assemble the N finished shards into the cache")
    p.set_defaults(func=cmd_cache)
    p = sub.add_parser("latents", help="encode the configured manifests with the VAE into the latent cache")
    add_config_args(p)
    p.add_argument("--shard", type=shard_argument, default=None, metavar="I/N",
                   help="encode only shard I of N of each manifest into its own part file (one Slurm array task)")
    p.add_argument("--merge", type=shard_count, default=0, metavar="N", help="assemble the N finished shards into the cache")
    p.set_defaults(func=cmd_latents)
    p = sub.add_parser("demo", help="write the synthetic demo dataset")
    p.add_argument("--out", default="demo/data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=96)
    p.add_argument("--n-val", type=int, default=16)
    p.add_argument("--n-test", type=int, default=16)
    p.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ManifestError, ConfigError, VAEError, DeviceError, CacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
