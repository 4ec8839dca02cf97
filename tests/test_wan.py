"""Wan 2.1 fine-tuning (model.arch=wan): tiny random Wan pipelines saved in the hub's layout (tests/pretrained.py),
loaded through the code a user's real weights take, checked against diffusers' own WanPipeline.

The transformer of the training tests runs on pixels (in_channels 3), so the demo data trains it without a VAE."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrained import save_wan_pipeline, step_state
from runs import assert_states_equal, load, prepare, straight_and_cut, tiny_config
from t2v import config as C
from t2v.models import build_model, ema_copy
from t2v.models.pretrained import PretrainedError
from t2v.models.wan import TEXT_LEN
from t2v.space import PixelSpace
from t2v.step import Cond, step_generator, train_step

REPO = Path(__file__).resolve().parents[1]
TEXT_DIM = 64  # the demo's hash encoder: tokens of text.dim values, Wan's text_dim


def wan_overrides(folder, *extra):
    return ["model.arch=wan", f"model.pretrained={folder}", "diffusion.objective=flow", "diffusion.shift=3",
            "text.tokens=true", f"text.dim={TEXT_DIM}", *extra]


def wan_config(folder, *extra, frames=5):
    return C.load_config(REPO / "configs/tiny.yaml", wan_overrides(folder, f"data.frames={frames}", *extra), env={})


@pytest.fixture(scope="module")
def pixel_wan(tmp_path_factory):
    """A whole tiny WanPipeline whose transformer denoises RGB frames."""
    return save_wan_pipeline(tmp_path_factory.mktemp("wan") / "pipe", in_channels=3, text_dim=TEXT_DIM)


class Raw(PixelSpace):
    """Pixel space without clipping: the samples compared as they leave the sampler."""

    bounded = False

    def to_frames(self, x):
        return x


def test_sampler_equals_wan_pipeline(pixel_wan):
    """Same initial noise and caption embeddings: our UniPC sampling (with guidance against the empty caption's
    embedding) gives WanPipeline's latents, its scheduler loaded from the same folder."""
    from diffusers import WanPipeline

    from t2v.sample import generate

    cfg = wan_config(pixel_wan, "train.finetune=full")
    model = build_model(cfg, 3).eval()
    model.null = torch.randn(2, TEXT_DIM)  # the empty caption: two real tokens
    tokens = torch.randn(2, 6, TEXT_DIM)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    ours = generate(model, cfg, torch.zeros(2, TEXT_DIM), tokens=tokens, token_mask=mask, steps=4, guidance=5.0,
                    seed=3, method="unipc", space=Raw())  # b t c h w
    pipe = WanPipeline.from_pretrained(pixel_wan)
    noise = torch.randn((2, 5, 3, 16, 16), generator=torch.Generator().manual_seed(3))  # what generate drew, b t c h w
    prompt = model.captions(tokens, mask, None)  # b 512 d: the padding zero, as WanPipeline.encode_prompt makes it
    assert prompt.shape == (2, TEXT_LEN, TEXT_DIM) and prompt[1, 4:].abs().max() == 0
    negative = model.captions(model.null[None].expand(2, -1, -1), None, None)  # b 512 d
    assert negative[:, :2].abs().min() > 0 and negative[:, 2:].abs().max() == 0
    theirs = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, num_frames=5, height=16,
                  width=16, latents=noise.permute(0, 2, 1, 3, 4), num_inference_steps=4, guidance_scale=5.0,
                  output_type="latent").frames  # b c t h w
    torch.testing.assert_close(ours, theirs.permute(0, 2, 1, 3, 4), rtol=0, atol=2e-5)
    assert ours.abs().max() > 1.0  # not a trivial output


def test_training_loss_is_wans_flow_loss(pixel_wan):
    """train_step's loss for a batch equals the hand computation with the library model, called as WanPipeline
    calls it: x_t = (1 - sigma) x0 + sigma eps, timestep 1000 sigma, context zero-padded to 512, target eps - x0."""
    cfg = wan_config(pixel_wan, "train.finetune=full", "diffusion.cond_dropout=0")
    model = build_model(cfg, 3)
    state = step_state(model, cfg)
    objective = state.objective
    x0 = torch.rand(2, 5, 3, 16, 16) * 2 - 1  # b t c h w
    tokens, mask = torch.randn(2, 7, TEXT_DIM), torch.arange(7)[None] < torch.tensor([[7], [3]])
    step = 11
    g = step_generator(cfg.train.seed, step, torch.device("cpu"))  # the step's draws, in the step's order
    sigma = objective.draw_times(g, 2, "cpu")
    eps = torch.randn(x0.shape, generator=g)
    x = x0.permute(0, 2, 1, 3, 4)  # b c t h w, as the pipeline holds latents
    e = eps.permute(0, 2, 1, 3, 4)
    s = sigma.view(2, 1, 1, 1, 1)
    context = torch.zeros(2, TEXT_LEN, TEXT_DIM)
    context[:, :7] = tokens * mask[..., None]
    with torch.no_grad():
        out = model.transformer(hidden_states=(1 - s) * x + s * e, timestep=sigma * 1000,
                                encoder_hidden_states=context, return_dict=False)[0]
    hand = ((out - (e - x)) ** 2).mean()
    result = train_step(state, step, x0, Cond(torch.zeros(2, TEXT_DIM), tokens, mask))  # then it updates the weights
    assert result.loss == pytest.approx(float(hand), rel=1e-5)
    assert 0 < sigma.min() and sigma.max() < 1 and len(set(sigma.tolist())) == 2


def test_full_and_lora_state_dicts_hold_what_trains(pixel_wan):
    full = build_model(wan_config(pixel_wan, "train.finetune=full"), 3)
    lora = build_model(wan_config(pixel_wan, "train.finetune=lora", "train.lora_rank=4"), 3)
    n_transformer = len(full.transformer.state_dict())
    assert len(full.state_dict()) == n_transformer
    names = list(lora.state_dict())
    # rank-4 A and B for q, k, v, out of both attentions of both blocks
    assert len(names) == 2 * 2 * 4 * 2 and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {tuple(lora.state_dict()[n].shape) for n in names if "lora_A" in n} == {(4, 24)}
    ema = ema_copy(lora)
    assert list(ema.state_dict()) == names  # the EMA saves the same keys although nothing in it trains
    wrapped = torch.nn.ModuleDict({"module": lora})  # as DDP or torch.compile hold it
    assert list(wrapped.state_dict()) == [f"module.{n}" for n in names]
    assert not wrapped.load_state_dict(wrapped.state_dict()).missing_keys  # the frozen base is not "missing"
    base = [p for n, p in lora.named_parameters() if "lora_" not in n]
    shared = {id(p) for p in ema.parameters()}
    assert all(id(p) in shared for p in base)  # the frozen base is not copied for the EMA
    assert not any(id(p) in shared for n, p in lora.named_parameters() if "lora_" in n)


def test_a_bf16_base_halves_the_frozen_weights_and_computes_what_the_fp32_base_computes(pixel_wan):
    """model.base_dtype=bf16: the frozen weights in bf16 except what diffusers keeps in fp32 (Wan's norms, time
    embedding, modulation), the LoRA in fp32 and the checkpoint's keys unchanged; called in fp32 (a sampler) it
    computes under its own bf16 autocast and returns fp32, within bf16 rounding of the fp32 base."""
    over = ("train.finetune=lora", "train.lora_rank=4", "diffusion.cond_dropout=0")
    m32, m16 = (build_model(wan_config(pixel_wan, *over, f"model.base_dtype={d}"), 3) for d in ("fp32", "bf16"))
    frozen = lambda m: {n: p for n, p in m.named_parameters() if not p.requires_grad}  # noqa: E731
    keep = set(type(m16.transformer)._keep_in_fp32_modules)
    kept = {n for n, p in frozen(m16).items() if p.dtype == torch.float32}
    assert kept and all(keep & set(n.split(".")) for n in kept)  # fp32 only where diffusers keeps it at inference
    assert all(p.dtype == torch.bfloat16 for n, p in frozen(m16).items() if n not in kept)
    assert all(p.dtype == torch.float32 for p in m16.parameters() if p.requires_grad)
    size = lambda m: sum(p.numel() * p.element_size() for p in frozen(m).values())  # noqa: E731
    halved = sum(p.numel() for n, p in frozen(m32).items() if n not in kept)
    assert size(m16) == size(m32) - 2 * halved  # 2 of 4 bytes saved on every other frozen weight (Wan 1.3B: 5.7 -> 2.8 GB)
    assert {k: v.dtype for k, v in m16.state_dict().items()} == {k: v.dtype for k, v in m32.state_dict().items()}

    x, t = torch.rand(2, 5, 3, 16, 16) * 2 - 1, torch.tensor([0.2, 0.7])  # b t c h w
    tokens, mask = torch.randn(2, 7, TEXT_DIM), torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        a, b = (m(x, t * 1000, tokens=tokens, token_mask=mask) for m in (m32, m16))
    assert b.dtype == torch.float32 and 0 < (a - b).abs().max() < 0.05 * a.abs().max()
    s32, s16 = step_state(m32, wan_config(pixel_wan, *over)), step_state(m16, wan_config(pixel_wan, *over))
    s32.precision = s16.precision = "bf16"  # the step on a GPU: every matmul in bf16 whatever the weights' dtype
    cond = Cond(torch.zeros(2, TEXT_DIM), tokens, mask)
    assert train_step(s16, 3, x, cond).loss == pytest.approx(train_step(s32, 3, x, cond).loss, rel=2e-2)
    with pytest.raises(C.ConfigError, match="train.finetune=full freezes nothing"):
        wan_config(pixel_wan, "train.finetune=full", "model.base_dtype=bf16")
    with pytest.raises(C.ConfigError, match="model.base_dtype apply to model.arch=wan or animatediff only"):
        C.load_config(REPO / "configs/tiny.yaml", ["model.base_dtype=bf16"], env={})


def test_the_base_digest_is_what_from_pretrained_loads(pixel_wan, tmp_path):
    """A fuller download of the same repository (fp16 or other variants beside the weights) is the same base."""
    from t2v.models.pretrained import weights_digest

    folder = tmp_path / "transformer"
    shutil.copytree(pixel_wan / "transformer", folder)
    before = weights_digest(folder)
    (folder / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"other bytes")
    assert weights_digest(folder) == before
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"other weights")
    assert weights_digest(folder) != before


def test_a_cache_without_the_empty_caption_is_refused(pixel_wan, tmp_path):
    from t2v.models import set_null_caption
    from t2v.text import embed_captions

    cfg = wan_config(pixel_wan)
    model = build_model(cfg, 3)
    cache = embed_captions(cfg.text, ["a red circle"], tmp_path, progress=False)
    with pytest.raises(PretrainedError, match='no per-token embedding of the empty caption "".*t2v.text embed'):
        set_null_caption(model, cache)


def test_bad_bases_and_settings_are_refused_by_name(pixel_wan, tmp_path, monkeypatch):
    with pytest.raises(PretrainedError, match="holds no WanTransformer3DModel.*it holds: a.txt"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "a.txt").write_text("x")
        build_model(wan_config(tmp_path / "empty"), 3)
    vae_only = tmp_path / "vae_only"
    shutil.copytree(pixel_wan / "vae", vae_only / "transformer")
    with pytest.raises(PretrainedError, match="AutoencoderKLWan, not a WanTransformer3DModel"):
        build_model(wan_config(vae_only), 3)
    with pytest.raises(PretrainedError, match="(?s)not available offline.*snapshot_download\\('Wan-AI/Nope-1.3B'\\)"):
        build_model(wan_config("Wan-AI/Nope-1.3B"), 3)  # a hub name not in the cache, offline
    with pytest.raises(PretrainedError, match="lora_targets=to_nothing matches no module.*blocks.0.attn1.to_q"):
        build_model(wan_config(pixel_wan, "train.finetune=lora", "train.lora_targets=to_nothing"), 3)
    with pytest.raises(PretrainedError, match="takes 3-channel inputs but model.space=pixel gives 16"):
        build_model(wan_config(pixel_wan), 16)
    with pytest.raises(C.ConfigError, match="train.finetune=motion trains AnimateDiff's motion modules"):
        wan_config(pixel_wan, "train.finetune=motion")
    with pytest.raises(C.ConfigError, match="set diffusion.objective=flow"):
        wan_config(pixel_wan, "diffusion.objective=ddpm")
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(PretrainedError, match="needs the peft package"):
        build_model(wan_config(pixel_wan, "train.finetune=lora"), 3)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(PretrainedError, match="needs the accelerate package"):
        build_model(wan_config(pixel_wan), 3)


@pytest.mark.slow
def test_lora_run_resumes_bit_exact_exports_and_refuses_another_base(pixel_wan, tmp_path, capsys):
    """A LoRA fine-tune of the demo data: interrupted and resumed equals uninterrupted bit for bit; its checkpoints
    hold the adapter only; the exported file loads into WanPipeline with its alpha and gives our EMA model's output;
    a resume or a sample against other base weights is refused, naming the base."""
    from diffusers import WanPipeline

    from t2v import export as export_mod
    from t2v.sample import load_ema
    from t2v.train import TrainingError, train

    base = tmp_path / "base"
    shutil.copytree(pixel_wan, base)
    over = wan_overrides(base, "data.frames=5", "train.finetune=lora", "train.lora_rank=4", "train.lora_alpha=8",
                         "train.steps=8", "train.ckpt_every=4", "train.val_every=0", "train.lr=1e-2")
    straight_and_cut(tmp_path / "data", tmp_path, *over, stop_at=3)
    a, b = load(tmp_path / "whole" / "ckpt_000008.pt"), load(tmp_path / "cut" / "ckpt_000008.pt")
    assert_states_equal(a, b)
    assert set(a["model"]) == set(a["ema"]) and len(a["model"]) == 33
    assert all("lora_" in n for n in a["model"] if n != "null_tokens")
    assert a["model"]["null_tokens"].shape == (1, TEXT_DIM)  # the hash encoder's "": its start token
    assert a["data"]["base"]["name"] == str(base) and len(a["data"]["base"]["sha256"]) == 64
    assert (tmp_path / "whole" / "ckpt_000008.pt").stat().st_size < 200_000  # the base's 150 kB are not in it

    written = export_mod.export(tmp_path / "whole")
    assert written == tmp_path / "whole" / "export" / "ckpt_000008" / "pytorch_lora_weights.safetensors"
    _, ours, _ = load_ema(tmp_path / "whole")
    pipe = WanPipeline.from_pretrained(base)
    x, t, context = torch.randn(1, 3, 5, 16, 16), torch.tensor([400.0]), torch.randn(1, TEXT_LEN, TEXT_DIM)
    with torch.no_grad():
        before = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
        pipe.load_lora_weights(written.parent)
        after = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
        mine = ours.transformer(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
    assert (mine - before).abs().max() > 1e-3  # the adapter changed the model ...
    torch.testing.assert_close(after, mine, rtol=0, atol=1e-6)  # ... and diffusers loads that change, alpha 8 / rank 4
    with pytest.raises(export_mod.ExportError, match="not empty"):
        export_mod.export(tmp_path / "whole")
    capsys.readouterr()
    assert export_mod.main([str(tmp_path / "whole"), "--out", str(tmp_path / "cli")]) == 0  # the command users run
    printed = capsys.readouterr().out
    assert "exported" in printed and f"pipe.load_lora_weights('{tmp_path / 'cli'}')" in printed
    assert export_mod.main([str(tmp_path / "whole"), "--format", "motion", "--out", str(tmp_path / "m")]) == 2
    assert "exports lora, full" in capsys.readouterr().err
    full = export_mod.export(tmp_path / "whole", "full", tmp_path / "full")
    with torch.no_grad():
        merged = WanPipeline.from_pretrained(full).transformer(hidden_states=x, timestep=t,
                                                                 encoder_hidden_states=context, return_dict=False)[0]
    torch.testing.assert_close(merged, mine, rtol=0, atol=1e-5)

    save_wan_pipeline(base, in_channels=3, text_dim=TEXT_DIM, seed=1)  # other weights at the same path
    longer = tiny_config(tmp_path / "data", tmp_path / "whole", *over, "train.steps=10")
    with pytest.raises(TrainingError, match=f"trained from the base {base} .* has other weights"):
        train(longer)
    from t2v.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="has other weights"):
        load_ema(tmp_path / "whole")


@pytest.mark.slow
def test_full_run_resumes_bit_exact_and_exports_a_pipeline_diffusers_loads(pixel_wan, tmp_path):
    """configs/wan_full.yaml's recipe (train.finetune=full): every transformer weight trains, interrupted and resumed
    equals uninterrupted bit for bit, the checkpoint holds the transformer (not the text encoder or the VAE), and the
    default export is a WanPipeline folder whose transformer gives our EMA model's output."""
    from diffusers import WanPipeline

    from t2v import export as export_mod
    from t2v.sample import load_ema

    over = wan_overrides(pixel_wan, "data.frames=5", "train.finetune=full", "train.steps=4", "train.ckpt_every=2",
                         "train.val_every=0", "train.lr=1e-3")
    straight_and_cut(tmp_path / "data", tmp_path, *over, stop_at=3)
    a = load(tmp_path / "whole" / "ckpt_000004.pt")
    assert_states_equal(a, load(tmp_path / "cut" / "ckpt_000004.pt"))
    base = WanPipeline.from_pretrained(pixel_wan).transformer
    held = {n.removeprefix("transformer.") for n in a["model"] if n != "null_tokens"}
    assert held == set(base.state_dict())  # the whole transformer, and nothing of the text encoder or VAE

    written = export_mod.export(tmp_path / "whole")
    assert written == tmp_path / "whole" / "export" / "ckpt_000004"
    _, ours, _ = load_ema(tmp_path / "whole")
    x, t, context = torch.randn(1, 3, 5, 16, 16), torch.tensor([400.0]), torch.randn(1, TEXT_LEN, TEXT_DIM)
    with torch.no_grad():
        before = base(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
        theirs = WanPipeline.from_pretrained(written).transformer(hidden_states=x, timestep=t,
                                                                  encoder_hidden_states=context, return_dict=False)[0]
        mine = ours.transformer(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
    assert (mine - before).abs().max() > 1e-3  # four steps moved the weights ...
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-6)  # ... and the exported folder holds them


@pytest.mark.slow
def test_a_bf16_base_run_resumes_bit_exact_samples_and_exports_fp32(pixel_wan, tmp_path):
    """configs/wan_lora.yaml's model.base_dtype=bf16 through the documented commands: the LoRA trains and resumes
    bit-exact, its checkpoint holds the fp32 adapter only, sampling (fp32, no autocast of its own) runs, and a
    `--format full` export merges the adapter into the fp32 base, as the base was published."""
    from safetensors.torch import load_file

    from t2v import export as export_mod
    from t2v.sample import generate, load_ema

    over = wan_overrides(pixel_wan, "data.frames=5", "train.finetune=lora", "train.lora_rank=4", "train.steps=4",
                         "train.ckpt_every=2", "train.val_every=4", "train.lr=1e-2", "model.base_dtype=bf16")
    straight_and_cut(tmp_path / "data", tmp_path, *over, stop_at=2)
    a = load(tmp_path / "whole" / "ckpt_000004.pt")
    assert_states_equal(a, load(tmp_path / "cut" / "ckpt_000004.pt"))
    assert all(v.dtype == torch.float32 for v in a["model"].values())
    assert "val step 000004" in (tmp_path / "whole" / "train.log").read_text()
    cfg, model, _ = load_ema(tmp_path / "whole")
    video = generate(model, cfg, torch.zeros(1, TEXT_DIM), tokens=torch.randn(1, 3, TEXT_DIM),
                     token_mask=torch.ones(1, 3, dtype=torch.bool), steps=2, seed=0)
    assert video.shape == (1, 5, 3, 16, 16) and video.dtype == torch.float32 and torch.isfinite(video).all()
    full = export_mod.export(tmp_path / "whole", "full", tmp_path / "full")
    weights = load_file(full / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float32}


def test_umt5_captions_are_wan_pipelines_and_cached_at_their_length(pixel_wan, tmp_path):
    """text.encoder=umt5 from the pipeline folder: the cleaned caption, the mask, the padding zero: WanPipeline's
    prompt embeddings at every real token. The cache stores the real tokens only and pads at lookup."""
    from diffusers import WanPipeline

    from t2v.text import EmbeddingCache, embed_captions, encoder_key

    cfg = wan_config(pixel_wan, "text.encoder=umt5", f"text.name={pixel_wan}", "text.max_tokens=512").text
    captions = ["a red circle moving right", "  the   cat &amp; dog", ""]
    cache = embed_captions(cfg, captions, tmp_path, progress=False)
    pipe = WanPipeline.from_pretrained(pixel_wan)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=512)
    for i, caption in enumerate(captions):
        tokens, mask = cache.get_tokens(caption)
        assert tokens.shape == (512, TEXT_DIM) and mask.shape == (512,)
        torch.testing.assert_close(tokens, theirs[i], rtol=0, atol=2e-3)  # float16 in the cache
    lengths = cache.lengths.tolist()
    assert lengths == [int(cache.get_tokens(c)[1].sum()) for c in cache.captions] and min(lengths) == 1
    assert cache.flat_tokens.shape == (sum(lengths), TEXT_DIM)
    assert cache.nbytes() < cache.padded_nbytes() / 10  # vs every caption padded to 512 tokens
    reloaded = EmbeddingCache.load(tmp_path, encoder_key(cfg))
    assert torch.equal(reloaded.get_tokens(captions[1])[0], cache.get_tokens(captions[1])[0])


def encoded_demo(tmp_path: Path, over: list[str], n_train: int, kind: str = "shapes"):
    """The demo data (``kind``), its captions embedded and its clips encoded by `python -m t2v.data latents` with
    ``over``: (the training config, the latents command's arguments)."""
    from t2v.data.__main__ import main as data_main
    from t2v.data.demo import make_demo
    from t2v.data.manifest import read_manifest
    from t2v.text import embed_captions

    cfg = tiny_config(tmp_path / "data", tmp_path / "run", *over)
    make_demo(tmp_path / "data", n_train=n_train, n_val=2, n_test=2, seed=0, kind=kind)
    captions = [c for m in (cfg.data.manifest, C.val_manifest(cfg)) for clip in read_manifest(m) for c in clip.captions]
    embed_captions(cfg.text, captions + list(cfg.train.sample_prompts) + [""], C.cache_dir(cfg, "text"), progress=False)
    args = ["latents", "--config", str(REPO / "configs/tiny.yaml"), f"data.manifest={cfg.data.manifest}",
            f"data.cache_dir={cfg.data.cache_dir}", f"text.cache_dir={cfg.text.cache_dir}", *over]
    assert data_main(args) == 0
    return cfg, args


@pytest.mark.slow
def test_wan_in_its_vae_space_trains_resumes_and_samples_what_wan_pipeline_decodes(tmp_path):
    """The path of a real fine-tune: Wan's own VAE (16 channels, 4x in time) encodes each clip of 4k+1 frames once
    (`python -m t2v.data latents`), normalised by its latents_mean/std; a LoRA trains, resumes bit-exact, and its
    decoded samples are WanPipeline's video from the same noise and prompt embeddings. Frames are wider than high
    (16 x 32, as MSR-VTT's 240 x 320 are), so a height and width swapped anywhere would show."""
    from diffusers import WanPipeline

    from t2v.data.__main__ import main as data_main
    from t2v.sample import generate, load_ema, space_for_sampling
    from t2v.train import train

    base = save_wan_pipeline(tmp_path / "wan", in_channels=16, text_dim=TEXT_DIM)
    over = [*wan_overrides(base, "data.frames=5", "data.width=32", "model.space=latent", f"vae.name={base}",
                           "vae.subfolder=vae",
                           "train.finetune=lora", "train.lora_rank=4", "train.steps=6", "train.ckpt_every=3",
                           "train.val_every=3", "train.lr=1e-2")]
    cfg, args = encoded_demo(tmp_path, over, n_train=6)
    shapes = sorted(np.load(p, mmap_mode="r").shape for p in (tmp_path / "data" / "cache").glob("latents_*.npy"))
    # train and val clips, mean/std, 1 + (5 - 1) / 4 latent frames, c h w
    assert shapes == [(2, 2, 2, 16, 2, 4), (6, 2, 2, 16, 2, 4)]
    bad = [a.replace("data.frames=5", "data.frames=6") for a in args]
    assert data_main(bad) == 2  # refused before anything is encoded, naming the nearest frame counts

    assert train(cfg) == 0
    cut = tiny_config(tmp_path / "data", tmp_path / "cut", *over)
    assert train(cut, stop_at=2) != 0 and train(cut) == 0
    assert_states_equal(load(tmp_path / "run" / "ckpt_000006.pt"), load(tmp_path / "cut" / "ckpt_000006.pt"))
    assert "val step 000006" in (tmp_path / "run" / "train.log").read_text()

    run_cfg, model, _ = load_ema(tmp_path / "run")
    space = space_for_sampling(run_cfg)
    tokens = torch.randn(1, 5, TEXT_DIM)
    mask = torch.ones(1, 5, dtype=torch.bool)
    ours = generate(model, run_cfg, torch.zeros(1, TEXT_DIM), tokens=tokens, token_mask=mask, steps=3,
                    guidance=4.0, seed=7, method="unipc", space=space)  # b t 3 h w in [-1, 1]
    assert ours.shape == (1, 5, 3, 16, 32)
    pipe = WanPipeline.from_pretrained(base)
    pipe.transformer = model.transformer  # the fine-tuned transformer (its LoRA applied)
    noise = torch.randn((1, 2, 16, 2, 4), generator=torch.Generator().manual_seed(7))  # b t c h w, as generate drew
    prompt = model.captions(tokens, mask, None)
    negative = model.captions(model.null[None], None, None)  # the empty caption, from the checkpoint
    theirs = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, num_frames=5, height=16,
                  width=32, latents=noise.permute(0, 2, 1, 3, 4), num_inference_steps=3, guidance_scale=4.0,
                  output_type="pt").frames  # b t 3 h w in [0, 1]
    torch.testing.assert_close(ours, theirs * 2 - 1, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_wan_trains_on_windows_at_its_rate_from_encoded_windows_and_resumes_bit_exact(tmp_path):
    """data.sampling=window in Wan's VAE space: `python -m t2v.data latents` encodes windows of 4k+1 frames inside
    the shots of each clip (the demo's "shots" set, cut every ~1.5 s); a LoRA trains on draws of them, validates on
    fixed ones, and a run cut in two ends bit-identical to an uninterrupted one."""
    from t2v.train import train

    base = save_wan_pipeline(tmp_path / "wan", in_channels=16, text_dim=TEXT_DIM)
    over = [*wan_overrides(base, "data.frames=5", "data.sampling=window", "data.fps=8", "data.latent_windows=2",
                           "model.space=latent", f"vae.name={base}", "vae.subfolder=vae", "train.finetune=lora",
                           "train.lora_rank=4", "train.steps=4", "train.ckpt_every=2", "train.val_every=4",
                           "train.val_clips=2", "train.lr=1e-2")]
    cfg, _ = encoded_demo(tmp_path, over, n_train=4, kind="shots")
    shapes = sorted(np.load(p, mmap_mode="r").shape for p in (tmp_path / "data" / "cache").glob("latwin_*.npy"))
    assert shapes == [(4, 2, 2, 16, 2, 2), (8, 2, 2, 16, 2, 2)]  # val and train clips x 2 windows, 2 t' c h w

    assert train(cfg) == 0
    cut = tiny_config(tmp_path / "data", tmp_path / "cut", *over)
    assert train(cut, stop_at=2) != 0 and train(cut) == 0
    assert_states_equal(load(tmp_path / "run" / "ckpt_000004.pt"), load(tmp_path / "cut" / "ckpt_000004.pt"))
    assert "val step 000004" in (tmp_path / "run" / "train.log").read_text()
    from t2v.space import build_space
    from t2v.vae import VAEError

    with pytest.raises(VAEError, match=r"data.strides=\[1, 2\]: .* set data.strides=1"):  # windows encoded at one rate
        build_space(tiny_config(tmp_path / "data", tmp_path / "bad", *over, "data.strides=[1,2]"))
