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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from t2v.cachebuild import CacheError, Every, Files, Partial, build_part, merge_parts, run_jobs, shard_rows, write_array
from t2v.data.manifest import Clip
from t2v.data.video import FrameSize, VideoError, frame_hw, read_timeline
from t2v.data.windows import (VERSION, Plan, Rate, WindowCache, decode_clip, files, open_windows, plan, size_line,
                              window_key)
from t2v.files import write_text

log = logging.getLogger("t2v.data")

# the per-clip index a build writes (starts and frames: a store of encoded windows, Store.per_clip)
TABLE = ("lengths", "shots", "fps", "source_fps", "repeat", "bad", "starts", "frames")


@dataclass(frozen=True)
class Store:
    """What a window cache keeps of each frame."""

    prefix: str  # file names: <prefix>_<key>.npy / .json
    key: str  # t2v.data.windows.window_key
    row: tuple  # one frame's row shape
    dtype: str
    encode: Callable | None = None  # (F, H, W, 3) uint8 -> (F, *row); None: the pixels
    resumable: bool = False  # a killed full build resumes from its partial file (the latent build on a GPU)
    what: str = "window cache"
    # 0: a row per frame. k > 0: k rows per clip, each a whole window encoded (a video VAE's latents belong to a
    # window, not a frame): encode(frames, shots) gives at most k rows and the first frame of each (-1: a clip with
    # no shot as long as a window, its longest shot padded); rows it leaves are zeros
    per_clip: int = 0


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


def _rows(store: Store, p: Plan | str) -> int:
    """How many rows a clip takes: its frames, or the store's encoded windows."""
    return 0 if not isinstance(p, Plan) else store.per_clip or len(p.indices)


def _entry(clip: Clip, i: int, p: Plan | str, shots, error: str, rows: int, starts=(), frames: int = 0) -> dict:
    """One clip's line of the index."""
    ok = isinstance(p, Plan)
    bad = [] if not error else [{"index": i, "path": str(clip.video), "line": clip.line, "error": error}]
    return {"lengths": rows, "shots": shots, "fps": p.fps if ok else 0.0, "source_fps": p.source_fps if ok else 0.0,
            "repeat": bool(ok and p.repeat), "bad": bad, "starts": list(starts), "frames": frames}


def _table(entries: list[dict]) -> dict:
    return {k: [e[k] for e in entries] if k != "bad" else [b for e in entries for b in e["bad"]] for k in TABLE}


def _load_entries(state: Path, n: int) -> list | None:
    entries = json.loads(state.read_text())
    return entries if len(entries) == n else None


def _write_rows(out_npy: Path, clips, rows: range, plans, size: FrameSize, rate: Rate, store: Store, workers: int,
                progress: bool, desc: str, save_every_s: float = 30.0) -> dict:
    """Decode (and encode) ``rows`` clip after clip at their planned lengths into out_npy; returns their index.
    A resumable store fills it in place (t2v.cachebuild.Partial), its state being each clip's index line."""
    lengths = [_rows(store, plans[i]) for i in rows]
    first = dict(zip(rows, np.cumsum([0] + lengths[:-1]).tolist()))  # each clip's first row
    shape = (sum(lengths), *store.row)
    partial, entries = None, [None] * len(rows)
    if store.resumable:
        f = Files(out_npy.with_suffix(""))
        state = f.beside("partial.json")
        partial = Partial(f, shape, store.dtype, (state,), lambda: _load_entries(state, len(rows)))
        if partial.state is not None:
            entries = partial.state
            log.info("resuming %s: %d of %d clips already done", partial.path, sum(e is not None for e in entries),
                     len(rows))
    todo = [i for i in rows if entries[i - rows.start] is None]
    jobs = [(i, str(clips[i].video), size, rate, plans[i].indices.tolist(), plans[i].fps, plans[i].source_fps)
            for i in todo if isinstance(plans[i], Plan)]
    for i in todo:  # clips that could not even be planned
        if isinstance(plans[i], str):
            entries[i - rows.start] = _entry(clips[i], i, plans[i], [0], plans[i], 0)

    def fill(out: np.ndarray) -> None:
        save_due = Every(save_every_s)
        for i, u8, shots, error in run_jobs(_decode_job, jobs, workers, progress, desc):
            starts = ()
            if u8 is not None and store.per_clip:
                encoded, starts = store.encode(u8, shots)
                out[first[i]:first[i] + len(encoded)] = encoded
            elif u8 is not None:
                out[first[i]:first[i] + len(u8)] = u8 if store.encode is None else store.encode(u8)
            entries[i - rows.start] = _entry(clips[i], i, plans[i], shots, error, lengths[i - rows.start], starts,
                                             0 if u8 is None else len(u8))
            if partial is not None and save_due():
                partial.save([json.dumps(entries).encode()])

    if partial is None:
        write_array(out_npy, shape, store.dtype, fill)
    else:
        fill(partial.out)
        partial.finish()
    for e in entries:
        for b in e["bad"]:
            log.warning("%s: line %d: %s", store.what, b["line"], b["error"])
    return _table(entries)


def write_index(path: Path, key: str, clips, size: FrameSize, rate: Rate, table: dict, **extra) -> None:
    offsets = np.concatenate([[0], np.cumsum(table["lengths"])]).astype(int).tolist()
    meta = {"key": key, "version": VERSION, "size": size, "rate": rate.__dict__, "paths": [str(c.video) for c in clips],
            "offsets": offsets, "shots": table["shots"], "fps": table["fps"], "source_fps": table["source_fps"],
            "repeat": [i for i, r in enumerate(table["repeat"]) if r], "bad": table["bad"],
            **({k: table[k] for k in ("starts", "frames")} if any(table["starts"]) else {}), **extra}
    write_text(path, json.dumps(meta))  # last: its presence means the .npy is complete


def _files(cache_dir: Path, store: Store) -> Files:
    return files(cache_dir, store.prefix, store.key)


def build(clips: Sequence[Clip], size: FrameSize, rate: Rate, cache_dir, store: Store, progress: bool = True,
          workers: int = 1, save_every_s: float = 30.0, **extra) -> Path:
    """Every clip into the cache ``store`` names, unless it is complete already; returns its .npy. Clips that cannot
    be read are recorded as bad (no rows). ``extra``: more fields for the index (the latent space)."""
    cache_dir = Path(cache_dir)
    f = _files(cache_dir, store)
    if f.meta.is_file():
        return f.npy
    cache_dir.mkdir(parents=True, exist_ok=True)
    rows = range(len(clips))
    plans = _plans(clips, rows, rate)
    planned = sum(_rows(store, p) for p in plans.values())
    log.info("%s at %s: %s", store.what, rate.describe(),
             size_line(len(clips), planned, int(np.prod(store.row)) * np.dtype(store.dtype).itemsize))
    table = _write_rows(f.npy, clips, rows, plans, size, rate, store, workers, progress,
                        f"caching {store.what} to {cache_dir}", save_every_s)
    write_index(f.meta, store.key, clips, size, rate, table, **extra)
    return f.npy


def build_shard(clips: Sequence[Clip], size: FrameSize, rate: Rate, cache_dir, store: Store, shard: int, shards: int,
                progress: bool = True, workers: int = 1) -> Path:
    """Shard ``shard`` of ``shards`` (a contiguous run of clips) into its own part file; a finished one is kept."""
    cache_dir = Path(cache_dir)
    rows = shard_rows(len(clips), shard, shards)

    def write(part_npy: Path) -> tuple[range, dict]:
        cache_dir.mkdir(parents=True, exist_ok=True)
        table = _write_rows(part_npy, clips, rows, _plans(clips, rows, rate), size, rate,
                            Store(**{**store.__dict__, "resumable": False}), workers, progress,
                            f"caching {store.what}, shard {shard}/{shards}")
        return rows, {"table": table}

    return build_part(_files(cache_dir, store), store.key, shard, shards,
                      lambda: _files(cache_dir, store).meta.is_file(), write)


def merge(clips: Sequence[Clip], size: FrameSize, rate: Rate, cache_dir, store: Store, shards: int, **extra) -> Path:
    """The ``shards`` parts concatenated into the file one build writes (the same bytes), atomically; the parts
    are removed once it is complete. Fails, naming them, if a part is missing or the parts do not tile the clips."""
    f = _files(Path(cache_dir), store)
    if f.meta.is_file():  # a rerun of a merge that finished: nothing to do
        return f.npy

    def write_meta(metas: list[dict]) -> None:
        table = {k: [v for meta in metas for v in meta["table"][k]] for k in TABLE}
        write_index(f.meta, store.key, clips, size, rate, table, **extra)

    merge_parts(f, shards, len(clips), store.what, store.row, store.dtype, write_meta)
    return f.npy


# --- the pixel window cache ---------------------------------------------------------------------------------------

def pixel_store(clips: Sequence[Clip], size: FrameSize, rate: Rate) -> Store:
    return Store("windows", window_key(clips, size, rate), (*frame_hw(size), 3), "uint8")  # h w c


def _opened(clips, size: FrameSize, rate: Rate, cache_dir, npy: Path) -> WindowCache:
    cache = open_windows(clips, size, rate, cache_dir)
    if cache is None:  # a source file changed while we decoded: the key moved on
        raise CacheError(f"window cache {npy}: source videos changed during the build; run it again")
    return cache


def build_windows(clips: Sequence[Clip], size: FrameSize, rate: Rate, cache_dir, progress: bool = True,
                  workers: int = 1) -> WindowCache:
    """The pixel window cache of these clips (built unless it is there), with ``workers`` decoding processes."""
    cached = open_windows(clips, size, rate, cache_dir)
    if cached is not None:
        return cached
    npy = build(clips, size, rate, cache_dir, pixel_store(clips, size, rate), progress, workers)
    return _opened(clips, size, rate, cache_dir, npy)


def build_windows_shard(clips: Sequence[Clip], size: FrameSize, rate: Rate, cache_dir, shard: int, shards: int,
                        progress: bool = True, workers: int = 1) -> Path:
    return build_shard(clips, size, rate, cache_dir, pixel_store(clips, size, rate), shard, shards, progress, workers)


def merge_windows(clips: Sequence[Clip], size: FrameSize, rate: Rate, cache_dir, shards: int) -> WindowCache:
    npy = merge(clips, size, rate, cache_dir, pixel_store(clips, size, rate), shards)
    return _opened(clips, size, rate, cache_dir, npy)
