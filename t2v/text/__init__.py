"""Frozen text encoders and the caption-embedding cache.

The text encoder is frozen, so it runs ONCE over every caption (``python -m t2v.text embed``) and the
results are cached; the training process only looks embeddings up and never runs the encoder.

  encoders.py   the encoders (clip, hash, tiny), ``build_encoder`` and ``encoder_key`` (the cache's key)
  cache.py      ``EmbeddingCache`` (the file per encoder key) and ``embed_captions`` (fill it, once)
  cli.py        ``python -m t2v.text embed`` (__main__.py runs it), and the manifest caption reader
Pretrained weights are loaded offline first by ``t2v.hf``, shared with ``t2v.eval``.

Everything other code uses is importable from ``t2v.text`` itself, as before the package was split.
"""
from t2v.hf import MIN_TOKENIZER_VOCAB, hf_offline, hf_tokenize, load_offline_first
from t2v.text.cache import (EMBED_COMMAND, CaptionNotCachedError, EmbeddingCache, EmbeddingCacheError, cache_path,
                            embed_captions, slug)
from t2v.text.cli import main, read_captions
from t2v.text.encoders import (CLIP_MAX_POSITIONS, CLIPEncoder, HashEncoder, TextEncoder, TextEncoderError,
                               WordHashTokenizer, build_clip_b32_random, build_encoder, build_tiny, encoder_key,
                               mean_pool, words)

__all__ = [
    # encoders
    "CLIP_MAX_POSITIONS", "CLIPEncoder", "HashEncoder", "TextEncoder", "TextEncoderError", "WordHashTokenizer",
    "build_clip_b32_random", "build_encoder", "build_tiny", "encoder_key", "mean_pool", "words",
    # cache
    "EMBED_COMMAND", "CaptionNotCachedError", "EmbeddingCache", "EmbeddingCacheError", "cache_path",
    "embed_captions", "slug",
    # command line
    "main", "read_captions",
    # Hugging Face loading, now in t2v.hf; still importable from here, where it used to live
    "MIN_TOKENIZER_VOCAB", "hf_offline", "hf_tokenize", "load_offline_first",
]
