import json
import multiprocessing
import os
import pickle
import re
import threading

import numpy as np
import pytest
from videos import noise_frames, touch_newer, write_garbage, write_gray_clip, write_manifest, write_video

import t2v.data.cache as cache_mod
from t2v.data.cache import build_cache, cache_key, open_cache
from t2v.data.manifest import read_manifest
from t2v.data.video import decode_uint8


@pytest.fixture
def clips(tmp_path):
    vids = tmp_path / "videos"
    write_video(vids / "noise.mp4", noise_frames(12, 40))  # not square, not the cache size
    write_gray_clip(vids / "gray.mp4", n=20)
    write_garbage(vids / "garbage.mp4")
    write_gray_clip(vids / "short.mp4", n=3)
    rows = [
        {"video": "videos/noise.mp4", "caption": "noise"},
        {"video": "videos/garbage.mp4", "caption": "broken"},
        {"video": "videos/gray.mp4", "caption": "gray"},
        {"video": "videos/gray.mp4", "caption": "gray, the middle second", "start": 0.5, "end": 1.5},
        {"video": "videos/short.mp4", "caption": "too short"},
    ]
    return read_manifest(write_manifest(tmp_path / "m.jsonl", rows))


def test_round_trip_equals_direct_decoding(clips, tmp_path):
    cache = build_cache(clips, 4, 32, tmp_path / "cache", progress=False)
    assert len(cache) == 5 and cache.bad == {1, 4}
    for i in (0, 2, 3):
        got = cache.get(i)
        assert got.dtype == np.uint8 and got.shape == (4, 32, 32, 3)
        c = clips[i]
        assert np.array_equal(got, decode_uint8(c.video, 4, 32, start=c.start, end=c.end))
    assert not np.array_equal(cache.get(2), cache.get(3))  # start/end are part of what was cached
    assert isinstance(cache.array, np.memmap) and not cache.get(0).flags.writeable

    key = cache_key(clips, 4, 32)
    meta = json.loads((tmp_path / "cache" / f"clips_{key}.json").read_text())
    assert (meta["key"], meta["frames"], meta["size"]) == (key, 4, 32)
    assert meta["paths"] == [str(c.video) for c in clips]
    assert [(b["index"], b["path"]) for b in meta["bad"]] == [(1, str(clips[1].video)), (4, str(clips[4].video))]
    assert "too short" in meta["bad"][1]["error"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"clips_{key}.json", f"clips_{key}.npy"]


def test_second_build_reuses_the_cache(clips, tmp_path, monkeypatch):
    first = build_cache(clips, 4, 32, tmp_path / "cache", progress=False)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a valid cache was decoded again")

    monkeypatch.setattr(cache_mod, "decode_uint8", no_decoding)
    again = build_cache(clips, 4, 32, tmp_path / "cache", progress=False)
    assert again.npy == first.npy and again.bad == first.bad
    assert np.array_equal(again.array, first.array)
    opened = open_cache(clips, 4, 32, tmp_path / "cache")
    assert opened is not None and opened.bad == {1, 4}


def test_changes_invalidate(clips, tmp_path):
    d = tmp_path / "cache"
    assert open_cache(clips, 4, 32, d) is None  # nothing built yet
    build_cache(clips, 4, 32, d, progress=False)
    key = cache_key(clips, 4, 32)
    assert open_cache(clips, 4, 32, d) is not None
    assert cache_key(clips, 2, 32) != key and open_cache(clips, 2, 32, d) is None
    assert cache_key(clips, 4, 64) != key and open_cache(clips, 4, 64, d) is None
    assert open_cache(clips[:3], 4, 32, d) is None

    # a source touched (same bytes, new mtime) or rewritten moves the key on
    touch_newer(clips[0].video)
    assert cache_key(clips, 4, 32) != key and open_cache(clips, 4, 32, d) is None
    key = cache_key(clips, 4, 32)
    write_gray_clip(clips[2].video, n=22)
    assert cache_key(clips, 4, 32) != key and open_cache(clips, 4, 32, d) is None
    rebuilt = build_cache(clips, 4, 32, d, progress=False)
    assert np.array_equal(rebuilt.get(2), decode_uint8(clips[2].video, 4, 32))


def test_incomplete_cache_is_not_used(clips, tmp_path):
    d = tmp_path / "cache"
    cache = build_cache(clips, 4, 32, d, progress=False)
    cache.npy.unlink()  # e.g. a user's cleanup
    assert open_cache(clips, 4, 32, d) is None
    cache = build_cache(clips, 4, 32, d, progress=False)
    assert cache.npy.is_file()
    cache.npy.with_suffix(".json").unlink()  # a build killed before its .json was written
    assert open_cache(clips, 4, 32, d) is None
    build_cache(clips, 4, 32, d, progress=False)
    assert open_cache(clips, 4, 32, d) is not None


def test_pickle_sends_the_path_not_the_pixels(clips, tmp_path):
    cache = build_cache(clips, 4, 32, tmp_path / "cache", progress=False)
    blob = pickle.dumps(cache)
    assert len(blob) < 2000  # the array is 5*4*32*32*3 = 61 kB
    back = pickle.loads(blob)
    assert np.array_equal(back.get(3), cache.get(3)) and back.bad == cache.bad


def test_cache_cli_builds_into_the_configured_folder(clips, tmp_path, capsys, monkeypatch):
    from t2v.data.__main__ import main

    for var in ("CONFIG", "MANIFEST", "FRAMES", "SIZE"):  # the baseline's variables must not leak in
        monkeypatch.delenv(var, raising=False)
    manifest = tmp_path / "m.jsonl"
    args = ["cache", f"data.manifest={manifest}", "data.frames=4", "data.size=32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    cache = open_cache(clips, 4, 32, tmp_path / ".t2v_cache")  # default: beside the manifest
    assert cache is not None and str(cache.npy) in out and "2 bad" in out
    assert f"bad: {manifest}:2: {clips[1].video}" in out
    assert main(args + ["data.sampling=random_window"]) == 2
    assert "cannot be cached" in capsys.readouterr().err


def test_parallel_and_sharded_builds_write_the_bytes_of_one_process(clips, tmp_path):
    """--workers N decodes in N processes, --shard I/N writes a deterministic slice to its own part, and the merge
    assembles the very file a single process writes (byte for byte, and the same .json, bad clips included)."""
    from t2v.data.cache import build_shard, merge_shards

    serial = build_cache(clips, 4, 32, tmp_path / "serial", progress=False)
    assert serial.bad == {1, 4}  # the garbage and the too-short clip
    parallel = build_cache(clips, 4, 32, tmp_path / "parallel", progress=False, workers=2)
    assert parallel.npy.read_bytes() == serial.npy.read_bytes()
    for n in (1, 3):
        d = tmp_path / f"shards{n}"
        for i in reversed(range(n)):  # in any order, as array tasks finish
            build_shard(clips, 4, 32, d, i, n, progress=False)
        if n == 3:  # a rerun of the array keeps the finished parts
            before = {p.name: p.stat().st_mtime_ns for p in d.glob("*.part*")}
            build_shard(clips, 4, 32, d, 1, 3, progress=False)
            assert {p.name: p.stat().st_mtime_ns for p in d.glob("*.part*")} == before
        merged = merge_shards(clips, 4, 32, d, n)
        assert merged.npy.read_bytes() == serial.npy.read_bytes()
        assert merged.npy.with_suffix(".json").read_text() == serial.npy.with_suffix(".json").read_text()
        assert not list(d.glob("*.part*"))  # parts removed once the cache is complete


def _dies_on_job_2(job: int) -> int:
    """A decoding job whose process dies (a decoder crashing on a bad file, the OOM killer) on job 2."""
    if job == 2:
        os._exit(3)
    return job


def test_a_worker_that_dies_is_an_error_not_a_hang():
    """--workers N: a worker process that dies mid-build stops the build with an error that says what to do,
    and leaves no worker behind (a multiprocessing.Pool waited forever for the lost result)."""
    from t2v.cachebuild import CacheError, run_jobs

    desc = "caching clips to /data/.t2v_cache"  # what build_cache passes
    assert list(run_jobs(_dies_on_job_2, [0, 1, 3], 2, False, desc)) == [0, 1, 3]
    outcome = []
    # in a thread, so that a hang fails this test instead of stalling the suite
    build = threading.Thread(target=lambda: outcome.append(_raised(run_jobs, _dies_on_job_2, list(range(12)), 2,
                                                                   False, desc)), daemon=True)
    build.start()
    build.join(timeout=120)
    assert outcome, "the build still waits for the dead worker's result after 120 s"
    assert isinstance(outcome[0], CacheError), outcome
    assert re.search(f"^{re.escape(desc)}: a worker process died .* --workers 1", str(outcome[0])), outcome
    assert multiprocessing.active_children() == []


def _raised(fn, *args) -> BaseException | None:
    try:
        list(fn(*args))
    except Exception as e:
        return e
    return None


def test_a_merge_with_a_missing_shard_names_it(clips, tmp_path):
    from t2v.data.cache import CacheError, build_shard, merge_shards

    build_shard(clips, 4, 32, tmp_path / "c", 0, 2, progress=False)
    with pytest.raises(CacheError, match="1 of 2 shards are not finished.*part0001-of-0002"):
        merge_shards(clips, 4, 32, tmp_path / "c", 2)


def test_a_merge_or_shard_rerun_after_the_merge_is_a_no_op(clips, tmp_path):
    from t2v.data.cache import build_shard, merge_shards

    for i in range(2):
        build_shard(clips, 4, 32, tmp_path / "c", i, 2, progress=False)
    first = merge_shards(clips, 4, 32, tmp_path / "c", 2)
    assert merge_shards(clips, 4, 32, tmp_path / "c", 2).npy == first.npy  # the merge job rerun: nothing to do
    assert build_shard(clips, 4, 32, tmp_path / "c", 0, 2, progress=False)  # a shard rerun after it: nothing to do
    assert not list((tmp_path / "c").glob("*.part*"))
