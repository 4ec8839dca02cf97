"""Frames that are not square (data.size = height, data.width = width): MSR-VTT's own 240x320, Wan at 480p.

A square run (data.width 0 or equal to data.size) keeps the names of its caches and resumes from checkpoints written
before data.width existed; a non-square one caches, trains, resumes and samples at height x width, never transposed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runs import assert_states_equal, load, prepare, straight_and_cut, tiny_config
from t2v import config as C
from t2v.checkpointer import incompatible_changes
from t2v.data.cache import cache_key
from t2v.data.manifest import Clip
from t2v.runlog import TrainingError

REPO = Path(__file__).resolve().parents[1]


def test_square_runs_keep_their_cache_names_and_old_checkpoints_resume(tmp_path):
    clips = [Clip(line=1, video=tmp_path / "missing.mp4", captions=["x"], id="a")]
    square, same, wide = (C.load_config(REPO / "configs/tiny.yaml", over, env={})
                          for over in (["data.size=16"], ["data.size=16", "data.width=16"], ["data.width=24"]))
    assert square.data.frame_size == same.data.frame_size == 16 and wide.data.frame_size == (16, 24)
    assert (wide.data.size, wide.data.width) == (16, 24)
    # the name of a square run's cache is what it was before data.width (the size hashed as one int)
    assert cache_key(clips, 4, same.data.frame_size) == cache_key(clips, 4, 16) != cache_key(clips, 4, (16, 24))
    old = C.to_dict(square)
    del old["data"]["width"]  # a checkpoint's config from before data.width
    assert incompatible_changes(C.from_dict(old), same) == []
    assert incompatible_changes(square, wide) == ["data.width: 0 -> 24"]


@pytest.mark.parametrize("over, message", [
    (["data.width=-1"], "data.width must be >= 0"),
    (["data.width=20"], r"data.width must be a multiple of 8 \(the UNet halves it twice\), got 20"),
    (["model.arch=dit", "model.patch=2", "data.width=17"], r"data.width=17 must give frames \(17 cells\) divisible by"),
])
def test_a_width_the_model_cannot_take_is_refused_by_its_key(over, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(REPO / "configs/tiny.yaml", over, env={})


def test_the_msrvtt_wan_configs_are_native_and_480p():
    lora, full, p480 = (C.load_config(REPO / f"configs/{name}.yaml", env={})
                        for name in ("wan_lora", "wan_full", "wan_lora_480p"))
    assert lora.data.frame_size == full.data.frame_size == (240, 320)  # MSR-VTT's own frames: 30x40 latent cells, 15x20 patches
    assert p480.data.frame_size == (480, 640) and p480.train.finetune == "lora"
    with pytest.raises(C.ConfigError, match=r"data.width=328 must give latent frames \(328/8 cells\) divisible by "
                                            "Wan's 2x2 patches"):
        C.load_config(REPO / "configs/wan_lora.yaml", ["data.width=328"], env={})


@pytest.mark.slow
def test_a_wide_run_caches_trains_resumes_bit_exact_and_samples_wide(tmp_path):
    from t2v.sample import main as sample_main
    from t2v.train import train

    args = ("data.size=16", "data.width=24", "train.steps=6", "train.ckpt_every=3", "train.val_every=3",
            "train.sample_every=6")
    straight_and_cut(tmp_path / "data", tmp_path, *args, stop_at=4)
    (npy,) = (tmp_path / "data" / "cache").glob("clips_*.npy")
    assert np.load(npy, mmap_mode="r").shape == (8, 4, 16, 24, 3)  # n t h w c: 16 high, 24 wide
    assert_states_equal(load(tmp_path / "whole" / "ckpt_000006.pt"), load(tmp_path / "cut" / "ckpt_000006.pt"))
    assert "val step 000006" in (tmp_path / "whole" / "train.log").read_text()

    out = tmp_path / "samples"
    assert sample_main(["--ckpt", str(tmp_path / "whole"), "--prompt", "a red circle", "--steps", "2",
                        "--out", str(out), "--format", "mp4"]) == 0
    import decord

    assert decord.VideoReader(str(out / "a_red_circle.mp4"))[0].shape[:2] == (16, 24)  # as sampled, not resized
    # the run's checkpoint does not resume at another width
    with pytest.raises(TrainingError, match=r"ckpt_000006.pt: .*\(data.width: 24 -> 32\)"):
        train(tiny_config(tmp_path / "data", tmp_path / "whole", *args[:1], "data.width=32", "train.steps=9"))


@pytest.mark.slow
def test_a_wide_dit_trains_on_windows_from_a_wide_window_cache(tmp_path):
    from t2v.train import train

    args = ("model.arch=dit", "data.size=16", "data.width=32", "data.sampling=window", "data.fps=8",
            "train.steps=2", "train.ckpt_every=2", "train.val_every=2", "train.sample_every=2")
    cfg = tiny_config(tmp_path / "data", tmp_path / "run", *args)
    prepare(cfg, n_train=4)
    assert train(cfg) == 0
    (npy,) = [p for p in (tmp_path / "data" / "cache").glob("windows_*.npy")]
    assert np.load(npy, mmap_mode="r").shape[1:] == (16, 32, 3)  # frames, h w c
    grid = Image.open(tmp_path / "run" / "samples" / "preview_step000002.png")
    assert grid.width > grid.height
