"""Judges of the demo's clips: which colour, shape and motion a (sampled or real) clip shows.

They read pixels only, at any FRAMES x SIZE, and know the demo's geometry (t2v.data.demo): one shape of one
palette colour on black, moving straight along one axis. On the real demo clips they score >= 95% on each of
colour, shape and motion (tests/test_demo_judge.py), so a model's score is a measure of the model, not of
the judge.

- colour: the palette hue most saturated, bright pixels are nearest to (black and grey pixels do not vote);
- motion: where the shape's brightness-weighted centroid goes over the clip (a least-squares slope over all
  frames, so one bad frame does not decide it); under 20% of the frame width in all (half of what the demo's
  shapes travel) is "still";
- shape: each frame is compared with a circle, a square and an upright triangle of the frame's own area and
  centroid, rendered at 4x and area-averaged down like the data loader's resize; the best soft IoU summed
  over frames wins. Filling ratios of bounding boxes alone cannot tell shapes apart at 16x16;
- background: the mean brightness (max of R, G, B in [0, 1]) of the pixels at least one pixel away from the
  fitted shape: 0 on the real clips, and what a speckled sample's black should be measured by.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from t2v.data.demo import COLORS, MOTIONS, SHAPES

MIN_SATURATION, MIN_VALUE = 0.35, 0.3  # below either, a pixel has no meaningful hue
# of the frame width: less than this over the clip is "still". The demo's shapes travel 0.4 of it, so a sample
# must cover at least half the distance; a blob that drifts a pixel or two is not "moving left".
MIN_TRAVEL = 0.2
SUPERSAMPLE = 4


def _hsv(video: np.ndarray) -> np.ndarray:
    from matplotlib.colors import rgb_to_hsv

    return rgb_to_hsv(video.astype(np.float32) / 255.0)  # t h w 3


@functools.lru_cache(maxsize=1)
def _palette_hues() -> np.ndarray:
    from matplotlib.colors import rgb_to_hsv

    return rgb_to_hsv(np.array(list(COLORS.values()), dtype=np.float32) / 255.0)[:, 0]  # k


def _nearest_palette(hue: np.ndarray) -> np.ndarray:
    """Index into COLORS of the palette hue nearest to each hue (on the circle)."""
    d = np.abs(hue[..., None] - _palette_hues())  # ... k
    return np.minimum(d, 1.0 - d).argmin(axis=-1)


def dominant_color(video: np.ndarray, min_saturation: float = MIN_SATURATION, min_value: float = MIN_VALUE) -> str:
    """Name of the demo colour whose hue most of a clip's coloured pixels have ("none" if nothing is coloured).

    video: (T, H, W, 3) uint8. Each saturated, bright pixel votes for the palette colour nearest in hue, so a
    noisy sample is judged by its colour, not by its speckle.
    """
    return _dominant(_hsv(video), min_saturation, min_value)


def _dominant(hsv: np.ndarray, min_saturation: float = MIN_SATURATION, min_value: float = MIN_VALUE) -> str:
    hsv = hsv.reshape(-1, 3)  # (t h w) 3
    hue = hsv[(hsv[:, 1] >= min_saturation) & (hsv[:, 2] >= min_value), 0]
    if len(hue) == 0:
        return "none"
    return list(COLORS)[int(np.bincount(_nearest_palette(hue), minlength=len(COLORS)).argmax())]


def foreground(video: np.ndarray, color: str) -> np.ndarray:
    """(T, H, W) soft map in [0, 1] of the pixels of ``color``: 1 inside the shape, fractional at its
    antialiased edge, 0 on the background and on pixels of other hues."""
    return _foreground(_hsv(video), color)


def _foreground(hsv: np.ndarray, color: str) -> np.ndarray:
    ours = (_nearest_palette(hsv[..., 0]) == list(COLORS).index(color)) & (hsv[..., 1] >= MIN_SATURATION)
    full = max(COLORS[color]) / 255.0  # the value of a pixel fully inside the shape
    return np.where(ours, np.clip(hsv[..., 2] / full, 0.0, 1.0), 0.0)


def shape_mask(shape: str, cx: float, cy: float, area: float, size: int) -> np.ndarray:
    """(size, size) fraction of each pixel covered by ``shape`` of ``area`` pixels with centroid (cx, cy):
    the demo's own geometry (t2v.data.demo._mask), placed by centroid instead of box centre."""
    k = SUPERSAMPLE
    y, x = (np.mgrid[0 : size * k, 0 : size * k] + 0.5) / k
    if shape == "circle":
        r = np.sqrt(area / np.pi)
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        r = np.sqrt(area) / 2
        m = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif shape == "triangle":
        r = np.sqrt(area / 2)  # apex at top, base 2r at the bottom, height 2r: area 2r², centroid r/3 below centre
        top = cy - r / 3 - r
        m = (y >= top) & (y <= top + 2 * r) & (np.abs(x - cx) <= (y - top) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")
    return m.reshape(size, k, size, k).mean(axis=(1, 3))  # area-average back to size x size


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-9))


@dataclass
class Verdict:
    color: str
    shape: str
    motion: str
    background: float  # mean brightness in [0, 1] away from the shape
    travel: float = 0.0  # how far the centroid moves over the clip, in frame widths (the demo's shapes: 0.4)
    backstep: float = 0.0  # the largest frame-to-frame step against that motion, in frame widths (a jump back)


def judge(video: np.ndarray) -> Verdict:
    """Colour, shape, motion and background brightness of one (T, H, W, 3) uint8 clip."""
    t_len, h, w, _ = video.shape
    hsv = _hsv(video)  # t h w 3, once for the colour vote and the foreground
    value = hsv[..., 2]  # t h w: max(R, G, B) in [0, 1]
    color = _dominant(hsv)
    if color == "none":
        return Verdict("none", "none", "none", float(value.mean()))
    fg = _foreground(hsv, color)  # t h w
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    area = fg.sum(axis=(1, 2))  # t
    seen = area >= 1.0  # frames where the shape covers at least one pixel's worth
    scores = dict.fromkeys(SHAPES, 0.0)
    near = np.zeros((t_len, h, w), bool)
    centres = []
    for i in np.flatnonzero(seen):
        cx, cy = (fg[i] * xs).sum() / area[i], (fg[i] * ys).sum() / area[i]
        centres.append((i, cx, cy))
        fits = {s: shape_mask(s, cx, cy, area[i], h) for s in SHAPES}
        ious = {s: _soft_iou(fg[i], m) for s, m in fits.items()}
        for s, iou in ious.items():
            scores[s] += iou
        near[i] = _dilate(fits[max(ious, key=ious.get)] > 0)
    shape = max(scores, key=scores.get) if centres else "none"
    motion, travel = _direction(centres, w) if len(centres) >= 2 else ("none", 0.0)
    # frames without a shape count whole: their brightness is all background
    background = float(value[~near].mean()) if (~near).any() else 0.0
    return Verdict(color, shape, motion, background, travel, _backstep(centres, motion, w))


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a (H, W) mask by one pixel in the 8 directions."""
    p = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)


def _direction(centres: list[tuple[int, float, float]], width: int) -> tuple[str, float]:
    """("left"/"right"/"up"/"down", travel in frame widths) from the least-squares slope of the centroid over
    frames; "still" if it moves less than MIN_TRAVEL of the frame width in all."""
    t, cx, cy = (np.array(c, dtype=np.float64) for c in zip(*centres))
    span = t.max() - t.min()
    tc = t - t.mean()
    dx, dy = ((tc * v).sum() / (tc * tc).sum() * span for v in (cx, cy))  # travel over the seen frames
    travel = float(max(abs(dx), abs(dy)) / width)
    if travel < MIN_TRAVEL:
        return "still", travel
    if abs(dx) >= abs(dy):
        return ("right" if dx > 0 else "left"), travel
    return ("down" if dy > 0 else "up"), travel  # y grows downwards


# A step back of more than this (frame widths) between two frames is a jump, not noise: the demo's shapes move 0.05
# per frame at 8 frames, so a smooth move never steps back; frames spread over a clip with cuts jump back ~0.3.
STEADY_TOLERANCE = 0.03
_AXIS = {"right": (1, 1), "left": (1, -1), "down": (2, 1), "up": (2, -1)}  # (centre field, sign along it)


def _backstep(centres: list[tuple[int, float, float]], motion: str, width: int) -> float:
    """The largest step between consecutive seen frames against ``motion``, in frame widths (0: none)."""
    if motion not in _AXIS or len(centres) < 2:
        return 0.0
    field, sign = _AXIS[motion]
    along = np.array([c[field] for c in centres]) * sign
    return float(max(0.0, -np.diff(along).min()) / width)


def score(verdicts: list[Verdict], wanted: list[tuple[str, str, str]]) -> dict:
    """Accuracies of colour, shape, motion (and all three at once) against (colour, shape, motion) triples, the
    mean background brightness, "steady": the motion is right and never jumps back (STEADY_TOLERANCE), and
    "moving": the shape travels (any direction, >= MIN_TRAVEL), which tells a model that draws still shapes from one
    that moves them but does not take the direction from the caption (moving high, motion near chance)."""
    n = len(wanted)
    hits = {k: [getattr(v, k) == w[i] for v, w in zip(verdicts, wanted)] for i, k in enumerate(("color", "shape", "motion"))}
    return {
        "color": sum(hits["color"]) / n,
        "shape": sum(hits["shape"]) / n,
        "motion": sum(hits["motion"]) / n,
        "all": sum(all(h) for h in zip(*hits.values())) / n,
        "steady": sum(m and v.backstep <= STEADY_TOLERANCE for m, v in zip(hits["motion"], verdicts)) / n,
        "moving": sum(v.motion in MOTIONS for v in verdicts) / n,
        "background": float(np.mean([v.background for v in verdicts])),
        "num": n,
    }


__all__ = ["COLORS", "MOTIONS", "SHAPES", "Verdict", "dominant_color", "foreground", "judge", "score", "shape_mask"]
