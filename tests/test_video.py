import numpy as np
import pytest
import torch
from decord._ffi.base import DECORDError
from videos import frame_ids, gray_frames, write_garbage, write_gray_clip, write_truncated, write_video

from t2v.data.video import VideoError, VideoTooShort, decode_uint8, frame_indices, to_model


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    """24 frames at 8 fps (3 s); frame k is gray 8*k."""
    return write_gray_clip(tmp_path_factory.mktemp("gray") / "gray.mp4", n=24)


def test_even_indices():
    assert frame_indices(24, 8).tolist() == [0, 3, 7, 10, 13, 16, 20, 23]
    assert frame_indices(24, 1).tolist() == [0]
    assert frame_indices(24, 4, first=8, last=19).tolist() == [8, 12, 15, 19]
    assert frame_indices(5, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="need 6 frames"):
        frame_indices(5, 6)
    with pytest.raises(ValueError, match="sampling"):
        frame_indices(24, 4, sampling="middle")


def test_random_window_indices():
    starts = set()
    for seed in range(40):
        idx = frame_indices(100, 8, "random_window", window=0.25, rng=np.random.default_rng(seed))
        assert idx[-1] - idx[0] == 24  # 25 frames = a quarter of the clip
        assert 0 <= idx[0] and idx[-1] <= 99 and np.all(np.diff(idx) > 0)
        starts.add(int(idx[0]))
        again = frame_indices(100, 8, "random_window", window=0.25, rng=np.random.default_rng(seed))
        assert idx.tolist() == again.tolist()
    assert len(starts) > 10  # the offset really varies
    # a window narrower than the frames asked for widens to fit them; window=1 is "even"
    narrow = frame_indices(20, 8, "random_window", 0.1, np.random.default_rng(0))
    assert np.diff(narrow).tolist() == [1] * 7
    whole = frame_indices(20, 8, "random_window", 1.0, np.random.default_rng(3))
    assert whole.tolist() == frame_indices(20, 8).tolist()
    with pytest.raises(ValueError, match="rng"):
        frame_indices(20, 8, "random_window")


@pytest.mark.parametrize("size", [32, 48])  # 48: decord cannot scale to it; the fallback resizes
def test_decode_reads_the_even_frames(gray, size):
    u8 = decode_uint8(gray, 8, size)
    assert u8.shape == (8, size, size, 3) and u8.dtype == np.uint8
    assert frame_ids(u8).tolist() == frame_indices(24, 8).tolist()
    expected = gray_frames(24, size)[frame_indices(24, 8)].astype(int)
    assert np.abs(u8.astype(int) - expected).max() <= 2  # lossless H.264, but yuv420p rounding


def test_decode_random_window_matches_indices(gray):
    for seed in range(5):
        u8 = decode_uint8(gray, 4, 32, "random_window", window=0.5, rng=np.random.default_rng(seed))
        idx = frame_indices(24, 4, "random_window", 0.5, np.random.default_rng(seed))
        assert frame_ids(u8).tolist() == idx.tolist()


def test_start_end_restrict_the_frames(gray):
    # 8 fps: [1.0 s, 2.5 s) shows frames 8..19
    u8 = decode_uint8(gray, 4, 32, start=1.0, end=2.5)
    assert frame_ids(u8).tolist() == [8, 12, 15, 19]
    assert frame_ids(decode_uint8(gray, 2, 32, start=2.0)).tolist() == [16, 23]
    assert frame_ids(decode_uint8(gray, 2, 32, end=1.0)).tolist() == [0, 7]
    with pytest.raises(VideoTooShort, match=r"gray\.mp4: too short: 4 frames between 1\.0s and 1\.5s, need 8"):
        decode_uint8(gray, 8, 32, start=1.0, end=1.5)


def test_too_short(tmp_path):
    short = write_gray_clip(tmp_path / "short.mp4", n=5)
    assert decode_uint8(short, 5, 32).shape == (5, 32, 32, 3)
    with pytest.raises(VideoTooShort, match=r"short\.mp4: too short: 5 frames, need 6") as e:
        decode_uint8(short, 6, 32)
    assert isinstance(e.value, VideoError) and e.value.path == str(short)


@pytest.mark.parametrize(
    "make, cause",
    [
        (lambda p: write_truncated(p, faststart=True), DECORDError),  # opens, fails mid-stream
        (lambda p: write_truncated(p, faststart=False), RuntimeError),  # no index: cannot open
        (write_garbage, RuntimeError),
    ],
    ids=["truncated-faststart", "truncated", "garbage"],
)
def test_corrupt_files_raise_video_error(tmp_path, make, cause):
    path = make(tmp_path / "bad.mp4")
    with pytest.raises(VideoError) as e:
        decode_uint8(path, 8, 32)
    assert e.value.path == str(path) and str(path) in str(e.value)
    assert isinstance(e.value.__cause__, cause) and not isinstance(e.value, VideoTooShort)


def test_missing_file(tmp_path):
    with pytest.raises(VideoError, match="nope.mp4: file not found"):
        decode_uint8(tmp_path / "nope.mp4", 8, 32)


def test_to_model(gray, tmp_path):
    u8 = np.zeros((2, 4, 4, 3), np.uint8)
    u8[0, 1, 2] = (255, 0, 128)
    x = to_model(u8)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    assert x[0, :, 1, 2].tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1], abs=1e-6)
    assert x.min() == -1.0 and torch.equal(to_model(torch.from_numpy(u8)), x)
    with pytest.raises(ValueError, match="uint8"):
        to_model(u8.astype(np.float32))
    # a colour clip keeps its channels in RGB order
    red = np.zeros((8, 32, 32, 3), np.uint8)
    red[..., 0] = 220
    clip = to_model(decode_uint8(write_video(tmp_path / "red.mp4", red), 8, 32))
    assert clip[:, 0].mean() > 0.6 and clip[:, 1:].mean() < -0.8
