"""Frozen text encoders: captions in, embeddings out (pooled, and per token for cross-attention).

An encoder's ``key`` names it and its weights; the caption-embedding cache (``t2v.text.cache``) is keyed by it,
and ``encoder_key(text_cfg)`` computes it without building the encoder, so training can open the cache without
touching the weights.

Encoders (``text.encoder``):
  clip  the baseline: Hugging Face ``CLIPTextModel`` + ``CLIPTokenizer`` from ``text.name`` (a hub name
        or a local folder written by ``save_pretrained``), loaded offline first by ``t2v.hf``; mean of the
        last hidden state over the real tokens (attention mask), 512-d for openai/clip-vit-base-patch32.
  hash  the offline demo encoder: a deterministic bag of words, no download, not semantic.
  tiny  a tiny random-weight CLIPTextModel with a word-hash tokenizer, for tests and timing.
  umt5  Wan 2.1's UMT5 encoder and tokenizer from ``text.name`` (a Wan pipeline repository or folder, whose
        text_encoder/ and tokenizer/ it reads), run as WanPipeline runs it: per-token embeddings, padding zero.
  sd_clip  Stable Diffusion 1.5's CLIP ViT-L from ``text.name`` (an SD repository or folder), as its pipelines and
        AnimateDiff run it: all 77 token outputs, no mask.
``build_clip_b32_random()`` builds a random-weight model of CLIP B/32's size for benchmarks.
"""
from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from t2v import hf
from t2v.config_checks import TEXT_ENCODERS as ENCODERS
from t2v.hf import MIN_TOKENIZER_VOCAB, hf_tokenize

CLIP_MAX_POSITIONS = 77
_WORD = re.compile(r"[a-z]+")


class TextEncoderError(RuntimeError):
    """A text encoder cannot be built (weights missing offline, broken tokenizer, wrong dim)."""


def words(caption: str) -> list[str]:
    """Lower-case words, the unit of the hash encoder and of the word-hash tokenizers."""
    return _WORD.findall(caption.lower())


def _stable_int(text: str) -> int:
    """A hash that is the same in every process (Python's hash() of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens: hidden (B, L, D), mask (B, L) -> (B, D)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


# ----------------------------------------------------------------------------------------- encoders


class TextEncoder:
    """Maps captions to embeddings. Subclasses set ``key`` (encoder + weights), ``dim`` and ``max_tokens``.

    ``encode(captions)`` returns (pooled (B, D) float32, tokens (B, L, D) float32 or None,
    mask (B, L) bool or None), padded to the longest caption of the batch, at most ``max_tokens``.
    """

    key: str = ""
    dim: int = 0
    max_tokens: int = CLIP_MAX_POSITIONS

    def encode(self, captions: Sequence[str]):
        raise NotImplementedError

    def __call__(self, captions: Sequence[str]):
        return self.encode(captions)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.key!r}, dim={self.dim})"


class ModelEncoder(TextEncoder):
    """An encoder around a torch text model (``self.model``) that can move between devices."""

    model: torch.nn.Module
    device: torch.device

    def to(self, device) -> "ModelEncoder":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self


class HashEncoder(TextEncoder):
    """Offline demo encoder: a deterministic bag of words. NOT semantic.

    Each lower-case word (regex ``[a-z]+``) maps to a fixed pseudo-random unit vector derived from a
    stable hash of the word (hashlib SHAKE-256, so every process and machine agrees; Python's hash() is
    salted per process). ``pooled`` is the normalised mean of the word vectors (zeros for a caption with
    no words, e.g. ""); ``tokens`` are a fixed start vector followed by the word vectors (at most
    ``max_tokens`` in all), so every mask has at least one real token and cross-attention never sees an
    all-masked row. Different words give nearly orthogonal vectors, which is all the demo dataset needs:
    its captions differ only by colour, shape and motion words ("a red circle moving right").
    """

    BOS = "<start>"  # cannot collide with a word: words are [a-z]+

    def __init__(self, dim: int = 512, max_tokens: int = CLIP_MAX_POSITIONS):
        if dim < 1 or max_tokens < 1:
            raise TextEncoderError(f"hash encoder: dim and max_tokens must be >= 1 (got {dim}, {max_tokens})")
        self.dim, self.max_tokens = int(dim), int(max_tokens)
        self.key = f"hash:{self.dim}"  # pooled does not depend on max_tokens (it averages every word)
        self._vectors: dict[str, torch.Tensor] = {}

    def word_vector(self, word: str) -> torch.Tensor:
        v = self._vectors.get(word)
        if v is None:
            # 2*dim uniforms from an extendable-output hash -> Box-Muller normals -> unit vector.
            raw = hashlib.shake_256(f"t2v-hash-v1:{self.dim}:{word}".encode("utf-8")).digest(8 * self.dim)
            u = torch.frombuffer(bytearray(raw), dtype=torch.int32).double() / 2.0**32 + 0.5  # [0, 1)
            u1, u2 = u[0::2].clamp(min=1e-12), u[1::2]
            v = (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * torch.pi * u2)).float()
            v = v / v.norm().clamp(min=1e-12)
            self._vectors[word] = v
        return v

    @torch.no_grad()
    def encode(self, captions: Sequence[str]):
        captions = list(captions)
        per = [words(c) for c in captions]
        pooled = torch.zeros(len(captions), self.dim)
        for i, ws in enumerate(per):
            if ws:
                p = torch.stack([self.word_vector(w) for w in ws]).mean(0)
                pooled[i] = p / p.norm().clamp(min=1e-12)
        seqs = [[self.BOS] + ws[: self.max_tokens - 1] for ws in per]
        length = max((len(s) for s in seqs), default=1)
        tokens = torch.zeros(len(captions), length, self.dim)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.stack([self.word_vector(w) for w in s])
            mask[i, : len(s)] = True
        return pooled, tokens, mask


class WordHashTokenizer:
    """A deterministic word-level tokenizer for random-weight models: each word hashes into the vocab.

    Sequence = [bos] + word ids + [eos], right-padded with ``pad_id`` to the longest in the batch,
    truncated to ``max_tokens`` (eos kept).
    """

    def __init__(self, vocab_size: int, bos_id: int, eos_id: int, pad_id: int, first_word_id: int, n_word_ids: int):
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = vocab_size, bos_id, eos_id, pad_id
        self.first_word_id, self.n_word_ids = first_word_id, n_word_ids

    def __len__(self) -> int:
        return self.vocab_size

    def ids(self, caption: str, max_tokens: int) -> list[int]:
        body = [self.first_word_id + _stable_int(w) % self.n_word_ids for w in words(caption)]
        return [self.bos_id] + body[: max(max_tokens - 2, 0)] + [self.eos_id]

    def __call__(self, captions: Sequence[str], max_tokens: int = CLIP_MAX_POSITIONS):
        seqs = [self.ids(c, max_tokens) for c in captions]
        length = max((len(s) for s in seqs), default=2)
        input_ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), length, dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return input_ids, mask


class CLIPEncoder(ModelEncoder):
    """A CLIPTextModel (real or random weights) + a tokenize function; mean-pooled last hidden state.

    ``tokenize(captions, max_tokens) -> (input_ids (B, L) long, attention_mask (B, L))`` must pad to the
    longest caption of the batch. CLIP's attention is causal and padding is on the right, so a caption's
    embedding does not depend on what it is batched with.
    """

    def __init__(self, model, tokenize: Callable, key: str, max_tokens: int, device: str | torch.device = "cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenize = tokenize
        self.key = key
        self.dim = int(model.config.hidden_size)
        self.max_tokens = min(int(max_tokens), int(model.config.max_position_embeddings))
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]):
        self.model.eval()
        ids, mask = self.tokenize(list(captions), self.max_tokens)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        mask = mask.bool()
        return mean_pool(hidden, mask).cpu(), hidden.cpu(), mask.cpu()


class UMT5Encoder(ModelEncoder):
    """Wan 2.1's text encoder as ``WanPipeline`` runs it: the caption cleaned (the pipeline's own prompt_clean),
    UMT5 run with the attention mask, every padding position set to zero. ``tokens`` are the real tokens only
    (padded to the longest caption of the batch here, to Wan's 512 by the model: t2v.models.wan); ``pooled`` is
    their mean (Wan does not read it)."""

    def __init__(self, model, tokenizer, key: str, max_tokens: int, device: str | torch.device = "cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.key, self.max_tokens = key, int(max_tokens)
        self.dim = int(model.config.d_model)
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]):
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        # Padding to the batch's longest caption instead of the pipeline's 512: with the mask, the real tokens'
        # embeddings do not depend on how much padding follows them.
        out = self.tokenizer([prompt_clean(c) for c in captions], padding="longest", max_length=self.max_tokens,
                             truncation=True, add_special_tokens=True, return_attention_mask=True,
                             return_tensors="pt")
        ids, mask = out["input_ids"].to(self.device), out["attention_mask"].to(self.device)
        hidden = self.model(ids, mask).last_hidden_state.float()
        mask = mask.bool()
        hidden = hidden * mask[..., None]  # the padding is zero, as WanPipeline makes it
        return mean_pool(hidden, mask).cpu(), hidden.cpu(), mask.cpu()


class SDCLIPEncoder(ModelEncoder):
    """Stable Diffusion 1.5's text encoder (CLIP ViT-L/14) as its pipelines and AnimateDiffPipeline run it: every
    caption padded to 77 tokens, the model run without a mask, and all 77 outputs the conditioning (the UNet
    attends to the padding positions too). ``mask`` is therefore all True; ``pooled`` is the mean over the real
    tokens (the UNet does not read it)."""

    def __init__(self, model, tokenizer, key: str, device: str | torch.device = "cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.key, self.dim = key, int(model.config.hidden_size)
        self.max_tokens = int(min(tokenizer.model_max_length, model.config.max_position_embeddings))
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]):
        out = self.tokenizer(list(captions), padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt")
        ids, real = out["input_ids"].to(self.device), out["attention_mask"].bool()
        hidden = self.model(ids).last_hidden_state.float().cpu()  # no mask, as StableDiffusionPipeline
        return mean_pool(hidden, real), hidden, torch.ones(hidden.shape[:2], dtype=torch.bool)


def _random_clip(seed: int, **config):
    """A random-weight CLIPTextModel; the seed fixes the weights without touching the global RNG."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(CLIPTextConfig(**config)).eval()


def build_tiny(dim: int = 32, max_tokens: int = CLIP_MAX_POSITIONS, seed: int = 0, vocab_size: int = 1000,
               device: str | torch.device = "cpu") -> CLIPEncoder:
    """Tiny random CLIPTextModel (2 layers, 2 heads) + word-hash tokenizer. For tests and timing."""
    if dim % 2:
        raise TextEncoderError(f"tiny encoder: text.dim must be even (2 attention heads), got {dim}")
    model = _random_clip(
        seed, vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=max_tokens, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    tok = WordHashTokenizer(vocab_size, bos_id=1, eos_id=2, pad_id=0, first_word_id=3, n_word_ids=vocab_size - 3)
    enc = CLIPEncoder(model, tok, f"tiny:{dim}:{max_tokens}:seed{seed}", max_tokens, device)
    enc.tokenizer = tok
    return enc


def build_clip_b32_random(seed: int = 0, max_tokens: int = CLIP_MAX_POSITIONS,
                          device: str | torch.device = "cpu") -> CLIPEncoder:
    """A random-weight text model of CLIP ViT-B/32's exact size (63 M params, 512-d) with a word-hash
    tokenizer, for benchmarks (running the encoder every step vs looking up cached embeddings).
    ``.model`` is the CLIPTextModel, ``.tokenize(captions, max_tokens)`` gives (input_ids, attention_mask).
    The embeddings are not semantic."""
    model = _random_clip(
        seed, vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=8, max_position_embeddings=CLIP_MAX_POSITIONS,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    tok = WordHashTokenizer(49408, bos_id=49406, eos_id=49407, pad_id=49407, first_word_id=0, n_word_ids=49406)
    enc = CLIPEncoder(model, tok, f"clip-b32-random:seed{seed}", max_tokens, device)
    enc.tokenizer = tok
    return enc


def encoder_key(text_cfg) -> str:
    """The cache key of the encoder ``build_encoder(text_cfg)`` builds, computed WITHOUT loading it,
    so training can open the cache without touching the encoder's weights."""
    kind = text_cfg.encoder
    if kind == "hash":
        return f"hash:{int(text_cfg.dim)}"
    if kind == "tiny":
        return f"tiny:{int(text_cfg.dim)}:{int(text_cfg.max_tokens)}:seed0"
    p = Path(text_cfg.name).expanduser()
    name = str(p.resolve()) if p.is_dir() else text_cfg.name  # a folder by its absolute path, a hub name as it is
    if kind == "umt5":
        return f"umt5:{name}@{int(text_cfg.max_tokens)}"
    if kind == "sd_clip":
        return f"sd_clip:{name}"
    if kind == "clip":
        # Truncating below CLIP's 77 positions changes the embedding of long captions.
        suffix = f"@{int(text_cfg.max_tokens)}" if int(text_cfg.max_tokens) < CLIP_MAX_POSITIONS else ""
        return f"clip:{name}{suffix}"
    raise TextEncoderError(f"unknown text.encoder {kind!r}: expected {', '.join(ENCODERS)}")


def build_encoder(text_cfg, device: str | torch.device = "cpu") -> TextEncoder:
    """The frozen encoder ``text_cfg`` describes, in eval mode. Raises TextEncoderError early and clearly
    (e.g. CLIP weights missing offline) instead of encoding captions with something broken."""
    kind = text_cfg.encoder
    if kind == "hash":
        enc: TextEncoder = HashEncoder(text_cfg.dim, text_cfg.max_tokens)
    elif kind == "tiny":
        enc = build_tiny(text_cfg.dim, text_cfg.max_tokens, seed=0, device=device)
    elif kind == "clip":
        enc = _load_clip(text_cfg, device)
    elif kind == "umt5":
        enc = _load_umt5(text_cfg, device)
    elif kind == "sd_clip":
        enc = _load_sd_clip(text_cfg, device)
    else:
        raise TextEncoderError(f"unknown text.encoder {kind!r}: expected {', '.join(ENCODERS)}")
    if enc.key != encoder_key(text_cfg):  # the cache is keyed by encoder_key: the two must agree (not an assert: -O)
        raise TextEncoderError(f"encoder key {enc.key!r} differs from the cache key {encoder_key(text_cfg)!r}")
    return enc


# ------------------------------------------------------------------------------------- pretrained CLIP


def _how_to_get_clip(name: str) -> str:
    hub = name if hf.looks_like_hub_name(name) else "openai/clip-vit-base-patch32"
    return (
        "How to get the CLIP text encoder onto a compute node without internet:\n"
        "  1. On a login node (which has internet), with HF_HOME pointing at a shared scratch folder, run once:\n"
        "       export HF_HOME=/scratch/$USER/hf\n"
        "       python -c \"from transformers import CLIPTextModel, CLIPTokenizer; "
        f"CLIPTokenizer.from_pretrained('{hub}'); CLIPTextModel.from_pretrained('{hub}')\"\n"
        "  2. In the job script: export HF_HOME=/scratch/$USER/hf HF_HUB_OFFLINE=1\n"
        "  Or save both with save_pretrained into one folder and set text.name=/path/to/that/folder.\n"
        "  (For an offline demo without CLIP use text.encoder=hash.)"
    )


def _load_clip(text_cfg, device) -> CLIPEncoder:
    name = str(text_cfg.name)
    try:
        folder = hf.local_folder(name)
    except FileNotFoundError:
        raise TextEncoderError(f"text.name={name!r} looks like a local folder but it does not exist.\n"
                               + _how_to_get_clip(name)) from None
    source = str(folder) if folder else name
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise TextEncoderError(f"text.encoder=clip needs transformers: {e}") from None

    # Model and tokenizer in one load(local_only): both come from the same place, or neither does.
    def load(local_only: bool):
        # Model first: it raises quickly when files are missing, whereas the tokenizer would not.
        model = CLIPTextModel.from_pretrained(source, local_files_only=local_only)
        tok = CLIPTokenizer.from_pretrained(source, local_files_only=local_only)
        return model, tok

    t0 = time.time()
    model, tok = hf.load_offline_first(load, name, folder, "text encoder", _how_to_get_clip(name), TextEncoderError)
    if len(tok) <= MIN_TOKENIZER_VOCAB:
        raise TextEncoderError(
            f"the CLIP tokenizer loaded from {source!r} has only {len(tok)} tokens (a real one has 49,408). "
            "Usually its files are missing and transformers returned a placeholder tokenizer instead of raising. Refusing to "
            "encode captions with it.\n" + _how_to_get_clip(name))
    if len(tok) > model.config.vocab_size:
        raise TextEncoderError(f"{source!r}: tokenizer has {len(tok)} tokens but the model only "
                               f"{model.config.vocab_size} embeddings; tokenizer and weights do not match")
    if int(model.config.hidden_size) != int(text_cfg.dim):
        raise TextEncoderError(f"{source!r} gives {model.config.hidden_size}-d embeddings but text.dim="
                               f"{text_cfg.dim}: set text.dim={model.config.hidden_size}")
    enc = CLIPEncoder(model, hf_tokenize(tok), encoder_key(text_cfg), text_cfg.max_tokens, device)
    enc.tokenizer = tok
    enc.load_seconds = time.time() - t0
    return enc


# ------------------------------------------------------------- Wan's UMT5 and Stable Diffusion's CLIP, from a pipeline


def _how_to_get(name: str, what: str, example: str) -> str:
    hub = name if hf.looks_like_hub_name(name) else example
    return hf.how_to_fetch(what, "from huggingface_hub import snapshot_download; "
                           f"snapshot_download('{hub}', allow_patterns=['text_encoder/*', 'tokenizer/*'])", "text.name")


def _load_from_pipeline(text_cfg, model_cls, what: str, example: str):
    """(text encoder, tokenizer) of ``text.name``: a pipeline repository or folder (text_encoder/ and tokenizer/ in
    it) or a folder holding both, offline first; the encoder's width checked against text.dim."""
    from transformers import AutoTokenizer

    name = str(text_cfg.name)
    how = _how_to_get(name, what, example)
    try:
        folder = hf.local_folder(name)
    except FileNotFoundError:
        raise TextEncoderError(f"text.name={name!r} looks like a local folder but it does not exist.\n" + how) from None
    source = str(folder) if folder else name
    nested = folder is None or (folder / "text_encoder").is_dir()
    enc_sub, tok_sub = ({"subfolder": "text_encoder"}, {"subfolder": "tokenizer"}) if nested else ({}, {})

    def load(local_only: bool):
        model = model_cls.from_pretrained(source, local_files_only=local_only, **enc_sub)
        return model, AutoTokenizer.from_pretrained(source, local_files_only=local_only, **tok_sub)

    model, tok = hf.load_offline_first(load, name, folder, "text encoder", how, TextEncoderError)
    width = int(getattr(model.config, "d_model", 0) or model.config.hidden_size)
    if width != int(text_cfg.dim):
        raise TextEncoderError(f"{source!r} gives {width}-d embeddings but text.dim={text_cfg.dim}: set text.dim={width}")
    if len(tok) > model.config.vocab_size:
        raise TextEncoderError(f"{source!r}: tokenizer has {len(tok)} tokens but the model only "
                               f"{model.config.vocab_size} embeddings; tokenizer and weights do not match")
    return model, tok


def _load_umt5(text_cfg, device) -> UMT5Encoder:
    """Wan's UMT5 encoder and tokenizer of ``text.name``."""
    from transformers import UMT5EncoderModel

    model, tok = _load_from_pipeline(text_cfg, UMT5EncoderModel, "UMT5 text encoder",
                                     "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    return UMT5Encoder(model, tok, encoder_key(text_cfg), text_cfg.max_tokens, device)


def _load_sd_clip(text_cfg, device) -> SDCLIPEncoder:
    """Stable Diffusion 1.5's CLIP text encoder and tokenizer of ``text.name``."""
    from transformers import CLIPTextModel

    model, tok = _load_from_pipeline(text_cfg, CLIPTextModel, "Stable Diffusion text encoder",
                                     "runwayml/stable-diffusion-v1-5")
    return SDCLIPEncoder(model, tok, encoder_key(text_cfg), device)
