"""Windows at a real frame rate (``data.sampling=window``): the cache holds every frame of a clip at the rate the
model sees, cut into shots, and each draw takes a fresh window of ``data.frames`` frames inside one shot.

The "even" clip cache stores one fixed sample spread over the whole clip: on MSR-VTT's ~15 s clips that is a
slideshow of frames ~2 s apart across scene cuts, the same one every epoch. Here a clip is stored at ``data.fps``
frames per second (or every ``data.frame_interval``-th source frame), from its ``start`` for at most
``data.max_seconds``, read at the container's own timestamps (so variable frame rates play at their real speed).
PySceneDetect's content detector finds the cuts at build time; a window never spans one.

Files, beside the clip cache (``t2v.config.cache_dir``):
  ``windows_<key>.npy``   (F, H, W, 3) uint8: every clip's frames at the target rate, clip after clip
  ``windows_<key>.json``  key, settings and, per clip, its first row (``offsets``, N+1), its shot starts, its
                          rate, and the clips that could not be read (``bad``). Written last: its presence means
                          the .npy is complete.
The key hashes the size, the rate settings and every source file's path, size, mtime and range; ``data.frames``
is not in it: one cache serves every window length. Which window a draw takes is a pure function of
(seed, draw), so a resumed run reads exactly the windows an uninterrupted one reads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from t2v.data.cache import (CacheError, MappedCache, cache_key, check_parts, remove_parts, run_jobs, shard_rows)
from t2v.data.manifest import Clip
from t2v.data.video import NoFrameRate, Timeline, VideoError, decode_frames, read_timeline
from t2v.files import atomic_path, write_text

log = logging.getLogger("t2v.data")

VERSION = 1


@dataclass(frozen=True)
class Rate:
    """What the window cache holds of each clip: the frame rate, how much of it, and whether cuts split it."""

    fps: float = 0.0  # frames per second the model sees; 0: frame_interval
    frame_interval: int = 0  # every k-th source frame; 0: fps
    max_seconds: float = 30.0  # the cache keeps at most this much of each clip, from its start
    cuts: bool = True  # find scene cuts (PySceneDetect's content detector); windows never cross one
    cut_threshold: float = 27.0  # the detector's threshold (its default): higher finds fewer cuts

    @classmethod
    def of(cls, data) -> "Rate":
        return cls(float(data.fps), int(data.frame_interval), float(data.max_seconds), bool(data.cuts),
                   float(data.cut_threshold))

    def describe(self) -> str:
        return f"{self.fps:g} fps" if self.fps else f"every {self.frame_interval}. source frame"


def window_key(clips: Sequence[Clip], size: int, rate: Rate) -> str:
    blob = json.dumps({"version": VERSION, "sources": cache_key(clips, 0, size), "size": size,
                       "rate": [rate.fps, rate.frame_interval, rate.max_seconds, rate.cuts, rate.cut_threshold]})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# --- one clip: which source frames, decoded, cut into shots --------------------------------------------------

@dataclass
class Plan:
    """Which source frames the cache holds of one clip, at what rate; ``repeat``: the source is slower than
    data.fps, so some frames are shown twice (a stutter the model will learn)."""

    indices: np.ndarray
    fps: float
    source_fps: float
    repeat: bool = False


def source_rate(tl: Timeline, path: str) -> tuple[np.ndarray, float]:
    """(frame start times, frames per second) of a video; a VideoError for a video that reports no rate."""
    starts, n = tl.starts, len(tl.starts)
    span = float(starts[-1] - starts[0]) if n > 1 else 0.0
    if n > 1 and span > 0 and np.all(np.diff(starts) >= 0):
        return starts, (n - 1) / span
    if math.isfinite(tl.avg_fps) and tl.avg_fps > 0:  # no usable timestamps: a constant rate
        return np.arange(n) / tl.avg_fps, tl.avg_fps
    raise NoFrameRate(path, f"the video reports {tl.avg_fps} fps and no frame timestamps: its frame rate is unknown, "
                           "so it cannot be sampled in seconds (re-encode it, e.g. ffmpeg -i IN -r 30 OUT)")


def plan(tl: Timeline, rate: Rate, path: str, start: float | None = None, end: float | None = None) -> Plan:
    """The frames of [start, end) (capped at rate.max_seconds) at the target rate: for each target time the
    frame on screen then (data.fps), or every k-th frame (data.frame_interval)."""
    starts, src = source_rate(tl, path)
    if len(starts) == 0:
        raise VideoError(path, "the video has no frames")
    t0 = max(start or 0.0, float(starts[0]))
    t1 = float(starts[-1]) + 1.0 / src if end is None else min(end, float(starts[-1]) + 1.0 / src)
    t1 = min(t1, t0 + rate.max_seconds)
    if t1 <= t0:
        return Plan(np.zeros(0, np.int64), rate.fps or src / rate.frame_interval, src)
    if rate.fps:
        times = t0 + np.arange(math.ceil((t1 - t0) * rate.fps - 1e-6)) / rate.fps
        idx = np.clip(np.searchsorted(starts, times + 1e-6, side="right") - 1, 0, len(starts) - 1)
        return Plan(idx.astype(np.int64), rate.fps, src, repeat=bool(len(np.unique(idx)) < len(idx)))
    first = int(np.searchsorted(starts, t0 - 1e-6, side="left"))
    idx = np.arange(first, len(starts), rate.frame_interval)
    return Plan(idx[starts[idx] < t1 - 1e-9].astype(np.int64), src / rate.frame_interval, src)


def shot_starts(u8: np.ndarray, fps: float, threshold: float) -> list[int]:
    """Where each shot begins (0 first) in a clip's frames (T, H, W, 3), by PySceneDetect's content detector fed
    the frames the cache holds: a cut between two of them is exactly what a window must not contain."""
    from scenedetect import ContentDetector
    from scenedetect.common import FrameTimecode

    detector, fps = ContentDetector(threshold=threshold, min_scene_len=1), float(fps)
    cuts: list[int] = []
    for j, frame in enumerate(u8):
        tc = FrameTimecode(j, fps=fps)
        cuts += [c.frame_num for c in detector.process_frame(tc, np.ascontiguousarray(frame[..., ::-1]))]  # BGR
    if len(u8):
        cuts += [c.frame_num for c in detector.post_process(FrameTimecode(len(u8), fps=fps))]
    return [0] + sorted({c for c in cuts if 0 < c < len(u8)})


def decode_clip(path: str, size: int, rate: Rate, start=None, end=None, p: Plan | None = None):
    """(frames (F, H, W, 3) uint8, plan, shot starts) of one clip, as the window cache stores it."""
    p = p or plan(read_timeline(path), rate, path, start, end)
    u8 = decode_frames(path, p.indices, size) if len(p.indices) else np.zeros((0, size, size, 3), np.uint8)
    shots = shot_starts(u8, p.fps, rate.cut_threshold) if rate.cuts else [0]
    return u8, p, shots


def pick_window(length: int, shots: Sequence[int], frames: int, strides: Sequence[int], rng: np.random.Generator,
                pad: bool = False) -> tuple[np.ndarray, int] | None:
    """(rows, stride): ``frames`` rows ``stride`` apart inside one shot, uniform over every such window of every
    stride the clip has room for; None if it has room for none (with ``pad``: the longest shot from its start,
    its last frame repeated)."""
    bounds = [int(s) for s in shots if 0 <= s < length] + [length]
    spans = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    options = []
    for s in strides:
        counts = [max(0, b - a - (frames - 1) * s) for a, b in spans]  # window starts that fit in each shot
        if sum(counts):
            options.append((s, counts))
    if not options:
        if not pad or not spans:
            return None
        a, b = max(spans, key=lambda ab: ab[1] - ab[0])
        s = min(strides)
        return np.minimum(a + s * np.arange(frames), b - 1), s
    s, counts = options[int(rng.integers(len(options)))]
    k = int(rng.integers(sum(counts)))
    for (a, _), c in zip(spans, counts):
        if k < c:
            return a + k + s * np.arange(frames), s
        k -= c
    raise AssertionError("unreachable")


def longest_shot(length: int, shots: Sequence[int]) -> int:
    bounds = list(shots) + [length]
    return max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)


# --- the cache --------------------------------------------------------------------------------------------------

@dataclass
class Windowed(MappedCache):
    """Rows: frames, clip after clip (``offsets``); the pixel window cache and the latent one alike."""

    npy: Path
    size: int
    rate: Rate
    paths: list[str]
    offsets: np.ndarray  # (N+1,) int64: clip i is rows offsets[i]:offsets[i+1]
    shots: list[list[int]]  # per clip, where each shot begins (relative to the clip)
    fps: np.ndarray  # (N,) the rate each clip is stored at
    bad: set[int] = field(default_factory=set)
    repeat: set[int] = field(default_factory=set)  # clips whose source is slower than data.fps: frames repeat
    source_fps: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (N,) each source's own rate
    _array: np.ndarray | None = field(default=None, repr=False)

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def window(self, i: int, frames: int, strides: Sequence[int], rng, pad: bool = False):
        """(rows of the array, fps the window plays at) for clip i, or None if it has no room for a window."""
        if i in self.bad:
            return None
        got = pick_window(self.length(i), self.shots[i], frames, strides, rng, pad)
        if got is None:
            return None
        rows, stride = got
        return self.offsets[i] + rows, float(self.fps[i]) / stride

    def too_short(self, frames: int, strides: Sequence[int]) -> list[int]:
        """Clips (not bad) with no room for one window of ``frames`` at the smallest stride."""
        need = (frames - 1) * min(strides) + 1
        return [i for i in range(len(self)) if i not in self.bad and longest_shot(self.length(i), self.shots[i]) < need]

    def nbytes_per_frame(self) -> int:
        return int(np.prod(self.array.shape[1:])) * self.array.dtype.itemsize


@dataclass
class WindowCache(Windowed):
    """Rows: (H, W, 3) uint8 frames."""


def _files(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"windows_{key}.npy", cache_dir / f"windows_{key}.json"


def read_index(meta: dict) -> dict:
    """The per-clip table of a window cache's .json as Windowed's fields."""
    return {"offsets": np.asarray(meta["offsets"], np.int64), "shots": meta["shots"],
            "fps": np.asarray(meta["fps"], np.float64), "bad": {int(b["index"]) for b in meta["bad"]},
            "repeat": set(meta["repeat"]), "source_fps": np.asarray(meta["source_fps"], np.float64)}


def open_windows(clips: Sequence[Clip], size: int, rate: Rate, cache_dir) -> WindowCache | None:
    """The window cache of exactly these clips and settings, or None if it is missing or incomplete."""
    key = window_key(clips, size, rate)
    npy, meta_path = _files(Path(cache_dir), key)
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        arr = np.load(npy, mmap_mode="r")
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable window cache %s: %s", npy, e)
        return None
    index = read_index(meta)
    if (meta.get("key") != key or meta.get("paths") != [str(c.video) for c in clips]
            or arr.shape != (int(index["offsets"][-1]), size, size, 3) or arr.dtype != np.uint8):
        log.warning("ignoring window cache %s: it does not match these clips (shape %s)", npy, arr.shape)
        return None
    return WindowCache(npy, size, rate, meta["paths"], _array=arr, **index)


def _decode_job(job: tuple):
    """(index, frames or None, plan record, error): one clip, in a worker process or in this one."""
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


def _build_rows(out_path: Path, clips, rows: range, plans, size: int, rate: Rate, workers: int, progress: bool,
                desc: str) -> dict:
    """Decode ``rows`` (clip after clip, at their planned lengths) into a new .npy at out_path; the rows' table."""
    lengths = [len(plans[i].indices) if isinstance(plans[i], Plan) else 0 for i in rows]
    total = sum(lengths)
    table = {"lengths": lengths, "shots": [], "fps": [], "source_fps": [], "repeat": [], "bad": []}
    with atomic_path(out_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(total, size, size, 3))
        jobs = [(i, str(clips[i].video), size, rate, plans[i].indices.tolist(), plans[i].fps, plans[i].source_fps)
                for i in rows if isinstance(plans[i], Plan)]
        starts = dict(zip(rows, np.cumsum([0] + lengths[:-1]).tolist()))
        results = {i: (u8, shots, err) for i, u8, shots, err in run_jobs(_decode_job, jobs, workers, progress, desc)}
        for i in rows:
            p = plans[i]
            u8, shots, err = results.get(i, (None, [0], p if isinstance(p, str) else ""))
            if u8 is not None:
                out[starts[i]:starts[i] + len(u8)] = u8
            else:
                log.warning("window cache: line %d: %s", clips[i].line, err)
                table["bad"].append({"index": i, "path": str(clips[i].video), "line": clips[i].line, "error": err})
            table["shots"].append(shots)
            table["fps"].append(p.fps if isinstance(p, Plan) else 0.0)
            table["source_fps"].append(p.source_fps if isinstance(p, Plan) else 0.0)
            table["repeat"].append(bool(isinstance(p, Plan) and p.repeat))
        out.flush()
        del out
    return table


def _write_meta(path: Path, key: str, clips, size: int, rate: Rate, table: dict) -> None:
    offsets = np.concatenate([[0], np.cumsum(table["lengths"])]).astype(int).tolist()
    meta = {"key": key, "version": VERSION, "size": size, "rate": rate.__dict__, "paths": [str(c.video) for c in clips],
            "offsets": offsets, "shots": table["shots"], "fps": table["fps"], "source_fps": table["source_fps"],
            "repeat": [i for i, r in enumerate(table["repeat"]) if r], "bad": table["bad"]}
    write_text(path, json.dumps(meta))  # last: its presence means the .npy is complete


def size_line(n_clips: int, frames: int, bytes_per_frame: int) -> str:
    """What a build prints and the docs quote: frames and bytes in all and per clip."""
    total = frames * bytes_per_frame
    return (f"{n_clips} clips, {frames:,} frames ({frames / max(n_clips, 1):.1f} per clip), {_bytes(total)} "
            f"({_bytes(total / max(n_clips, 1))} per clip)")


def _bytes(n: float) -> str:
    unit = next((u for u in ("TiB", "GiB", "MiB", "KiB") if n >= 2 ** (10 * ("KMGT".index(u[0]) + 1))), "B")
    return f"{n:.0f} B" if unit == "B" else f"{n / 2 ** (10 * ('KMGT'.index(unit[0]) + 1)):.2f} {unit}"


def build_windows(clips: Sequence[Clip], size: int, rate: Rate, cache_dir, progress: bool = True,
                  workers: int = 1) -> WindowCache:
    """Decode every clip at the target rate into the window cache (unless a valid one is there) with ``workers``
    processes (the same bytes as one). Clips that cannot be read are recorded as bad (no rows) and skipped."""
    cached = open_windows(clips, size, rate, cache_dir)
    if cached is not None:
        return cached
    cache_dir = Path(cache_dir)
    key = window_key(clips, size, rate)
    npy, meta_path = _files(cache_dir, key)
    rows = range(len(clips))
    plans = _plans(clips, rows, rate)
    planned = sum(len(p.indices) for p in plans.values() if isinstance(p, Plan))
    log.info("window cache at %s: %s", rate.describe(), size_line(len(clips), planned, size * size * 3))
    table = _build_rows(npy, clips, rows, plans, size, rate, workers, progress, f"caching windows to {cache_dir}")
    _write_meta(meta_path, key, clips, size, rate, table)
    cache = open_windows(clips, size, rate, cache_dir)
    if cache is None:  # a source file changed while we decoded: the key moved on
        raise CacheError(f"window cache {npy}: source videos changed during the build; run it again")
    return cache


def _part(cache_dir: Path, key: str, shard: int, shards: int) -> tuple[Path, Path]:
    stem = cache_dir / f"windows_{key}.part{shard:04d}-of-{shards:04d}"
    return Path(f"{stem}.npy"), Path(f"{stem}.json")


def build_windows_shard(clips: Sequence[Clip], size: int, rate: Rate, cache_dir, shard: int, shards: int,
                        progress: bool = True, workers: int = 1) -> Path:
    """Shard ``shard`` of ``shards`` (a contiguous run of clips) into its own part file; a finished one is kept."""
    cache_dir = Path(cache_dir)
    key = window_key(clips, size, rate)
    part_npy, part_meta = _part(cache_dir, key, shard, shards)
    if part_meta.is_file() or open_windows(clips, size, rate, cache_dir) is not None:
        return part_npy
    rows = shard_rows(len(clips), shard, shards)
    table = _build_rows(part_npy, clips, rows, _plans(clips, rows, rate), size, rate, workers, progress,
                        f"caching windows, shard {shard}/{shards}")
    write_text(part_meta, json.dumps({"key": key, "rows": [rows.start, rows.stop], "table": table}))
    return part_npy


def merge_windows(clips: Sequence[Clip], size: int, rate: Rate, cache_dir, shards: int) -> WindowCache:
    """The ``shards`` parts concatenated into the file one build writes (the same bytes), atomically."""
    cached = open_windows(clips, size, rate, cache_dir)
    if cached is not None:
        return cached
    cache_dir = Path(cache_dir)
    key = window_key(clips, size, rate)
    parts = [_part(cache_dir, key, i, shards) for i in range(shards)]
    check_parts(parts, "window cache")
    metas = [json.loads(meta.read_text()) for _, meta in parts]
    table: dict = {k: [] for k in ("lengths", "shots", "fps", "source_fps", "repeat", "bad")}
    expect = 0
    for (_, meta_path), meta in zip(parts, metas):
        start, stop = meta["rows"]
        if start != expect:
            raise CacheError(f"window cache: {meta_path} covers clips {start}-{stop}, expected it to start at {expect}")
        expect = stop
        for k in table:
            table[k] += meta["table"][k]
    if expect != len(clips):
        raise CacheError(f"window cache: the {shards} parts cover {expect} of {len(clips)} clips")
    npy, meta_path = _files(cache_dir, key)
    with atomic_path(npy) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(sum(table["lengths"]), size, size, 3))
        row = 0
        for part_npy, _ in parts:
            part = np.load(part_npy, mmap_mode="r")
            out[row:row + len(part)] = part
            row += len(part)
        out.flush()
        del out
    _write_meta(meta_path, key, clips, size, rate, table)
    remove_parts(parts)
    cache = open_windows(clips, size, rate, cache_dir)
    if cache is None:
        raise CacheError(f"window cache {npy}: source videos changed during the build; run it again")
    return cache


def report_short(cache: Windowed, clips: Sequence[Clip], manifest, frames: int, strides: Sequence[int],
                 pad: bool) -> list[str]:
    """``manifest:line: ...`` for every clip with no room for one window, saying what training does with it."""
    need = (frames - 1) * min(strides) + 1
    fate = "padded (its longest shot, the last frame repeated)" if pad else "skipped (data.short_clips=pad pads it)"
    return [f"{manifest}:{clips[i].line}: {clips[i].video}: longest shot {longest_shot(cache.length(i), cache.shots[i])}"
            f" frames at {cache.fps[i]:g} fps, a window needs {need}: {fate}" for i in cache.too_short(frames, strides)]


def cached_seconds_line(cache: Windowed) -> str:
    """Size and content of a built cache, as the build prints it."""
    return (f"{size_line(len(cache), int(cache.offsets[-1]), cache.nbytes_per_frame())}, "
            f"{sum(len(s) - 1 for s in cache.shots)} cuts, {len(cache.bad)} bad")


def fixed_window(clip: Clip, data, seed: int, index: int) -> tuple[np.ndarray, float]:
    """One clip's window for a measurement that must not move between evaluations (validation, eval's real clips):
    drawn from (seed, index) at the first stride, the longest shot padded if no shot is long enough."""
    u8, p, shots = decode_clip(str(clip.video), data.size, Rate.of(data), clip.start, clip.end)
    got = pick_window(len(u8), shots, data.frames, data.strides[:1], np.random.default_rng([seed, index]), pad=True)
    if got is None:
        raise VideoError(clip.video, f"no frames between {clip.start}s and {clip.end}s")
    return u8[got[0]], p.fps / got[1]
