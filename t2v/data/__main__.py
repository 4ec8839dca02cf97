"""Data tools: ``python -m t2v.data {check,cache,latents,demo}``.

  check MANIFEST [--video-root R] [--frames N]     list every bad line and video; exit 1 if any
  check [MANIFEST] --config F [key=value ...]      the same as training with F reads it (windows at data.fps too)
  cache [MANIFEST] [--config F] [key=value ...]    pre-decode MANIFEST (default data.manifest) into the clip cache
  latents [MANIFEST] [--config F] [key=value ...]  encode the training and validation clips with vae.name (GPU if any)
  demo [--out DIR] [--seed S] [--n-train N ...]    write the synthetic demo dataset

MANIFEST, --config F, the key=value overrides and the other options come in any order (t2v.config.split_positionals
tells a path from an override); a positional MANIFEST means data.manifest=MANIFEST. Every argument is parsed and the
config loaded before a clip is read, so a typo fails in a second, not after the decoding.
"""
from __future__ import annotations

import argparse
import collections
import logging
import sys
import time
from pathlib import Path

from t2v.config import (ConfigError, add_config_args, cache_dir, load_with_manifest, split_positionals,
                        val_manifest)
from t2v.cachebuild import no_room
from t2v.data.cache import CacheError, shard_argument, shard_count
from t2v.data.manifest import ManifestError, Problem
from t2v.data.video import describe_size
from t2v.device import DeviceError
from t2v.table import text_table
from t2v.vae import VAEError


def print_table(problems: list[Problem], out=None) -> None:
    rows = [(p.line, p.kind, p.message) for p in problems]
    print(text_table(("line", "kind", "message"), rows, sep=" | ", rule=True, right=[0]), file=out or sys.stdout)


def cmd_check(args) -> int:
    from t2v.data.manifest import check_manifest

    manifest, overrides = split_positionals(args.positionals)
    frames, cfg = args.frames, None
    if args.config or overrides:  # the checks training will make: FRAMES, and windows at data.fps
        cfg = load_with_manifest(args.config, overrides, manifest)
        manifest, frames = cfg.data.manifest, cfg.data.frames
    if not manifest:
        raise ConfigError("check: name a MANIFEST, or give --config F / key=value arguments (data.manifest)")
    if cfg is not None and cfg.data.sampling == "window":
        problems = _check_windows(cfg, manifest)
    else:
        problems = check_manifest(manifest, args.video_root or (cfg.data.video_root if cfg else ""), frames,
                                  progress=True)
    with open(manifest, "rb") as f:
        n_lines = sum(1 for raw in f if raw.strip())
    if not problems:
        print(f"{manifest}: {n_lines} line(s), no problems")
        return 0
    print_table(problems)
    kinds = collections.Counter(p.kind for p in problems)
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    bad_lines = len({p.line for p in problems})
    print(f"\n{manifest}: {bad_lines} bad line(s) out of {n_lines}: {summary}")
    if cfg is not None and cfg.data.sampling == "window":
        print("Training skips unreadable videos and, as data.short_clips says, skips or pads the too short ones; "
              "lines that are not valid need fixing (or data.skip_bad_lines=true).")
    else:
        print("Fix them, or skip them in training with data.skip_bad_lines=true "
              "(unreadable videos are skipped at train time).")
    return 1


def _check_windows(cfg, manifest) -> list[Problem]:
    """Every clip decoded as the window cache will be (same rate, size and cut detection): what cannot be read,
    has no frame rate, repeats frames (source slower than data.fps) or has no shot as long as one window."""
    from t2v.data.manifest import _parse
    from t2v.data.video import NoFrameRate, VideoError
    from t2v.data.windows import Rate, decode_clip, longest_shot
    from t2v.progress import progress as progress_counter

    rate, d = Rate.of(cfg.data), cfg.data
    need = (d.frames - 1) * min(d.strides) + 1
    clips, problems = _parse(Path(manifest), cfg.data.video_root, check_files=True)
    for clip in progress_counter(clips, desc="checking windows", unit="clip"):
        try:
            u8, plan, shots = decode_clip(str(clip.video), d.frame_size, rate, clip.start, clip.end)
        except NoFrameRate as e:
            problems.append(Problem(clip.line, "no_frame_rate", str(e)))
            continue
        except VideoError as e:
            problems.append(Problem(clip.line, "unreadable_video", str(e)))
            continue
        if plan.repeat:
            problems.append(Problem(clip.line, "repeats_frames", f"{clip.video}: the source plays at "
                                    f"{plan.source_fps:.3g} fps, below data.fps={d.fps:g}: frames repeat"))
        longest = longest_shot(len(u8), shots)
        if longest < need:
            fate = "padded" if d.short_clips == "pad" else "skipped (data.short_clips=pad pads it)"
            problems.append(Problem(clip.line, "too_short", f"{clip.video}: longest shot {longest} frames "
                                    f"({longest / plan.fps:.2f} s at {plan.fps:g} fps, {len(shots)} shots), a window "
                                    f"needs {need}: {fate} in training"))
    return sorted(problems, key=lambda p: p.line)


def cmd_cache(args) -> int:
    from t2v.data.cache import build_cache, build_shard, merge_shards
    from t2v.data.manifest import read_manifest

    manifest, overrides = split_positionals(args.positionals)
    cfg = load_with_manifest(args.config, overrides, manifest)
    if cfg.data.sampling == "random_window":
        print("data.sampling='random_window' cannot be cached (each draw decodes other frames); "
              "data.sampling=window with data.fps caches every frame at that rate", file=sys.stderr)
        return 2
    clips = read_manifest(cfg.data.manifest, cfg.data.video_root, skip_bad=cfg.data.skip_bad_lines)
    if cfg.data.sampling == "window":
        return _cache_windows(cfg, clips, args)
    t0 = time.time()
    if args.shard:
        part = build_shard(clips, cfg.data.frames, cfg.data.frame_size, cache_dir(cfg), *args.shard,
                           workers=args.workers)
        print(f"clip cache shard {args.shard[0]}/{args.shard[1]}: {part} ({time.time() - t0:.1f} s); merge them with "
              f"`python -m t2v.data cache --merge {args.shard[1]}` and the same arguments")
        return 0
    if args.merge:
        cache = merge_shards(clips, cfg.data.frames, cfg.data.frame_size, cache_dir(cfg), args.merge)
    else:
        cache = build_cache(clips, cfg.data.frames, cfg.data.frame_size, cache_dir(cfg), progress=True,
                            workers=args.workers)
    print(f"clip cache: {cache.npy} ({len(cache)} clips of {cfg.data.frames}x{describe_size(cfg.data.frame_size)}, "
          f"{len(cache.bad)} bad, {time.time() - t0:.1f} s)")
    for i in sorted(cache.bad):
        print(f"  bad: {cfg.data.manifest}:{clips[i].line}: {clips[i].video}")
    return 0


def _cache_windows(cfg, clips, args) -> int:
    """The training manifest's window cache (the validation loss decodes its few clips itself)."""
    from t2v.data.window_build import build_windows, build_windows_shard, merge_windows
    from t2v.data.windows import Rate

    rate, t0 = Rate.of(cfg.data), time.time()
    if args.shard:
        part = build_windows_shard(clips, cfg.data.frame_size, rate, cache_dir(cfg), *args.shard, workers=args.workers)
        print(f"window cache shard {args.shard[0]}/{args.shard[1]}: {part} ({time.time() - t0:.1f} s); merge them "
              f"with `python -m t2v.data cache --merge {args.shard[1]}` and the same arguments")
        return 0
    if args.merge:
        cache = merge_windows(clips, cfg.data.frame_size, rate, cache_dir(cfg), args.merge)
    else:
        cache = build_windows(clips, cfg.data.frame_size, rate, cache_dir(cfg), progress=True, workers=args.workers)
    print_window_cache(cfg, cache, clips, cfg.data.manifest, f"{time.time() - t0:.1f} s")
    return 0


def print_window_cache(cfg, cache, clips, manifest, took: str) -> None:
    """What a window-cache build reports: size, cuts, and every clip it could not use, by file and line."""
    from t2v.data.windows import cached_seconds_line, report_short

    print(f"window cache: {cache.npy} ({describe_size(cfg.data.frame_size)} at {cache.rate.describe()}, at most "
          f"{cfg.data.max_seconds:g} s per clip: {cached_seconds_line(cache)}; {took})")
    for i in sorted(cache.bad):
        print(f"  bad: {manifest}:{clips[i].line}: {clips[i].video}")
    for i in sorted(cache.repeat):
        print(f"  slower than data.fps: {manifest}:{clips[i].line}: {clips[i].video}: the source plays at "
              f"{cache.source_fps[i]:.3g} fps, so frames repeat (lower data.fps to avoid it)")
    short = report_short(cache, clips, manifest, cfg.data.frames, cfg.data.strides, cfg.data.short_clips == "pad")
    for line in short:
        print(f"  too short: {line}")
    if short:
        print(f"{len(short)} of {len(clips)} clips have no shot as long as a window of data.frames={cfg.data.frames}")


def cmd_latents(args) -> int:
    from t2v.data.cache import open_cache
    from t2v.data.latents import build_latent_shard, build_latents, latent_cells, merge_latent_shards
    from t2v.data.manifest import read_manifest
    from t2v.device import pick_device
    from t2v.vae import load_vae, vae_identity

    manifest, overrides = split_positionals(args.positionals)
    cfg = load_with_manifest(args.config, overrides, manifest)
    if cfg.data.sampling == "random_window":
        raise CacheError("data.sampling='random_window' cannot be cached; data.sampling=window with data.fps can")
    device = pick_device(cfg.train.device)
    vae = load_vae(cfg.vae, device)
    vae_id = vae_identity(cfg.vae, vae)
    manifests = [cfg.data.manifest] + ([val_manifest(cfg)] if val_manifest(cfg).is_file() else [])
    for manifest in manifests:
        clips = read_manifest(manifest, cfg.data.video_root, skip_bad=cfg.data.skip_bad_lines)
        t0 = time.time()
        if cfg.data.sampling == "window":
            _latent_windows(cfg, clips, manifest, vae, vae_id, args, device)
            continue
        clip_cache = open_cache(clips, cfg.data.frames, cfg.data.frame_size, cache_dir(cfg))  # faster than decoding
        common = (clips, cfg.data.frames, cfg.data.frame_size, cache_dir(cfg), vae, vae_id)
        if args.shard:  # each manifest's slice I of N (one array task), merged once all are done
            part = build_latent_shard(*common, *args.shard, cfg.vae.batch_size, clip_cache=clip_cache)
            print(f"latent cache shard {args.shard[0]}/{args.shard[1]} of {manifest}: {part} ({time.time() - t0:.1f} s)")
            continue
        if args.merge:
            cache = merge_latent_shards(*common, args.merge)
        else:
            cache = build_latents(*common, cfg.vae.batch_size, clip_cache=clip_cache, progress=True)
        s = cache.space
        h, w = latent_cells(cfg.data.frame_size, s)
        row = 2 * s.latent_frames(cfg.data.frames) * s.channels * h * w * 2  # mean and std, float16
        print(f"latent cache: {cache.npy} ({len(cache)} clips of {manifest}, {s.latent_frames(cfg.data.frames)}x"
              f"{s.channels}x{h}x{w} latents of {cfg.vae.name}, {row:,} bytes a clip, {len(cache.bad)} "
              f"bad, {time.time() - t0:.1f} s on {device})")
    return 0


def _latent_windows(cfg, clips, manifest, vae, vae_id, args, device) -> None:
    """data.sampling=window: every clip decoded at data.fps, cut into shots and encoded (the latent window cache)."""
    from t2v.data.latents import build_latent_windows, latent_cells, open_latent_windows
    from t2v.data.windows import Rate, cached_seconds_line

    t0, rate = time.time(), Rate.of(cfg.data)
    windows = (cfg.data.frames, cfg.data.latent_windows)  # used by a video VAE only
    npy = build_latent_windows(clips, cfg.data.frame_size, rate, cache_dir(cfg), vae, vae_id, cfg.vae.batch_size,
                               shard=args.shard, merge_shards=args.merge, frames=windows[0], per_clip=windows[1])
    if args.shard:
        print(f"latent window cache shard {args.shard[0]}/{args.shard[1]} of {manifest}: {npy} ({time.time() - t0:.1f} s)")
        return
    cache = open_latent_windows(clips, cfg.data.frame_size, rate, cache_dir(cfg), vae_id, *windows)
    if cache is None:
        raise CacheError(f"latent window cache {npy}: source videos changed during the build; run it again")
    s, took = cache.space, f"{time.time() - t0:.1f} s on {device}"
    cells = "x".join(map(str, latent_cells(cfg.data.frame_size, s)))  # h x w
    if s.temporal > 1:  # whole windows encoded: count them, and their bytes
        n = sum(len(w) for w in cache.starts)
        row = cache.array[0].nbytes if len(cache.array) else 0
        print(f"latent window cache: {cache.npy} ({manifest}, {n} windows of {cfg.data.frames} frames at "
              f"{rate.describe()} in {len(cache) - len(cache.bad)} clips, each {s.latent_frames(cfg.data.frames)}x"
              f"{s.channels}x{cells} latents of {cfg.vae.name}: {row:,} bytes a window, "
              f"{cache.array.nbytes / max(len(cache), 1):,.0f} bytes a clip, {len(cache.bad)} bad; {took})")
        return
    print(f"latent window cache: {cache.npy} ({manifest}, {s.channels}x{cells} latents of {cfg.vae.name} at "
          f"{rate.describe()}: {cached_seconds_line(cache)}; {took})")


def cmd_demo(args) -> int:
    from t2v.data.demo import make_demo

    t0 = time.time()
    paths = make_demo(args.out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed,
                      kind=args.kind)
    for split, path in paths.items():
        print(f"{split}: {path}")
    print(f"demo dataset in {args.out} ({time.time() - t0:.1f} s)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t2v.data", description="Manifest checks, clip cache, demo data.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="list every bad line and unreadable or too short video in a manifest",
                       description="With --config F or key=value: check what training with that config reads "
                                   "(data.frames, and windows at data.fps); the manifest defaults to data.manifest.")
    add_config_args(p, manifest=True)
    p.add_argument("--video-root", default="", help='relative video paths resolve here ("" = the manifest folder)')
    p.add_argument("--frames", type=int, default=8, help="videos with fewer frames are reported too short")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("cache", help="pre-decode the configured manifest into the clip cache")
    add_config_args(p, manifest=True)
    p.add_argument("--workers", type=int, default=1, help="decoding processes (the same bytes as one)")
    p.add_argument("--shard", type=shard_argument, default=None, metavar="I/N",
                   help="decode only shard I of N into its own part file (one Slurm array task)")
    p.add_argument("--merge", type=shard_count, default=0, metavar="N", help="assemble the N finished shards into the cache")
    p.set_defaults(func=cmd_cache)
    p = sub.add_parser("latents", help="encode the configured manifests with the VAE into the latent cache")
    add_config_args(p, manifest=True)
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
    p.add_argument("--kind", choices=("shapes", "shots"), default="shapes",
                   help="shapes: the demo (one 2 s shot per clip); shots: ~6 s at 24 fps, four shots, slow motion")
    p.set_defaults(func=cmd_demo)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in sub.choices:
        parser.parse_args(argv)  # prints usage / help and exits
    # parse_args stops taking positionals at the first option (`check M --config F data.fps=8` left data.fps=8
    # over); the subcommand's parse_intermixed_args takes them anywhere (the top parser cannot: it has subparsers)
    args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ManifestError, ConfigError, VAEError, DeviceError, CacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or quota: one line, not a traceback
        code = no_room(e, "data.cache_dir")
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
