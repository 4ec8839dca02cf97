"""Pre-decoded clip cache: every clip decoded once to uint8 and memory-mapped afterwards.

Decoding MSR-VTT runs at ~15 clips/s per core; reading the cache at ~200k clips/s, so a GPU is never
starved by its data loader. The file name carries a hash of everything the pixels depend on (frames,
size, each source file's path, size, mtime and time range), so a stale cache is never read: a changed
setting or file just gives a new name. This cache holds "even" samples; `data.sampling=window` reads t2v.data.windows.

Files: ``clips_<key>.npy`` (N, T, H, W, 3) uint8 and ``clips_<key>.json`` (key, frames, size, paths,
bad). The .json is written last, so its presence means the .npy is complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from t2v.cachebuild import (CacheError, Files, bad_of, build_part, check_parts, merge_parts,
                            parse_shard, remove_parts, run_jobs, shard_argument, shard_count, shard_rows, write_array)
from t2v.data.manifest import Clip
from t2v.data.video import FrameSize, VideoError, decode_uint8, frame_hw
from t2v.files import write_text

log = logging.getLogger("t2v.data")

VERSION = 1  # bump when the decoding itself changes, so old caches are not reused


def cache_key(clips: Sequence[Clip], frames: int, size: FrameSize) -> str:
    sources = []
    for c in clips:
        try:
            st = os.stat(c.video)
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = [None, None]  # missing now; the key changes once the file appears
        sources.append([str(c.video), *stamp, c.start, c.end])
    blob = json.dumps({"version": VERSION, "frames": frames, "size": size, "clips": sources})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class MappedCache:
    """One row per clip of a memory-mapped .npy (``npy``, ``paths``, ``_array``): the clip cache and the latent
    cache (t2v.data.latents) alike."""

    npy: Path
    paths: list[str]
    _array: np.ndarray | None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.npy, mmap_mode="r")
        return self._array

    def get(self, i: int) -> np.ndarray:
        """Clip i's row as a read-only memory-mapped view (zeros for a bad clip)."""
        return self.array[i]

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self):
        # DataLoader workers started with spawn pickle the dataset: send the path, not the mapped array
        state = dict(self.__dict__)
        state["_array"] = None
        return state


@dataclass
class ClipCache(MappedCache):
    """Rows: (T, H, W, 3) uint8 frames."""

    npy: Path
    frames: int
    size: FrameSize
    paths: list[str]
    bad: set[int] = field(default_factory=set)
    _array: np.ndarray | None = field(default=None, repr=False)


def _files(cache_dir: Path, key: str) -> Files:
    return Files(cache_dir / f"clips_{key}")


def read_mapped(npy: Path, meta_path: Path, what: str) -> tuple[np.ndarray, dict] | None:
    """(memory-mapped array, its .json) of a finished cache, or None (never built, still building: the .json comes
    last, or unreadable: logged). Every cache opens through here; each then checks that it fits."""
    if not meta_path.is_file():
        return None
    try:
        return np.load(npy, mmap_mode="r"), json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s %s: %s", what, npy, e)
        return None


def open_cache(clips: Sequence[Clip], frames: int, size: FrameSize, cache_dir: str | os.PathLike) -> ClipCache | None:
    """The cache for exactly these clips and settings, or None if it is missing, stale or incomplete."""
    key = cache_key(clips, frames, size)
    f = _files(Path(cache_dir), key)
    npy = f.npy
    got = read_mapped(npy, f.meta, "clip cache")
    if got is None:
        return None
    arr, meta = got
    expected = (len(clips), *_row(frames, size))
    if (
        meta.get("key") != key
        or meta.get("paths") != [str(c.video) for c in clips]
        or arr.shape != expected
        or arr.dtype != np.uint8
    ):
        log.warning("ignoring clip cache %s: it does not match %s (shape %s)", npy, expected, arr.shape)
        return None
    bad = {int(b["index"]) for b in meta.get("bad", [])}
    return ClipCache(npy=npy, frames=frames, size=size, paths=meta["paths"], bad=bad, _array=arr)


def _decode_one(job: tuple) -> tuple[int, np.ndarray | None, str]:
    """(index, frames or None, error): one clip, in a worker process or in this one."""
    i, video, frames, size, start, end = job
    try:
        return i, decode_uint8(video, frames, size, "even", start=start, end=end), ""
    except VideoError as e:
        return i, None, str(e)


def _fill(out: np.ndarray, offset: int, clips: Sequence[Clip], rows: range, frames: int, size: FrameSize, workers: int,
          progress: bool, desc: str) -> list[dict]:
    """Decode ``rows`` (by ``workers`` processes) into out[i - offset]; returns the bad clips (zeros in the array)
    in index order."""
    jobs = [(i, str(clips[i].video), frames, size, clips[i].start, clips[i].end) for i in rows]
    bad = []
    for i, u8, error in run_jobs(_decode_one, jobs, workers, progress, desc):
        if u8 is None:
            log.warning("clip cache: line %d: %s", clips[i].line, error)
            bad.append({"index": i, "path": str(clips[i].video), "error": error})
        else:
            out[i - offset] = u8
    return bad


def _finish(clips: Sequence[Clip], frames: int, size: FrameSize, cache_dir: Path, key: str, bad: list[dict]) -> None:
    meta = {"key": key, "version": VERSION, "frames": frames, "size": size,
            "paths": [str(c.video) for c in clips], "bad": bad}
    f = _files(cache_dir, key)
    write_text(f.meta, json.dumps(meta, indent=1))  # last: its presence means the .npy is complete
    log.info("clip cache: %d clips (%d bad) in %s", len(clips), len(bad), f.npy)


def _opened(clips: Sequence[Clip], frames: int, size: FrameSize, cache_dir: Path, key: str) -> ClipCache:
    cache = open_cache(clips, frames, size, cache_dir)
    if cache is None:  # a source file changed while we decoded: the key moved on
        raise CacheError(f"clip cache {_files(cache_dir, key).npy}: source videos changed during the build; "
                         "run it again")
    return cache


def _row(frames: int, size: FrameSize) -> tuple:
    return frames, *frame_hw(size), 3  # t h w c


def build_cache(
    clips: Sequence[Clip], frames: int, size: FrameSize, cache_dir: str | os.PathLike, progress: bool = True,
    workers: int = 1,
) -> ClipCache:
    """Decode every clip ("even" sampling) into the cache, unless a valid cache is already there, with
    ``workers`` decoding processes (the same bytes as one).

    A clip that fails to decode is recorded as bad (zeros in the array) instead of failing the build;
    the dataset skips it. Several processes may build at once: each writes its own temporary file and
    the atomic rename keeps whichever finishes last, with identical content.
    """
    cached = open_cache(clips, frames, size, cache_dir)
    if cached is not None:
        return cached
    cache_dir = Path(cache_dir)
    key = cache_key(clips, frames, size)
    bad = write_array(_files(cache_dir, key).npy, (len(clips), *_row(frames, size)), np.uint8,
                      lambda out: _fill(out, 0, clips, range(len(clips)), frames, size, workers, progress,
                                        f"caching clips to {cache_dir}"))
    _finish(clips, frames, size, cache_dir, key, bad)
    return _opened(clips, frames, size, cache_dir, key)


# --- sharded builds (t2v.cachebuild): a deterministic slice per process (a Slurm array task), then one merge -------

def build_shard(clips: Sequence[Clip], frames: int, size: FrameSize, cache_dir: str | os.PathLike, shard: int,
                shards: int, progress: bool = True, workers: int = 1) -> Path:
    """Decode shard ``shard`` of ``shards`` into its own part file (kept if already finished: rerunning the
    shards of a killed array job redoes only the unfinished ones). Returns the part's .npy."""
    cache_dir = Path(cache_dir)
    key = cache_key(clips, frames, size)
    rows = shard_rows(len(clips), shard, shards)

    def write(part_npy: Path) -> tuple[range, dict]:
        bad = write_array(part_npy, (len(rows), *_row(frames, size)), np.uint8,
                          lambda out: _fill(out, rows.start, clips, rows, frames, size, workers, progress,
                                            f"caching shard {shard}/{shards} to {cache_dir}"))
        return rows, {"bad": bad}

    return build_part(_files(cache_dir, key), key, shard, shards,
                      lambda: open_cache(clips, frames, size, cache_dir) is not None, write)


def merge_shards(clips: Sequence[Clip], frames: int, size: FrameSize, cache_dir: str | os.PathLike,
                 shards: int) -> ClipCache:
    """Assemble the ``shards`` part files into the cache file one process writes (the same bytes), atomically;
    the parts are removed once it is complete. Fails, naming them, if a part is missing."""
    cached = open_cache(clips, frames, size, cache_dir)
    if cached is not None:  # a rerun of a merge that finished: nothing to do
        return cached
    cache_dir = Path(cache_dir)
    key = cache_key(clips, frames, size)
    merge_parts(_files(cache_dir, key), shards, len(clips), "clip cache", _row(frames, size), np.uint8,
                lambda metas: _finish(clips, frames, size, cache_dir, key, bad_of(metas)))
    return _opened(clips, frames, size, cache_dir, key)


# the shared builder's error, planning and part helpers moved to t2v.cachebuild; they are still importable from here
__all__ = ["CacheError", "ClipCache", "MappedCache", "build_cache", "build_shard", "cache_key",
           "check_parts", "merge_shards", "open_cache", "parse_shard", "read_mapped", "remove_parts", "run_jobs",
           "shard_argument", "shard_count", "shard_rows"]
