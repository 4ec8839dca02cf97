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


SHOT_COLOURS = ((255, 255, 0), (0, 0, 0))  # right half of even and odd shots: every cut changes it completely


def shot_frames(shot_lengths, width: int = 70, height: int = 46) -> np.ndarray:
    """Frames of a multi-shot clip whose content names them: the left half is gray 3 x the frame's index (so at
    most 86 frames), the right half flips between yellow and black at every cut. Odd sizes by default, as real
    sources have."""
    n = sum(shot_lengths)
    assert 3 * (n - 1) <= 255, "too many frames to number by their gray level"
    frames = np.zeros((n, height, width, 3), np.uint8)
    k = 0
    for s, length in enumerate(shot_lengths):
        for _ in range(length):
            frames[k, :, : width // 2] = 3 * k  # 3 apart: the codec's +-1 never mistakes one for the next
            frames[k, :, width // 2:] = SHOT_COLOURS[s % 2]
            k += 1
    return frames


def frame_numbers(u8: np.ndarray) -> np.ndarray:
    """The source frame index of each decoded frame of a shot_frames clip (its left quarter: clear of the edge)."""
    w = u8.shape[2]
    return np.round(u8[:, :, : w // 4].reshape(len(u8), -1).mean(axis=1) / 3).astype(int)  # t h w c -> t (h w c)


def write_timed_video(path, frames: np.ndarray, times_s, audio: bool = False) -> Path:
    """Frames shown from the given times (seconds): a variable frame rate when they are uneven, 29.97 fps when
    they are k * 1001 / 30000. Lossless H.264; optionally with an AAC audio track, as downloaded clips have."""
    import fractions

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tb = fractions.Fraction(1, 30000)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options, stream.thread_count = {"qp": "0"}, 1
        stream.time_base = stream.codec_context.time_base = tb
        sound = out.add_stream("aac", rate=16000) if audio else None
        for frame, t in zip(frames, times_s):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts, vf.time_base = int(round(t / tb)), tb
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if sound is not None:
            samples = int(16000 * (times_s[-1] + 0.1))
            tone = (0.1 * np.sin(np.arange(samples) * 2 * np.pi * 440 / 16000)).astype(np.float32)[None]  # 1 s
            for s in range(0, samples, 1024):
                af = av.AudioFrame.from_ndarray(tone[:, s:s + 1024], format="flt", layout="mono")
                af.sample_rate, af.pts = 16000, s
                for packet in sound.encode(af):
                    out.mux(packet)
            for packet in sound.encode():
                out.mux(packet)
    return path
