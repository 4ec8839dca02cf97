"""t2v.text: frozen text encoders (hash, tiny, clip offline) and the caption-embedding cache."""
import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2v import text
from t2v.config import TextConfig

REPO = Path(__file__).resolve().parents[1]


def hash_cfg(dim=64, **kw):
    return TextConfig(encoder="hash", dim=dim, **kw)


class CountingEncoder(text.TextEncoder):
    """Wraps an encoder and counts what it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.key, self.dim, self.max_tokens = inner, inner.key, inner.dim, inner.max_tokens
        self.calls, self.captions = 0, 0

    def encode(self, captions):
        self.calls += 1
        self.captions += len(captions)
        return self.inner.encode(captions)


# ------------------------------------------------------------------------------------------ hash


def test_hash_encoder_shapes_and_colour_words():
    enc = text.build_encoder(hash_cfg(dim=64))
    assert enc.key == "hash:64" and enc.dim == 64
    caps = ["a red circle moving right", "a blue circle moving right", "A RED circle, moving right!", ""]
    pooled, tokens, mask = enc.encode(caps)
    assert pooled.shape == (4, 64) and pooled.dtype == torch.float32
    assert tokens.shape == (4, 6, 64) and mask.shape == (4, 6) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [6, 6, 6, 1]  # start vector + words; "" has only the start vector
    assert torch.allclose(pooled[:3].norm(dim=1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-3)  # colour word changes the embedding
    assert torch.equal(pooled[0], pooled[2])  # case and punctuation do not
    assert torch.equal(pooled[3], torch.zeros(64))
    # padding to the longest in the batch, capped by max_tokens
    short = text.build_encoder(hash_cfg(dim=64, max_tokens=3)).encode(caps)[1]
    assert short.shape == (4, 3, 64)


def test_hash_encoder_is_deterministic_across_processes():
    caps = ["a red circle moving right", "a green square moving up"]
    mine = text.HashEncoder(dim=16).encode(caps)[0]
    code = ("import json; from t2v.text import HashEncoder; "
            f"print(json.dumps(HashEncoder(dim=16).encode({caps!r})[0].tolist()))")
    env = dict(os.environ, PYTHONHASHSEED="12345")  # a different salt for Python's own hash()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    theirs = torch.tensor(json.loads(out.stdout))
    assert torch.equal(mine, theirs)


# ------------------------------------------------------------------------------------------ tiny


def test_tiny_encoder_shapes_padding_invariance_and_seed():
    cfg = TextConfig(encoder="tiny", dim=32, max_tokens=16)
    enc = text.build_encoder(cfg)
    assert enc.dim == 32 and enc.key == "tiny:32:16:seed0"
    short, long = "a red circle", "a big blue square moving slowly up and to the left"
    pooled, tokens, mask = enc.encode([short, long])
    assert pooled.shape == (2, 32) and tokens.shape == (2, 13, 32) and mask.sum(1).tolist() == [5, 13]
    alone = enc.encode([short])
    assert alone[1].shape == (1, 5, 32)  # padded to the longest in the batch, not to max_tokens
    assert torch.allclose(pooled[0], alone[0][0], atol=1e-5)
    capped = enc.encode([long + " " + long])[1]
    assert capped.shape == (1, 16, 32)  # capped at max_tokens
    # same weights in a second build (fixed seed), and the global RNG is left alone
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = text.build_encoder(cfg)
    assert torch.equal(torch.rand(1), before)
    assert torch.equal(again.encode([short])[0], alone[0])
    assert not again.model.training and not any(p.requires_grad for p in again.model.parameters())


def test_clip_b32_random_has_the_real_size():
    enc = text.build_clip_b32_random(seed=0)
    c = enc.model.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
            c.max_position_embeddings) == (49408, 512, 12, 8, 2048, 77)
    ids, mask = enc.tokenize(["a red circle", ""], 77)
    assert ids.shape == (2, 5) and ids[1, :2].tolist() == [49406, 49407]
    pooled, _, _ = enc.encode(["a red circle"])
    assert pooled.shape == (1, 512)


# ------------------------------------------------------------------------------------------ clip


def test_clip_missing_offline_fails_fast_with_instructions(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # failing fast means not trying the hub: the no_network fixture fails the test on any connection attempt
    with pytest.raises(text.TextEncoderError) as e:
        text.build_encoder(TextConfig(encoder="clip", name="nonexistent-org/no-such-clip-model"))
    msg = str(e.value)
    assert "HF_HOME" in msg and "HF_HUB_OFFLINE=1" in msg and "save_pretrained" in msg
    assert "CLIPTextModel.from_pretrained('nonexistent-org/no-such-clip-model')" in msg


def test_clip_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(text.TextEncoderError, match="does not exist"):
        text.build_encoder(TextConfig(encoder="clip", name=str(tmp_path / "nope")))


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_small_clip_tokenizer(folder: Path, letter_pairs=True):
    """vocab.json + merges.txt in CLIP's byte-level BPE format: 512 byte symbols, every letter pair
    merged (1352 merges) and the two special tokens: 1866 tokens, above the len > 1000 sanity check."""
    chars = _bytes_to_unicode()
    merges = [f"{a} {b}{end}" for a in string.ascii_lowercase for b in string.ascii_lowercase for end in ("", "</w>")]
    if not letter_pairs:
        merges = merges[:10]
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def save_local_clip(folder: Path, dim=32, letter_pairs=True):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    n = write_small_clip_tokenizer(folder / "bpe", letter_pairs)
    tok = CLIPTokenizer(vocab=str(folder / "bpe" / "vocab.json"), merges=str(folder / "bpe" / "merges.txt"))
    assert len(tok) == n
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=n, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_clip_from_local_folder(tmp_path):
    folder = save_local_clip(tmp_path / "clip")
    enc = text.build_encoder(TextConfig(encoder="clip", name=str(folder), dim=32))
    assert enc.key == f"clip:{folder.resolve()}" == text.encoder_key(TextConfig(encoder="clip", name=str(folder)))
    assert len(enc.tokenizer) == 1866
    caps = ["a red circle", "a green square moving up and then down"]
    pooled, tokens, mask = enc.encode(caps)
    assert pooled.shape == (2, 32) and tokens.shape[:2] == mask.shape and mask.shape[1] < 77
    assert mask[0].sum() < mask[1].sum()
    assert torch.allclose(enc.encode(caps[:1])[0][0], pooled[0], atol=1e-5)  # padding does not leak in
    expected = text.mean_pool(tokens, mask)
    assert torch.allclose(expected, pooled)
    # cached through embed_captions like any encoder
    cache = text.embed_captions(TextConfig(encoder="clip", name=str(folder), dim=32), caps, tmp_path / "c",
                                progress=False)
    assert cache.added == 2 and torch.allclose(cache.get(caps[1]), pooled[1], atol=1e-6)
    # wrong text.dim is caught at build time
    with pytest.raises(text.TextEncoderError, match="text.dim=32"):
        text.build_encoder(TextConfig(encoder="clip", name=str(folder), dim=512))


def test_clip_placeholder_tokenizer_is_refused(tmp_path):
    folder = save_local_clip(tmp_path / "clip", letter_pairs=False)  # 524 tokens: stands in for the 2-token trap
    with pytest.raises(text.TextEncoderError, match="only 524 tokens"):
        text.build_encoder(TextConfig(encoder="clip", name=str(folder), dim=32))


# ----------------------------------------------------------------------------------------- cache


def test_embed_captions_caches_and_second_run_encodes_nothing(tmp_path):
    cfg = hash_cfg()
    caps = ["a red circle", "a blue square", "a red circle", ""]
    enc = CountingEncoder(text.build_encoder(cfg))
    cache = text.embed_captions(cfg, caps, tmp_path, batch_size=2, progress=False, encoder=enc)
    assert enc.captions == 3 and cache.added == 3 and len(cache) == 3
    assert cache.path == tmp_path / f"text_{text.slug('hash:64')}.pt" and cache.path.is_file()
    assert cache.path.name.startswith("text_hash_64-")

    enc2 = CountingEncoder(text.build_encoder(cfg))
    again = text.embed_captions(cfg, caps, tmp_path, progress=False, encoder=enc2)
    assert enc2.calls == 0 and again.added == 0 and len(again) == 3
    # without an encoder passed in, nothing is built either
    assert text.embed_captions(cfg, caps, tmp_path, progress=False).added == 0

    enc3 = CountingEncoder(text.build_encoder(cfg))
    more = text.embed_captions(cfg, caps + ["a green triangle"], tmp_path, progress=False, encoder=enc3)
    assert enc3.captions == 1 and len(more) == 4

    loaded = text.EmbeddingCache.load(tmp_path, "hash:64")
    assert "a red circle" in loaded and "a yellow star" not in loaded and len(loaded) == 4
    assert torch.equal(loaded.get("a blue square"), enc.inner.encode(["a blue square"])[0][0])
    assert loaded.hits == 1 and loaded.misses == 0
    assert loaded.missing(["x", "a red circle", "y", "x"]) == ["x", "y"]
    assert loaded.get_batch(["", "a red circle"]).shape == (2, 64) and loaded.hits == 3
    # no temp files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [loaded.path.name]


def test_round_trip_with_tokens(tmp_path):
    cfg = hash_cfg(dim=8, max_tokens=6, tokens=True)
    caps = ["a red circle", "one two three four five six seven", ""]
    cache = text.embed_captions(cfg, caps, tmp_path, progress=False)
    assert cache.flat_tokens.shape == (11, 8) and cache.flat_tokens.dtype == torch.float16 and cache.token_length == 6
    d = torch.load(cache.path, weights_only=True)
    # stored at the real lengths (4 + 6 + 1 tokens: the start token and the words, cut at max_tokens), padded at load
    assert set(d) == {"key", "dim", "captions", "pooled", "tokens", "lengths", "token_length"}
    assert d["tokens"].shape == (11, 8) and d["token_length"] == 6
    assert sorted(d["lengths"].tolist()) == [1, 4, 6] and d["captions"] == cache.captions
    assert d["pooled"].dtype == torch.float32 and d["tokens"].dtype == torch.float16

    loaded = text.EmbeddingCache.load(tmp_path, "hash:8", dim=8)
    tok, mask = loaded.get_tokens("a red circle")
    assert tok.shape == (6, 8) and tok.dtype == torch.float32 and mask.tolist() == [True] * 4 + [False] * 2
    _, ref_tokens, _ = text.HashEncoder(8, 6).encode(["a red circle"])
    assert torch.allclose(tok[:4], ref_tokens[0], atol=1e-3)
    assert loaded.get_tokens("")[1].sum() == 1
    assert torch.equal(loaded.pooled, cache.pooled)

    # a cache built without tokens is rebuilt whole when tokens are asked for
    plain_dir = tmp_path / "plain"
    text.embed_captions(hash_cfg(dim=8), caps[:2], plain_dir, progress=False)
    rebuilt = text.embed_captions(cfg, caps, plain_dir, progress=False)
    assert rebuilt.has_tokens and rebuilt.added == 3
    # ... and a cache with tokens keeps them when a later call does not ask for them
    later = text.embed_captions(hash_cfg(dim=8), ["a new caption"], plain_dir, progress=False)
    assert later.added == 1 and later.get_tokens("a new caption")[1].sum() == 4
    # add() with longer tokens than stored pads what is stored
    later.add(["x y z"], torch.zeros(1, 8), torch.ones(1, 9, 8), torch.ones(1, 9, dtype=torch.bool))
    assert later.token_length == 9 and later.get_tokens("")[0].shape == (9, 8) and later.get_tokens("")[1].sum() == 1
    with pytest.raises(text.EmbeddingCacheError, match="text.tokens=true"):
        text.EmbeddingCache.load(tmp_path / "none", "hash:8").get_tokens("")
    # adding a caption already cached changes nothing; a mask that is not a prefix is refused before any change
    n, length = len(later), later.token_length
    assert later.add([""], torch.zeros(1, 8), torch.ones(1, 12, 8), torch.ones(1, 12, dtype=torch.bool)) == 0
    assert later.token_length == length
    with pytest.raises(ValueError, match="prefix"):
        later.add(["z"], torch.zeros(1, 8), torch.ones(1, 3, 8), torch.tensor([[False, True, True]]))
    assert len(later) == n and "z" not in later


def test_cache_errors(tmp_path):
    cfg = hash_cfg()
    cache = text.embed_captions(cfg, ["a red circle"], tmp_path, progress=False)

    with pytest.raises(KeyError) as e:
        cache.get("a purple hexagon")
    msg = str(e.value)
    assert "python -m t2v.text embed" in msg and "a purple hexagon" in msg and str(cache.path) in msg
    assert cache.misses == 1

    # a file that holds another encoder's key
    other = text.cache_path(tmp_path, "hash:128")
    other.write_bytes(cache.path.read_bytes())
    with pytest.raises(text.EmbeddingCacheError) as e:
        text.EmbeddingCache.load(tmp_path, "hash:128")
    assert str(other) in str(e.value) and "'hash:64'" in str(e.value)

    # a corrupt (truncated) file
    cache.path.write_bytes(cache.path.read_bytes()[:50])
    with pytest.raises(text.EmbeddingCacheError) as e:
        text.EmbeddingCache.load(tmp_path, "hash:64")
    assert str(cache.path) in str(e.value)

    # missing file: an empty cache; require() names the command
    empty = text.EmbeddingCache.load(tmp_path / "new", "hash:64")
    assert len(empty) == 0
    with pytest.raises(text.EmbeddingCacheError, match="python -m t2v.text embed"):
        empty.require(["a red circle", ""])


def test_slug_is_filesystem_safe_and_distinct():
    keys = ["clip:openai/clip-vit-base-patch32", "clip:openai_clip-vit-base-patch32", "clip:/a b/c:d", "hash:512"]
    slugs = [text.slug(k) for k in keys]
    assert len(set(slugs)) == len(keys)
    assert all(set(s) <= set(string.ascii_letters + string.digits + "._-") for s in slugs)
    assert slugs[0].startswith("clip_openai_clip-vit-base-patch32-")


# ------------------------------------------------------------------------------------------- CLI


def write_manifest(path: Path):
    lines = [
        json.dumps({"video": "a.mp4", "caption": "a red circle moving right"}),
        json.dumps({"video": "b.mp4", "text": "a blue square moving up"}),
        json.dumps({"video": "c.mp4", "captions": ["a green triangle moving left", "a red circle moving right"]}),
        "{not json",
        "",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_embed_end_to_end(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "train.jsonl")
    extra = tmp_path / "val.jsonl"
    extra.write_text(json.dumps({"caption": "a yellow star"}) + "\n")
    args = ["embed", f"data.manifest={manifest}", "text.encoder=hash", "text.dim=32", "--manifest", str(extra),
            "--no-progress", "train.sample_prompts=[a purple circle moving down]"]
    assert text.main(args) == 0
    out = capsys.readouterr().out
    cache = text.EmbeddingCache.load(tmp_path / ".t2v_cache", "hash:32")
    assert sorted(cache.captions) == sorted(["a red circle moving right", "a blue square moving up",
                                             "a green triangle moving left", "a yellow star",
                                             "a purple circle moving down", ""])
    assert "6 newly encoded" in out and str(cache.path) in out

    assert text.main(args) == 0
    assert "0 newly encoded, 6 already cached" in capsys.readouterr().out

    assert text.main(["embed", f"data.manifest={tmp_path / 'missing.jsonl'}", "text.encoder=hash"]) == 2
    assert "manifest not found" in capsys.readouterr().err


def test_cli_as_module_matches_in_process_encoder(tmp_path):
    """`python -m t2v.text embed` in another process gives the same embeddings as this one."""
    manifest = write_manifest(tmp_path / "train.jsonl")
    env = dict(os.environ, PYTHONHASHSEED="7")
    r = subprocess.run([sys.executable, "-m", "t2v.text", "embed", f"data.manifest={manifest}", "text.encoder=hash",
                        f"text.cache_dir={tmp_path / 'tc'}", "--no-progress"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cache = text.EmbeddingCache.load(tmp_path / "tc", "hash:512")
    assert "" in cache and "a red circle moving right" in cache and "a green square moving up" in cache
    enc = text.HashEncoder(512)
    assert torch.equal(cache.get_batch(cache.captions), enc.encode(cache.captions)[0])


@pytest.mark.parametrize("tokens", [False, True])
def test_sharded_embedding_merges_into_the_file_one_process_writes(tmp_path, tokens):
    """`embed --shard I/N` encodes a contiguous run of the batches one process would (so each caption meets the
    same batch), `--merge N` adds the parts in order: the cache file is the one a single build writes."""
    from t2v.text.cache import embed_shard, merge_embedding_shards

    cfg = TextConfig(encoder="tiny", dim=32, max_tokens=16, tokens=tokens)
    captions = [f"a {c} {s} moving {m}" for c in ("red", "green", "blue") for s in ("circle", "square")
                for m in ("left", "up")] + ["", "x"]
    one = text.embed_captions(cfg, captions, tmp_path / "one", batch_size=4, progress=False)
    for i in (1, 2, 0):
        embed_shard(cfg, captions, tmp_path / "sharded", i, 3, batch_size=4)
    merged = merge_embedding_shards(cfg, captions, tmp_path / "sharded", 3, batch_size=4)
    assert merged.captions == one.captions and torch.equal(merged.pooled, one.pooled)
    assert merged.path.read_bytes() == one.path.read_bytes()
    assert [p.name for p in (tmp_path / "sharded").iterdir()] == [merged.path.name]  # parts removed
    assert merge_embedding_shards(cfg, captions, tmp_path / "sharded", 3, batch_size=4).path == merged.path  # rerun
    more = captions + ["new one", "new two"]
    embed_shard(cfg, more, tmp_path / "sharded", 0, 2, batch_size=1)
    with pytest.raises(text.EmbeddingCacheError, match="1 of 2 caption-embedding shards are not finished"):
        merge_embedding_shards(cfg, more, tmp_path / "sharded", 2, batch_size=1)
    # a part planned against other captions is never merged into this plan
    embed_shard(cfg, more + ["third"], tmp_path / "sharded", 1, 2, batch_size=1)
    with pytest.raises(text.EmbeddingCacheError, match="not finished"):
        merge_embedding_shards(cfg, more, tmp_path / "sharded", 2, batch_size=1)
