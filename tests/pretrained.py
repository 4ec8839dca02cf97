"""Tiny random pretrained models in the hub's folder layout (save_pretrained), built offline, loaded by the tests
through the same code a user's real weights take. Sizes from diffusers' own tests (docs: ../shared notes)."""
from __future__ import annotations

from pathlib import Path

import torch


def step_state(model, cfg):
    """The StepState t2v.train builds for ``model`` (AdamW over what trains, the EMA sharing the frozen base), on
    CPU in fp32, for tests that check one step's loss."""
    from t2v.models import ema_copy
    from t2v.objective import build_objective
    from t2v.step import StepState

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    return StepState(model, model, ema_copy(model), opt, torch.amp.GradScaler("cpu", enabled=False),
                     build_objective(cfg.diffusion), cfg.diffusion, cfg.train, "fp32", torch.device("cpu"))


def wan_transformer(in_channels: int = 16, text_dim: int = 32, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=in_channels, out_channels=in_channels, text_dim=text_dim, freq_dim=256,
                                 ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32)


def wan_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def umt5_tokenizer(words=("a", "red", "green", "blue", "yellow", "circle", "square", "triangle", "moving", "left",
                          "right", "up", "down", "the", "cat", "dog")):
    """A Unigram tokenizer trained in-process (tokenizers), wrapped like UMT5's: pad 0, eos 1, unk 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=64, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator([" ".join(words)] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def umt5_encoder(vocab_size: int, d_model: int = 32, seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
                                       num_heads=4, relative_attention_num_buckets=8)).eval()


def save_wan_pipeline(folder: Path, in_channels: int = 16, text_dim: int = 32, seed: int = 0, shift: float = 3.0):
    """A whole tiny WanPipeline (transformer, VAE, UMT5, tokenizer, UniPC flow scheduler) saved to ``folder``."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    tokenizer = umt5_tokenizer()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=umt5_encoder(len(tokenizer), text_dim, seed),
                       vae=wan_vae(seed), transformer=wan_transformer(in_channels, text_dim, seed),
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         num_train_timesteps=1000, flow_shift=shift))
    pipe.save_pretrained(folder)
    return Path(folder)


def sd_tokenizer(words=("a", "red", "green", "blue", "yellow", "circle", "square", "triangle", "moving", "left",
                        "right", "up", "down", "the", "cat", "dog")):
    """A word-level tokenizer shaped like CLIP's for Stable Diffusion pipelines: start and end tokens, padded with the
    end token to 77 (model_max_length), trained in-process with the tokenizers library."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(
        special_tokens=["<start>", "<end>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<start> $A <end>",
                                                       special_tokens=[("<start>", 0), ("<end>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<start>", eos_token="<end>", unk_token="<unk>",
                                   pad_token="<end>", model_max_length=77)


def save_sd_pipeline(folder: Path, in_channels: int = 4, text_dim: int = 32, seed: int = 0):
    """A tiny Stable Diffusion 1.5-shaped repository (unet, vae, text_encoder, tokenizer, scheduler), each component
    saved in its subfolder as the hub holds runwayml/stable-diffusion-v1-5 (sizes from diffusers' tests)."""
    import json

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    UNet2DConditionModel(block_out_channels=(8, 8), layers_per_block=2, sample_size=8, in_channels=in_channels,
                         out_channels=in_channels, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text_dim,
                         norm_num_groups=2).save_pretrained(folder / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=16).save_pretrained(folder / "vae")
    tokenizer = sd_tokenizer()
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=37,
                                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=1)).save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, timestep_spacing="linspace").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None]}))
    return folder
