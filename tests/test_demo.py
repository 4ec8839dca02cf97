import itertools
import json
import time

import decord
import numpy as np
import pytest

from t2v.data.demo import COLORS, MOTIONS, SHAPES, make_demo
from t2v.data.manifest import read_manifest
from t2v.data.video import decode_uint8

COUNTS = dict(n_train=48, n_val=4, n_test=4)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, make_demo(out, seed=0, **COUNTS)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_layout_and_manifests(demo):
    out, paths = demo
    assert paths == {s: out / f"{s}.jsonl" for s in ("train", "val", "test")}
    train, val, test = (rows(paths[s]) for s in ("train", "val", "test"))
    assert [len(train), len(val), len(test)] == [48, 4, 4]
    # MSR-VTT-style names, numbered across the splits
    assert [r["id"] for r in train + val + test] == [f"video{i}" for i in range(56)]
    assert all(r["video"] == f"videos/{r['id']}.mp4" for r in train + val + test)
    assert {(r["color"], r["shape"], r["motion"]) for r in train} == set(itertools.product(COLORS, SHAPES, MOTIONS))
    for r in train + val + test:
        assert 2 <= len(r["captions"]) <= 3
        assert r["captions"][0] == f"a {r['color']} {r['shape']} moving {r['motion']}"
        assert all(r["color"] in c and r["shape"] in c for c in r["captions"])
    clips = read_manifest(paths["train"])  # the loader accepts them, every file exists
    assert len(clips) == 48 and clips[0].video == (out / "videos" / "video0.mp4").resolve()


def test_clip_format(demo):
    out, _ = demo
    vr = decord.VideoReader(str(out / "videos" / "video0.mp4"))
    assert (len(vr), vr[0].shape, vr.get_avg_fps()) == (16, (64, 64, 3), 8.0)


def test_colour_and_motion_of_clips(demo):
    out, paths = demo
    names = list(COLORS)
    for r in rows(paths["train"])[:12] + rows(paths["test"]):
        u8 = decode_uint8(out / r["video"], 16, 64).astype(float)
        fg = u8.max(axis=-1) > 80  # (T, H, W): the shape, not the black background
        assert 0.05 < fg.mean() < 0.3, r  # a large shape (a triangle covers ~7%), inside the frame
        mean = u8[fg].mean(axis=0)
        nearest = names[int(np.argmin([np.abs(mean - COLORS[c]).sum() for c in names]))]
        assert nearest == r["color"] and np.abs(mean - COLORS[r["color"]]).max() < 25, (r, mean)
        ys, xs = np.nonzero(fg[0])
        ye, xe = np.nonzero(fg[-1])
        dx, dy = xe.mean() - xs.mean(), ye.mean() - ys.mean()
        moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}[r["motion"]]
        assert moved > 15 and abs(dy if r["motion"] in ("left", "right") else dx) < 3, (r, dx, dy)


def test_deterministic_and_idempotent(demo, tmp_path):
    out, paths = demo
    again = make_demo(tmp_path / "a", seed=0, **COUNTS)
    for s in paths:
        assert again[s].read_text() == paths[s].read_text()
    names = sorted(p.name for p in (out / "videos").iterdir())
    assert len(names) == 56
    for name in names:  # every clip, byte for byte (x264 with its asm on was not, one run in ten)
        assert (tmp_path / "a" / "videos" / name).read_bytes() == (out / "videos" / name).read_bytes(), name

    small = dict(n_train=4, n_val=1, n_test=1)
    other = make_demo(tmp_path / "b", seed=1, **small)
    assert other["train"].read_text() != make_demo(tmp_path / "d", seed=0, **small)["train"].read_text()

    # a second call with the same settings writes nothing; other settings regenerate
    stamp = (tmp_path / "a" / "videos" / "video0.mp4").stat().st_mtime_ns
    time.sleep(0.01)
    make_demo(tmp_path / "a", seed=0, **COUNTS)
    assert (tmp_path / "a" / "videos" / "video0.mp4").stat().st_mtime_ns == stamp
    make_demo(tmp_path / "a", seed=1, **small)
    assert (tmp_path / "a" / "train.jsonl").read_text() == other["train"].read_text()
    assert json.loads((tmp_path / "a" / "demo.json").read_text()) == {"version": 1, "seed": 1, **small}


def test_demo_cli(tmp_path, capsys, monkeypatch):
    from t2v.data.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--seed", "2", "--n-train", "3", "--n-val", "1", "--n-test", "2"]) == 0
    assert "train: demo/data/train.jsonl" in capsys.readouterr().out  # the default folder
    assert len((tmp_path / "demo" / "data" / "train.jsonl").read_text().splitlines()) == 3
    assert len(list((tmp_path / "demo" / "data" / "videos").glob("video*.mp4"))) == 6
    assert json.loads((tmp_path / "demo" / "data" / "demo.json").read_text())["seed"] == 2
