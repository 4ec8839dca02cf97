"""Building a window cache (t2v.data.windows): plan every clip from its timestamps, decode it at the target rate,
find its cuts, keep each frame as it is or as an encoder makes it (the VAE's posterior in latent space), and write
the frames clip after clip into one array with its per-clip index.

One builder for the pixel and the latent window caches (a ``Store`` says what a frame becomes), in one process, as
shards of contiguous clips (one Slurm array task each) that a merge concatenates into the bytes of one build, or,
for the latent cache on a GPU, resumable after a kill without redoing the clips it finished. Decoding runs in
``workers`` spawned processes; the encoder runs here, in clip order, so any number of workers writes the same bytes.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from t2v.data.cache import CacheError, check_parts, remove_parts, run_jobs, shard_rows
from t2v.data.manifest import Clip
from t2v.data.video import VideoError, read_timeline
from t2v.data.windows import (VERSION, Plan, Rate, WindowCache, decode_clip, files, open_windows, plan, size_line,
                              window_key)
from t2v.files import atomic_path, atomic_write, write_text

log = logging.getLogger("t2v.data")

TABLE = ("lengths", "shots", "fps", "source_fps", "repeat", "bad")  # the per-clip index a build writes


@dataclass(frozen=True)
class Store:
    """What a window cache keeps of each frame."""

    prefix: str  # file names: <prefix>_<key>.npy / .json
    key: str  # t2v.data.windows.window_key
    row: tuple  # one frame's row shape
    dtype: str
    encode: Callable[[np.ndarray], np.ndarray] | None = None  # (F, H, W, 3) uint8 -> (F, *row); None: the pixels
    resumable: bool = False  # a killed full build resumes from its partial file (the latent build on a GPU)
    what: str = "window cache"


def _decode_job(job: tuple):
    """(index, frames or None, shots, error): one clip, in a worker process or in this one."""
    i, video, size, rate, indices, fps, src = job
    try:
        u8, _, shots = decode_clip(video, size, rate, p=Plan(np.asarray(indices, np.int64), fps, src))
        return i, u8, shots, ""
    except VideoError as e:
        return i, None, [0], str(e)


def _plans(clips: Sequence[Clip], rows: range, rate: Rate) -> dict[int, Plan | str]:
    """Each clip's plan (its timestamps only: no frame is decoded), or the error that stops it."""
    out: dict[int, Plan | str] = {}
    for i in rows:
        try:
            out[i] = plan(read_timeline(clips[i].video), rate, str(clips[i].video), clips[i].start, clips[i].end)
        except VideoError as e:
            out[i] = str(e)
    return out


def _entry(clip: Clip, i: int, p: Plan | str, shots, error: str) -> dict:
    """One clip's line of the index."""
    ok = isinstance(p, Plan)
    bad = [] if not error else [{"index": i, "path": str(clip.video), "line": clip.line, "error": error}]
    return {"lengths": len(p.indices) if ok else 0, "shots": shots, "fps": p.fps if ok else 0.0,
            "source_fps": p.source_fps if ok else 0.0, "repeat": bool(ok and p.repeat), "bad": bad}


def _table(entries: list[dict]) -> dict:
    return {k: [e[k] for e in entries] if k != "bad" else [b for e in entries for b in e["bad"]] for k in TABLE}


class _Partial:
    """A resumable build's state: the partial array, and per clip whether it is on disk and its index line."""

    def __init__(self, npy: Path, shape: tuple, dtype: str, n: int):
        self.path, self.state = Path(f"{npy.with_suffix('')}.partial.npy"), Path(f"{npy.with_suffix('')}.partial.json")
        self.out, self.entries = None, [None] * n
        if self.path.is_file() and self.state.is_file():
            try:
                out = np.lib.format.open_memmap(self.path, mode="r+")
                entries = json.loads(self.state.read_text())
                if out.shape == shape and out.dtype == np.dtype(dtype) and len(entries) == n:
                    self.out, self.entries = out, entries
                    log.info("resuming %s: %d of %d clips already done", self.path, sum(e is not None for e in entries), n)
            except (OSError, ValueError):
                pass
        if self.out is None:
            self.out = np.lib.format.open_memmap(self.path, mode="w+", dtype=dtype, shape=shape)

    def save(self) -> None:
        self.out.flush()  # the array first: the state never claims clips that are not on disk
        with atomic_write(self.state) as f:
            f.write(json.dumps(self.entries).encode())


def _write_rows(out_npy: Path, clips, rows: range, plans, size: int, rate: Rate, store: Store, workers: int,
                progress: bool, desc: str, save_every_s: float = 30.0) -> dict:
    """Decode (and encode) ``rows`` clip after clip at their planned lengths into out_npy; returns their index."""
    lengths = [len(plans[i].indices) if isinstance(plans[i], Plan) else 0 for i in rows]
    first = dict(zip(rows, np.cumsum([0] + lengths[:-1]).tolist()))  # each clip's first row
    shape = (sum(lengths), *store.row)
    partial = _Partial(out_npy, shape, store.dtype, len(rows)) if store.resumable else None
    todo = [i for i in rows if partial is None or partial.entries[i - rows.start] is None]
    jobs = [(i, str(clips[i].video), size, rate, plans[i].indices.tolist(), plans[i].fps, plans[i].source_fps)
            for i in todo if isinstance(plans[i], Plan)]
    entries = list(partial.entries) if partial else [None] * len(rows)
    for i in todo:  # clips that could not even be planned
        if isinstance(plans[i], str):
            entries[i - rows.start] = _entry(clips[i], i, plans[i], [0], plans[i])
    def fill(out: np.ndarray) -> None:
        last_save = time.time()
        for i, u8, shots, error in run_jobs(_decode_job, jobs, workers, progress, desc):
            if u8 is not None:
                out[first[i]:first[i] + len(u8)] = u8 if store.encode is None else store.encode(u8)
            entries[i - rows.start] = _entry(clips[i], i, plans[i], shots, error)
            if partial is not None and time.time() - last_save > save_every_s:
                partial.entries = entries
                partial.save()
                last_save = time.time()
        out.flush()

    if partial is None:  # its own temporary file: several processes may build at once, the last rename wins
        with atomic_path(out_npy) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=store.dtype, shape=shape)
            fill(out)
            del out
    else:
        fill(partial.out)
        partial.out = None
        os.replace(partial.path, out_npy)
        partial.state.unlink(missing_ok=True)
    for e in entries:
        for b in e["bad"]:
            log.warning("%s: line %d: %s", store.what, b["line"], b["error"])
    return _table(entries)


def write_index(path: Path, key: str, clips, size: int, rate: Rate, table: dict, **extra) -> None:
    offsets = np.concatenate([[0], np.cumsum(table["lengths"])]).astype(int).tolist()
    meta = {"key": key, "version": VERSION, "size": size, "rate": rate.__dict__, "paths": [str(c.video) for c in clips],
            "offsets": offsets, "shots": table["shots"], "fps": table["fps"], "source_fps": table["source_fps"],
            "repeat": [i for i, r in enumerate(table["repeat"]) if r], "bad": table["bad"], **extra}
    write_text(path, json.dumps(meta))  # last: its presence means the .npy is complete


def build(clips: Sequence[Clip], size: int, rate: Rate, cache_dir, store: Store, progress: bool = True,
          workers: int = 1, save_every_s: float = 30.0, **extra) -> Path:
    """Every clip into the cache ``store`` names, unless it is complete already; returns its .npy. Clips that cannot
    be read are recorded as bad (no rows). ``extra``: more fields for the index (the latent space)."""
    cache_dir = Path(cache_dir)
    npy, meta = files(cache_dir, store.prefix, store.key)
    if meta.is_file():
        return npy
    cache_dir.mkdir(parents=True, exist_ok=True)
    rows = range(len(clips))
    plans = _plans(clips, rows, rate)
    planned = sum(len(p.indices) for p in plans.values() if isinstance(p, Plan))
    log.info("%s at %s: %s", store.what, rate.describe(),
             size_line(len(clips), planned, int(np.prod(store.row)) * np.dtype(store.dtype).itemsize))
    table = _write_rows(npy, clips, rows, plans, size, rate, store, workers, progress,
                        f"caching {store.what} to {cache_dir}", save_every_s)
    write_index(meta, store.key, clips, size, rate, table, **extra)
    return npy


def _part(cache_dir: Path, store: Store, shard: int, shards: int) -> tuple[Path, Path]:
    stem = cache_dir / f"{store.prefix}_{store.key}.part{shard:04d}-of-{shards:04d}"
    return Path(f"{stem}.npy"), Path(f"{stem}.json")


def build_shard(clips: Sequence[Clip], size: int, rate: Rate, cache_dir, store: Store, shard: int, shards: int,
                progress: bool = True, workers: int = 1) -> Path:
    """Shard ``shard`` of ``shards`` (a contiguous run of clips) into its own part file; a finished one is kept."""
    cache_dir = Path(cache_dir)
    part_npy, part_meta = _part(cache_dir, store, shard, shards)
    if part_meta.is_file() or files(cache_dir, store.prefix, store.key)[1].is_file():  # done, or merged already
        return part_npy
    cache_dir.mkdir(parents=True, exist_ok=True)
    rows = shard_rows(len(clips), shard, shards)
    table = _write_rows(part_npy, clips, rows, _plans(clips, rows, rate), size, rate,
                        Store(**{**store.__dict__, "resumable": False}), workers, progress,
                        f"caching {store.what}, shard {shard}/{shards}")
    write_text(part_meta, json.dumps({"key": store.key, "rows": [rows.start, rows.stop], "table": table}))
    return part_npy


def merge(clips: Sequence[Clip], size: int, rate: Rate, cache_dir, store: Store, shards: int, **extra) -> Path:
    """The ``shards`` parts concatenated into the file one build writes (the same bytes), atomically; the parts
    are removed once it is complete. Fails, naming them, if a part is missing or the parts do not tile the clips."""
    cache_dir = Path(cache_dir)
    npy, meta_path = files(cache_dir, store.prefix, store.key)
    if meta_path.is_file():  # a rerun of a merge that finished: nothing to do
        return npy
    parts = [_part(cache_dir, store, i, shards) for i in range(shards)]
    check_parts(parts, store.what)
    table: dict = {k: [] for k in TABLE}
    expect = 0
    for _, part_meta in parts:
        meta = json.loads(part_meta.read_text())
        start, stop = meta["rows"]
        if start != expect:
            raise CacheError(f"{store.what}: {part_meta} covers clips {start}-{stop}, expected it to start at {expect}")
        expect = stop
        for k in TABLE:
            table[k] += meta["table"][k]
    if expect != len(clips):
        raise CacheError(f"{store.what}: the {shards} parts cover {expect} of {len(clips)} clips")
    with atomic_path(npy) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=store.dtype, shape=(sum(table["lengths"]), *store.row))
        row = 0
        for part_npy, _ in parts:
            part = np.load(part_npy, mmap_mode="r")
            out[row:row + len(part)] = part
            row += len(part)
        out.flush()
        del out
    write_index(meta_path, store.key, clips, size, rate, table, **extra)
    remove_parts(parts)
    return npy


# --- the pixel window cache ---------------------------------------------------------------------------------------

def pixel_store(clips: Sequence[Clip], size: int, rate: Rate) -> Store:
    return Store("windows", window_key(clips, size, rate), (size, size, 3), "uint8")


def _opened(clips, size: int, rate: Rate, cache_dir, npy: Path) -> WindowCache:
    cache = open_windows(clips, size, rate, cache_dir)
    if cache is None:  # a source file changed while we decoded: the key moved on
        raise CacheError(f"window cache {npy}: source videos changed during the build; run it again")
    return cache


def build_windows(clips: Sequence[Clip], size: int, rate: Rate, cache_dir, progress: bool = True,
                  workers: int = 1) -> WindowCache:
    """The pixel window cache of these clips (built unless it is there), with ``workers`` decoding processes."""
    cached = open_windows(clips, size, rate, cache_dir)
    if cached is not None:
        return cached
    npy = build(clips, size, rate, cache_dir, pixel_store(clips, size, rate), progress, workers)
    return _opened(clips, size, rate, cache_dir, npy)


def build_windows_shard(clips: Sequence[Clip], size: int, rate: Rate, cache_dir, shard: int, shards: int,
                        progress: bool = True, workers: int = 1) -> Path:
    return build_shard(clips, size, rate, cache_dir, pixel_store(clips, size, rate), shard, shards, progress, workers)


def merge_windows(clips: Sequence[Clip], size: int, rate: Rate, cache_dir, shards: int) -> WindowCache:
    npy = merge(clips, size, rate, cache_dir, pixel_store(clips, size, rate), shards)
    return _opened(clips, size, rate, cache_dir, npy)
