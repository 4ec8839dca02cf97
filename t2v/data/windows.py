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

from t2v.cachebuild import Files
from t2v.data.cache import MappedCache, cache_key, read_mapped
from t2v.data.manifest import Clip
from t2v.data.video import FrameSize, NoFrameRate, Timeline, VideoError, decode_frames, frame_hw, read_timeline
from t2v.files import human_bytes

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


def window_key(clips: Sequence[Clip], size: FrameSize, rate: Rate, store: str = "") -> str:
    """The cache's name: every source (path, size, mtime, range), the frame size, the rate, and what is stored of
    each frame (``store``: "" for pixels, the VAE's identity for latents)."""
    blob = json.dumps({"version": VERSION, "sources": cache_key(clips, 0, size), "size": size, "store": store,
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


def decode_clip(path: str, size: FrameSize, rate: Rate, start=None, end=None, p: Plan | None = None):
    """(frames (F, H, W, 3) uint8, plan, shot starts) of one clip, as the window cache stores it."""
    p = p or plan(read_timeline(path), rate, path, start, end)
    u8 = decode_frames(path, p.indices, size) if len(p.indices) else np.zeros((0, *frame_hw(size), 3), np.uint8)
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


def window_starts(length: int, shots: Sequence[int], frames: int, k: int) -> list[int]:
    """Up to ``k`` first frames of windows of ``frames`` consecutive frames inside one shot, spread evenly over
    every such window of the clip (its beginning, middle and end, across its shots): what a cache that must encode
    whole windows keeps of a clip. No shot that long: [-1] (its longest shot, padded), or [] for no frames."""
    bounds = [int(s) for s in shots if 0 <= s < length] + [length]
    starts = [a + j for a, b in zip(bounds[:-1], bounds[1:]) for j in range(max(0, b - a - frames + 1))]
    if not starts:
        return [-1] if length else []
    picks = np.unique(np.linspace(0, len(starts) - 1, k).round().astype(int))
    return [starts[p] for p in picks]


def padded_window(length: int, shots: Sequence[int], frames: int) -> np.ndarray:
    """The frames of a clip's longest shot from its start, its last frame repeated up to ``frames``."""
    bounds = [int(s) for s in shots if 0 <= s < length] + [length]
    a, b = max(zip(bounds[:-1], bounds[1:]), key=lambda ab: ab[1] - ab[0])
    return np.minimum(a + np.arange(frames), b - 1)


def longest_shot(length: int, shots: Sequence[int]) -> int:
    bounds = list(shots) + [length]
    return max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)


# --- the cache --------------------------------------------------------------------------------------------------

@dataclass
class Windowed(MappedCache):
    """Rows: frames, clip after clip (``offsets``); the pixel window cache and the latent one alike."""

    npy: Path
    size: FrameSize
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
        """(rows of the array: a slice, or an index array when padded; fps the window plays at) for clip i, or None
        if it has no room for a window."""
        if i in self.bad:
            return None
        got = pick_window(self.length(i), self.shots[i], frames, strides, rng, pad)
        if got is None:
            return None
        rows, stride = got
        rows = self.offsets[i] + rows
        if rows[-1] - rows[0] == stride * (len(rows) - 1):  # evenly spaced (not padded): a view, no gather
            rows = slice(int(rows[0]), int(rows[-1]) + 1, stride)
        return rows, float(self.fps[i]) / stride

    def item(self, rows) -> np.ndarray:
        """What a draw of ``rows`` (from window()) gives the dataset: (T, H, W, 3) uint8 pixels here."""
        return self.array[rows]

    def too_short(self, frames: int, strides: Sequence[int]) -> list[int]:
        """Clips (not bad) with no room for one window of ``frames`` at the smallest stride."""
        need = (frames - 1) * min(strides) + 1
        return [i for i in range(len(self)) if i not in self.bad and longest_shot(self.length(i), self.shots[i]) < need]

    def nbytes_per_frame(self) -> int:
        return int(np.prod(self.array.shape[1:])) * self.array.dtype.itemsize


@dataclass
class WindowCache(Windowed):
    """Rows: (H, W, 3) uint8 frames."""


def files(cache_dir: Path, prefix: str, key: str) -> Files:
    """A window cache's files (t2v.cachebuild.Files): ``<prefix>_<key>.npy``, its ``.json`` index, parts."""
    return Files(Path(cache_dir) / f"{prefix}_{key}")


def read_index(meta: dict) -> dict:
    """The per-clip table of a window cache's .json as Windowed's fields."""
    return {"offsets": np.asarray(meta["offsets"], np.int64), "shots": meta["shots"],
            "fps": np.asarray(meta["fps"], np.float64), "bad": {int(b["index"]) for b in meta["bad"]},
            "repeat": set(meta["repeat"]), "source_fps": np.asarray(meta["source_fps"], np.float64)}


def open_index(npy: Path, meta_path: Path, key: str, clips: Sequence[Clip], row: tuple, dtype, what: str):
    """(array, index meta) of a complete window cache whose key, clips and row shape match, else None."""
    got = read_mapped(npy, meta_path, what)
    if got is None:
        return None
    arr, meta = got
    if (meta.get("key") != key or meta.get("paths") != [str(c.video) for c in clips]
            or arr.shape != (int(meta["offsets"][-1]), *row) or arr.dtype != np.dtype(dtype)):
        log.warning("ignoring %s %s: it does not match these clips (shape %s)", what, npy, arr.shape)
        return None
    return arr, meta


def open_windows(clips: Sequence[Clip], size: FrameSize, rate: Rate, cache_dir) -> WindowCache | None:
    """The window cache of exactly these clips and settings, or None if it is missing or incomplete."""
    key = window_key(clips, size, rate)
    f = files(cache_dir, "windows", key)
    npy, meta_path = f.npy, f.meta
    got = open_index(npy, meta_path, key, clips, (*frame_hw(size), 3), np.uint8, "window cache")
    if got is None:
        return None
    arr, meta = got
    return WindowCache(npy, size, rate, meta["paths"], _array=arr, **read_index(meta))


def size_line(n_clips: int, frames: int, bytes_per_frame: int) -> str:
    """What a build prints and the docs quote: frames and bytes in all and per clip."""
    total = frames * bytes_per_frame
    return (f"{n_clips} clips, {frames:,} frames ({frames / max(n_clips, 1):.1f} per clip), {human_bytes(total)} "
            f"({human_bytes(total / max(n_clips, 1))} per clip)")


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
    u8, p, shots = decode_clip(str(clip.video), data.frame_size, Rate.of(data), clip.start, clip.end)
    got = pick_window(len(u8), shots, data.frames, data.strides[:1], np.random.default_rng([seed, index]), pad=True)
    if got is None:
        raise VideoError(clip.video, f"no frames between {clip.start}s and {clip.end}s")
    return u8[got[0]], p.fps / got[1]
