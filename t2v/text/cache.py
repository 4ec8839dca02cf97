"""The caption-embedding cache: every caption embedded once by the frozen text encoder, looked up by its text.

The text encoder is frozen, so it runs ONCE over every caption (``python -m t2v.text embed``) and the
results are cached; the training process only looks embeddings up and never runs the encoder.

Cache file: ``<cache_dir>/text_<slug of encoder key>.pt``, a dict
  {"key": str, "dim": int, "captions": list[str], "pooled": float32 (N, D),
   with text.tokens=true: "tokens": float16 (T, D), every caption's real tokens one after another,
   "lengths": int32 (N,) how many are each caption's, "token_length": int, what a lookup pads them to}
Each caption is stored at its real length and padded only when it is looked up: Wan's captions are padded to 512
tokens of 4096 values, 4 MB a caption in float16, where MSR-VTT's average ~12 real tokens take 100 kB.
(Files of the first format, "tokens" (N, L, D) padded with a "mask" (N, L), still load.)
written atomically (temp file + os.replace) and read with ``torch.load(weights_only=True)``.
The empty caption "" is always embedded: it is the unconditional input for classifier-free guidance.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from t2v import files
from t2v.cachebuild import Every, check_parts, part_name, remove_parts, shard_rows
from t2v.progress import progress as progress_counter
from t2v.text.encoders import TextEncoder, TextEncoderError, build_encoder, encoder_key

EMBED_COMMAND = "python -m t2v.text embed --config <your config>"


class EmbeddingCacheError(RuntimeError):
    """A caption-embedding cache file is unreadable, or belongs to another encoder."""


class CaptionNotCachedError(KeyError):
    """A caption has no cached embedding. (KeyError, but prints its message without quotes.)"""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def slug(key: str) -> str:
    """A filesystem-safe, collision-free name for an encoder key: readable part + short digest."""
    return files.slug(key, 80, "key", digest=True)


def cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    """The one file that holds encoder ``key``'s embeddings: caches of different encoders never mix."""
    return Path(cache_dir) / f"text_{slug(key)}.pt"


def _ragged(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded token embeddings (N, L, D) and mask (N, L) -> (the real tokens, one caption after another (T, D);
    each caption's count (N,)). Every encoder here puts the real tokens first; anything else is refused."""
    mask = mask.bool()
    lengths = mask.sum(1)
    if not torch.equal(mask, torch.arange(mask.shape[1])[None] < lengths[:, None]):
        raise ValueError("token masks must mark a prefix of each row (real tokens first, then padding)")
    return tokens[mask], lengths.to(torch.int32)


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
        self._tokens: list[torch.Tensor] | None = None  # chunks of real tokens (T_i, D) float16
        self._lengths: list[torch.Tensor] = []  # chunks of per-caption token counts (N_i,)
        self._token_length = 0  # what get_tokens pads to
        self._starts: torch.Tensor | None = None  # each caption's first row in the tokens (lazily)
        self.hits = self.misses = self.added = 0

    # ---- file
    @classmethod
    def load(cls, cache_dir: str | os.PathLike, key: str, dim: int | None = None) -> "EmbeddingCache":
        """The cache of encoder ``key`` in ``cache_dir``: empty when the file does not exist yet."""
        return cls.load_path(cache_path(cache_dir, key), key, dim)

    @classmethod
    def load_path(cls, path: Path, key: str, dim: int | None = None) -> "EmbeddingCache":
        """The cache file ``path`` (a whole cache, or one shard's part of it), verified against ``key``."""
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
        if d.get("tokens") is not None and "mask" in d:  # the first format: padded rows and their mask
            tokens, mask = d["tokens"], d["mask"]
            if tokens.shape[:1] != (len(captions),) or mask.shape != tokens.shape[:2]:
                raise EmbeddingCacheError(f"caption-embedding cache {path}: tokens {tuple(tokens.shape)} and mask "
                                          f"{tuple(mask.shape)} do not match {len(captions)} captions. {fix}")
            flat, lengths = _ragged(tokens, mask)
            cache._tokens, cache._lengths, cache._token_length = [flat], [lengths], int(tokens.shape[1])
        elif d.get("tokens") is not None:
            tokens, lengths = d["tokens"], d.get("lengths")
            if (lengths is None or tokens.ndim != 2 or lengths.shape != (len(captions),)
                    or int(lengths.sum()) != tokens.shape[0]):
                raise EmbeddingCacheError(f"caption-embedding cache {path}: tokens {tuple(tokens.shape)} do not match "
                                          f"{len(captions)} captions' lengths. {fix}")
            cache._tokens, cache._lengths = [tokens], [lengths]
            cache._token_length = int(d.get("token_length") or (int(lengths.max()) if len(lengths) else 1))
        return cache

    def save(self) -> Path:
        """Write the cache atomically (temp file + os.replace): a killed job never leaves half a file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        d = {"key": self.key, "dim": self.dim, "captions": list(self.captions), "pooled": self.pooled.contiguous()}
        if self.has_tokens:
            d["tokens"], d["lengths"] = self.flat_tokens.contiguous(), self.lengths.contiguous()
            d["token_length"] = self.token_length
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
        """The length every caption's tokens are padded to when looked up (text.max_tokens when built)."""
        return self._token_length if self._tokens is not None else None

    @property
    def flat_tokens(self) -> torch.Tensor | None:
        """Every caption's real tokens, one after another (T, D) float16."""
        if self._tokens is None:
            return None
        if len(self._tokens) > 1:
            self._tokens, self._lengths = [torch.cat(self._tokens)], [torch.cat(self._lengths)]
        return self._tokens[0]

    @property
    def lengths(self) -> torch.Tensor | None:
        """Each caption's real token count (N,)."""
        if self._tokens is None:
            return None
        self.flat_tokens  # consolidates both
        return self._lengths[0]

    def nbytes(self) -> int:
        """The tensors' bytes (what the file holds, beyond the captions' text)."""
        n = self.pooled.numel() * self.pooled.element_size()
        if self._tokens is not None:
            n += self.flat_tokens.numel() * self.flat_tokens.element_size() + self.lengths.numel() * 4
        return n

    def padded_nbytes(self) -> int:
        """The bytes the tokens would take padded to token_length (the first format): what ragged storage saves."""
        return len(self) * (self.token_length or 0) * self.dim * 2

    def _padded(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row i's tokens padded with zeros to token_length (L, D) float16, and its mask (L,)."""
        if self._starts is None or self._starts.shape[0] != len(self):
            lengths = self.lengths.long()
            self._starts = torch.cumsum(lengths, 0) - lengths
        n, start = int(self.lengths[i]), int(self._starts[i])
        out = torch.zeros(self.token_length, self.dim, dtype=torch.float16)
        out[:n] = self.flat_tokens[start:start + n]
        return out, torch.arange(self.token_length) < n

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
            mask: torch.Tensor | None = None, token_length: int = 0) -> int:
        """Add embeddings (captions already cached are skipped). Returns how many were added. Tokens come padded
        (N, L, D) with their mask and are stored at their real lengths; lookups pad them to the longest of
        ``token_length`` and every L added."""
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
            if self._tokens is None and len(self):
                raise ValueError("this cache has no token embeddings for its existing captions; rebuild it")
            flat, lengths = _ragged(tokens.detach().cpu(), mask.detach().cpu())  # refused before any change
            token_length = max(int(tokens.shape[1]), int(token_length))
        elif self._tokens is not None:
            raise ValueError("this cache stores token embeddings: give tokens and mask too")
        else:
            flat = lengths = None
        return self._append(captions, pooled.detach().float().cpu(), flat, lengths, token_length)

    def extend(self, part: "EmbeddingCache") -> int:
        """Add another cache's captions (a shard's part) as stored, without padding them; returns how many."""
        if part.has_tokens != self.has_tokens and len(self):
            raise ValueError(f"{part.path} and {self.path} differ in whether they hold token embeddings")
        if not self.dim and not self.pooled.numel():
            self.dim, self._pooled = part.dim, [torch.zeros(0, part.dim)]
        return self._append(part.captions, part.pooled, part.flat_tokens, part.lengths, part.token_length or 0)

    def _append(self, captions: list[str], pooled: torch.Tensor, flat: torch.Tensor | None,
                lengths: torch.Tensor | None, token_length: int) -> int:
        """The captions not cached yet, with their rows of ``pooled`` (N, D) and, when ``flat`` is given, their real
        tokens (rows of ``flat`` by ``lengths``, as _ragged stores them); returns how many were added."""
        keep = [i for i, c in enumerate(captions) if c not in self._index]
        if not keep:
            return 0
        for i in keep:
            self._index[captions[i]] = len(self.captions)
            self.captions.append(captions[i])
        self._pooled.append(pooled[keep])
        if flat is not None:
            if self._tokens is None:
                self._tokens, self._lengths = [], []
            starts = torch.cumsum(lengths.long(), 0) - lengths.long()
            rows = torch.cat([torch.arange(int(starts[i]), int(starts[i] + lengths[i])) for i in keep])
            self._tokens.append(flat[rows].to(torch.float16))
            self._lengths.append(lengths[keep])
            self._token_length = max(self._token_length, int(token_length))
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
        tokens, mask = self._padded(self._row(caption))
        return tokens.float(), mask

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


def _checked_encoder(text_cfg, device) -> TextEncoder:
    encoder = build_encoder(text_cfg, device=device)
    _check_dim(encoder, text_cfg)
    return encoder


def _check_dim(encoder: TextEncoder, text_cfg) -> None:
    if encoder.dim != int(text_cfg.dim):
        raise TextEncoderError(f"encoder {encoder.key!r} gives {encoder.dim}-d embeddings but text.dim={text_cfg.dim}")


def _encode_into(cache: EmbeddingCache, encoder: TextEncoder, batch: list[str], want_tokens: bool,
                 token_length: int) -> None:
    """Encode one batch of captions into ``cache``: pooled, and per-token (looked up padded to ``token_length``)."""
    pooled, tokens, mask = encoder.encode(batch)
    if want_tokens:
        if tokens is None:
            raise TextEncoderError(f"encoder {encoder.key!r} gives no token embeddings (text.tokens=true)")
        tokens, mask = tokens[:, :token_length], mask[:, :token_length]  # what a cut text.max_tokens keeps
        cache.add(batch, pooled, tokens, mask, token_length=token_length)
    else:
        cache.add(batch, pooled)


def _todo_batches(text_cfg, captions: Iterable[str], cache_dir, batch_size: int) -> tuple[EmbeddingCache, list]:
    """The cache as it is and the batches a build would encode, in the order it encodes them."""
    cache = EmbeddingCache.load(cache_dir, encoder_key(text_cfg), text_cfg.dim)
    if text_cfg.tokens and len(cache) and (not cache.has_tokens or cache.token_length != int(text_cfg.max_tokens)):
        raise EmbeddingCacheError(f"{cache.path} was built without text.tokens (or another text.max_tokens); a "
                                  "sharded build cannot rebuild it: run `python -m t2v.text embed` in one process")
    order = sorted(cache.missing(captions), key=lambda c: (len(c), c))
    return cache, [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _part_path(cache: EmbeddingCache, batches: list, shard: int, shards: int) -> Path:
    """A part's file, named by the plan it belongs to: shards planned against another state of the cache (or
    other captions, or another batch size) never mix in a merge."""
    plan = hashlib.sha256(json.dumps(batches).encode()).hexdigest()[:12]
    return Path(f"{part_name(cache.path.with_suffix(f'.{plan}'), shard, shards)}.pt")


def embed_shard(text_cfg, captions: Iterable[str], cache_dir: str | os.PathLike, shard: int, shards: int,
                batch_size: int = 64, device: str | torch.device = "cpu") -> Path:
    """Encode shard ``shard`` of ``shards`` of the missing captions (a contiguous run of the batches one process
    would encode, so every caption is encoded in the same batch) into its own part file; a finished part is kept."""
    cache, batches = _todo_batches(text_cfg, captions, cache_dir, batch_size)
    path = _part_path(cache, batches, shard, shards)
    if path.exists() or not batches:  # finished, or nothing left to embed (already merged)
        return path
    part = EmbeddingCache(path, cache.key, int(text_cfg.dim))
    mine = [batches[j] for j in shard_rows(len(batches), shard, shards)]
    # as embed_captions: a file that has tokens keeps them complete, at its own length
    want_tokens = bool(text_cfg.tokens) or cache.has_tokens
    length = cache.token_length if cache.has_tokens else int(text_cfg.max_tokens)
    if mine:
        encoder = _checked_encoder(text_cfg, device)
        for batch in mine:
            _encode_into(part, encoder, batch, want_tokens, length)
    part.save()
    return path


def merge_embedding_shards(text_cfg, captions: Iterable[str], cache_dir: str | os.PathLike, shards: int,
                           batch_size: int = 64) -> EmbeddingCache:
    """Add the ``shards`` parts to the cache in shard order (the order one process adds them), save it once,
    atomically, and remove the parts. Fails, naming it, if a part is missing; a merge that already ran is a no-op."""
    captions = list(captions)
    cache, batches = _todo_batches(text_cfg, captions, cache_dir, batch_size)
    if not batches:
        return cache
    parts = [(_part_path(cache, batches, i, shards),) for i in range(shards)]  # one file each: the part is the .pt
    check_parts(parts, "text cache", EmbeddingCacheError, "caption-embedding shards")
    for (path,) in parts:
        part = EmbeddingCache.load_path(path, cache.key, int(text_cfg.dim))
        if len(part):
            cache.extend(part)
    left = cache.missing(captions)
    if left:  # cannot happen with parts of this plan; refuse rather than save a cache training would reject
        raise EmbeddingCacheError(f"the merged shards leave {len(left)} captions without an embedding "
                                  f"(e.g. {left[0]!r}); rerun the shards")
    cache.save()
    remove_parts(parts)
    return cache


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
    _check_dim(encoder, text_cfg)
    order = sorted(todo, key=lambda c: (len(c), c))
    bar = progress_counter(total=len(order), desc="embedding captions", unit="caption", enabled=progress)
    save_due = Every(save_every_s)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        _encode_into(cache, encoder, batch, want_tokens, token_length)
        bar.update(len(batch))
        if save_due():
            cache.save()
    bar.close()
    cache.save()
    return cache
