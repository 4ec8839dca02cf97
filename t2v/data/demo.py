"""A synthetic MSR-VTT-like dataset: coloured shapes moving on black, with captions that name them.

It lets the whole pipeline (and a model that visibly learns colour, shape and motion) run offline in
minutes on a CPU. Everything follows from the seed: the same seed gives byte-identical clips.

Two kinds: ``shapes`` (the demo: 16 frames, one continuous 2 s shot) and ``shots``, which has what real video has
and the demo hides: clips of ~6 s at 24 fps cut into four shots, the shape moving slowly (a third of the frame per
second) and starting each shot somewhere else. Frames spread over such a clip ("even") jump between shots; a
window at 8 fps inside one shot shows the motion the caption names.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np

from t2v.data.video import write_mp4
from t2v.files import write_text

COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (235, 220, 40)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down")
FRAMES, SIZE, FPS = 16, 64, 8
SHOTS_FPS, SHOTS_PER_CLIP, SHOT_SECONDS, SPEED = 24, 4, (1.3, 1.7), 0.34  # "shots": speed in frames widths / s
KINDS = ("shapes", "shots")
VERSION = 1  # bump when the clips or captions change, so old demo folders are regenerated
_DIRECTION = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards
_PHRASE = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}


def captions_for(color: str, shape: str, motion: str) -> list[str]:
    return [
        f"a {color} {shape} moving {motion}",
        f"{color} {shape} moves {_PHRASE[motion]}",
        f"a video of a {color} {shape} moving {motion}",
    ]


def _mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean (H, W) mask of a shape centred at (cx, cy) with half-size r, in pixels."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    # upright triangle: apex at the top, base at the bottom of the box; |dx| shrinks towards the apex
    return (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)


def render(color: str, shape: str, motion: str, rng: np.random.Generator) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of one clip."""
    r = SIZE * 0.2 * rng.uniform(0.9, 1.1)  # ~40% of the frame wide, so its colour dominates
    travel = SIZE * 0.4  # how far the centre moves over the clip
    dx, dy = _DIRECTION[motion]
    # start so the whole path stays inside the frame; jitter the cross-axis position for variety
    along = SIZE / 2 - travel / 2
    across = SIZE / 2 + rng.uniform(-0.1, 0.1) * SIZE
    x0 = (along if dx > 0 else SIZE - along) if dx else across
    y0 = (along if dy > 0 else SIZE - along) if dy else across
    video = np.zeros((FRAMES, SIZE, SIZE, 3), np.uint8)
    for t in range(FRAMES):
        f = t / (FRAMES - 1)
        video[t][_mask(shape, x0 + dx * travel * f, y0 + dy * travel * f, r)] = COLORS[color]
    return video


def render_shots(color: str, shape: str, motion: str, rng: np.random.Generator) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of one "shots" clip: SHOTS_PER_CLIP shots at SHOTS_FPS, each the same slow move in
    ``motion`` shown again from its beginning (as edits of one action are: replays, several takes), at another
    position across it. Frames from inside one shot show the motion; frames spread over the clip see it jump back
    at every cut."""
    r = SIZE * 0.2 * rng.uniform(0.9, 1.1)
    dx, dy = _DIRECTION[motion]
    shots = []
    for _ in range(SHOTS_PER_CLIP):
        n = int(round(rng.uniform(*SHOT_SECONDS) * SHOTS_FPS))
        along = SIZE * 0.25 + rng.uniform(0, 0.03) * SIZE  # from the start of the path (its centre ends by 0.86)
        across = SIZE / 2 + rng.uniform(-0.15, 0.15) * SIZE
        x0 = (along if dx > 0 else SIZE - along) if dx else across
        y0 = (along if dy > 0 else SIZE - along) if dy else across
        video = np.zeros((n, SIZE, SIZE, 3), np.uint8)
        for t in range(n):
            step = SPEED * SIZE * t / SHOTS_FPS
            video[t][_mask(shape, x0 + dx * step, y0 + dy * step, r)] = COLORS[color]
        shots.append(video)
    return np.concatenate(shots)


def _combos(n: int, rng: np.random.Generator, cover: bool) -> list[tuple[str, str, str]]:
    combos = list(itertools.product(COLORS, SHAPES, MOTIONS))
    if cover:  # every combination once per 48 clips, in a seeded order
        order = [combos[i] for i in rng.permutation(len(combos))]
        return [order[i % len(order)] for i in range(n)]
    return [combos[i] for i in rng.integers(0, len(combos), n)]


def make_demo(
    out_dir: str | os.PathLike = "demo/data", n_train: int = 96, n_val: int = 16, n_test: int = 16, seed: int = 0,
    kind: str = "shapes",
) -> dict[str, Path]:
    """Write ``videos/videoN.mp4`` and train/val/test.jsonl under out_dir; returns the manifest paths.

    Train covers every colour x shape x motion combination when n_train >= 48. Does nothing when the
    folder already holds a complete demo made with the same seed, counts and kind.
    """
    if kind not in KINDS:
        raise ValueError(f"demo kind must be one of {', '.join(KINDS)}, got {kind!r}")
    out = Path(out_dir)
    manifests = {split: out / f"{split}.jsonl" for split in ("train", "val", "test")}
    info = {"version": VERSION, "seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test}
    if kind != "shapes":  # the demo's demo.json stays as it was: existing demo folders are not rebuilt
        info["kind"] = kind
    draw, fps = (render, FPS) if kind == "shapes" else (render_shots, SHOTS_FPS)
    info_path = out / "demo.json"
    if info_path.is_file() and all(p.is_file() for p in manifests.values()):
        try:
            if json.loads(info_path.read_text()) == info:
                return manifests
        except ValueError:
            pass  # a damaged demo.json: regenerate
    (out / "videos").mkdir(parents=True, exist_ok=True)
    info_path.unlink(missing_ok=True)  # written last: its presence means the demo is complete

    rng = np.random.default_rng(seed)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    number = 0  # global numbering like MSR-VTT (train first, then val, then test)
    for split, n in counts.items():
        lines = []
        for color, shape, motion in _combos(n, rng, cover=split == "train"):
            vid = f"video{number}"
            number += 1
            write_mp4(out / "videos" / f"{vid}.mp4", draw(color, shape, motion, rng), fps)
            row = {"video": f"videos/{vid}.mp4", "captions": captions_for(color, shape, motion), "id": vid,
                   "color": color, "shape": shape, "motion": motion}
            lines.append(json.dumps(row) + "\n")
        write_text(manifests[split], "".join(lines))
    info_path.write_text(json.dumps(info) + "\n")
    return manifests
