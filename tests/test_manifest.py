import json
import logging
import subprocess
import sys

import pytest
from videos import write_garbage, write_gray_clip, write_manifest, write_truncated

from t2v.data.manifest import Clip, ManifestError, check_manifest, pick_caption, read_manifest


@pytest.fixture
def clip_file(tmp_path):
    # structural checks only need the file to exist; a real clip keeps it honest for check_manifest
    return write_gray_clip(tmp_path / "videos" / "a.mp4", n=12)


@pytest.mark.parametrize("video_key", ["video", "video_path", "path", "clip"])
@pytest.mark.parametrize(
    "caption_field, expected",
    [
        ({"caption": " a dog runs "}, ["a dog runs"]),
        ({"text": "a dog runs"}, ["a dog runs"]),
        ({"captions": ["a dog runs", "dog running"]}, ["a dog runs", "dog running"]),
    ],
)
def test_key_variants(tmp_path, clip_file, video_key, caption_field, expected):
    m = write_manifest(tmp_path / "m.jsonl", [{video_key: "videos/a.mp4", **caption_field}])
    [clip] = read_manifest(m)
    assert clip == Clip(line=1, video=clip_file.resolve(), captions=expected, id="a")


def test_ids_times_blank_lines_and_absolute_paths(tmp_path, clip_file):
    m = write_manifest(
        tmp_path / "m.jsonl",
        [
            "",
            {"video": str(clip_file), "caption": "x", "id": "clip7", "start": 1, "end": 2.5},
            "   ",
            {"video": "videos/a.mp4", "caption": "y", "video_id": "video3"},
        ],
    )
    a, b = read_manifest(m)
    assert (a.line, a.id, a.start, a.end, a.video) == (2, "clip7", 1.0, 2.5, clip_file.resolve())
    assert (b.line, b.id, b.start, b.end) == (4, "video3", None, None)


def test_relative_paths_resolve_against_video_root(tmp_path, clip_file, monkeypatch):
    (tmp_path / "manifests").mkdir()
    m = write_manifest(tmp_path / "manifests" / "m.jsonl", [{"video": "a.mp4", "caption": "x"}])
    # "" = the manifest's folder, where a.mp4 is not
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: missing_file"):
        read_manifest(m)
    assert read_manifest(m, video_root=tmp_path / "videos")[0].video == clip_file.resolve()
    monkeypatch.chdir(tmp_path)  # a relative video_root is relative to the working directory
    assert read_manifest(m, video_root="videos")[0].video == clip_file.resolve()
    assert read_manifest(m, check_files=False)[0].video == (tmp_path / "manifests" / "a.mp4").resolve()


def bad_rows():
    """(row, kind) for every structural problem; rows are written one per line, in this order."""
    return [
        ('{"video": "videos/a.mp4", "caption": ', "bad_json"),
        ('["videos/a.mp4", "a dog"]', "bad_json"),
        ({"caption": "a dog"}, "missing_video_key"),
        ({"video": "", "caption": "a dog"}, "missing_video_key"),
        ({"video": "videos/a.mp4"}, "missing_caption"),
        ({"video": "videos/a.mp4", "captions": "a dog".split() + [3]}, "missing_caption"),
        ({"video": "videos/a.mp4", "caption": "  "}, "empty_caption"),
        ({"video": "videos/a.mp4", "captions": []}, "empty_caption"),
        ({"video": "videos/a.mp4", "caption": "a dog", "start": 3, "end": 1}, "bad_time"),
        ({"video": "videos/nope.mp4", "caption": "a dog"}, "missing_file"),
    ]


def test_bad_lines_raise_with_every_location(tmp_path, clip_file):
    rows = [{"video": "videos/a.mp4", "caption": "ok"}] + [r for r, _ in bad_rows()]
    m = write_manifest(tmp_path / "m.jsonl", rows)
    with pytest.raises(ManifestError) as e:
        read_manifest(m)
    msg = str(e.value)
    for line, (_, kind) in enumerate(bad_rows(), start=2):
        assert f"{m}:{line}: {kind}:" in msg
    assert f"{m}:1:" not in msg
    assert "data.skip_bad_lines=true" in msg and f"python -m t2v.data check {m}" in msg


def test_error_list_is_capped(tmp_path):
    m = write_manifest(tmp_path / "m.jsonl", ["not json"] * 25)
    with pytest.raises(ManifestError) as e:
        read_manifest(m)
    assert f"{m}:20: bad_json" in str(e.value) and f"{m}:21:" not in str(e.value)
    assert "and 5 more" in str(e.value)


def test_skip_bad_lines_warns_and_keeps_good_ones(tmp_path, clip_file, caplog):
    rows = ["{oops", {"video": "videos/a.mp4", "caption": "ok"}, {"video": "videos/a.mp4"}]
    m = write_manifest(tmp_path / "m.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="t2v.data"):
        clips = read_manifest(m, skip_bad=True)
    assert [c.line for c in clips] == [2]
    assert any("skipped 2 bad line(s) out of 3" in r.getMessage() for r in caplog.records)


def test_missing_or_empty_manifest(tmp_path):
    with pytest.raises(ManifestError, match=str(tmp_path / "nope.jsonl")):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(ManifestError, match="no usable clips"):
        read_manifest(write_manifest(tmp_path / "empty.jsonl", ["", ""]))
    with pytest.raises(ManifestError, match="no usable clips"):
        read_manifest(write_manifest(tmp_path / "bad.jsonl", ["{"]), skip_bad=True)


@pytest.fixture
def bad_manifest(tmp_path, clip_file):
    """A manifest with one line of every problem kind; returns (path, {line: kind})."""
    write_garbage(tmp_path / "videos" / "garbage.mp4")
    write_truncated(tmp_path / "videos" / "cut.mp4", faststart=True)
    write_gray_clip(tmp_path / "videos" / "short.mp4", n=4)
    rows = [({"video": "videos/a.mp4", "caption": "fine"}, None)] + bad_rows() + [
        ({"video": "videos/garbage.mp4", "caption": "x"}, "unreadable_video"),
        ({"video": "videos/cut.mp4", "caption": "x"}, "unreadable_video"),
        ({"video": "videos/short.mp4", "caption": "x"}, "too_short"),
    ]
    m = write_manifest(tmp_path / "m.jsonl", [r for r, _ in rows])
    return m, {line: kind for line, (_, kind) in enumerate(rows, start=1) if kind}


def test_check_manifest_reports_every_kind_at_its_line(bad_manifest):
    m, expected = bad_manifest
    problems = check_manifest(m, frames=8)
    assert {p.line: p.kind for p in problems} == expected
    assert len(problems) == len(expected)
    by_line = {p.line: p.message for p in problems}
    assert "garbage.mp4" in by_line[max(expected) - 2] and "4 frames" in by_line[max(expected)]
    # with 4 frames wanted the short clip is fine
    assert {p.line for p in check_manifest(m, frames=4)} == set(expected) - {max(expected)}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "t2v.data", *args], capture_output=True, text=True, timeout=120)


def test_check_cli_table_and_exit_status(bad_manifest, tmp_path):
    m, expected = bad_manifest
    r = run_cli("check", str(m), "--frames", "8")
    assert r.returncode == 1, r.stderr
    table = [line.split(" | ") for line in r.stdout.splitlines() if line.count(" | ") == 2]
    assert [c.strip() for c in table[0]] == ["line", "kind", "message"]
    assert {int(row[0]): row[1].strip() for row in table[1:]} == expected
    assert f"{len(expected)} bad line(s) out of {len(expected) + 1}" in r.stdout



def test_check_cli_clean_and_missing_manifest(tmp_path, clip_file, capsys):
    from t2v.data.__main__ import main

    good = write_manifest(tmp_path / "good.jsonl", [json.dumps({"video": "videos/a.mp4", "caption": "fine"})])
    assert main(["check", str(good)]) == 0
    assert "1 line(s), no problems" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "missing.jsonl")]) == 2
    assert "manifest not found" in capsys.readouterr().err


def test_pick_caption_is_deterministic_and_uses_every_caption():
    caps = ["a", "b", "c"]
    picks = [pick_caption(caps, seed=0, draw=d) for d in range(60)]
    assert picks == [pick_caption(caps, seed=0, draw=d) for d in range(60)]
    assert set(picks) == set(caps)
    assert picks != [pick_caption(caps, seed=1, draw=d) for d in range(60)]
    assert pick_caption(["only"], 5, 7) == "only"
    with pytest.raises(ValueError):
        pick_caption([], 0, 0)
