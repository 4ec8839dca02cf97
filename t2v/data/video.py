"""Decoding clips to fixed-size frame stacks with decord.

decord raises two unrelated exception types on bad files (RuntimeError when a file cannot be opened,
decord._ffi.base.DECORDError, which is not a RuntimeError, when it is corrupt inside) and IndexError on
out-of-range frames; all three become a VideoError that names the file.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from t2v.files import atomic_path

try:
    import decord
    from decord._ffi.base import DECORDError
except ImportError:  # decord has no wheels for some platforms (macOS arm64); fail when a video is read
    decord = None

    class DECORDError(Exception):
        pass


SAMPLINGS = ("even", "random_window")


# A frame size as the data code takes it: a square's side, or (height, width)
FrameSize = int | tuple[int, int]


def frame_hw(size: FrameSize) -> tuple[int, int]:
    """(height, width) of a frame size: an int is a square's side (every square run's setting), a pair is
    (height, width), as t2v.config.DataConfig.frame_size gives for MSR-VTT's own 240x320."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def describe_size(size: FrameSize) -> str:
    """``64x64``, ``240x320``: height x width, as the error messages say it."""
    return "{}x{}".format(*frame_hw(size))


class VideoError(RuntimeError):
    """A video that cannot be decoded; ``.path`` names it."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class VideoTooShort(VideoError):
    """A readable video with fewer frames than requested."""


class NoFrameRate(VideoError):
    """A readable video that reports no frame rate and no timestamps: it cannot be sampled in seconds."""


def frame_indices(
    n_total: int,
    frames: int,
    sampling: str = "even",
    window: float = 0.5,
    rng: np.random.Generator | None = None,
    first: int = 0,
    last: int | None = None,
) -> np.ndarray:
    """Which ``frames`` frames of [first, last] (inclusive) to read.

    "even" spreads them over the whole range; "random_window" spreads them over a window covering
    ``window`` of the range at an offset drawn from ``rng`` (never fewer frames than requested).
    """
    last = n_total - 1 if last is None else min(last, n_total - 1)
    first = max(first, 0)
    span = last - first + 1
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if span < frames:
        raise ValueError(f"need {frames} frames, only {max(span, 0)} in range [{first}, {last}]")
    if sampling == "even":
        lo, hi = first, last
    elif sampling == "random_window":
        if rng is None:
            raise ValueError("sampling='random_window' needs an rng")
        if not 0 < window <= 1:
            raise ValueError(f"window must be in (0, 1], got {window}")
        width = min(span, max(frames, round(window * span)))  # frames covered by the window
        lo = first + int(rng.integers(0, span - width + 1))
        hi = lo + width - 1
    else:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    return np.linspace(lo, hi, frames).round().astype(np.int64)


def _frame_range(n_total: int, fps: float, start: float | None, end: float | None) -> tuple[int, int]:
    """Frames shown in [start, end) seconds; frame k is shown from k / fps."""
    first, last = 0, n_total - 1
    if start is not None:
        first = math.ceil(start * fps - 1e-6)
    if end is not None:
        last = min(last, math.ceil(end * fps - 1e-6) - 1)
    return first, last


def _to_numpy(batch) -> np.ndarray:
    # decord returns its own NDArray, or a torch tensor if someone set decord.bridge to torch
    return batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)


def _resize_u8(u8: np.ndarray, size: FrameSize) -> np.ndarray:
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float()  # t h w c -> t c h w
    x = F.interpolate(x, size=frame_hw(size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()  # t c h w -> t h w c


def _open(path: str, size: FrameSize | None):
    """A decord VideoReader, squashing frames to ``size`` (None: full size)."""
    if size is None:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    h, w = frame_hw(size)
    return decord.VideoReader(path, ctx=decord.cpu(0), width=w, height=h, num_threads=1)


def _get_batch(vr, path: str, idx, size: FrameSize):
    """Frames ``idx`` of an open reader as (T, H, W, 3) uint8."""
    try:
        return _to_numpy(vr.get_batch(idx))
    except DECORDError as e:
        # decord 0.6 cannot scale to some widths (8, 16, 24, 48, 72 among them: its row padding trips
        # "DECORDArrayCopyFromTo: The size must exactly match"); decode full size and resize here.
        if "DECORDArrayCopyFromTo" not in str(e):
            raise
        return _resize_u8(_to_numpy(_open(path, None).get_batch(idx)), size)


def _checked_path(path) -> str:
    if decord is None:
        raise VideoError(path, "decord is not installed (pip install decord)")
    if not Path(path).is_file():
        raise VideoError(path, "file not found")
    return str(path)


def _decode_error(path: str, e: Exception) -> VideoError:
    return VideoError(path, f"cannot decode: {str(e).strip().splitlines()[0][:300]}")


def decode_uint8(
    path: str | os.PathLike,
    frames: int,
    size: FrameSize,
    sampling: str = "even",
    window: float = 0.5,
    rng: np.random.Generator | None = None,
    start: float | None = None,
    end: float | None = None,
) -> np.ndarray:
    """``frames`` frames of a video squashed to ``size`` (a side, or (height, width); the aspect ratio is not kept):
    (T, H, W, 3) uint8."""
    path = _checked_path(path)
    vr = None
    try:
        vr = _open(path, size)
        n_total = len(vr)
        first, last = 0, n_total - 1
        if start is not None or end is not None:
            fps = float(vr.get_avg_fps())
            if not fps > 0:
                raise VideoError(path, f"cannot restrict to start/end: the video reports {fps} fps")
            first, last = _frame_range(n_total, fps, start, end)
        if last - first + 1 < frames:
            where = f" between {start}s and {end}s" if start is not None or end is not None else ""
            raise VideoTooShort(path, f"too short: {max(last - first + 1, 0)} frames{where}, need {frames}")
        idx = frame_indices(n_total, frames, sampling, window, rng, first, last)
        u8 = _get_batch(vr, path, idx, size)
    except VideoError:
        raise
    except (RuntimeError, DECORDError, IndexError) as e:
        raise _decode_error(path, e) from e
    finally:
        vr = None  # close the file now, not at some later garbage collection
    if u8.shape != (frames, *frame_hw(size), 3) or u8.dtype != np.uint8:
        raise VideoError(path, f"decoded {u8.shape} {u8.dtype}, expected {(frames, *frame_hw(size), 3)} uint8")
    return u8


@dataclass
class Timeline:
    """When each frame of a video is shown: ``starts`` (n,) seconds, from the container's timestamps (so a
    variable frame rate is read as it is), and the average rate the video reports."""

    starts: np.ndarray
    avg_fps: float


def read_timeline(path: str | os.PathLike) -> Timeline:
    """Frame timestamps without decoding any frame (decord reads them from the container's index)."""
    path = _checked_path(path)
    vr = None
    try:
        vr = _open(path, 32)
        n = len(vr)
        fps = float(vr.get_avg_fps())
        starts = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64).reshape(n, 2)[:, 0] if n else \
            np.zeros(0)
    except (RuntimeError, DECORDError, IndexError) as e:
        raise _decode_error(path, e) from e
    finally:
        vr = None
    return Timeline(starts, fps)


def decode_frames(path: str | os.PathLike, idx: np.ndarray, size: FrameSize) -> np.ndarray:
    """Source frames ``idx`` (any order, repeats allowed) squashed to ``size``: (len(idx), H, W, 3) uint8."""
    path = _checked_path(path)
    vr = None
    try:
        vr = _open(path, size)
        u8 = _get_batch(vr, path, np.asarray(idx, dtype=np.int64), size)
    except (RuntimeError, DECORDError, IndexError) as e:
        raise _decode_error(path, e) from e
    finally:
        vr = None
    if u8.shape != (len(idx), *frame_hw(size), 3) or u8.dtype != np.uint8:
        raise VideoError(path, f"decoded {u8.shape} {u8.dtype}, expected {(len(idx), *frame_hw(size), 3)} uint8")
    return u8


def to_model(u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (T, 3, H, W) in [-1, 1], the model's input."""
    if isinstance(u8, np.ndarray):
        u8 = torch.from_numpy(np.array(u8))  # a copy: cache memmaps are read-only
    if u8.dtype != torch.uint8 or u8.ndim != 4 or u8.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (T, H, W, 3) array, got {tuple(u8.shape)} {u8.dtype}")
    # one conversion pass straight into a contiguous float tensor, then in-place scaling (bench: "Adopted change")
    x = u8.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)  # t h w c -> t c h w
    return x.div_(127.5).sub_(1.0)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float = 8) -> Path:
    """(T, H, W, 3) uint8 frames as H.264 yuv420p (mpeg4 if this FFmpeg lacks libx264), written atomically
    (t2v.files): the demo's clips and sampled videos alike."""
    import av  # PyAV: only the writers need it

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with atomic_path(path, fsync=False) as tmp, av.open(str(tmp), "w", format="mp4") as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))  # 7.5 fps, 29.97 fps
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1  # x264's output depends on its thread count
        if codec == "libx264":
            # Measured: with its assembly on, this x264 gives different bytes for the same frames in about one
            # run in ten at 64x64 (an asm routine reads uninitialised memory). Plain C is bit-exact, CPU-independent
            # and fast enough for the demo's clips and sampled videos.
            stream.options = {"x264-params": "asm=0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return Path(path)
