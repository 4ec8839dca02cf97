"""Tiny random pretrained models in the hub's folder layout (save_pretrained), built offline, loaded by the tests
through the same code a user's real weights take. Sizes from diffusers' own tests (docs: ../shared notes)."""
from __future__ import annotations

from pathlib import Path

import torch


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
