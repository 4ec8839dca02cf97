import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from videos import write_gray_clip

from t2v.data.manifest import read_manifest
from tools.prepare_msrvtt import main

REPO = Path(__file__).resolve().parents[1]


def video(vid, split, k):
    # the fields and types of MSR-VTT's videodatainfo files
    return {"category": k % 20, "url": f"https://www.youtube.com/watch?v=x{k}", "video_id": vid,
            "start time": 10.0 + k, "end time": 20.5 + k, "split": split, "id": k}


@pytest.fixture
def msrvtt(tmp_path):
    train_val = {
        "info": {"contributor": "Microsoft MSM group", "year": "2016"},
        "videos": [video("video0", "train", 0), video("video1", "train", 1), video("video2", "validate", 2)],
        "sentences": [
            {"caption": "a man is talking", "video_id": "video0", "sen_id": 1},
            {"caption": "a person speaks", "video_id": "video0", "sen_id": 0},
            {"caption": "cars race on a track", "video_id": "video1", "sen_id": 2},
            {"caption": "a cat plays", "video_id": "video2", "sen_id": 3},
        ],
    }
    test = {
        "info": {},
        "videos": [video("video3", "test", 3), video("video4", "test", 4)],
        "sentences": [
            {"caption": "a dog", "video_id": "video3", "sen_id": 4},
            {"caption": "a bird", "video_id": "video4", "sen_id": 5},
        ],
    }
    (tmp_path / "train_val_videodatainfo.json").write_text(json.dumps(train_val))
    (tmp_path / "test_videodatainfo.json").write_text(json.dumps(test))
    for vid in ("video0", "video2", "video3", "video4"):  # video1 is missing, as some are from YouTube takedowns
        write_gray_clip(tmp_path / "data" / "videos" / f"{vid}.mp4", n=8)
    return tmp_path


def test_cli_builds_manifests_and_lists_missing(msrvtt):
    out = msrvtt / "data"
    r = subprocess.run(
        [sys.executable, str(REPO / "tools" / "prepare_msrvtt.py"),
         "--annotations", str(msrvtt / "train_val_videodatainfo.json"), str(msrvtt / "test_videodatainfo.json"),
         "--videos", str(out / "videos"), "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert f"{out / 'train.jsonl'}: 1 videos" in r.stdout and f"{out / 'test.jsonl'}: 2 videos" in r.stdout
    assert "1 of 5 videos missing" in r.stdout and "video1" in r.stdout
    assert (out / "missing_videos.txt").read_text() == "video1\n"

    rows = {s: [json.loads(x) for x in (out / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "val", "test")}
    assert [r["id"] for r in rows["train"]] == ["video0"]
    assert [r["id"] for r in rows["val"]] == ["video2"]
    assert [r["id"] for r in rows["test"]] == ["video3", "video4"]
    first = rows["train"][0]
    assert first["captions"] == ["a person speaks", "a man is talking"]  # sen_id order
    assert first["video"] == "videos/video0.mp4"  # under the output folder: relative
    assert (first["source_start"], first["source_end"]) == (10.0, 20.5)
    assert "start" not in first and "end" not in first  # the files are already cut
    clips = read_manifest(out / "test.jsonl")
    assert [c.video for c in clips] == [(out / "videos" / f"video{k}.mp4").resolve() for k in (3, 4)]
    assert clips[0].start is None and clips[0].captions == ["a dog"]


def test_videos_outside_the_output_folder_are_absolute(msrvtt, capsys):
    out = msrvtt / "manifests"
    assert main(["--annotations", str(msrvtt / "test_videodatainfo.json"), "--videos", str(msrvtt / "data" / "videos"),
                 "--out", str(out)]) == 0
    [row, _] = [json.loads(x) for x in (out / "test.jsonl").read_text().splitlines()]
    assert row["video"] == str((msrvtt / "data" / "videos" / "video3.mp4").resolve())
    assert (out / "train.jsonl").read_text() == ""


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"videos": [], "sentences": [\n  {"caption": "x",}\n]}', r"bad\.json:2: not valid JSON"),
        ('{"videos": []}', r'bad\.json: expected MSR-VTT\'s structure, an object with "videos" and "sentences"'),
        (json.dumps({"videos": [video("video0", "train", 0), {"video_id": "video1"}], "sentences": []}),
         r'bad\.json: videos\[1\]: missing "split"'),
        (json.dumps({"videos": [dict(video("video0", "train", 0), split="dev")], "sentences": []}),
         r"bad\.json: videos\[0\]: unknown split 'dev'"),
        (json.dumps({"videos": [], "sentences": [{"video_id": "video0", "caption": 5}]}),
         r'bad\.json: sentences\[0\]: "caption" has the wrong type'),
    ],
    ids=["json", "structure", "missing-key", "split", "caption-type"],
)
def test_malformed_annotations_name_the_file(msrvtt, capsys, text, expected):
    bad = msrvtt / "bad.json"
    bad.write_text(text)
    args = ["--annotations", str(bad), "--videos", str(msrvtt / "data" / "videos"), "--out", str(msrvtt / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert re.search(expected, err), err


def test_no_video_found_fails(msrvtt, capsys):
    empty = msrvtt / "empty"
    empty.mkdir()
    annotations = str(msrvtt / "test_videodatainfo.json")
    out = msrvtt / "o"
    out.mkdir()
    (out / "train.jsonl").write_text('{"video": "v.mp4", "caption": "kept"}\n')  # an earlier, good manifest
    args = ["--annotations", annotations, "--videos", str(empty), "--out", str(out)]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "2 of 2 videos missing" in captured.out and "nothing written" in captured.err
    assert (out / "train.jsonl").read_text() == '{"video": "v.mp4", "caption": "kept"}\n'
    assert not (out / "val.jsonl").exists()
