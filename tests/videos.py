"""Small real videos for tests, written with PyAV so each frame's content is known exactly."""
from __future__ import annotations

import json
import os
from pathlib import Path

import av
import numpy as np

GRAY_STEP = 8  # frame k of a gray clip has level GRAY_STEP * k


def write_video(path, frames: np.ndarray, fps: int = 8, faststart: bool = False) -> Path:
    """Write (T, H, W, 3) uint8 frames as H.264 yuv420p, lossless (qp 0) so flat colours survive.

    faststart puts the index first: a truncated file then still opens and fails mid-stream (decord's
    DECORDError), while a truncated default file cannot be opened at all (RuntimeError).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"  # decord 0.6 fails to scale yuv444p at some sizes
        stream.options = {"qp": "0"}
        stream.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def gray_frames(n: int, size: int = 32) -> np.ndarray:
    assert GRAY_STEP * (n - 1) <= 255, "too many frames for distinct gray levels"
    return np.stack([np.full((size, size, 3), GRAY_STEP * k, np.uint8) for k in range(n)])  # t h w c


def write_gray_clip(path, n: int = 24, size: int = 32, fps: int = 8) -> Path:
    """A clip whose frame k is solid gray GRAY_STEP * k."""
    return write_video(path, gray_frames(n, size), fps)


def frame_ids(u8: np.ndarray) -> np.ndarray:
    """Which gray-clip frame each decoded frame is (the codec may be off by one or two levels)."""
    return np.round(u8.reshape(len(u8), -1).mean(axis=1) / GRAY_STEP).astype(int)  # t h w c -> t (h w c)


def noise_frames(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Random frames: big enough files that truncation cuts through frame data, not just headers."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_truncated(path, n: int = 16, size: int = 32, keep: float = 0.5, faststart: bool = True) -> Path:
    write_video(path, noise_frames(n, size), faststart=faststart)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return Path(path)


def write_garbage(path, nbytes: int = 4096) -> Path:
    Path(path).write_bytes(np.random.default_rng(1).bytes(nbytes))
    return Path(path)


def write_manifest(path, rows) -> Path:
    """rows: dicts (written as JSON) or raw strings (written as they are)."""
    Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return Path(path)


def touch_newer(path) -> None:
    """Bump a file's mtime so a cache keyed on it sees a change even within the filesystem's time resolution."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
