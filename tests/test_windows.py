"""Windows at a real frame rate (data.sampling=window): which frames the cache holds, the cuts, the windows drawn.

The test videos number their frames (tests/videos.shot_frames: the left half's gray level is 3 x the source frame
index, the right half flips at every cut), so every assertion reads the frames that were really decoded."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runs import REPO
from t2v import config as C
from t2v.data import __main__ as data_cli
from t2v.data.dataset import ClipDataset
from t2v.data.manifest import read_manifest
from t2v.data.video import NoFrameRate, Timeline, VideoError
from t2v.data.window_build import build_windows, build_windows_shard, merge_windows
from t2v.data.windows import Rate, decode_clip, open_windows, pick_window, plan, source_rate
from t2v.models.unet import UNet3DCond
from t2v.sample import save_gif, save_mp4
from videos import frame_numbers, shot_frames, write_manifest, write_timed_video

NTSC = 30000 / 1001  # 29.97 fps


class Captions:
    def get(self, caption):
        return torch.zeros(4)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Three real clips: 29.97 fps with audio and three shots; a variable rate (24 then 12 fps) with two; one shot
    at 24 fps that is too short for most windows. Odd frame sizes (70x46)."""
    d = tmp_path_factory.mktemp("windows")
    shots = {"ntsc": [24, 32, 24], "vfr": [40, 40], "short": [10]}
    times = {"ntsc": np.arange(80) / NTSC, "vfr": np.concatenate([np.arange(40) / 24, 40 / 24 + np.arange(40) / 12]),
             "short": np.arange(10) / 24}
    for name in shots:
        write_timed_video(d / f"{name}.mp4", shot_frames(shots[name]), times[name], audio=name == "ntsc")
    write_manifest(d / "train.jsonl", [{"video": f"{n}.mp4", "caption": f"clip {n}"} for n in shots])
    return {"dir": d, "shots": shots, "times": times, "manifest": d / "train.jsonl"}


def source_shot(video, k: np.ndarray) -> np.ndarray:
    """Which shot source frame k belongs to."""
    return np.searchsorted(np.cumsum(video), k, side="right")


def test_the_cache_holds_frames_at_the_target_rate_and_finds_every_cut(videos, tmp_path):
    clips = read_manifest(videos["manifest"])
    cache = build_windows(clips, 16, Rate(fps=8.0), tmp_path, progress=False)
    for i, name in enumerate(videos["shots"]):
        u8 = cache.array[cache.offsets[i]:cache.offsets[i + 1]]
        k = frame_numbers(u8)  # the source frames really stored
        t = videos["times"][name][k]
        # frame j is the one on screen at j / 8 s: shown at or before it, and the next one after it
        target = np.arange(len(k)) / 8
        nxt = np.append(videos["times"][name], np.inf)[k + 1]
        assert np.all(t <= target + 1e-6) and np.all(nxt > target - 1e-6), name
        # a cut is found exactly where the shot of the stored frames changes
        changes = [0] + [j for j in range(1, len(k)) if source_shot(videos["shots"][name], k[j]) !=
                         source_shot(videos["shots"][name], k[j - 1])]
        assert cache.shots[i] == changes, name
    assert cache.fps.tolist() == [8.0, 8.0, 8.0]
    assert abs(cache.source_fps[0] - NTSC) < 0.01 and 12 < cache.source_fps[1] < 24


def test_a_window_never_spans_a_cut_and_its_frames_are_1_over_fps_apart(videos, tmp_path):
    clips = read_manifest(videos["manifest"])
    cache = build_windows(clips, 16, Rate(fps=8.0), tmp_path, progress=False)
    ds = ClipDataset(clips, Captions(), frames=4, size=16, seed=3, sampling="window", windows=cache, strides=(1, 2))
    seen = set()
    for draw in range(300):
        item = ds[(draw % 2, draw)]  # the two clips with cuts
        name = list(videos["shots"])[item["index"]]
        u8 = ((item["video"].permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).numpy().astype(np.uint8)
        k = frame_numbers(u8)  # t c h w -> t h w c -> source frames
        assert len(set(source_shot(videos["shots"][name], k))) == 1, f"{name}: window {k} spans a cut"
        stride = round(8 / float(item["fps"]))
        t = videos["times"][name][k]
        # consecutive frames stride / 8 s apart, to within the source frame they are read from
        assert np.all(np.abs(np.diff(t) - stride / 8) < 1 / 12 + 1e-6), (name, t)
        seen.add((name, int(k[0]), stride))
    assert {s for _, _, s in seen} == {1, 2} and len(seen) > 20  # fresh windows, both rates
    assert torch.equal(ds[(0, 5)]["video"], ds[(0, 5)]["video"])  # a pure function of (seed, draw)


def test_pick_window_is_uniform_over_the_windows_that_fit():
    rng = np.random.default_rng(0)
    starts = [int(pick_window(20, [0, 5, 12], 4, (1,), rng)[0][0]) for _ in range(4000)]
    fits = [0, 1, 5, 6, 7, 8, 12, 13, 14, 15, 16]  # shots [0,5) [5,12) [12,20): a window of 4 fits at these
    assert sorted(set(starts)) == fits
    counts = np.bincount(starts, minlength=20)[fits]
    assert counts.min() > 0.7 * counts.mean()
    assert pick_window(6, [0, 3], 4, (1,), rng) is None  # no shot of 4 frames
    rows, stride = pick_window(6, [0, 3], 4, (1, 2), rng, pad=True)
    assert rows.tolist() == [0, 1, 2, 2] and stride == 1  # the longest shot, its last frame repeated


def test_frame_interval_start_end_and_max_seconds(videos):
    tl = Timeline(videos["times"]["ntsc"], NTSC)
    p = plan(tl, Rate(frame_interval=3), "ntsc.mp4", start=1.0, end=2.0)
    assert p.indices.tolist() == list(range(30, 60, 3)) and abs(p.fps - NTSC / 3) < 1e-2  # [1 s, 2 s): frames 30-59
    p = plan(tl, Rate(fps=8.0, max_seconds=1.0), "ntsc.mp4", start=0.5)
    assert len(p.indices) == 8 and videos["times"]["ntsc"][p.indices[0]] <= 0.5  # 1 s from 0.5 s, 8 frames
    p = plan(Timeline(videos["times"]["vfr"], 0.0), Rate(fps=30.0), "vfr.mp4")
    assert p.repeat  # a source slower than data.fps: frames are shown twice, and the plan says so


def test_a_video_with_no_frame_rate_is_refused_by_name():
    with pytest.raises(NoFrameRate, match=r"x.mp4: the video reports 0.0 fps and no frame timestamps"):
        source_rate(Timeline(np.zeros(5), 0.0), "x.mp4")


def test_sharded_and_parallel_builds_write_the_bytes_of_one_build(videos, tmp_path):
    clips = read_manifest(videos["manifest"])
    one = build_windows(clips, 16, Rate(fps=8.0), tmp_path / "one", progress=False)
    for i in range(2):
        build_windows_shard(clips, 16, Rate(fps=8.0), tmp_path / "sharded", i, 2, progress=False)
    merged = merge_windows(clips, 16, Rate(fps=8.0), tmp_path / "sharded", 2)
    two = build_windows(clips, 16, Rate(fps=8.0), tmp_path / "workers", progress=False, workers=2)
    for other in (merged, two):
        assert Path(other.npy).read_bytes() == Path(one.npy).read_bytes()
        assert json.loads(Path(other.npy).with_suffix(".json").read_text()) == json.loads(
            Path(one.npy).with_suffix(".json").read_text())
    assert open_windows(clips, 16, Rate(fps=12.0), tmp_path / "one") is None  # another rate: another cache


def config(videos, *overrides):
    return C.load_config(REPO / "configs/tiny.yaml", [
        f"data.manifest={videos['manifest']}", f"data.cache_dir={videos['dir'] / 'cache'}", "data.sampling=window",
        "data.fps=8", *overrides], env={})


def test_check_and_cache_report_clips_too_short_for_a_window_by_line(videos, capsys):
    args = ["--config", str(REPO / "configs/tiny.yaml"), f"data.manifest={videos['manifest']}",
            f"data.cache_dir={videos['dir'] / 'cache'}", "data.sampling=window", "data.fps=8", "data.frames=6"]
    assert data_cli.main(["check", *args]) == 1
    out = capsys.readouterr().out
    # short.mp4: 10 frames at 24 fps = 4 frames at 8 fps; the 29.97 fps clip's shots are 7, 8 and 9 frames
    assert f"3 | too_short | {videos['dir'] / 'short.mp4'}: longest shot 4 frames" in out
    assert "a window needs 6: skipped (data.short_clips=pad pads it)" in out and "1 too_short" in out
    assert data_cli.main(["cache", *args, "data.short_clips=pad"]) == 0
    out = capsys.readouterr().out
    assert f"too short: {videos['manifest']}:3: {videos['dir'] / 'short.mp4'}: longest shot 4 frames" in out
    assert "padded" in out and "3 clips, 66 frames" in out  # 2.67 s + 5 s + 0.42 s at 8 fps and "3 cuts" in out


@pytest.mark.parametrize("overrides, message", [
    (["data.fps=0"], "needs exactly one of data.fps"),
    (["data.frame_interval=2"], "needs exactly one of data.fps"),
    (["data.fps=-1"], "data.fps must be >= 0"),
    (["data.frames=16", "data.max_seconds=1"], "lasts 2 s, longer than data.max_seconds=1"),
    (["data.strides=0"], "data.strides must be whole numbers >= 1"),
    (["data.short_clips=stretch"], "data.short_clips must be 'skip' or 'pad'"),
    (["data.sampling=even"], "data.fps and data.frame_interval apply to data.sampling=window only"),
    (["data.sampling=even", "data.fps=0", "model.fps_cond=true"], "model.fps_cond needs data.sampling=window"),
])
def test_bad_window_settings_fail_with_what_to_change(videos, overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        config(videos, *overrides)


def test_a_video_shorter_than_every_window_fails_training_clearly(videos, tmp_path):
    from t2v.data.sources import open_training_windows
    from t2v.runlog import TrainingError

    clips = read_manifest(videos["manifest"])[2:]  # short.mp4 alone

    class Log:
        enabled, line, warn = False, print, print

    with pytest.raises(TrainingError, match="no clip has room for a window of 6 frames at 8 fps.*data.short_clips=pad"):
        open_training_windows(config(videos, "data.frames=6", f"data.cache_dir={tmp_path}"), clips, Log(), None)


def test_fps_conditioning_starts_as_a_no_op_and_then_tells_rates_apart():
    torch.manual_seed(0)
    net = UNet3DCond(base_channels=8, channel_mults=(1, 2), text_dim=4, fps_cond=True)
    plain = UNet3DCond(base_channels=8, channel_mults=(1, 2), text_dim=4)
    x, t, text = torch.randn(2, 4, 3, 8, 8), torch.tensor([10, 500]), torch.randn(2, 4)
    with torch.no_grad():
        for name, p in net.named_parameters():  # a trained-looking net (its residual branches start at zero)
            if not name.startswith("fps_mlp.2"):
                p.normal_(0, 0.3)
        plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("fps_mlp")})
        assert torch.equal(net(x, t, text, fps=torch.tensor([8.0, 24.0])), plain(x, t, text))  # zero-init: no-op
        for p in net.fps_mlp[-1].parameters():
            p.normal_()
        assert not torch.allclose(net(x, t, text, fps=torch.tensor([8.0, 8.0])),
                                  net(x, t, text, fps=torch.tensor([24.0, 24.0])))
    with pytest.raises(ValueError, match="needs each clip's frame rate"):
        net(x, t, text)


@pytest.mark.parametrize("fps", [8.0, 12.5, NTSC])
def test_sampled_files_play_at_the_rate_asked(tmp_path, fps):
    import av
    from PIL import Image

    video = torch.rand(6, 3, 16, 16) * 2 - 1
    with av.open(str(save_mp4(video, tmp_path / "a.mp4", fps))) as f:
        assert abs(float(f.streams.video[0].average_rate) - fps) < 1e-3
    gif = Image.open(save_gif(video, tmp_path / "a.gif", fps))
    assert abs(gif.info["duration"] - 1000 / fps) <= 5  # GIF delays are whole hundredths of a second


def test_window_items_from_latents_are_posteriors_of_the_same_frames(videos, tmp_path):
    """A latent window cache row is frame-aligned with the pixel cache: the dataset returns (2 t c h w)."""
    from test_latent import tiny_vae
    from t2v.data.latents import build_latent_windows, open_latent_windows
    from t2v.vae import encode

    clips = read_manifest(videos["manifest"])
    pixels = build_windows(clips, 16, Rate(fps=8.0), tmp_path, progress=False)
    vae = tiny_vae().eval()
    build_latent_windows(clips, 16, Rate(fps=8.0), tmp_path, vae, "tiny", batch_frames=8, progress=False)
    lat = open_latent_windows(clips, 16, Rate(fps=8.0), tmp_path, "tiny")
    assert lat.offsets.tolist() == pixels.offsets.tolist() and lat.shots == pixels.shots
    ds = ClipDataset(clips, Captions(), frames=4, size=16, seed=0, sampling="window", windows=lat)
    px = ClipDataset(clips, Captions(), frames=4, size=16, seed=0, sampling="window", windows=pixels)
    item, ref = ds[(1, 7)], px[(1, 7)]
    assert item["latent"].shape == (2, 4, 4, 8, 8)  # 2 t c h w
    with torch.no_grad():
        mean, _ = encode(vae, ref["video"], 8)  # the same window's frames, encoded now
    assert torch.allclose(item["latent"][0], mean, atol=2e-3)  # float16 on disk
    with pytest.raises(VideoError):
        decode_clip(str(tmp_path / "missing.mp4"), 16, Rate(fps=8.0))


def test_a_video_vae_caches_whole_windows_inside_shots_and_each_draw_takes_one(videos, tmp_path):
    """Wan's causal VAE (4x in time): its latents belong to a window, so the latent window cache holds up to
    data.latent_windows windows of data.frames frames per clip, each inside one shot and spread over them, each the
    posterior of exactly those frames encoded as one video. A draw takes one of its clip's windows; a clip with no
    shot that long is padded or skipped; shards write the bytes of one build."""
    from pretrained import wan_vae
    from t2v.data import latents as L
    from t2v.data.video import to_model
    from t2v.vae import encode_clip

    clips, rate, vae = read_manifest(videos["manifest"]), Rate(fps=8.0), wan_vae().eval()
    npy = L.build_latent_windows(clips, 16, rate, tmp_path / "one", vae, "wan", progress=False, frames=5, per_clip=3)
    cache = L.open_latent_windows(clips, 16, rate, tmp_path / "one", "wan", 5, 3)
    assert isinstance(cache, L.LatentVideoWindows) and cache.array.shape == (9, 2, 2, 16, 2, 2)  # 3 clips x 3
    assert L.open_latent_windows(clips, 16, rate, tmp_path / "one", "wan", 9, 3) is None  # other windows: not these
    pixels = build_windows(clips, 16, rate, tmp_path / "px", progress=False)  # the same frames, decoded alike
    assert [len(s) for s in cache.starts] == [3, 3, 1] and cache.starts[2] == [-1]  # "short": ~3 frames at 8 fps
    assert cache.too_short(5, (1,)) == [2]
    for i in (0, 1):
        bounds = [*pixels.shots[i], pixels.length(i)]
        for j, start in enumerate(cache.starts[i]):
            assert any(a <= start and start + 5 <= b for a, b in zip(bounds[:-1], bounds[1:]))  # inside one shot
            frames = pixels.array[pixels.offsets[i] + start:pixels.offsets[i] + start + 5]
            mean, std = encode_clip(vae, to_model(np.ascontiguousarray(frames)))  # t' c h w: those frames, now
            row = torch.from_numpy(cache.array[cache.offsets[i] + j].astype(np.float32))
            torch.testing.assert_close(row[0], mean, rtol=0, atol=2e-3)  # float16 on disk
            torch.testing.assert_close(row[1], std, rtol=0, atol=2e-3)
    assert cache.starts[1][0] == 0 and cache.starts[1][-1] == pixels.length(1) - 5  # the first and last window

    ds = ClipDataset(clips, Captions(), frames=5, size=16, seed=0, sampling="window", windows=cache)
    drawn = {int(np.argmax([np.array_equal(ds[(1, d)]["latent"].numpy(), cache.array[cache.offsets[1] + j])
                            for j in range(3)])) for d in range(12)}
    assert drawn == {0, 1, 2}  # every window of the clip gets drawn
    assert torch.equal(ds[(1, 5)]["latent"], ds[(1, 5)]["latent"])  # a pure function of (seed, draw)
    assert cache.window(2, 5, (1,), np.random.default_rng(0)) is None  # skipped, unless padded:
    assert cache.window(2, 5, (1,), np.random.default_rng(0), pad=True)[0] == cache.offsets[2]

    for i in range(2):
        L.build_latent_windows(clips, 16, rate, tmp_path / "sharded", vae, "wan", progress=False, shard=(i, 2),
                               frames=5, per_clip=3)
    merged = L.build_latent_windows(clips, 16, rate, tmp_path / "sharded", vae, "wan", progress=False,
                                    merge_shards=2, frames=5, per_clip=3)
    assert merged.read_bytes() == npy.read_bytes()


@pytest.fixture(scope="module")
def shots_dir(tmp_path_factory):
    """The "shots" demo set (a few clips) with its caption embeddings."""
    from t2v.data.demo import make_demo
    from t2v.text import embed_captions

    d = tmp_path_factory.mktemp("shots")
    make_demo(d, n_train=6, n_val=2, n_test=1, seed=0, kind="shots")
    cfg = shots_config(d, d / "unused")
    captions = [c for m in (cfg.data.manifest, C.val_manifest(cfg)) for clip in read_manifest(m) for c in clip.captions]
    embed_captions(cfg.text, captions + list(cfg.train.sample_prompts) + [""], C.cache_dir(cfg, "text"),
                   progress=False)
    return d


def shots_config(d, outdir, *overrides):
    from runs import tiny_config

    return tiny_config(d, outdir, "data.sampling=window", "data.fps=8", "data.strides=1,2", "model.fps_cond=true",
                       "train.steps=12", "train.ckpt_every=5", "train.log_every=1", "train.val_every=6",
                       "train.val_clips=2", *overrides)


def test_window_training_resumes_bit_exact_and_refuses_another_rate(shots_dir, tmp_path, capsys):
    from runs import assert_states_equal, load
    from t2v import train as T
    from t2v.runlog import REQUEUE_EXIT
    from t2v.sample import main as sample_main

    assert T.train(shots_config(shots_dir, tmp_path / "straight")) == 0
    assert T.train(shots_config(shots_dir, tmp_path / "resumed"), stop_at=7) == REQUEUE_EXIT
    assert T.train(shots_config(shots_dir, tmp_path / "resumed")) == 0
    a, b = load(tmp_path / "straight" / "ckpt_000012.pt"), load(tmp_path / "resumed" / "ckpt_000012.pt")
    assert_states_equal(a, b)
    assert a["data"]["fps"] == 8.0  # the rate samples play at
    for change in ("data.fps=12", "data.strides=1", "data.sampling=even"):
        extra = ("data.fps=0", "model.fps_cond=false") if change == "data.sampling=even" else ()
        with pytest.raises(T.TrainingError, match=rf"[(; ]{change.split('=')[0]}: .* -> .*use a new OUTDIR"):
            T.train(shots_config(shots_dir, tmp_path / "straight", change, *extra, "train.steps=20"))
    assert sample_main(["--ckpt", str(tmp_path / "straight"), "--prompt", "a red circle moving right", "--steps", "2",
                        "--format", "mp4"]) == 0
    assert "| 8 fps (the rate it was trained at, window sampling)" in capsys.readouterr().out
    assert sample_main(["--ckpt", str(tmp_path / "straight"), "--prompt", "a red circle", "--fps", "0"]) == 2
    assert "--fps must be > 0" in capsys.readouterr().err


def test_latent_window_builds_shard_merge_and_resume_into_the_bytes_of_one_build(videos, tmp_path, monkeypatch):
    from test_latent import tiny_vae
    from t2v.data import latents as L
    from t2v.data import window_build

    clips, rate, vae = read_manifest(videos["manifest"]), Rate(fps=8.0), tiny_vae().eval()
    one = L.build_latent_windows(clips, 16, rate, tmp_path / "one", vae, "tiny", batch_frames=8, progress=False)
    for i in range(2):
        L.build_latent_windows(clips, 16, rate, tmp_path / "sharded", vae, "tiny", 8, False, shard=(i, 2))
    merged = L.build_latent_windows(clips, 16, rate, tmp_path / "sharded", vae, "tiny", 8, False, merge_shards=2)
    assert merged.read_bytes() == one.read_bytes()
    assert not list((tmp_path / "sharded").glob("*.part*"))  # the parts are gone once merged

    # killed after the first clip: the rerun encodes only the two clips left, and writes the same bytes
    real, calls = window_build._decode_job, []

    def dies_on_the_second_clip(job):
        calls.append(job[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would leave it: the partial file and the first clip's state
        return real(job)

    monkeypatch.setattr(window_build, "_decode_job", dies_on_the_second_clip)
    with pytest.raises(KeyboardInterrupt):
        L.build_latent_windows(clips, 16, rate, tmp_path / "killed", vae, "tiny", 8, False, save_every_s=0)
    assert list((tmp_path / "killed").glob("*.partial.*"))
    calls.clear()
    monkeypatch.setattr(window_build, "_decode_job", lambda job: (calls.append(job[0]), real(job))[1])
    resumed = L.build_latent_windows(clips, 16, rate, tmp_path / "killed", vae, "tiny", 8, False)
    assert calls == [1, 2] and resumed.read_bytes() == one.read_bytes()
    assert json.loads(resumed.with_suffix(".json").read_text()) == json.loads(one.with_suffix(".json").read_text())


def test_eval_scores_real_windows_against_samples_at_the_trained_rate(shots_dir, tmp_path, monkeypatch):
    """t2v.eval on a window-trained model: its real clips are one fixed window each (as trained, not "even"),
    its samples are asked for the trained rate."""
    from test_eval import TOKENIZER_ARGS, TinyI3D, WordHashTokenizer, tiny_clip_model
    from t2v import eval as E
    from t2v import sample as S
    from t2v import train as T
    from t2v.data import windows as W

    assert T.train(shots_config(shots_dir, tmp_path / "run", "train.steps=2", "train.val_every=0")) == 0
    torch.jit.save(torch.jit.script(TinyI3D().eval()), str(tmp_path / "i3d.pt"))
    scorer = E.ClipScorer(tiny_clip_model(), WordHashTokenizer(**TOKENIZER_ARGS), name="tiny-clip")
    windows, rates = [], []
    real_window = W.fixed_window
    monkeypatch.setattr(W, "fixed_window", lambda *a: windows.append(a[3]) or real_window(*a))
    real_gen = S.generate  # eval imports it where it runs
    monkeypatch.setattr(S, "generate", lambda *a, **k: rates.append(k["fps"]) or real_gen(*a, **k))
    r = E.evaluate(tmp_path / "run", shots_dir / "val.jsonl", 2, clip_model=scorer, i3d=str(tmp_path / "i3d.pt"),
                   steps=2, write=False)
    assert windows == [0, 1] and rates == [8.0] and np.isfinite(r["fvd"]) and r["frames"] == 4


def test_latent_space_trains_on_windows_from_the_latent_window_cache(shots_dir, tmp_path, capsys):
    """model.space=latent with data.sampling=window: `t2v.data latents` encodes every frame at data.fps (train and
    val manifests), training cuts its windows from there (resuming bit-exact) and samples decode at the rate."""
    from runs import assert_states_equal, load
    from test_latent import tiny_vae
    from t2v import train as T
    from t2v.runlog import REQUEUE_EXIT
    from t2v.sample import main as sample_main

    tiny_vae().save_pretrained(tmp_path / "vae")
    latent = ("model.space=latent", f"vae.name={tmp_path / 'vae'}", "vae.batch_size=8", "model.fps_cond=false",
              "data.strides=1")
    with pytest.raises(T.TrainingError, match=r"(?s)no latent window cache for these clips.*python -m t2v.data latents"):
        T.train(shots_config(shots_dir, tmp_path / "first", *latent))
    args = [f"data.manifest={shots_dir / 'train.jsonl'}", f"data.cache_dir={shots_dir / 'cache'}",
            "data.sampling=window", "data.fps=8", *latent]
    assert data_cli.main(["latents", "--config", str(REPO / "configs/tiny.yaml"), *args]) == 0
    out = capsys.readouterr().out
    assert out.count("latent window cache:") == 2 and "4x8x8 latents" in out and "18 cuts" in out  # 6 clips x 3
    assert T.train(shots_config(shots_dir, tmp_path / "straight", *latent)) == 0
    assert T.train(shots_config(shots_dir, tmp_path / "resumed", *latent), stop_at=5) == REQUEUE_EXIT
    assert T.train(shots_config(shots_dir, tmp_path / "resumed", *latent)) == 0
    assert_states_equal(load(tmp_path / "straight" / "ckpt_000012.pt"), load(tmp_path / "resumed" / "ckpt_000012.pt"))
    assert "validation loss every 6 steps: 2 clips" in (tmp_path / "straight" / "train.log").read_text()
    assert sample_main(["--ckpt", str(tmp_path / "straight"), "--prompt", "a red circle moving right", "--steps", "2",
                        "--format", "gif"]) == 0
    assert "| 8 fps (the rate it was trained at" in capsys.readouterr().out
