"""The latent cache: every clip's frames encoded once by the frozen VAE, memory-mapped afterwards.

Training in latent space never runs the VAE encoder: it reads each clip's posterior (mean and std per frame) from
here and draws ``z = mean + std * noise`` with the step's own generator, so a resumed run stays bit-exact.

Files, beside the clip cache (``C.cache_dir(cfg, "data")``):
  ``latents_<key>.npy``   (N, 2, T, C, h, w) float16: [:, 0] the posterior mean, [:, 1] its std, unscaled
  ``latents_<key>.json``  key, VAE identity, frames, size, latent space, paths, bad clips. Written last: its
                          presence means the .npy is complete.
  ``latents_<key>.partial.npy`` + ``.done.npy`` + ``.bad.json``: a build in progress. A killed build resumes from them without
                          redoing finished clips (the done mask is saved only after the array is flushed).
The key hashes the clip cache's key (frames, size, every source file's path, size, mtime and range) with the
VAE's identity (name, config, a digest of its weights): a changed setting, video or VAE gives a new name.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from t2v.data.cache import (CacheError, ClipCache, MappedCache, assemble_parts, cache_key, check_parts, remove_parts,
                            shard_rows)
from t2v.data.manifest import Clip
from t2v.data.video import VideoError, decode_uint8, to_model
from t2v.data.windows import Rate, WindowCache, Windowed, read_index, window_key
from t2v.files import atomic_path, atomic_write, write_text
from t2v.progress import progress as progress_counter
from t2v.vae import LatentSpace, encode

log = logging.getLogger("t2v.data")

VERSION = 1


def latent_key(clips: Sequence[Clip], frames: int, size: int, vae_id: str) -> str:
    blob = json.dumps({"version": VERSION, "clips": cache_key(clips, frames, size), "vae": vae_id})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _files(cache_dir: Path, key: str) -> dict[str, Path]:
    stem = cache_dir / f"latents_{key}"
    return {"npy": stem.with_suffix(".npy"), "meta": stem.with_suffix(".json"),
            "partial": Path(f"{stem}.partial.npy"), "done": Path(f"{stem}.done.npy"), "bad": Path(f"{stem}.bad.json")}


@dataclass
class LatentCache(MappedCache):
    """Rows: each clip's posterior, (2, T, C, h, w) float16: [0] the mean, [1] the std."""

    npy: Path
    frames: int
    size: int
    space: LatentSpace
    paths: list[str]
    bad: set[int] = field(default_factory=set)
    _array: np.ndarray | None = field(default=None, repr=False)


def open_latents(clips: Sequence[Clip], frames: int, size: int, cache_dir: str | os.PathLike,
                 vae_id: str) -> LatentCache | None:
    """The latent cache of exactly these clips, settings and VAE, or None if it is missing or incomplete."""
    key = latent_key(clips, frames, size, vae_id)
    f = _files(Path(cache_dir), key)
    if not f["meta"].is_file():
        return None
    try:
        meta = json.loads(f["meta"].read_text())
        arr = np.load(f["npy"], mmap_mode="r")
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable latent cache %s: %s", f["npy"], e)
        return None
    space = LatentSpace(**meta["space"])
    h = size // space.factor
    if (meta.get("key") != key or meta.get("paths") != [str(c.video) for c in clips]
            or arr.shape != (len(clips), 2, frames, space.channels, h, h) or arr.dtype != np.float16):
        log.warning("ignoring latent cache %s: it does not match these clips (shape %s)", f["npy"], arr.shape)
        return None
    return LatentCache(f["npy"], frames, size, space, meta["paths"], {int(b["index"]) for b in meta["bad"]}, arr)


def _resume_or_create(f: dict[str, Path], shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The partial array and its done mask: those a killed build left (if they fit), else new ones."""
    if f["partial"].is_file() and f["done"].is_file():
        try:
            out = np.lib.format.open_memmap(f["partial"], mode="r+")
            done = np.load(f["done"])
            if out.shape == shape and out.dtype == np.float16 and done.shape == (shape[0],):
                return out, done.astype(bool)
        except (OSError, ValueError):
            pass
        log.warning("latent cache: the partial build in %s does not fit; starting over", f["partial"])
    return np.lib.format.open_memmap(f["partial"], mode="w+", dtype=np.float16, shape=shape), np.zeros(shape[0], bool)


def _save_done(done: np.ndarray, path: Path) -> None:
    with atomic_write(path) as f:  # a file object: np.save adds no ".npy" to its name
        np.save(f, done)


def _groups(n: int, frames: int, batch_frames: int) -> list[range]:
    """The fixed groups of clips the VAE encodes together (batch_frames // frames clips each)."""
    per_group = max(1, batch_frames // frames)
    return [range(s, min(s + per_group, n)) for s in range(0, n, per_group)]


def _encode_group(out: np.ndarray, offset: int, clips: Sequence[Clip], group: range, frames: int, size: int, vae,
                  batch_frames: int, clip_cache: ClipCache | None) -> list[dict]:
    """Encode one group into out[i - offset] (zeros for a clip that cannot be decoded); returns those bad clips."""
    videos, ok, bad = [], [], []
    for i in group:
        try:
            u8 = clip_cache.get(i) if clip_cache is not None and i not in clip_cache.bad else decode_uint8(
                clips[i].video, frames, size, "even", start=clips[i].start, end=clips[i].end)
            videos.append(to_model(np.ascontiguousarray(u8)))  # t c h w in [-1, 1]
            ok.append(i)
        except VideoError as e:
            log.warning("latent cache: line %d: %s", clips[i].line, e)
            bad.append({"index": i, "path": str(clips[i].video), "error": str(e)})
            out[i - offset] = 0
    if videos:
        mean, std = encode(vae, torch.cat(videos), batch_frames)  # (n t) c h w: the group's frames, clip by clip
        for k, i in enumerate(ok):
            rows = slice(k * frames, (k + 1) * frames)
            out[i - offset, 0], out[i - offset, 1] = mean[rows].numpy(), std[rows].numpy()  # t c h w each
    return bad


def build_latents(clips: Sequence[Clip], frames: int, size: int, cache_dir: str | os.PathLike, vae, vae_id: str,
                  batch_frames: int = 16, clip_cache: ClipCache | None = None, progress: bool = True,
                  save_every_s: float = 30.0) -> LatentCache:
    """Encode every clip ("even" sampling, from ``clip_cache`` when given, else decoded) into the latent cache,
    unless it is already complete. Clips go to the VAE in fixed groups of ``batch_frames // frames``, so a resumed
    build encodes each group exactly as an uninterrupted one does. A clip that cannot be decoded is recorded as
    bad (zeros) and skipped by the dataset."""
    cached = open_latents(clips, frames, size, cache_dir, vae_id)
    if cached is not None:
        return cached
    space = LatentSpace.of(vae)
    if size % space.factor:
        raise CacheError(f"data.size={size} is not a multiple of the VAE's spatial factor {space.factor}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = latent_key(clips, frames, size, vae_id)
    f = _files(cache_dir, key)
    h = size // space.factor
    out, done = _resume_or_create(f, (len(clips), 2, frames, space.channels, h, h))
    bad = json.loads(f["bad"].read_text()) if f["bad"].is_file() and done.any() else []
    groups = _groups(len(clips), frames, batch_frames)
    todo = [g for g in groups if not done[g.start:g.stop].all()]
    if len(todo) < len(groups):
        log.info("latent cache: resuming %s, %d of %d clips already encoded", f["partial"], int(done.sum()), len(clips))
    last_save = time.time()
    bar = progress_counter(total=sum(len(g) for g in todo), desc=f"encoding latents to {cache_dir}", unit="clip",
                           enabled=progress)
    for group in todo:
        failed = _encode_group(out, 0, clips, group, frames, size, vae, batch_frames, clip_cache)
        bad = [b for b in bad if b["index"] not in group] + failed
        done[group.start:group.stop] = True
        bar.update(len(group))
        if time.time() - last_save > save_every_s:
            out.flush()  # the array first: the done mask never claims clips that are not on disk
            _save_done(done, f["done"])
            write_text(f["bad"], json.dumps(bad))
            last_save = time.time()
    bar.close()
    out.flush()
    del out
    os.replace(f["partial"], f["npy"])
    _write_meta(f["meta"], key, vae_id, frames, size, space, clips, bad)
    for p in (f["done"], f["bad"]):
        p.unlink(missing_ok=True)
    log.info("latent cache: %d clips (%d bad) in %s", len(clips), len(bad), f["npy"])
    cache = open_latents(clips, frames, size, cache_dir, vae_id)
    if cache is None:  # a source file changed while we encoded: the key moved on
        raise CacheError(f"latent cache {f['npy']}: source videos changed during the build; run it again")
    return cache


def _write_meta(path: Path, key: str, vae_id: str, frames: int, size: int, space: LatentSpace, clips, bad) -> None:
    meta = {"key": key, "version": VERSION, "vae": vae_id, "frames": frames, "size": size,
            "space": {"channels": space.channels, "factor": space.factor, "scaling_factor": space.scaling_factor},
            "paths": [str(c.video) for c in clips], "bad": bad}
    write_text(path, json.dumps(meta, indent=1))  # last: its presence means the .npy is complete


# --- sharded builds (one Slurm array task per shard, then one merge), as for the clip cache -----------------------

def _part(cache_dir: Path, key: str, shard: int, shards: int) -> tuple[Path, Path]:
    stem = cache_dir / f"latents_{key}.part{shard:04d}-of-{shards:04d}"
    return Path(f"{stem}.npy"), Path(f"{stem}.json")


def build_latent_shard(clips: Sequence[Clip], frames: int, size: int, cache_dir: str | os.PathLike, vae, vae_id: str,
                       shard: int, shards: int, batch_frames: int = 16, clip_cache: ClipCache | None = None,
                       progress: bool = True) -> Path:
    """Encode shard ``shard`` of ``shards`` (a contiguous run of the fixed groups, so each is encoded exactly as in
    one build) into its own part file; a finished part is kept. Returns the part's .npy."""
    cache_dir = Path(cache_dir)
    key = latent_key(clips, frames, size, vae_id)
    part_npy, part_meta = _part(cache_dir, key, shard, shards)
    if part_meta.is_file() or open_latents(clips, frames, size, cache_dir, vae_id) is not None:  # done, or merged
        return part_npy
    space = LatentSpace.of(vae)
    if size % space.factor:
        raise CacheError(f"data.size={size} is not a multiple of the VAE's spatial factor {space.factor}")
    groups = _groups(len(clips), frames, batch_frames)
    mine = [groups[j] for j in shard_rows(len(groups), shard, shards)]
    start, stop = (mine[0].start, mine[-1].stop) if mine else (0, 0)
    h = size // space.factor
    bad = []
    with atomic_path(part_npy) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                        shape=(stop - start, 2, frames, space.channels, h, h))
        bar = progress_counter(total=stop - start, desc=f"encoding latents, shard {shard}/{shards}", unit="clip",
                               enabled=progress)
        for group in mine:
            bad += _encode_group(out, start, clips, group, frames, size, vae, batch_frames, clip_cache)
            bar.update(len(group))
        bar.close()
        out.flush()
        del out
    write_text(part_meta, json.dumps({"key": key, "rows": [start, stop], "bad": bad}))
    return part_npy


def merge_latent_shards(clips: Sequence[Clip], frames: int, size: int, cache_dir: str | os.PathLike, vae,
                        vae_id: str, shards: int) -> LatentCache:
    """The ``shards`` parts assembled into the file one build writes (the same bytes), atomically; parts removed."""
    cached = open_latents(clips, frames, size, cache_dir, vae_id)
    if cached is not None:  # a rerun of a merge that finished: nothing to do
        return cached
    cache_dir = Path(cache_dir)
    key = latent_key(clips, frames, size, vae_id)
    parts = [_part(cache_dir, key, i, shards) for i in range(shards)]
    check_parts(parts, "latent cache")
    space = LatentSpace.of(vae)
    h = size // space.factor
    f = _files(cache_dir, key)
    with atomic_path(f["npy"]) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                        shape=(len(clips), 2, frames, space.channels, h, h))
        bad = assemble_parts(parts, out, "latent cache", " (were the shards built with another vae.batch_size?)")
        out.flush()
        del out
    _write_meta(f["meta"], key, vae_id, frames, size, space, clips, bad)
    remove_parts(parts)
    cache = open_latents(clips, frames, size, cache_dir, vae_id)
    if cache is None:
        raise CacheError(f"latent cache {f['npy']}: source videos changed during the build; run it again")
    return cache


# --- windows at a real frame rate (data.sampling=window): every frame of the window cache, encoded ---------------

@dataclass
class LatentWindowCache(Windowed):
    """Rows: (2, C, h, w) float16 per frame, the posterior's mean and std, in the order of the window cache they
    were encoded from (same offsets, shots and rates): windows are cut from here at load time."""

    space: LatentSpace | None = None


def _window_files(cache_dir: Path, clips, size: int, rate: Rate, vae_id: str) -> tuple[str, dict[str, Path]]:
    blob = json.dumps({"version": VERSION, "windows": window_key(clips, size, rate), "vae": vae_id})
    key = hashlib.sha256(blob.encode()).hexdigest()[:20]
    stem = cache_dir / f"latwin_{key}"
    return key, {"npy": stem.with_suffix(".npy"), "meta": stem.with_suffix(".json"),
                 "partial": Path(f"{stem}.partial.npy"), "done": Path(f"{stem}.done.npy")}


def open_latent_windows(clips: Sequence[Clip], size: int, rate: Rate, cache_dir, vae_id: str):
    """The latent window cache of exactly these clips, settings and VAE, or None if it is missing or incomplete."""
    key, f = _window_files(Path(cache_dir), clips, size, rate, vae_id)
    if not f["meta"].is_file():
        return None
    try:
        meta = json.loads(f["meta"].read_text())
        arr = np.load(f["npy"], mmap_mode="r")
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable latent window cache %s: %s", f["npy"], e)
        return None
    space, index = LatentSpace(**meta["space"]), read_index(meta)
    h = size // space.factor
    if (meta.get("key") != key or meta.get("paths") != [str(c.video) for c in clips]
            or arr.shape != (int(index["offsets"][-1]), 2, space.channels, h, h) or arr.dtype != np.float16):
        log.warning("ignoring latent window cache %s: it does not match these clips (shape %s)", f["npy"], arr.shape)
        return None
    return LatentWindowCache(f["npy"], size, rate, meta["paths"], _array=arr, space=space, **index)


def _frame_chunks(n_frames: int, batch_frames: int) -> list[range]:
    """The fixed runs of frames the VAE encodes together: a resumed or sharded build encodes each as one build."""
    return [range(s, min(s + batch_frames, n_frames)) for s in range(0, n_frames, batch_frames)]


def _encode_frames(out: np.ndarray, offset: int, pixels: WindowCache, chunk: range, vae, batch_frames: int) -> None:
    mean, std = encode(vae, to_model(np.ascontiguousarray(pixels.array[chunk.start:chunk.stop])), batch_frames)  # n c h w
    out[chunk.start - offset:chunk.stop - offset, 0] = mean.numpy()
    out[chunk.start - offset:chunk.stop - offset, 1] = std.numpy()


def _window_meta(path: Path, key: str, vae_id: str, pixels: WindowCache, space: LatentSpace) -> None:
    meta = json.loads(pixels.npy.with_suffix(".json").read_text())  # offsets, shots, rates, bad: the same clips
    meta.update(key=key, vae=vae_id, windows=meta["key"],
                space={"channels": space.channels, "factor": space.factor, "scaling_factor": space.scaling_factor})
    write_text(path, json.dumps(meta))  # last: its presence means the .npy is complete


def build_latent_windows(clips: Sequence[Clip], pixels: WindowCache, cache_dir, vae, vae_id: str,
                         batch_frames: int = 16, progress: bool = True, save_every_s: float = 30.0,
                         shard: tuple[int, int] | None = None) -> Path:
    """Encode every frame of the window cache ``pixels`` (or, with ``shard`` (I, N), a contiguous run of its frame
    chunks into a part file) in fixed chunks of ``batch_frames``. A killed full build resumes from its partial file
    without re-encoding finished chunks. Returns the .npy written."""
    space = LatentSpace.of(vae)
    size, rate = pixels.size, pixels.rate
    if size % space.factor:
        raise CacheError(f"data.size={size} is not a multiple of the VAE's spatial factor {space.factor}")
    cache_dir = Path(cache_dir)
    key, f = _window_files(cache_dir, clips, size, rate, vae_id)
    h = size // space.factor
    chunks = _frame_chunks(int(pixels.offsets[-1]), batch_frames)
    if shard is not None:
        part_npy, part_meta = (Path(f"{f['npy'].with_suffix('')}.part{shard[0]:04d}-of-{shard[1]:04d}{e}")
                               for e in (".npy", ".json"))
        if part_meta.is_file() or f["meta"].is_file():
            return part_npy
        mine = [chunks[j] for j in shard_rows(len(chunks), *shard)]
        start, stop = (mine[0].start, mine[-1].stop) if mine else (0, 0)
        with atomic_path(part_npy) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(stop - start, 2, space.channels, h, h))
            for chunk in progress_counter(mine, desc=f"encoding window latents, shard {shard[0]}/{shard[1]}",
                                          unit="chunk", enabled=progress):
                _encode_frames(out, start, pixels, chunk, vae, batch_frames)
            out.flush()
            del out
        write_text(part_meta, json.dumps({"key": key, "rows": [start, stop], "bad": []}))
        return part_npy
    if f["meta"].is_file():
        return f["npy"]
    out, done = _resume_or_create(f, (int(pixels.offsets[-1]), 2, space.channels, h, h))
    todo = [c for c in chunks if not done[c.start:c.stop].all()]
    if len(todo) < len(chunks):
        log.info("latent window cache: resuming %s, %d of %d frames already encoded", f["partial"], int(done.sum()),
                 len(done))
    last_save = time.time()
    for chunk in progress_counter(todo, desc=f"encoding window latents to {cache_dir}", unit="chunk", enabled=progress):
        _encode_frames(out, 0, pixels, chunk, vae, batch_frames)
        done[chunk.start:chunk.stop] = True
        if time.time() - last_save > save_every_s:
            out.flush()  # the array first: the done mask never claims frames that are not on disk
            _save_done(done, f["done"])
            last_save = time.time()
    out.flush()
    del out
    os.replace(f["partial"], f["npy"])
    _window_meta(f["meta"], key, vae_id, pixels, space)
    f["done"].unlink(missing_ok=True)
    return f["npy"]


def merge_latent_windows(clips: Sequence[Clip], pixels: WindowCache, cache_dir, vae, vae_id: str, shards: int) -> Path:
    """The ``shards`` parts assembled into the file one build writes (the same bytes), atomically; parts removed."""
    space = LatentSpace.of(vae)
    key, f = _window_files(Path(cache_dir), clips, pixels.size, pixels.rate, vae_id)
    if f["meta"].is_file():
        return f["npy"]
    parts = [tuple(Path(f"{f['npy'].with_suffix('')}.part{i:04d}-of-{shards:04d}{e}") for e in (".npy", ".json"))
             for i in range(shards)]
    check_parts(parts, "latent window cache")
    h = pixels.size // space.factor
    with atomic_path(f["npy"]) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                        shape=(int(pixels.offsets[-1]), 2, space.channels, h, h))
        assemble_parts(parts, out, "latent window cache", " (were the shards built with another vae.batch_size?)")
        out.flush()
        del out
    _window_meta(f["meta"], key, vae_id, pixels, space)
    remove_parts(parts)
    return f["npy"]
