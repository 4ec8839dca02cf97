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
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from t2v.data.manifest import Clip
from t2v.data.video import VideoError, decode_uint8
from t2v.files import atomic_path, write_text
from t2v.progress import progress as progress_counter

log = logging.getLogger("t2v.data")

VERSION = 1  # bump when the decoding itself changes, so old caches are not reused


class CacheError(RuntimeError):
    pass


def cache_key(clips: Sequence[Clip], frames: int, size: int) -> str:
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
    size: int
    paths: list[str]
    bad: set[int] = field(default_factory=set)
    _array: np.ndarray | None = field(default=None, repr=False)


def _files(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"clips_{key}.npy", cache_dir / f"clips_{key}.json"


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


def open_cache(clips: Sequence[Clip], frames: int, size: int, cache_dir: str | os.PathLike) -> ClipCache | None:
    """The cache for exactly these clips and settings, or None if it is missing, stale or incomplete."""
    key = cache_key(clips, frames, size)
    npy, meta_path = _files(Path(cache_dir), key)
    got = read_mapped(npy, meta_path, "clip cache")
    if got is None:
        return None
    arr, meta = got
    expected = (len(clips), frames, size, size, 3)
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


def run_jobs(fn, jobs: list, workers: int, progress: bool, desc: str):
    """``fn(job)`` for every job, in order, in ``workers`` processes (a progress bar over the jobs). ``fn`` must be
    a module-level function and deterministic, so any number of workers gives what one process gives."""
    bar = progress_counter(total=len(jobs), desc=desc, unit="clip", enabled=progress)
    if workers <= 1:
        results = map(fn, jobs)
    else:  # spawn: a fresh interpreter per worker, never a fork of a process that holds decoder state
        pool = multiprocessing.get_context("spawn").Pool(workers)
        results = pool.imap(fn, jobs, chunksize=4)
    try:
        for r in results:
            bar.update(1)
            yield r
    finally:
        bar.close()
        if workers > 1:
            pool.terminate()


def _decoded(clips: Sequence[Clip], rows: range, frames: int, size: int, workers: int, progress: bool, desc: str):
    """(index, frames or None, error) for every clip in ``rows``, in order, decoded by ``workers`` processes."""
    jobs = [(i, str(clips[i].video), frames, size, clips[i].start, clips[i].end) for i in rows]
    return run_jobs(_decode_one, jobs, workers, progress, desc)


def _fill(out: np.ndarray, offset: int, clips: Sequence[Clip], rows: range, frames: int, size: int, workers: int,
          progress: bool, desc: str) -> list[dict]:
    """Decode ``rows`` into out[i - offset]; returns the bad clips (zeros in the array) in index order."""
    bad = []
    for i, u8, error in _decoded(clips, rows, frames, size, workers, progress, desc):
        if u8 is None:
            log.warning("clip cache: line %d: %s", clips[i].line, error)
            bad.append({"index": i, "path": str(clips[i].video), "error": error})
        else:
            out[i - offset] = u8
    return bad


def _finish(clips: Sequence[Clip], frames: int, size: int, cache_dir: Path, key: str, bad: list[dict]) -> ClipCache:
    npy, meta_path = _files(cache_dir, key)
    meta = {"key": key, "version": VERSION, "frames": frames, "size": size,
            "paths": [str(c.video) for c in clips], "bad": bad}
    write_text(meta_path, json.dumps(meta, indent=1))  # last: its presence means the .npy is complete
    log.info("clip cache: %d clips (%d bad) in %s", len(clips), len(bad), npy)
    cache = open_cache(clips, frames, size, cache_dir)
    if cache is None:  # a source file changed while we decoded: the key moved on
        raise CacheError(f"clip cache {npy}: source videos changed during the build; run it again")
    return cache


def build_cache(
    clips: Sequence[Clip], frames: int, size: int, cache_dir: str | os.PathLike, progress: bool = True,
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
    npy, _ = _files(cache_dir, key)
    with atomic_path(npy) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(clips), frames, size, size, 3))
        bad = _fill(out, 0, clips, range(len(clips)), frames, size, workers, progress, f"caching clips to {cache_dir}")
        out.flush()
        del out
    return _finish(clips, frames, size, cache_dir, key, bad)


# --- sharded builds: a deterministic slice per process (a Slurm array task), then one merge ----------------------

def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` (0 <= I < N), as `--shard` takes it and a Slurm array task passes it -> (I, N)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected I/N, e.g. 0/4, got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: expected 0 <= I < N")
    return i, n


def shard_count(text: str) -> int:
    """``--merge N`` for argparse: a whole number >= 1."""
    import argparse

    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected the number of shards (>= 1), got {text!r}")
    return int(text)


def shard_argument(text: str) -> tuple[int, int]:
    """parse_shard for argparse (its error becomes a usage error naming the option)."""
    import argparse

    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def shard_rows(n: int, shard: int, shards: int) -> range:
    """Shard ``shard`` of ``shards``: a contiguous slice, so the merge is a concatenation in order."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards}: expected 0 <= I < N")
    return range(n * shard // shards, n * (shard + 1) // shards)


def _part(cache_dir: Path, key: str, shard: int, shards: int) -> tuple[Path, Path]:
    stem = cache_dir / f"clips_{key}.part{shard:04d}-of-{shards:04d}"
    return Path(f"{stem}.npy"), Path(f"{stem}.json")


def build_shard(clips: Sequence[Clip], frames: int, size: int, cache_dir: str | os.PathLike, shard: int, shards: int,
                progress: bool = True, workers: int = 1) -> Path:
    """Decode shard ``shard`` of ``shards`` into its own part file (kept if already finished: rerunning the
    shards of a killed array job redoes only the unfinished ones). Returns the part's .npy."""
    cache_dir = Path(cache_dir)
    key = cache_key(clips, frames, size)
    part_npy, part_meta = _part(cache_dir, key, shard, shards)
    if part_meta.is_file() or open_cache(clips, frames, size, cache_dir) is not None:  # done, or already merged
        return part_npy
    rows = shard_rows(len(clips), shard, shards)
    with atomic_path(part_npy) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(rows), frames, size, size, 3))
        bad = _fill(out, rows.start, clips, rows, frames, size, workers, progress,
                    f"caching shard {shard}/{shards} to {cache_dir}")
        out.flush()
        del out
    write_text(part_meta, json.dumps({"key": key, "rows": [rows.start, rows.stop], "bad": bad}))
    return part_npy


def check_parts(parts: list[tuple[Path, Path]], what: str) -> None:
    """Every part's .json is there (it is written last), else CacheError naming the first that is not."""
    missing = [str(meta) for _, meta in parts if not meta.is_file()]
    if missing:
        raise CacheError(f"{what}: {len(missing)} of {len(parts)} shards are not finished ({missing[0]} ...); "
                         "rerun them (finished ones are kept), then merge")


def assemble_parts(parts: list[tuple[Path, Path]], out: np.ndarray, what: str, hint: str = "") -> list[dict]:
    """Copy each part's rows into ``out`` (one row per clip) and return the bad clips in index order. The parts
    must tile the rows exactly, in order: parts of another split (or grouping) never merge into a wrong file."""
    expect, bad = 0, []
    for part_npy, part_meta in parts:
        meta = json.loads(part_meta.read_text())
        start, stop = meta["rows"]
        if stop > start:  # an empty shard (more shards than rows) holds nothing
            if start != expect:
                raise CacheError(f"{what}: {part_meta} covers rows {start}-{stop}, expected it to start at "
                                 f"{expect}{hint}")
            out[start:stop] = np.load(part_npy, mmap_mode="r")
            expect = stop
        bad += meta["bad"]
    if expect != len(out):
        raise CacheError(f"{what}: the {len(parts)} parts cover {expect} of {len(out)} clips")
    return bad


def remove_parts(parts: list[tuple[Path, Path]]) -> None:
    for part_npy, part_meta in parts:
        part_npy.unlink(missing_ok=True)
        part_meta.unlink(missing_ok=True)


def merge_shards(clips: Sequence[Clip], frames: int, size: int, cache_dir: str | os.PathLike,
                 shards: int) -> ClipCache:
    """Assemble the ``shards`` part files into the cache file one process writes (the same bytes), atomically;
    the parts are removed once it is complete. Fails, naming them, if a part is missing."""
    cached = open_cache(clips, frames, size, cache_dir)
    if cached is not None:  # a rerun of a merge that finished: nothing to do
        return cached
    cache_dir = Path(cache_dir)
    key = cache_key(clips, frames, size)
    parts = [_part(cache_dir, key, i, shards) for i in range(shards)]
    check_parts(parts, "clip cache")
    npy, _ = _files(cache_dir, key)
    with atomic_path(npy) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(clips), frames, size, size, 3))
        bad = assemble_parts(parts, out, "clip cache")
        out.flush()
        del out
    cache = _finish(clips, frames, size, cache_dir, key, bad)
    remove_parts(parts)
    return cache
