"""Latent-space training with a pretrained VAE, without downloads: a tiny diffusers AutoencoderKL built from a
config and written with save_pretrained, so the real loading code runs (vae.name=<that folder>)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runs import REPO, assert_states_equal, load, tiny_config
from t2v import config as C
from t2v import train as T
from t2v.data import latents as L
from t2v.data.demo import make_demo
from t2v.data.manifest import read_manifest
from t2v.data.video import decode_uint8, to_model
from t2v.text import embed_captions
from t2v.vae import LatentSpace, VAEError, encode, load_vae, vae_identity


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Demo data (4 frames x 16x16), its caption embeddings, a tiny VAE folder (factor 2: 8x8 latents)."""
    d = tmp_path_factory.mktemp("latent")
    tiny_vae().save_pretrained(d / "vae")
    cfg = latent_config(d, d / "unused")
    make_demo(d, n_train=12, n_val=4, n_test=4, seed=0)
    captions = [c for m in (cfg.data.manifest, C.val_manifest(cfg)) for clip in read_manifest(m) for c in clip.captions]
    embed_captions(cfg.text, captions + list(cfg.train.sample_prompts) + [""], C.cache_dir(cfg, "text"), progress=False)
    return d


def latent_config(d: Path, outdir: Path, *overrides: str) -> C.Config:
    return tiny_config(d, outdir, "model.space=latent", f"vae.name={d / 'vae'}", "vae.batch_size=8", "train.steps=8",
                       "train.ckpt_every=4", "train.log_every=1", "train.val_every=4", *overrides)


def build(cfg: C.Config, manifest=None):
    vae = load_vae(cfg.vae)
    clips = read_manifest(manifest or cfg.data.manifest)
    return L.build_latents(clips, cfg.data.frames, cfg.data.size, C.cache_dir(cfg, "data"), vae,
                           vae_identity(cfg.vae, vae), cfg.vae.batch_size, progress=False), clips, vae


def test_the_cache_holds_each_frames_posterior(data):
    cfg = latent_config(data, data / "unused")
    cache, clips, vae = build(cfg)
    space = LatentSpace.of(vae)
    assert space == LatentSpace(channels=4, factor=2, scaling_factor=vae.config.scaling_factor)  # from its config
    assert cache.array.shape == (12, 2, 4, 4, 8, 8) and cache.array.dtype == np.float16  # n 2 t c h w
    frames = to_model(decode_uint8(clips[5].video, 4, 16))  # t c h w
    mean, std = encode(vae, frames, 8)
    np.testing.assert_allclose(cache.get(5)[0], mean.numpy(), rtol=2e-3, atol=2e-3)  # float16 on disk
    np.testing.assert_allclose(cache.get(5)[1], std.numpy(), rtol=2e-3, atol=2e-3)
    # keyed by the VAE: another VAE's latents are never read for these clips
    other = tiny_vae(seed=1)
    assert vae_identity(cfg.vae, other) != vae_identity(cfg.vae, vae)
    assert L.open_latents(clips, 4, 16, C.cache_dir(cfg, "data"), vae_identity(cfg.vae, other)) is None


def test_a_killed_build_resumes_without_redoing_finished_clips(data, tmp_path, monkeypatch):
    cfg = latent_config(data, data / "unused", f"data.cache_dir={tmp_path / 'a'}")
    reference, clips, vae = build(cfg)  # uninterrupted
    cfg = latent_config(data, data / "unused", f"data.cache_dir={tmp_path / 'b'}")
    calls = []
    real = L.encode

    def killed_after_three(vae, frames, batch):  # the build dies in its fourth group (2 clips each)
        calls.append(frames.shape[0])
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return real(vae, frames, batch)

    monkeypatch.setattr(L, "encode", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        L.build_latents(clips, 4, 16, tmp_path / "b", vae, vae_identity(cfg.vae, vae), 8, progress=False,
                        save_every_s=0)
    left = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "b").glob("latents_*"))
    assert left == ["bad.json", "done.npy", "partial.npy"]  # no .json: not complete, so never read
    calls.clear()
    monkeypatch.setattr(L, "encode", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    resumed = L.build_latents(clips, 4, 16, tmp_path / "b", vae, vae_identity(cfg.vae, vae), 8, progress=False)
    assert calls == [8, 8, 8]  # groups 4..6 only: 3 x (2 clips x 4 frames)
    assert np.array_equal(resumed.array, reference.array)  # byte for byte what one uninterrupted build wrote
    assert sorted(p.name.split(".", 1)[1] for p in (tmp_path / "b").glob("latents_*")) == ["json", "npy"]


def test_training_needs_the_latent_cache_and_says_how(data, tmp_path):
    cfg = latent_config(data, tmp_path, f"data.cache_dir={tmp_path / 'empty'}")
    with pytest.raises(T.TrainingError, match=r"(?s)no latent cache.*python -m t2v.data latents"):
        T.train(cfg)


def test_a_missing_vae_fails_at_once_with_how_to_fetch_it(data, tmp_path, no_network):
    with pytest.raises(VAEError, match="vae.name=.*looks like a local folder but it does not exist"):
        load_vae(C.VAEConfig(name=str(tmp_path / "no-vae")))
    with pytest.raises(VAEError) as e:
        load_vae(C.VAEConfig(name="no-such-org/no-such-vae"))  # HF_HUB_OFFLINE=1: never a download
    msg = str(e.value)
    assert "not available offline" in msg and "login node" in msg and "vae.name=/path/to/that/folder" in msg
    assert "AutoencoderKL.from_pretrained('no-such-org/no-such-vae')" in msg
    assert T.main(["--config", str(REPO / "configs/tiny.yaml"), "model.space=latent", "vae.name=no-such-org/vae",
                   f"train.outdir={tmp_path / 'run'}", f"data.manifest={data / 'train.jsonl'}"]) == 2


def test_latent_training_resumes_bit_exact_and_samples_decoded_videos(data, tmp_path):
    cfg = latent_config(data, tmp_path / "straight")
    build(cfg)
    build(cfg, C.val_manifest(cfg))
    assert T.train(cfg) == 0
    resumed = latent_config(data, tmp_path / "resumed")
    assert T.train(resumed, stop_at=3) == T.REQUEUE_EXIT
    assert T.train(latent_config(data, tmp_path / "resumed")) == 0
    a, b = load(tmp_path / "straight" / "ckpt_000008.pt"), load(tmp_path / "resumed" / "ckpt_000008.pt")
    assert_states_equal(a, b)
    # the config stays as resolved (model.in_channels 0: from the space); the checkpoint records the space's channels
    assert a["data"]["channels"] == 4 and a["config"]["model"]["space"] == "latent"
    log = (tmp_path / "straight" / "train.log").read_text()
    assert "val step 000008" in log  # the validation loss runs on the cached validation latents
    # sampling decodes through the VAE: frames at SIZE, not the 8x8 latents
    from t2v.sample import main as sample_main

    out = tmp_path / "samples"
    assert sample_main(["--ckpt", str(tmp_path / "straight"), "--prompt", "a red circle moving right", "--steps", "2",
                        "--out", str(out), "--format", "both"]) == 0
    from PIL import Image

    grid = Image.open(out / "grid.png")
    gif = Image.open(out / "a_red_circle_moving_right.gif")
    assert gif.size == (32, 32)  # 16x16 decoded frames, shown at 2x
    assert grid.size[0] >= 4 * 16 and (out / "a_red_circle_moving_right.mp4").stat().st_size > 0
    import av

    with av.open(str(out / "a_red_circle_moving_right.mp4")) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (16, 16, 3)


def test_the_transformer_with_flow_resumes_bit_exact_in_latent_space_and_samples(data, tmp_path):
    """The recommended MSR-VTT recipe's settings (configs/latent_dit_flow.yaml) on the tiny VAE's 8x8 latents."""
    recipe = ("model.arch=dit", "diffusion.objective=flow", "diffusion.shift=3", "model.cross_attention=true",
              "text.tokens=true")
    cfg = latent_config(data, tmp_path / "straight", *recipe)
    build(cfg)
    build(cfg, C.val_manifest(cfg))
    captions = [c for m in (cfg.data.manifest, C.val_manifest(cfg)) for clip in read_manifest(m) for c in clip.captions]
    embed_captions(cfg.text, captions + list(cfg.train.sample_prompts) + ["", "a red circle moving right"],
                   C.cache_dir(cfg, "text"), progress=False)  # again, with the per-token embeddings
    assert T.train(cfg) == 0
    assert T.train(latent_config(data, tmp_path / "resumed", *recipe), stop_at=5) == T.REQUEUE_EXIT
    assert T.train(latent_config(data, tmp_path / "resumed", *recipe)) == 0
    assert_states_equal(load(tmp_path / "straight" / "ckpt_000008.pt"), load(tmp_path / "resumed" / "ckpt_000008.pt"))
    assert "val step 000008" in (tmp_path / "straight" / "train.log").read_text()
    from t2v.sample import main as sample_main

    out = tmp_path / "samples"
    assert sample_main(["--ckpt", str(tmp_path / "straight"), "--prompt", "a red circle moving right", "--steps", "2",
                        "--method", "heun", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out / "a_red_circle_moving_right.gif").size == (32, 32)  # decoded 16x16 frames at 2x


def test_a_checkpoint_from_before_the_space_object_resumes_and_samples(data, tmp_path):
    """Latent checkpoints written before t2v/space.py hold the VAE's channels in model.in_channels (training filled
    them into the config) and no data.channels: they resume, and sample, as they did."""
    import torch

    from t2v.sample import main as sample_main

    cfg = latent_config(data, tmp_path / "old", "train.steps=4")
    build(cfg)
    build(cfg, C.val_manifest(cfg))
    assert T.train(cfg) == 0
    path = tmp_path / "old" / "ckpt_000004.pt"
    state = load(path)
    state["config"]["model"]["in_channels"] = 4  # as the old code saved it
    del state["data"]["channels"]
    torch.save(state, path)
    assert T.train(latent_config(data, tmp_path / "old", "train.steps=8")) == 0
    assert "resumed from" in (tmp_path / "old" / "train.log").read_text()
    assert sample_main(["--ckpt", str(path), "--prompt", "a red circle moving right", "--steps", "2"]) == 0


def test_eval_scores_decoded_frames(data, tmp_path):
    """t2v.eval decodes latent samples before CLIPSIM: the scorer sees RGB frames at SIZE."""
    from t2v import eval as E

    cfg = latent_config(data, tmp_path / "run", "train.steps=2", "train.ckpt_every=2", "train.val_every=0")
    build(cfg)
    assert T.train(cfg) == 0
    seen = []

    class Scorer:
        name = "shape-recorder"

        def encode_images(self, images):  # n 3 h w
            seen.append(tuple(images.shape[1:]))
            return torch.nn.functional.normalize(images.float().mean((2, 3)), dim=-1)

        def encode_text(self, captions):
            return torch.nn.functional.normalize(torch.ones(len(captions), 3), dim=-1)

    r = E.evaluate(tmp_path / "run", data / "test.jsonl", 2, clip_model=Scorer(), fvd=False, steps=2, write=False)
    assert seen and all(shape[0] == 3 and shape[1] == shape[2] for shape in seen) and -1 <= r["clipsim"] <= 1
    assert json.dumps(r)  # plain numbers


def test_sharded_latent_builds_merge_into_the_bytes_of_one_build(data, tmp_path):
    """`latents --shard I/N` then `--merge N` (array tasks on several GPUs) write what one build writes."""
    cfg = latent_config(data, data / "unused")
    vae = load_vae(cfg.vae)
    vid = vae_identity(cfg.vae, vae)
    clips = read_manifest(cfg.data.manifest)
    one = L.build_latents(clips, 4, 16, tmp_path / "one", vae, vid, 8, progress=False)
    for i in (2, 0, 1):
        L.build_latent_shard(clips, 4, 16, tmp_path / "sharded", vae, vid, i, 3, 8, progress=False)
    merged = L.merge_latent_shards(clips, 4, 16, tmp_path / "sharded", vae, vid, 3)
    assert merged.npy.read_bytes() == one.npy.read_bytes()
    assert merged.npy.with_suffix(".json").read_text() == one.npy.with_suffix(".json").read_text()
    assert sorted(p.suffix for p in (tmp_path / "sharded").iterdir()) == [".json", ".npy"]


def test_resume_refuses_another_vae(data, tmp_path):
    cfg = latent_config(data, tmp_path / "run", "train.steps=2", "train.ckpt_every=2", "train.val_every=0")
    build(cfg)
    assert T.train(cfg) == 0
    tiny_vae(seed=7).save_pretrained(tmp_path / "other-vae")  # same architecture and channels, other weights
    other = latent_config(data, tmp_path / "run", "train.steps=4", "train.val_every=0", f"vae.name={tmp_path / 'other-vae'}")
    with pytest.raises(T.TrainingError, match="vae.name"):  # another name
        T.train(other)
    tiny_vae(seed=7).save_pretrained(data / "vae-copy")
    import shutil

    shutil.copytree(data / "vae", tmp_path / "vae", dirs_exist_ok=True)
    cfg = latent_config(data, tmp_path / "run2", "train.steps=2", "train.ckpt_every=2", "train.val_every=0",
                        f"vae.name={tmp_path / 'vae'}", f"data.cache_dir={tmp_path / 'cache'}")
    build(cfg)
    assert T.train(cfg) == 0
    shutil.copytree(data / "vae-copy", tmp_path / "vae", dirs_exist_ok=True)  # the same folder, other weights
    with pytest.raises(T.TrainingError, match="trained on the latents of another VAE"):
        T.train(latent_config(data, tmp_path / "run2", "train.steps=4", "train.val_every=0",
                              f"vae.name={tmp_path / 'vae'}", f"data.cache_dir={tmp_path / 'cache'}"))
    assert [p.name for p in (tmp_path / "run").glob("ckpt_*")] == ["ckpt_000002.pt"]


def test_unet_patches_must_divide_the_latent_frame(data):
    """model.patch in latent space: the UNet halves patches of latent cells, so the latent frame (16 pixels / 2 = 8
    cells here) must hold a whole number of them at every level; a bad size is refused before any data is read."""
    from t2v.models import build_model
    from t2v.space import build_space

    cfg = latent_config(data, data / "unused", "model.patch=2")
    space = build_space(cfg)  # 8 cells: 4 patches, halved once
    model = build_model(cfg, space.channels)
    z = torch.randn(space.sample_shape(2, cfg.data.frames, cfg.data.size))  # b t c h w: 2 x 4 x 4 x 8 x 8
    assert model.patch == 2 and model(z, torch.tensor([10, 900]), torch.randn(2, cfg.text.dim)).shape == z.shape
    with pytest.raises(VAEError, match=r"data.size=16: latent frames are 16/2 cells, which the UNet halves 1 times "
                                       r"\(in patches of 8: model.patch\); use a multiple of 32"):
        build_space(latent_config(data, data / "unused", "model.patch=8"))
