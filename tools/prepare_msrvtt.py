"""Build train/val/test manifests from MSR-VTT's annotation files and video folder.

    python tools/prepare_msrvtt.py --annotations train_val_videodatainfo.json test_videodatainfo.json \
        --videos /scratch/data/msrvtt/videos --out /scratch/data/manifests

The annotation files have a ``videos`` list ({"video_id": "video0", "split": "train"|"validate"|"test",
"start time", "end time", "url", "category", "id"}) and a ``sentences`` list ({"video_id", "caption",
"sen_id"}). One manifest line per video, with all its captions. The distributed clips are already cut
from the YouTube source, so ``start time``/``end time`` are kept as ``source_start``/``source_end``
(metadata), not as ``start``/``end``, which would make the loader cut the clip again.
Videos absent from the folder are left out of the manifests and listed (also in ``missing_videos.txt``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from t2v.files import write_text

SPLITS = {"train": "train", "validate": "val", "test": "test"}  # MSR-VTT split -> manifest name


class AnnotationError(ValueError):
    pass


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text: {e}") from None
    lists = isinstance(data, dict) and all(isinstance(data.get(k), list) for k in ("videos", "sentences"))
    if not lists:
        raise AnnotationError(
            f'{path}: expected MSR-VTT\'s structure, an object with "videos" and "sentences" lists '
            f"(train_val_videodatainfo.json / test_videodatainfo.json)"
        )
    return data


def _field(path: Path, where: str, entry, key: str, types):
    if not isinstance(entry, dict):
        raise AnnotationError(f"{path}: {where}: expected an object, got {json.dumps(entry)[:80]}")
    if key not in entry:
        raise AnnotationError(f'{path}: {where}: missing "{key}" in {json.dumps(entry)[:120]}')
    if not isinstance(entry[key], types) or isinstance(entry[key], bool):
        raise AnnotationError(f'{path}: {where}: "{key}" has the wrong type: {json.dumps(entry[key])[:80]}')
    return entry[key]


def load_annotations(paths: Sequence[str | os.PathLike]) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """(videos by id, captions by video id in sen_id order) from one or more annotation files."""
    videos: dict[str, dict] = {}
    sentences: dict[str, list[tuple[int, str]]] = {}
    for path in map(Path, paths):
        data = _load(path)
        for k, v in enumerate(data["videos"]):
            where = f"videos[{k}]"
            vid = _field(path, where, v, "video_id", str)
            split = _field(path, where, v, "split", str)
            if split not in SPLITS:
                raise AnnotationError(f"{path}: {where}: unknown split {split!r}, expected one of {', '.join(SPLITS)}")
            if vid in videos and videos[vid]["split"] != split:
                earlier = videos[vid]["split"]
                raise AnnotationError(f"{path}: {where}: {vid} is in split {split!r} here and {earlier!r} earlier")
            videos[vid] = {
                "split": split,
                "source_start": v.get("start time"),
                "source_end": v.get("end time"),
                "category": v.get("category"),
                "url": v.get("url"),
            }
        for k, s in enumerate(data["sentences"]):
            where = f"sentences[{k}]"
            vid = _field(path, where, s, "video_id", str)
            caption = _field(path, where, s, "caption", str).strip()
            sen_id = s.get("sen_id", k) if isinstance(s.get("sen_id", k), int) else k
            if caption:
                sentences.setdefault(vid, []).append((sen_id, caption))
    captions = {vid: [c for _, c in sorted(pairs)] for vid, pairs in sentences.items()}
    return videos, captions


def _find(video_id: str, folders: Sequence[Path]) -> Path | None:
    for folder in folders:
        p = folder / f"{video_id}.mp4"
        if p.is_file():
            return p
    return None


def _video_number(video_id: str):
    digits = video_id[len("video"):]
    return (int(digits), video_id) if video_id.startswith("video") and digits.isdigit() else (float("inf"), video_id)


def build_manifests(
    videos: dict[str, dict], captions: dict[str, list[str]], folders: Sequence[Path], out: Path, absolute: bool = False
) -> dict:
    """Write <out>/{train,val,test}.jsonl; return counts and the videos left out."""
    out.mkdir(parents=True, exist_ok=True)
    lines = {name: [] for name in SPLITS.values()}
    missing, uncaptioned = [], []
    for vid in sorted(videos, key=_video_number):
        info = videos[vid]
        path = _find(vid, folders)
        if path is None:
            missing.append(vid)
            continue
        if not captions.get(vid):
            uncaptioned.append(vid)
            continue
        path = path.resolve()
        # relative when the videos live under the manifest folder (the pair moves together), else absolute
        inside = path.is_relative_to(out.resolve())
        video = str(path) if absolute or not inside else os.path.relpath(path, out.resolve())
        row = {"video": video, "captions": captions[vid], "id": vid,
               "source_start": info["source_start"], "source_end": info["source_end"], "category": info["category"]}
        lines[SPLITS[info["split"]]].append(json.dumps(row) + "\n")
    if not any(lines.values()):  # nothing found: keep whatever manifests are already in `out`
        return {"counts": {k: 0 for k in lines}, "missing": missing, "uncaptioned": uncaptioned}
    for name, rows in lines.items():
        write_text(out / f"{name}.jsonl", "".join(rows))
    (out / "missing_videos.txt").write_text("".join(f"{v}\n" for v in missing))
    return {"counts": {k: len(v) for k, v in lines.items()}, "missing": missing, "uncaptioned": uncaptioned}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", nargs="+", required=True,
                        help="train_val_videodatainfo.json [test_videodatainfo.json]")
    parser.add_argument("--videos", nargs="+", required=True,
                        help="folder(s) holding videoN.mp4 (e.g. TrainValVideo TestVideo)")
    parser.add_argument("--out", required=True, help="folder for train.jsonl, val.jsonl, test.jsonl")
    parser.add_argument("--absolute", action="store_true", help="always write absolute video paths")
    args = parser.parse_args(argv)

    folders = [Path(f) for f in args.videos]
    for f in folders:
        if not f.is_dir():
            print(f"error: video folder not found: {f}", file=sys.stderr)
            return 2
    try:
        videos, captions = load_annotations(args.annotations)
    except AnnotationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    result = build_manifests(videos, captions, folders, out, args.absolute)
    for name, n in result["counts"].items():
        print(f"{out / (name + '.jsonl')}: {n} videos")
    missing = result["missing"]
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
        print(f"{len(missing)} of {len(videos)} videos missing from {', '.join(map(str, folders))} "
              f"(left out; list in {out / 'missing_videos.txt'}): {shown}")
    if result["uncaptioned"]:
        uncaptioned = result["uncaptioned"]
        print(f"{len(uncaptioned)} videos have no captions (left out): {', '.join(uncaptioned[:20])}")
    if not sum(result["counts"].values()):
        print(f"error: no video of the annotations was found in {', '.join(map(str, folders))}; nothing written "
              f"(manifests already in {out} are kept)", file=sys.stderr)
        return 1
    train = out / "train.jsonl"
    print(f"next, at a real frame rate (windows of 8 frames at 8 fps inside one shot, docs/windows.md):\n"
          f"  python -m t2v.data check --config configs/window.yaml data.manifest={train}\n"
          f"  python -m t2v.data cache --config configs/window.yaml data.manifest={train}\n"
          f"  python -m t2v.text embed --config configs/window.yaml data.manifest={train}\n"
          f"  make submit CONFIG=configs/window.yaml MANIFEST={train} STEPS=5000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
