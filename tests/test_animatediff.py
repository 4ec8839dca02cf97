"""AnimateDiff (model.arch=animatediff): a tiny random Stable Diffusion 1.5-shaped repository saved in the hub's
layout (tests/pretrained.py), inflated with a motion adapter through the code a user's real weights take, checked
against diffusers' own UNet2DConditionModel and AnimateDiffPipeline. The UNet of these tests runs on pixels."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pretrained import save_sd_pipeline, step_state
from runs import assert_states_equal, load, straight_and_cut, tiny_config
from t2v import config as C
from t2v.models import build_model
from t2v.models.pretrained import PretrainedError
from t2v.objective import build_objective
from t2v.step import Cond, step_generator, train_step

REPO = Path(__file__).resolve().parents[1]
TEXT_DIM = 64
LINEAR = ("diffusion.objective=ddpm", "diffusion.schedule=linear", "diffusion.beta_start=0.00085",
          "diffusion.beta_end=0.012", "diffusion.prediction=eps")


def ad_overrides(folder, *extra):
    return ["model.arch=animatediff", f"model.pretrained={folder}", *LINEAR, "text.tokens=true", f"text.dim={TEXT_DIM}",
            "data.size=16", *extra]


def ad_config(folder, *extra):
    return C.load_config(REPO / "configs/tiny.yaml", ad_overrides(folder, *extra), env={})


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd15", in_channels=3, text_dim=TEXT_DIM)


def test_a_fresh_adapter_leaves_the_image_model_frame_by_frame(sd):
    """Inflated with a fresh adapter (its motion modules' outputs zero, as the original AnimateDiff), the video
    model is the SD UNet run on each frame alone; diffusers' own fresh MotionAdapter is not (max 1.11 here)."""
    from diffusers import UNet2DConditionModel

    model = build_model(ad_config(sd, "train.finetune=motion"), 3).eval()
    unet2d = UNet2DConditionModel.from_pretrained(sd / "unet").eval()
    x = torch.randn(2, 4, 3, 16, 16)  # b t c h w
    t = torch.tensor([10, 700])
    tokens = torch.randn(2, 77, TEXT_DIM)
    with torch.no_grad():
        ours = model(x, t, None, tokens=tokens, token_mask=torch.ones(2, 77, dtype=torch.bool))
        frames = unet2d(x.flatten(0, 1), t.repeat_interleave(4), encoder_hidden_states=tokens.repeat_interleave(4, 0))
    torch.testing.assert_close(ours, frames.sample.view(2, 4, 3, 16, 16), rtol=0, atol=1e-5)
    assert ours.abs().max() > 0.1
    # only the motion modules train, and only they are in the state dict
    names = list(model.state_dict())
    assert names and all("motion_modules" in n for n in names)
    assert len(names) == len([n for n, p in model.named_parameters() if p.requires_grad])


def test_a_bf16_base_keeps_the_motion_modules_fp32_and_computes_what_the_fp32_base_computes(sd):
    """model.base_dtype=bf16 (configs/animatediff.yaml): the frozen SD UNet in bf16, the motion modules that train in
    fp32; called in fp32 the model returns fp32 within bf16 rounding of the fp32 base's output."""
    m32, m16 = (build_model(ad_config(sd, "train.finetune=motion", f"model.base_dtype={d}"), 3).eval()
                for d in ("fp32", "bf16"))
    assert {p.dtype for p in m16.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in m16.parameters() if p.requires_grad} == {torch.float32}
    assert {k: v.dtype for k, v in m16.state_dict().items()} == {k: v.dtype for k, v in m32.state_dict().items()}
    x, t, tokens = torch.randn(1, 4, 3, 16, 16), torch.tensor([500]), torch.randn(1, 77, TEXT_DIM)  # b t c h w
    with torch.no_grad():
        a, b = (m(x, t, tokens=tokens) for m in (m32, m16))
    assert b.dtype == torch.float32 and 0 < (a - b).abs().max() < 0.05 * a.abs().max()


def test_sampler_equals_animatediff_pipeline(sd):
    """Same initial noise, prompt and negative-prompt embeddings: our sd-ddim sampling with guidance gives
    AnimateDiffPipeline's latents (its DDIM scheduler loaded from the same repository)."""
    from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter
    from transformers import AutoTokenizer, CLIPTextModel

    from t2v.sample import generate
    from t2v.space import PixelSpace

    class Raw(PixelSpace):
        bounded = False

        def to_frames(self, x):
            return x

    cfg = ad_config(sd, "train.finetune=full")
    model = build_model(cfg, 3).eval()
    with torch.no_grad():  # motion modules that do something: sampling must carry them along
        for name, p in model.unet.named_parameters():
            if "motion_modules" in name and "proj_out" in name:
                p.normal_(0, 0.05)
    model.null = torch.randn(77, TEXT_DIM)
    tokens = torch.randn(1, 77, TEXT_DIM)
    ours = generate(model, cfg, torch.zeros(1, TEXT_DIM), tokens=tokens, token_mask=torch.ones(1, 77, dtype=torch.bool),
                    steps=4, guidance=6.0, seed=5, method="sd-ddim", space=Raw())  # b t c h w
    pipe = AnimateDiffPipeline(vae=AutoencoderKL.from_pretrained(sd / "vae"),
                               text_encoder=CLIPTextModel.from_pretrained(sd / "text_encoder"),
                               tokenizer=AutoTokenizer.from_pretrained(sd / "tokenizer"), unet=model.unet,
                               motion_adapter=MotionAdapter(), scheduler=DDIMScheduler.from_pretrained(sd / "scheduler"))
    noise = torch.randn((1, 4, 3, 16, 16), generator=torch.Generator().manual_seed(5))
    theirs = pipe(prompt_embeds=tokens, negative_prompt_embeds=model.null[None], num_frames=4, height=16, width=16,
                  latents=noise.permute(0, 2, 1, 3, 4), num_inference_steps=4, guidance_scale=6.0,
                  output_type="latent").frames  # b c t h w
    torch.testing.assert_close(ours, theirs.permute(0, 2, 1, 3, 4), rtol=0, atol=5e-5)
    assert ours.abs().max() > 0.5


def test_training_loss_is_animatediffs_ddpm_loss(sd):
    """train_step's loss equals the hand computation with diffusers' DDPMScheduler (linear betas 0.00085 -> 0.012):
    x_t = scheduler.add_noise(x0, eps, t), the UNet called as AnimateDiffPipeline calls it, target eps."""
    from diffusers import DDPMScheduler

    cfg = ad_config(sd, "train.finetune=motion", "diffusion.cond_dropout=0")
    model = build_model(cfg, 3)
    state = step_state(model, cfg)
    objective = state.objective
    x0 = torch.rand(2, 4, 3, 16, 16) * 2 - 1
    tokens = torch.randn(2, 77, TEXT_DIM)
    step = 5
    g = step_generator(cfg.train.seed, step, torch.device("cpu"))
    t = objective.draw_times(g, 2, "cpu")
    eps = torch.randn(x0.shape, generator=g)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear")
    noisy = sched.add_noise(x0.permute(0, 2, 1, 3, 4), eps.permute(0, 2, 1, 3, 4), t)  # b c t h w
    with torch.no_grad():
        out = model.unet(noisy, t, encoder_hidden_states=tokens.repeat_interleave(4, 0)).sample
    hand = ((out - eps.permute(0, 2, 1, 3, 4)) ** 2).mean()
    result = train_step(state, step, x0, Cond(torch.zeros(2, TEXT_DIM), tokens, torch.ones(2, 77, dtype=torch.bool)))
    assert result.loss == pytest.approx(float(hand), rel=1e-4)


def test_sd_captions_are_the_pipelines(sd, tmp_path):
    """text.encoder=sd_clip: all 77 outputs of the text encoder, no mask, as AnimateDiffPipeline.encode_prompt."""
    from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter
    from transformers import AutoTokenizer, CLIPTextModel

    from t2v.text import embed_captions

    cfg = ad_config(sd, "text.encoder=sd_clip", f"text.name={sd}").text
    captions = ["a red circle moving right", ""]
    cache = embed_captions(cfg, captions, tmp_path, progress=False)
    pipe = AnimateDiffPipeline(vae=AutoencoderKL.from_pretrained(sd / "vae"),
                               text_encoder=CLIPTextModel.from_pretrained(sd / "text_encoder"),
                               tokenizer=AutoTokenizer.from_pretrained(sd / "tokenizer"),
                               unet=build_model(ad_config(sd), 3).unet, motion_adapter=MotionAdapter(),
                               scheduler=DDIMScheduler.from_pretrained(sd / "scheduler"))
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(captions, "cpu", 1, False)
    for i, caption in enumerate(captions):
        tokens, mask = cache.get_tokens(caption)
        assert tokens.shape == (77, TEXT_DIM) and bool(mask.all())
        torch.testing.assert_close(tokens, theirs[i], rtol=0, atol=2e-3)  # float16 in the cache


def test_bad_settings_are_refused_by_name(sd, tmp_path):
    with pytest.raises(C.ConfigError, match="set diffusion.objective=ddpm and diffusion.prediction=eps"):
        ad_config(sd, "diffusion.objective=flow")
    with pytest.raises(C.ConfigError, match="model.motion_adapter applies to model.arch=animatediff"):
        C.load_config(REPO / "configs/tiny.yaml", ["model.arch=wan", "model.pretrained=x", "diffusion.objective=flow",
                                                   "text.tokens=true", "model.motion_adapter=y"], env={})
    with pytest.raises(PretrainedError, match="data.frames=40: the motion adapter's positions reach 32 frames"):
        build_model(ad_config(sd, "data.frames=40"), 3)
    with pytest.raises(PretrainedError, match="holds no MotionAdapter"):
        (tmp_path / "nothing").mkdir()
        build_model(ad_config(sd, f"model.motion_adapter={tmp_path / 'nothing'}"), 3)
    with pytest.raises(PretrainedError, match="a AutoencoderKL, not a UNet2DConditionModel"):
        shutil.copytree(sd / "vae", tmp_path / "bad" / "unet")
        build_model(ad_config(tmp_path / "bad"), 3)
    for bad, says in ((["text.encoder=sd_clip", "text.max_tokens=300"], "set text.max_tokens=77"),
                      (["diffusion.beta_start=0.001", "diffusion.beta_end=0"], "0 < beta_start < beta_end < 1"),
                      (["diffusion.schedule=cosine"], "apply to diffusion.objective=ddpm with diffusion.schedule=linear"),
                      (["train.sample_method=sd-ddim", "diffusion.shift=2"], "needs diffusion.schedule=linear and")):
        with pytest.raises(C.ConfigError, match=says):
            ad_config(sd, *bad)
    cosine = ad_config(sd, "diffusion.schedule=cosine", "diffusion.beta_start=0", "diffusion.beta_end=0")
    with pytest.raises(ValueError, match="sd-ddim is diffusers' DDIM over linear betas"):
        build_objective(cosine.diffusion).sample(lambda x, t: x, (1, 2, 3, 8, 8), 2, "sd-ddim")


@pytest.mark.slow
def test_motion_run_resumes_bit_exact_and_exports_a_motion_adapter(sd, tmp_path):
    """AnimateDiff's own training (motion modules only) on the demo data: resumed equals uninterrupted bit for bit,
    the checkpoint holds the motion modules and their EMA only, and the exported MotionAdapter inflates the base
    UNet into our EMA model (AnimateDiffPipeline's way of loading one)."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    from t2v import export as export_mod
    from t2v.sample import load_ema
    from t2v.train import train

    over = ad_overrides(sd, "data.frames=4", "train.finetune=motion", "train.steps=6", "train.ckpt_every=3",
                        "train.val_every=3", "train.lr=1e-3", "train.sample_every=6", "train.sample_steps=2",
                        "train.sample_method=sd-ddim")
    straight_and_cut(tmp_path / "data", tmp_path, *over, stop_at=2)
    a, b = load(tmp_path / "whole" / "ckpt_000006.pt"), load(tmp_path / "cut" / "ckpt_000006.pt")
    assert_states_equal(a, b)
    assert all("motion_modules" in n for n in a["model"] if n != "null_tokens") and a["data"]["base"]["adapter"] == "fresh"
    log = (tmp_path / "whole" / "train.log").read_text()
    assert "val step 000006" in log and "sample grid" in log

    written = export_mod.export(tmp_path / "whole")
    assert (written / "config.json").is_file()
    _, ours, _ = load_ema(tmp_path / "whole")
    unet = UNetMotionModel.from_unet2d(UNet2DConditionModel.from_pretrained(sd / "unet"),
                                       MotionAdapter.from_pretrained(written))
    x, t, context = torch.randn(1, 3, 4, 16, 16), torch.tensor([500]), torch.randn(4, 77, TEXT_DIM)
    with torch.no_grad():
        theirs = unet(x, t, encoder_hidden_states=context).sample
        mine = ours.unet(x, t, encoder_hidden_states=context).sample
        image = UNet2DConditionModel.from_pretrained(sd / "unet")(x.permute(0, 2, 1, 3, 4).flatten(0, 1), t.repeat(4),
                                                                   encoder_hidden_states=context).sample
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-6)
    assert (mine.permute(0, 2, 1, 3, 4).flatten(0, 1) - image).abs().max() > 1e-4  # the motion modules learnt something

    # the full UNetMotionModel of the same run, and a LoRA run's adapter, as diffusers loads them
    full = export_mod.export(tmp_path / "whole", "full", tmp_path / "full")
    with torch.no_grad():
        torch.testing.assert_close(UNetMotionModel.from_pretrained(full)(x, t, encoder_hidden_states=context).sample,
                                   mine, rtol=0, atol=1e-5)
    lora = ad_overrides(sd, "data.frames=4", "train.finetune=lora", "train.lora_rank=4", "train.lora_alpha=8",
                        "train.steps=3", "train.ckpt_every=3", "train.val_every=0", "train.lr=1e-2")
    assert train(tiny_config(tmp_path / "data", tmp_path / "lora", *lora)) == 0
    written = export_mod.export(tmp_path / "lora")
    assert written.name == "pytorch_lora_weights.safetensors"
    _, tuned, _ = load_ema(tmp_path / "lora")
    from diffusers import AnimateDiffPipeline

    from t2v.models.animatediff import fresh_adapter

    unet2d = UNet2DConditionModel.from_pretrained(sd / "unet")
    pipe = AnimateDiffPipeline.from_pretrained(sd, motion_adapter=fresh_adapter(unet2d))  # the base, inflated
    with torch.no_grad():
        before = pipe.unet(x, t, encoder_hidden_states=context).sample
        pipe.load_lora_weights(written.parent)
        after = pipe.unet(x, t, encoder_hidden_states=context).sample
        mine = tuned.unet(x, t, encoder_hidden_states=context).sample
    assert (mine - before).abs().max() > 1e-3
    torch.testing.assert_close(after, mine, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_full_run_resumes_bit_exact_and_exports_the_motion_unet(sd, tmp_path):
    """train.finetune=full: the image layers train along with the motion modules, interrupted and resumed equals
    uninterrupted bit for bit, the checkpoint holds the whole inflated UNet, and the default export is a
    UNetMotionModel folder that gives our EMA model's output."""
    from diffusers import UNetMotionModel

    from t2v import export as export_mod
    from t2v.sample import load_ema

    over = ad_overrides(sd, "data.frames=4", "train.finetune=full", "train.steps=4", "train.ckpt_every=2",
                        "train.val_every=0", "train.lr=1e-3")
    straight_and_cut(tmp_path / "data", tmp_path, *over, stop_at=3)
    a = load(tmp_path / "whole" / "ckpt_000004.pt")
    assert_states_equal(a, load(tmp_path / "cut" / "ckpt_000004.pt"))
    names = [n for n in a["model"] if n != "null_tokens"]
    assert any("motion_modules" in n for n in names) and any("attn2.to_k" in n for n in names)  # video and image

    written = export_mod.export(tmp_path / "whole")
    assert written == tmp_path / "whole" / "export" / "ckpt_000004"
    _, ours, _ = load_ema(tmp_path / "whole")
    unet = UNetMotionModel.from_pretrained(written)
    assert {f"unet.{n}" for n, _ in unet.named_parameters()} == set(names)  # every weight; buffers are rebuilt
    x, t, context = torch.randn(1, 3, 4, 16, 16), torch.tensor([500]), torch.randn(4, 77, TEXT_DIM)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=context).sample,
                                   ours.unet(x, t, encoder_hidden_states=context).sample, rtol=0, atol=1e-5)
