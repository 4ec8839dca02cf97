"""Frozen text encoders and the caption-embedding cache.

The text encoder is frozen, so it runs ONCE over every caption (``python -m t2v.text embed``) and the
results are cached; the training process only looks embeddings up and never runs the encoder.

Encoders (``text.encoder``):
  clip  the baseline: Hugging Face ``CLIPTextModel`` + ``CLIPTokenizer`` from ``text.name`` (a hub name
        or a local folder written by ``save_pretrained``); mean of the last hidden state over the real
        tokens (attention mask), 512-d for openai/clip-vit-base-patch32.
  hash  the offline demo encoder: a deterministic bag of words, no download, not semantic.
  tiny  a tiny random-weight CLIPTextModel with a word-hash tokenizer, for tests and timing.
``build_clip_b32_random()`` builds a random-weight model of CLIP B/32's size for benchmarks.

Cache file: ``<cache_dir>/text_<slug of encoder key>.pt``, a dict
  {"key": str, "dim": int, "captions": list[str], "pooled": float32 (N, D),
   "tokens": float16 (N, L, D) (only with text.tokens=true), "mask": bool (N, L) (idem)}
written atomically (temp file + os.replace) and read with ``torch.load(weights_only=True)``.
The empty caption "" is always embedded: it is the unconditional input for classifier-free guidance.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from t2v import files
from t2v.data.manifest import row_captions
from t2v.device import DeviceError, pick_device
from t2v.progress import progress as progress_counter

# A real CLIP tokenizer has 49,408 tokens. The offline trap (CLIPTokenizer.from_pretrained of a hub name
# that is not cached, under HF_HUB_OFFLINE=1) silently returns one with 2, which encodes everything as unk.
MIN_TOKENIZER_VOCAB = 1000
CLIP_MAX_POSITIONS = 77
EMBED_COMMAND = "python -m t2v.text embed --config <your config>"
_WORD = re.compile(r"[a-z]+")


class TextEncoderError(RuntimeError):
    """A text encoder cannot be built (weights missing offline, broken tokenizer, wrong dim)."""


class EmbeddingCacheError(RuntimeError):
    """A caption-embedding cache file is unreadable, or belongs to another encoder."""


class CaptionNotCachedError(KeyError):
    """A caption has no cached embedding. (KeyError, but prints its message without quotes.)"""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def words(caption: str) -> list[str]:
    """Lower-case words, the unit of the hash encoder and of the word-hash tokenizers."""
    return _WORD.findall(caption.lower())


def _stable_int(text: str) -> int:
    """A hash that is the same in every process (Python's hash() of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def slug(key: str) -> str:
    """A filesystem-safe, collision-free name for an encoder key: readable part + short digest."""
    return files.slug(key, 80, "key", digest=True)


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


class CLIPEncoder(TextEncoder):
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

    def to(self, device) -> "CLIPEncoder":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def encode(self, captions: Sequence[str]):
        self.model.eval()
        ids, mask = self.tokenize(list(captions), self.max_tokens)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        mask = mask.bool()
        return mean_pool(hidden, mask).cpu(), hidden.cpu(), mask.cpu()


def hf_tokenize(tokenizer) -> Callable:
    def tokenize(captions: Sequence[str], max_tokens: int):
        out = tokenizer(list(captions), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        return out["input_ids"], out["attention_mask"]

    return tokenize


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


def hf_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _local_folder(name: str) -> Path | None:
    """A local model folder, or None for a hub name. A name that looks like a path must exist."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p.resolve()
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise TextEncoderError(f"text.name={name!r} looks like a local folder but it does not exist.\n" + _how_to_get_clip(name))
    return None


def _how_to_get_clip(name: str) -> str:
    hub = name if _looks_like_hub(name) else "openai/clip-vit-base-patch32"
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


def _looks_like_hub(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name))


def encoder_key(text_cfg) -> str:
    """The cache key of the encoder ``build_encoder(text_cfg)`` builds, computed WITHOUT loading it,
    so training can open the cache without touching the encoder's weights."""
    kind = text_cfg.encoder
    if kind == "hash":
        return f"hash:{int(text_cfg.dim)}"
    if kind == "tiny":
        return f"tiny:{int(text_cfg.dim)}:{int(text_cfg.max_tokens)}:seed0"
    if kind == "clip":
        p = Path(text_cfg.name).expanduser()
        name = str(p.resolve()) if p.is_dir() else text_cfg.name
        # Truncating below CLIP's 77 positions changes the embedding of long captions.
        suffix = f"@{int(text_cfg.max_tokens)}" if int(text_cfg.max_tokens) < CLIP_MAX_POSITIONS else ""
        return f"clip:{name}{suffix}"
    raise TextEncoderError(f"unknown text.encoder {kind!r}: expected clip, hash or tiny")


def load_offline_first(load: Callable[[bool], Any], name: str, folder: Path | None, what: str, how: str,
                       error: type[Exception]) -> Any:
    """``load(local_only)`` against the local Hugging Face cache first (fast, and right on compute nodes without
    internet); a download only when online and ``name`` is a hub name. Failures raise ``error`` saying where we
    looked, followed by ``how`` (instructions to get the weights onto the cluster)."""
    try:
        return load(True)
    except (OSError, ValueError) as first:
        if folder is not None or hf_offline():
            where = f"the folder {folder}" if folder else (
                f"the Hugging Face cache (HF_HOME={os.environ.get('HF_HOME', '<unset: ~/.cache/huggingface>')})")
            raise error(f"{what} {name!r} is not available offline: not found in {where} "
                        f"({type(first).__name__}: {str(first).splitlines()[0][:200]}).\n" + how) from None
    print(f"t2v: {what} {name!r} is not in the local Hugging Face cache; downloading it. On a compute node "
          "without internet this retries for minutes: set HF_HUB_OFFLINE=1 there.", file=sys.stderr)
    try:
        return load(False)
    except (OSError, ValueError) as e:
        raise error(f"could not load {what} {name!r}: {str(e).splitlines()[0][:300]}\n" + how) from None


def _load_clip(text_cfg, device) -> CLIPEncoder:
    name = str(text_cfg.name)
    folder = _local_folder(name)
    source = str(folder) if folder else name
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise TextEncoderError(f"text.encoder=clip needs transformers: {e}") from None

    def load(local_only: bool):
        # Model first: it raises quickly when files are missing, whereas the tokenizer would not.
        model = CLIPTextModel.from_pretrained(source, local_files_only=local_only)
        tok = CLIPTokenizer.from_pretrained(source, local_files_only=local_only)
        return model, tok

    t0 = time.time()
    model, tok = load_offline_first(load, name, folder, "text encoder", _how_to_get_clip(name), TextEncoderError)
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
    else:
        raise TextEncoderError(f"unknown text.encoder {kind!r}: expected clip, hash or tiny")
    if enc.key != encoder_key(text_cfg):  # the cache is keyed by encoder_key: the two must agree (not an assert: -O)
        raise TextEncoderError(f"encoder key {enc.key!r} differs from the cache key {encoder_key(text_cfg)!r}")
    return enc


# -------------------------------------------------------------------------------------------- cache


def cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"text_{slug(key)}.pt"


def _pad_to(tokens: torch.Tensor, mask: torch.Tensor, length: int):
    n, l, d = tokens.shape
    if l >= length:
        return tokens[:, :length], mask[:, :length]
    t = torch.zeros(n, length, d, dtype=tokens.dtype)
    m = torch.zeros(n, length, dtype=torch.bool)
    t[:, :l], m[:, :l] = tokens, mask
    return t, m


class EmbeddingCache:
    """Cached caption embeddings of one encoder (``key``), looked up by caption text.

    ``hits``/``misses`` count lookups, ``added`` counts captions added since the cache was loaded.
    """

    def __init__(self, path: str | os.PathLike, key: str, dim: int):
        self.path = Path(path)
        self.key, self.dim = key, int(dim)
        self.captions: list[str] = []
        self._index: dict[str, int] = {}
        self._pooled = [torch.zeros(0, self.dim)]  # chunks, concatenated lazily
        self._tokens: list[torch.Tensor] | None = None
        self._mask: list[torch.Tensor] | None = None
        self.hits = self.misses = self.added = 0

    # ---- file
    @classmethod
    def load(cls, cache_dir: str | os.PathLike, key: str, dim: int | None = None) -> "EmbeddingCache":
        """The cache of encoder ``key`` in ``cache_dir``: empty when the file does not exist yet."""
        path = cache_path(cache_dir, key)
        if not path.exists():
            return cls(path, key, dim or 0)
        fix = f"Delete it and rerun `{EMBED_COMMAND}`."
        try:
            d = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise EmbeddingCacheError(f"caption-embedding cache {path} is unreadable ({type(e).__name__}: {e}). {fix}") from None
        try:
            file_key, file_dim, captions, pooled = d["key"], int(d["dim"]), list(d["captions"]), d["pooled"]
        except (TypeError, KeyError, ValueError) as e:
            raise EmbeddingCacheError(f"caption-embedding cache {path} is not a t2v text cache (missing {e}). {fix}") from None
        if file_key != key:
            raise EmbeddingCacheError(f"caption-embedding cache {path} holds embeddings of encoder {file_key!r}, "
                                      f"not {key!r}. {fix}")
        if dim is not None and file_dim != int(dim):
            raise EmbeddingCacheError(f"caption-embedding cache {path} holds {file_dim}-d embeddings, expected {dim}. {fix}")
        if pooled.shape != (len(captions), file_dim) or len(set(captions)) != len(captions):
            raise EmbeddingCacheError(f"caption-embedding cache {path} is inconsistent: {len(captions)} captions, "
                                      f"pooled {tuple(pooled.shape)}. {fix}")
        cache = cls(path, key, file_dim)
        cache.captions = captions
        cache._index = {c: i for i, c in enumerate(captions)}
        cache._pooled = [pooled]
        if d.get("tokens") is not None:
            tokens, mask = d["tokens"], d["mask"]
            if tokens.shape[:1] != (len(captions),) or mask.shape != tokens.shape[:2]:
                raise EmbeddingCacheError(f"caption-embedding cache {path}: tokens {tuple(tokens.shape)} and mask "
                                          f"{tuple(mask.shape)} do not match {len(captions)} captions. {fix}")
            cache._tokens, cache._mask = [tokens], [mask]
        return cache

    def save(self) -> Path:
        """Write the cache atomically (temp file + os.replace): a killed job never leaves half a file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        d = {"key": self.key, "dim": self.dim, "captions": list(self.captions), "pooled": self.pooled.contiguous()}
        if self.has_tokens:
            d["tokens"], d["mask"] = self.tokens.contiguous(), self.mask.contiguous()
        with files.atomic_write(self.path) as f:
            torch.save(d, f)
        return self.path

    # ---- contents
    @property
    def pooled(self) -> torch.Tensor:
        if len(self._pooled) > 1:
            self._pooled = [torch.cat(self._pooled)]
        return self._pooled[0]

    @property
    def has_tokens(self) -> bool:
        return self._tokens is not None

    @property
    def token_length(self) -> int | None:
        return int(self._tokens[0].shape[1]) if self._tokens is not None else None

    @property
    def tokens(self) -> torch.Tensor | None:
        if self._tokens is None:
            return None
        if len(self._tokens) > 1:
            self._tokens, self._mask = [torch.cat(self._tokens)], [torch.cat(self._mask)]
        return self._tokens[0]

    @property
    def mask(self) -> torch.Tensor | None:
        if self._mask is None:
            return None
        self.tokens  # consolidates both
        return self._mask[0]

    def __len__(self) -> int:
        return len(self.captions)

    def __contains__(self, caption: object) -> bool:
        return caption in self._index

    def __repr__(self) -> str:
        return f"EmbeddingCache({self.path}, key={self.key!r}, {len(self)} captions, tokens={self.has_tokens})"

    def missing(self, captions: Iterable[str]) -> list[str]:
        """Captions without an embedding, each once, in first-seen order."""
        return [c for c in dict.fromkeys(captions) if c not in self._index]

    def add(self, captions: Sequence[str], pooled: torch.Tensor, tokens: torch.Tensor | None = None,
            mask: torch.Tensor | None = None) -> int:
        """Add embeddings (captions already cached are skipped). Returns how many were added."""
        captions = list(captions)
        if pooled.ndim != 2 or pooled.shape[0] != len(captions):
            raise ValueError(f"pooled must be ({len(captions)}, D), got {tuple(pooled.shape)}")
        if not self.dim and not len(self):
            self.dim, self._pooled = int(pooled.shape[1]), [torch.zeros(0, int(pooled.shape[1]))]
        if pooled.shape[1] != self.dim:
            raise ValueError(f"pooled is {pooled.shape[1]}-d, the cache holds {self.dim}-d embeddings")
        if (tokens is None) != (mask is None):
            raise ValueError("give tokens and mask together")
        if tokens is not None:
            if tokens.shape[:1] != (len(captions),) or tokens.shape[2] != self.dim or mask.shape != tokens.shape[:2]:
                raise ValueError(f"tokens must be ({len(captions)}, L, {self.dim}) with mask (N, L), "
                                 f"got {tuple(tokens.shape)} and {tuple(mask.shape)}")
            if self._tokens is None:
                if len(self):
                    raise ValueError("this cache has no token embeddings for its existing captions; rebuild it")
                self._tokens = [torch.zeros(0, tokens.shape[1], self.dim, dtype=torch.float16)]
                self._mask = [torch.zeros(0, tokens.shape[1], dtype=torch.bool)]
            elif tokens.shape[1] > self.token_length:  # longer than what is stored: pad what is stored
                grown = [_pad_to(t, m, tokens.shape[1]) for t, m in zip(self._tokens, self._mask)]
                self._tokens, self._mask = [t for t, _ in grown], [m for _, m in grown]
        elif self._tokens is not None:
            raise ValueError("this cache stores token embeddings: give tokens and mask too")
        keep = []
        for i, c in enumerate(captions):
            if c not in self._index:
                self._index[c] = len(self.captions)
                self.captions.append(c)
                keep.append(i)
        if not keep:
            return 0
        idx = torch.tensor(keep)
        self._pooled.append(pooled.detach().float().cpu()[idx])
        if tokens is not None:
            t, m = _pad_to(tokens.detach().cpu()[idx], mask.detach().cpu().bool()[idx], self.token_length)
            self._tokens.append(t.to(torch.float16))
            self._mask.append(m)
        self.added += len(keep)
        return len(keep)

    def _row(self, caption: str) -> int:
        i = self._index.get(caption)
        if i is None:
            self.misses += 1
            raise CaptionNotCachedError(
                f"caption {caption!r} has no cached text embedding in {self.path} (encoder {self.key!r}, "
                f"{len(self)} captions cached). The text encoder does not run during training: embed every "
                f"caption first with `{EMBED_COMMAND}` (add --manifest FILE for other manifests).")
        self.hits += 1
        return i

    def get(self, caption: str) -> torch.Tensor:
        """Pooled embedding (D,) float32."""
        return self.pooled[self._row(caption)]

    def get_tokens(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings (L, D) float32 and mask (L,) bool; needs a cache built with text.tokens=true."""
        if not self.has_tokens:
            raise EmbeddingCacheError(f"{self.path} has no per-token embeddings: set text.tokens=true and rerun "
                                      f"`{EMBED_COMMAND}`")
        i = self._row(caption)
        return self.tokens[i].float(), self.mask[i]

    def get_batch(self, captions: Sequence[str]) -> torch.Tensor:
        """Pooled embeddings (B, D) of several captions."""
        return self.pooled[torch.tensor([self._row(c) for c in captions], dtype=torch.long)]

    def require(self, captions: Iterable[str]) -> None:
        """Raise one clear error listing how many captions are missing (check before training starts)."""
        missing = self.missing(captions)
        if missing:
            shown = ", ".join(repr(c) for c in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise EmbeddingCacheError(
                f"{len(missing)} captions have no cached text embedding in {self.path} (encoder {self.key!r}): "
                f"{shown}. Run `{EMBED_COMMAND}` first (it embeds data.manifest, train.sample_prompts and \"\").")


def open_cache(cfg) -> EmbeddingCache:
    """The caption-embedding cache of a Config, loaded without building the encoder."""
    from t2v.config import cache_dir

    return EmbeddingCache.load(cache_dir(cfg, "text"), encoder_key(cfg.text), cfg.text.dim)


def embed_captions(text_cfg, captions: Iterable[str], cache_dir: str | os.PathLike, batch_size: int = 64,
                   progress: bool = True, encoder: TextEncoder | None = None,
                   device: str | torch.device = "cpu", save_every_s: float = 300.0) -> EmbeddingCache:
    """Embed the captions not cached yet, save, and return the cache (``cache.added`` = newly encoded).

    The encoder is built only if something is missing, so a second call encodes (and loads) nothing.
    Captions are batched by length so padding to the longest of a batch costs little; the cache is also
    saved every ``save_every_s`` seconds so a preempted job keeps its progress.
    """
    key = encoder.key if encoder is not None else encoder_key(text_cfg)
    cache = EmbeddingCache.load(cache_dir, key, text_cfg.dim)
    todo = cache.missing(captions)
    token_length = int(text_cfg.max_tokens)
    if text_cfg.tokens and len(cache) and (not cache.has_tokens or cache.token_length != token_length):
        # The file was built without tokens (or for another length): rebuild it whole.
        todo = list(dict.fromkeys(cache.captions + todo))
        cache = EmbeddingCache(cache.path, key, text_cfg.dim)
    # A file that has tokens keeps them complete even when this call does not need them.
    want_tokens = bool(text_cfg.tokens) or cache.has_tokens
    if cache.has_tokens:
        token_length = cache.token_length
    if not todo:
        return cache
    if encoder is None:
        encoder = build_encoder(text_cfg, device=device)
    if encoder.dim != int(text_cfg.dim):
        raise TextEncoderError(f"encoder {encoder.key!r} gives {encoder.dim}-d embeddings but text.dim={text_cfg.dim}")
    order = sorted(todo, key=lambda c: (len(c), c))
    bar = progress_counter(total=len(order), desc="embedding captions", unit="caption", enabled=progress)
    last_save = time.time()
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        pooled, tokens, mask = encoder.encode(batch)
        if want_tokens:
            if tokens is None:
                raise TextEncoderError(f"encoder {encoder.key!r} gives no token embeddings (text.tokens=true)")
            tokens, mask = _pad_to(tokens, mask, token_length)
            cache.add(batch, pooled, tokens, mask)
        else:
            cache.add(batch, pooled)
        bar.update(len(batch))
        if time.time() - last_save > save_every_s:
            cache.save()
            last_save = time.time()
    bar.close()
    cache.save()
    return cache


# ---------------------------------------------------------------------------------------------- CLI


def read_captions(manifest: str | os.PathLike) -> list[str]:
    """Captions of a JSON-lines manifest exactly as training reads them (t2v.data.manifest.row_captions: the same
    keys, whitespace cut, a single string accepted for ``captions``); lines that do not parse are skipped: the
    data layer reports them (`python -m t2v.data check`)."""
    out: list[str] = []
    with open(manifest, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.extend(row_captions(rec))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from t2v.config import ConfigError, add_config_args, cache_dir, load_config, val_manifest

    parser = argparse.ArgumentParser(prog="python -m t2v.text", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    p = sub.add_parser("embed", help="embed every caption of the manifest(s) once into the text cache")
    add_config_args(p)
    p.add_argument("--manifest", action="append", default=[], metavar="PATH",
                   help="another manifest whose captions to embed (repeatable; data.manifest and the "
                        "validation manifest are always included)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--no-progress", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in sub.choices:
        parser.parse_args(argv)  # prints usage / help and exits
    # key=value overrides may come before or after --options
    args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])

    try:
        cfg = load_config(args.config, args.overrides)
        captions: list[str] = []
        for m in [cfg.data.manifest, *args.manifest]:
            if not Path(m).is_file():
                raise ConfigError(f"manifest not found: {m}")
            captions += read_captions(m)
        if val_manifest(cfg).is_file():  # the validation loss needs its captions too
            captions += read_captions(val_manifest(cfg))
        n_manifest = len(set(captions))
        captions += list(cfg.train.sample_prompts) + [""]
        device = pick_device(args.device)
        out_dir = cache_dir(cfg, "text")
        t0 = time.time()
        cache = embed_captions(cfg.text, captions, out_dir, batch_size=args.batch_size,
                               progress=not args.no_progress, device=device)
    except (ConfigError, TextEncoderError, EmbeddingCacheError, DeviceError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    unique = len(set(captions))
    print(f"text embed: {unique} unique captions ({n_manifest} from manifests, plus sample prompts and \"\"): "
          f"{cache.added} newly encoded, {unique - cache.added} already cached, {time.time() - t0:.1f} s")
    print(f"encoder {cache.key} ({cache.dim}-d{', with tokens' if cache.has_tokens else ''}); "
          f"cache {cache.path} holds {len(cache)} captions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
