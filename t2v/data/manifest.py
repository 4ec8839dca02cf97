"""Manifests: JSON lines, one clip per line, checked before a job spends GPU hours on them.

A line names a video (``video``, ``video_path``, ``path`` or ``clip``) and its captions (``caption``,
``text`` or a list ``captions``), optionally an ``id``/``video_id`` and ``start``/``end`` in seconds.
Every problem is reported as ``manifest:line`` so the user can open the file at the bad line.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger("t2v.data")

VIDEO_KEYS = ("video", "video_path", "path", "clip")
CAPTION_KEYS = ("caption", "text")  # single string; "captions" takes a list
ID_KEYS = ("id", "video_id")
KINDS = (
    "bad_json",
    "missing_video_key",
    "missing_caption",
    "empty_caption",
    "bad_time",
    "missing_file",
    "unreadable_video",
    "too_short",
    "no_frame_rate",
    "repeats_frames",
)
MAX_LISTED = 20  # problems listed in an error message; a broken 10k-line manifest should not flood the log


class ManifestError(ValueError):
    pass


@dataclass
class Clip:
    line: int  # 1-based line in the manifest, so later errors can still point at it
    video: Path  # resolved
    captions: list[str]
    id: str
    start: float | None = None  # seconds; limits decoding to [start, end)
    end: float | None = None


@dataclass
class Problem:
    line: int
    kind: str  # one of KINDS
    message: str


def _root(path: Path, video_root: str | os.PathLike) -> Path:
    return Path(video_root).expanduser().resolve() if str(video_root) else path.resolve().parent


def normalize_caption(caption: str) -> str:
    """The one form of a caption that training, `text embed` and the caches key on: surrounding whitespace cut."""
    return caption.strip()


def row_captions(row: dict) -> list[str]:
    """A manifest row's captions as training sees them ([] if the row has none or they are malformed): the one
    reader `python -m t2v.text embed` shares with read_manifest, so both agree on every caption."""
    caps, problem = _captions(row)
    return [] if problem else caps


def _captions(row: dict) -> tuple[list[str] | None, Problem | None]:
    """The line's captions, or the problem with them (line number filled in by the caller)."""
    if "captions" in row:
        caps = row["captions"]
        if isinstance(caps, str):
            caps = [caps]
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            got = json.dumps(caps)[:80]
            return None, Problem(0, "missing_caption", f'"captions" must be a list of strings, got {got}')
    else:
        key = next((k for k in CAPTION_KEYS if k in row), None)
        if key is None:
            expected = ", ".join(CAPTION_KEYS)
            return None, Problem(0, "missing_caption", f"no caption: expected one of {expected} or captions")
        if not isinstance(row[key], str):
            return None, Problem(0, "missing_caption", f'"{key}" must be a string, got {json.dumps(row[key])[:80]}')
        caps = [row[key]]
    caps = [normalize_caption(c) for c in caps]
    if not caps or not all(caps):
        return None, Problem(0, "empty_caption", "empty caption" if len(caps) <= 1 else f"empty caption in {caps}")
    return caps, None


def _time(row: dict, key: str) -> float | None:
    v = row.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f'"{key}" must be a number of seconds, got {json.dumps(v)[:40]}')
    t = float(v)
    if not math.isfinite(t) or t < 0:
        raise ValueError(f'"{key}" must be a non-negative number of seconds, got {v!r}')
    return t


def _parse_line(raw: bytes, lineno: int, root: Path, check_files: bool) -> Clip | Problem | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Problem(lineno, "bad_json", f"not UTF-8: {e}")
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return Problem(lineno, "bad_json", f"not valid JSON: {e.msg} (column {e.colno})")
    if not isinstance(row, dict):
        return Problem(lineno, "bad_json", f"expected a JSON object, got {type(row).__name__}")

    key = next((k for k in VIDEO_KEYS if k in row), None)
    if key is None or not isinstance(row[key], str) or not row[key].strip():
        what = "no video key" if key is None else f'"{key}" is not a non-empty string'
        return Problem(lineno, "missing_video_key", f"{what}: expected one of {', '.join(VIDEO_KEYS)}")
    captions, problem = _captions(row)
    if problem:
        problem.line = lineno
        return problem
    try:
        start, end = _time(row, "start"), _time(row, "end")
    except ValueError as e:
        return Problem(lineno, "bad_time", str(e))
    if start is not None and end is not None and end <= start:
        return Problem(lineno, "bad_time", f"end ({end}) must be after start ({start})")

    video = Path(row[key].strip()).expanduser()
    video = (video if video.is_absolute() else root / video).resolve()
    if check_files and not video.is_file():
        return Problem(lineno, "missing_file", f"video not found: {video}")
    clip_id = next((str(row[k]) for k in ID_KEYS if row.get(k) not in (None, "")), video.stem)
    return Clip(line=lineno, video=video, captions=captions, id=clip_id, start=start, end=end)


def _parse(path: Path, video_root, check_files: bool) -> tuple[list[Clip], list[Problem]]:
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    clips, problems = [], []
    root = _root(path, video_root)
    # bytes, not text: one badly encoded line must be reported with its number, not fail the whole read
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            out = _parse_line(raw, lineno, root, check_files)
            if isinstance(out, Clip):
                clips.append(out)
            elif isinstance(out, Problem):
                problems.append(out)
    return clips, problems


def format_problems(path: str | os.PathLike, problems: Sequence[Problem], limit: int = MAX_LISTED) -> str:
    lines = [f"  {path}:{p.line}: {p.kind}: {p.message}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def read_manifest(
    path: str | os.PathLike,
    video_root: str | os.PathLike = "",
    skip_bad: bool = False,
    check_files: bool = True,
) -> list[Clip]:
    """Clips of a manifest after structural checks (JSON, keys, captions, files exist).

    Videos are not opened here (that takes minutes on MSR-VTT); ``check_manifest`` does that,
    and the training loop skips clips that turn out to be corrupt.
    """
    path = Path(path)
    clips, problems = _parse(path, video_root, check_files)
    n_lines = len(clips) + len(problems)
    if problems and not skip_bad:
        raise ManifestError(
            f"{path}: {len(problems)} bad line(s) out of {n_lines}:\n{format_problems(path, problems)}\n"
            f"Fix them, or train on the good lines with data.skip_bad_lines=true. "
            f"To list every problem, including unreadable videos: python -m t2v.data check {path}"
        )
    if problems:
        log.warning(
            "%s: skipped %d bad line(s) out of %d (data.skip_bad_lines=true); first: %s:%d: %s: %s",
            path, len(problems), n_lines, path, problems[0].line, problems[0].kind, problems[0].message,
        )
    if not clips:
        why = f"{len(problems)} bad lines" if problems else "empty file"
        raise ManifestError(f"{path}: no usable clips ({why})")
    return clips


def check_manifest(
    path: str | os.PathLike, video_root: str | os.PathLike = "", frames: int = 8, progress: bool = False
) -> list[Problem]:
    """Every problem in a manifest: the structural ones, plus videos that cannot be decoded or are too short.

    Each video is really decoded (``frames`` frames at a small size), because a file cut mid-stream
    opens fine and only fails when its frames are read.
    """
    from t2v.data.video import VideoError, VideoTooShort, decode_uint8
    from t2v.progress import progress as progress_counter

    path = Path(path)
    clips, problems = _parse(path, video_root, check_files=True)
    for clip in progress_counter(clips, desc="checking videos", unit="clip", enabled=progress):
        try:
            decode_uint8(clip.video, frames, 32, start=clip.start, end=clip.end)
        except VideoTooShort as e:
            problems.append(Problem(clip.line, "too_short", str(e)))
        except VideoError as e:
            problems.append(Problem(clip.line, "unreadable_video", str(e)))
    return sorted(problems, key=lambda p: p.line)


def pick_caption(captions: Sequence[str], seed: int, draw: int) -> str:
    """One caption, fixed by (seed, draw): a resumed run sees the same caption for the same sample."""
    if not captions:
        raise ValueError("no captions to pick from")
    if len(captions) == 1:
        return captions[0]
    rng = np.random.default_rng([seed, draw])
    return captions[int(rng.integers(len(captions)))]
