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
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from t2v.cachebuild import CacheError, Every, Files, Partial, bad_of, build_part, merge_parts, shard_rows, write_array
from t2v.data.cache import ClipCache, MappedCache, cache_key, read_mapped
from t2v.data.manifest import Clip
from t2v.data.video import FrameSize, VideoError, decode_uint8, describe_size, frame_hw, to_model
from t2v.data.window_build import Store, build, build_shard, merge
from t2v.data.windows import (Rate, Windowed, files, open_index, padded_window, read_index, window_key,
                              window_starts)
from t2v.files import write_text
from t2v.progress import progress as progress_counter
from t2v.vae import LatentSpace, encode, encode_clip

log = logging.getLogger("t2v.data")

VERSION = 1


def latent_key(clips: Sequence[Clip], frames: int, size: FrameSize, vae_id: str) -> str:
    blob = json.dumps({"version": VERSION, "clips": cache_key(clips, frames, size), "vae": vae_id})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _files(cache_dir: Path, key: str) -> Files:
    return Files(cache_dir / f"latents_{key}")


@dataclass
class LatentCache(MappedCache):
    """Rows: each clip's posterior, (2, T, C, h, w) float16: [0] the mean, [1] the std."""

    npy: Path
    frames: int
    size: FrameSize
    space: LatentSpace
    paths: list[str]
    bad: set[int] = field(default_factory=set)
    _array: np.ndarray | None = field(default=None, repr=False)


def open_latents(clips: Sequence[Clip], frames: int, size: FrameSize, cache_dir: str | os.PathLike,
                 vae_id: str) -> LatentCache | None:
    """The latent cache of exactly these clips, settings and VAE, or None if it is missing or incomplete."""
    key = latent_key(clips, frames, size, vae_id)
    f = _files(Path(cache_dir), key)
    got = read_mapped(f.npy, f.meta, "latent cache")
    if got is None:
        return None
    arr, meta = got
    space = LatentSpace.from_dict(meta["space"])
    if (meta.get("key") != key or meta.get("paths") != [str(c.video) for c in clips]
            or arr.shape != (len(clips), *_row(frames, size, space)) or arr.dtype != np.float16):
        log.warning("ignoring latent cache %s: it does not match these clips (shape %s)", f.npy, arr.shape)
        return None
    return LatentCache(f.npy, frames, size, space, meta["paths"], {int(b["index"]) for b in meta["bad"]}, arr)


def latent_cells(size: FrameSize, space: LatentSpace) -> tuple[int, int]:
    """(h, w) of a latent frame: the frame's height and width over the VAE's spatial factor."""
    return tuple(side // space.factor for side in frame_hw(size))


def _row(frames: int, size: FrameSize, space: LatentSpace) -> tuple:
    """One clip's row: (2, T, C, h, w), the posterior's mean and std (T: a video VAE's latent frames)."""
    return 2, space.latent_frames(frames), space.channels, *latent_cells(size, space)


def _space(vae, size: FrameSize, frames: int = 1) -> LatentSpace:
    space = LatentSpace.of(vae)
    if any(side % space.factor for side in frame_hw(size)):
        raise CacheError(f"frame size {describe_size(size)} (data.size x data.width) is not a multiple of the VAE's "
                         f"spatial factor {space.factor}")
    problem = space.frames_problem(frames)
    if problem:
        raise CacheError(problem)
    return space


def _opened(clips: Sequence[Clip], frames: int, size: FrameSize, cache_dir: Path, vae_id: str) -> LatentCache:
    cache = open_latents(clips, frames, size, cache_dir, vae_id)
    if cache is None:  # a source file changed while we encoded: the key moved on
        npy = _files(cache_dir, latent_key(clips, frames, size, vae_id)).npy
        raise CacheError(f"latent cache {npy}: source videos changed during the build; run it again")
    return cache


def _state_files(f: Files) -> tuple[Path, Path]:
    """A partial build's state, in the order it is saved: the bad clips, then the done mask (last: a kill between
    the two leaves bad clips of groups that are redone, never done groups whose bad clips are lost)."""
    return f.beside("bad.json"), f.beside("done.npy")


def _load_state(f: Files, n: int) -> tuple[list[dict], np.ndarray] | None:
    done = np.load(_state_files(f)[1])
    if done.shape != (n,):
        return None
    return json.loads(_state_files(f)[0].read_text()) if done.any() else [], done.astype(bool)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _groups(n: int, frames: int, batch_frames: int) -> list[range]:
    """The fixed groups of clips the VAE encodes together (batch_frames // frames clips each)."""
    per_group = max(1, batch_frames // frames)
    return [range(s, min(s + per_group, n)) for s in range(0, n, per_group)]


def _encode_group(out: np.ndarray, offset: int, clips: Sequence[Clip], group: range, frames: int, size: FrameSize, vae,
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
    if videos and LatentSpace.of(vae).temporal > 1:  # a video VAE: each clip as one video
        for video, i in zip(videos, ok):
            mean, std = encode_clip(vae, video)  # t' c h w each
            out[i - offset, 0], out[i - offset, 1] = mean.numpy(), std.numpy()
    elif videos:
        mean, std = encode(vae, torch.cat(videos), batch_frames)  # (n t) c h w: the group's frames, clip by clip
        for k, i in enumerate(ok):
            rows = slice(k * frames, (k + 1) * frames)
            out[i - offset, 0], out[i - offset, 1] = mean[rows].numpy(), std[rows].numpy()  # t c h w each
    return bad


def build_latents(clips: Sequence[Clip], frames: int, size: FrameSize, cache_dir: str | os.PathLike, vae, vae_id: str,
                  batch_frames: int = 16, clip_cache: ClipCache | None = None, progress: bool = True,
                  save_every_s: float = 30.0) -> LatentCache:
    """Encode every clip ("even" sampling, from ``clip_cache`` when given, else decoded) into the latent cache,
    unless it is already complete. Clips go to the VAE in fixed groups of ``batch_frames // frames``, so a resumed
    build encodes each group exactly as an uninterrupted one does. A clip that cannot be decoded is recorded as
    bad (zeros) and skipped by the dataset."""
    cached = open_latents(clips, frames, size, cache_dir, vae_id)
    if cached is not None:
        return cached
    space = _space(vae, size, frames)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = latent_key(clips, frames, size, vae_id)
    f = _files(cache_dir, key)
    partial = Partial(f, (len(clips), *_row(frames, size, space)), np.float16, _state_files(f),
                      lambda: _load_state(f, len(clips)))
    bad, done = partial.state or ([], np.zeros(len(clips), bool))
    groups = _groups(len(clips), frames, batch_frames)
    todo = [g for g in groups if not done[g.start:g.stop].all()]
    if len(todo) < len(groups):
        log.info("latent cache: resuming %s, %d of %d clips already encoded", partial.path, int(done.sum()), len(clips))
    save_due = Every(save_every_s)
    bar = progress_counter(total=sum(len(g) for g in todo), desc=f"encoding latents to {cache_dir}", unit="clip",
                           enabled=progress)
    for group in todo:
        failed = _encode_group(partial.out, 0, clips, group, frames, size, vae, batch_frames, clip_cache)
        bad = [b for b in bad if b["index"] not in group] + failed
        done[group.start:group.stop] = True
        bar.update(len(group))
        if save_due():
            partial.save([json.dumps(bad).encode(), _npy_bytes(done)])
    bar.close()
    partial.finish()
    _write_meta(f.meta, key, vae_id, frames, size, space, clips, bad)
    log.info("latent cache: %d clips (%d bad) in %s", len(clips), len(bad), f.npy)
    return _opened(clips, frames, size, cache_dir, vae_id)


def _write_meta(path: Path, key: str, vae_id: str, frames: int, size: FrameSize, space: LatentSpace, clips,
                bad) -> None:
    meta = {"key": key, "version": VERSION, "vae": vae_id, "frames": frames, "size": size,
            "space": space.to_dict(), "paths": [str(c.video) for c in clips], "bad": bad}
    write_text(path, json.dumps(meta, indent=1))  # last: its presence means the .npy is complete


# --- sharded builds (t2v.cachebuild: one Slurm array task per shard, then one merge), as for the clip cache ---------

def build_latent_shard(clips: Sequence[Clip], frames: int, size: FrameSize, cache_dir: str | os.PathLike, vae,
                       vae_id: str, shard: int, shards: int, batch_frames: int = 16, clip_cache: ClipCache | None = None,
                       progress: bool = True) -> Path:
    """Encode shard ``shard`` of ``shards`` (a contiguous run of the fixed groups, so each is encoded exactly as in
    one build) into its own part file; a finished part is kept. Returns the part's .npy."""
    cache_dir = Path(cache_dir)
    key = latent_key(clips, frames, size, vae_id)

    def write(part_npy: Path) -> tuple[range, dict]:
        space = _space(vae, size, frames)
        groups = _groups(len(clips), frames, batch_frames)
        mine = [groups[j] for j in shard_rows(len(groups), shard, shards)]
        start, stop = (mine[0].start, mine[-1].stop) if mine else (0, 0)

        def fill(out: np.ndarray) -> list[dict]:
            bad = []
            bar = progress_counter(total=stop - start, desc=f"encoding latents, shard {shard}/{shards}", unit="clip",
                                   enabled=progress)
            for group in mine:
                bad += _encode_group(out, start, clips, group, frames, size, vae, batch_frames, clip_cache)
                bar.update(len(group))
            bar.close()
            return bad

        return range(start, stop), {"bad": write_array(part_npy, (stop - start, *_row(frames, size, space)),
                                                       np.float16, fill)}

    return build_part(_files(cache_dir, key), key, shard, shards,
                      lambda: open_latents(clips, frames, size, cache_dir, vae_id) is not None, write)


def merge_latent_shards(clips: Sequence[Clip], frames: int, size: FrameSize, cache_dir: str | os.PathLike, vae,
                        vae_id: str, shards: int) -> LatentCache:
    """The ``shards`` parts assembled into the file one build writes (the same bytes), atomically; parts removed."""
    cached = open_latents(clips, frames, size, cache_dir, vae_id)
    if cached is not None:  # a rerun of a merge that finished: nothing to do
        return cached
    cache_dir = Path(cache_dir)
    key = latent_key(clips, frames, size, vae_id)
    space = LatentSpace.of(vae)
    f = _files(cache_dir, key)
    merge_parts(f, shards, len(clips), "latent cache", _row(frames, size, space), np.float16,
                lambda metas: _write_meta(f.meta, key, vae_id, frames, size, space, clips, bad_of(metas)),
                " (were the shards built with another vae.batch_size?)")
    return _opened(clips, frames, size, cache_dir, vae_id)


# --- windows at a real frame rate (data.sampling=window): every frame at the target rate, encoded -----------------

@dataclass
class LatentWindowCache(Windowed):
    """Rows: (2, C, h, w) float16 per frame, the posterior's mean and std, clip after clip (t2v.data.windows): windows
    are cut from here at load time."""

    space: LatentSpace | None = None

    def item(self, rows) -> np.ndarray:
        return np.ascontiguousarray(self.array[rows].swapaxes(0, 1))  # t 2 c h w -> 2 t c h w


@dataclass
class LatentVideoWindows(Windowed):
    """A video VAE's window cache. Rows: whole windows, (2, t', C, h, w) float16 each (the posterior's mean and std
    of data.frames frames at the cache's rate, encoded together), up to ``per_clip`` of them per clip, spread over
    its shots (t2v.data.windows.window_starts); each draw takes one of its clip's windows."""

    space: LatentSpace | None = None
    starts: list = field(default_factory=list)  # per clip, each encoded window's first frame (-1: padded)
    frames: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per clip, its frames at the rate

    def length(self, i: int) -> int:
        return int(self.frames[i])

    def _choices(self, i: int, pad: bool) -> list[int]:
        return [] if i in self.bad else [j for j, s in enumerate(self.starts[i]) if s >= 0 or pad]

    def window(self, i: int, frames: int, strides, rng, pad: bool = False):
        """(row of clip i's window this draw takes, its fps), or None if it has none. ``frames`` and ``strides``
        were fixed when the windows were encoded (t2v.space checks them)."""
        choices = self._choices(i, pad)
        if not choices:
            return None
        return int(self.offsets[i]) + choices[int(rng.integers(len(choices)))], float(self.fps[i])

    def too_short(self, frames: int, strides) -> list[int]:
        return [i for i in range(len(self)) if i not in self.bad and not self._choices(i, pad=False)]

    def item(self, rows) -> np.ndarray:
        return self.array[rows]  # 2 t' c h w


def _video_id(vae_id: str, frames: int, per_clip: int) -> str:
    """What a video VAE's window cache depends on beyond the frame cache's settings: its windows."""
    return f"{vae_id}|{per_clip} windows of {frames} frames"


def video_latent_store(clips: Sequence[Clip], size: FrameSize, rate: Rate, vae_id: str, space: LatentSpace, frames: int,
                       per_clip: int, vae=None) -> Store:
    """A video VAE's window cache as the shared builder writes it: each clip decoded at ``size`` and the rate, and up
    to ``per_clip`` windows of ``frames`` frames inside its shots each encoded as one video."""
    row = _row(frames, size, space)

    def encode_windows(u8: np.ndarray, shots) -> tuple[np.ndarray, list[int]]:
        starts = window_starts(len(u8), shots, frames, per_clip)
        out = np.zeros((len(starts), *row), np.float16)
        for j, start in enumerate(starts):
            rows = np.arange(start, start + frames) if start >= 0 else padded_window(len(u8), shots, frames)
            mean, std = encode_clip(vae, to_model(np.ascontiguousarray(u8[rows])))  # t' c h w each
            out[j, 0], out[j, 1] = mean.numpy(), std.numpy()
        return out, starts

    return Store("latwin", window_key(clips, size, rate, _video_id(vae_id, frames, per_clip)), row, "float16",
                 encode_windows if vae is not None else None, resumable=True, what="latent window cache",
                 per_clip=per_clip)


def latent_store(clips: Sequence[Clip], size: FrameSize, rate: Rate, vae_id: str, space: LatentSpace, vae=None,
                 batch_frames: int = 16) -> Store:
    """The latent window cache as the shared builder writes it: each clip's frames decoded at ``size`` and encoded
    by the VAE, ``batch_frames`` at a time from the clip's first frame (the same groups in any build)."""
    def encode_frames(u8: np.ndarray) -> np.ndarray:
        mean, std = encode(vae, to_model(np.ascontiguousarray(u8)), batch_frames)  # t c h w each
        return torch.stack([mean, std], dim=1).numpy()  # t 2 c h w

    row = (2, space.channels, *latent_cells(size, space))  # mean/std c h w
    return Store("latwin", window_key(clips, size, rate, vae_id), row, "float16",
                 encode_frames if vae is not None else None, resumable=True, what="latent window cache")


def open_latent_windows(clips: Sequence[Clip], size: FrameSize, rate: Rate, cache_dir, vae_id: str, frames: int = 0,
                        per_clip: int = 0):
    """The latent window cache of exactly these clips, settings and VAE, or None if it is missing or incomplete:
    an image VAE's frames, or (given ``frames`` and ``per_clip``) a video VAE's encoded windows."""
    keys = [window_key(clips, size, rate, vae_id)]
    if frames and per_clip:
        keys.append(window_key(clips, size, rate, _video_id(vae_id, frames, per_clip)))
    for key in keys:
        f = files(cache_dir, "latwin", key)
        try:
            space = LatentSpace.from_dict(json.loads(f.meta.read_text())["space"]) if f.meta.is_file() else None
        except (OSError, ValueError, KeyError, TypeError):
            space = None
        if space is None:
            continue
        video = space.temporal > 1
        row = _row(frames, size, space) if video else (2, space.channels, *latent_cells(size, space))
        got = open_index(f.npy, f.meta, key, clips, row, np.float16, "latent window cache")
        if got is None:
            return None
        arr, meta = got
        if video:
            return LatentVideoWindows(f.npy, size, rate, meta["paths"], _array=arr, space=space, starts=meta["starts"],
                                      frames=np.asarray(meta["frames"]), **read_index(meta))
        return LatentWindowCache(f.npy, size, rate, meta["paths"], _array=arr, space=space, **read_index(meta))
    return None


def build_latent_windows(clips: Sequence[Clip], size: FrameSize, rate: Rate, cache_dir, vae, vae_id: str,
                         batch_frames: int = 16, progress: bool = True, shard: tuple[int, int] | None = None,
                         merge_shards: int = 0, workers: int = 1, save_every_s: float = 30.0, frames: int = 0,
                         per_clip: int = 0) -> Path:
    """Decode every clip at the target rate, find its cuts and encode its frames with the VAE into the latent window
    cache (never a pixel cache in between: at 256 px that would be ~12x the latents); a video VAE encodes
    ``per_clip`` windows of ``frames`` frames inside shots instead. With ``shard`` (I, N) only that contiguous run of
    clips, into a part; with ``merge_shards`` N the parts assembled. A killed full build resumes without
    re-encoding the clips it finished. Returns the .npy written."""
    space = _space(vae, size, frames or 1)
    if space.temporal > 1:
        if frames < 1 or per_clip < 1:
            raise CacheError("a video VAE's latent window cache encodes whole windows: it needs data.frames and "
                             "data.latent_windows >= 1")
        store = video_latent_store(clips, size, rate, vae_id, space, frames, per_clip, vae)
    else:
        store = latent_store(clips, size, rate, vae_id, space, vae, batch_frames)
    extra = {"vae": vae_id, "space": space.to_dict(), **({"window": frames} if space.temporal > 1 else {})}
    if shard is not None:
        return build_shard(clips, size, rate, cache_dir, store, *shard, progress=progress, workers=workers)
    if merge_shards:
        return merge(clips, size, rate, cache_dir, store, merge_shards, **extra)
    return build(clips, size, rate, cache_dir, store, progress, workers, save_every_s, **extra)
