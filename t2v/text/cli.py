"""``python -m t2v.text embed``: embed every caption training will look up, once, into the text cache.

  embed [MANIFEST] [--config F] [key=value ...] [--manifest PATH ...] [--shard I/N | --merge N]

MANIFEST (it means data.manifest=MANIFEST), --config F, the key=value overrides and the options come in any order
(t2v.config.split_positionals tells a path from an override); all are parsed and the config loaded before anything
is encoded.

The captions are those of data.manifest, of the validation manifest when there is one, of any --manifest, the
sample prompts and "" (the unconditional input of classifier-free guidance). They are read with the data
layer's caption normaliser (``t2v.data.manifest.row_captions``), so what is embedded here is exactly what
training asks the cache for. Captions already cached are not encoded again, and the encoder is not even
loaded when nothing is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from t2v.cachebuild import no_room, shard_argument, shard_count
from t2v.data.manifest import row_captions
from t2v.device import DeviceError, pick_device
from t2v.text.cache import EmbeddingCacheError, embed_captions, embed_shard, merge_embedding_shards
from t2v.text.encoders import TextEncoderError


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
    from t2v import text  # the package docstring's first line is the command's description
    from t2v.config import ConfigError, add_config_args, cache_dir, load_with_manifest, split_positionals, val_manifest

    parser = argparse.ArgumentParser(prog="python -m t2v.text", description=text.__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    p = sub.add_parser("embed", help="embed every caption of the manifest(s) once into the text cache")
    add_config_args(p, manifest=True)
    p.add_argument("--manifest", action="append", default=[], metavar="PATH",
                   help="another manifest whose captions to embed (repeatable; data.manifest and the "
                        "validation manifest are always included)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--shard", type=shard_argument, default=None, metavar="I/N",
                   help="encode only shard I of N of the missing captions into a part file (one Slurm array task)")
    p.add_argument("--merge", type=shard_count, default=0, metavar="N", help="add the N finished shards to the cache")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in sub.choices:
        parser.parse_args(argv)  # prints usage / help and exits
    # MANIFEST and key=value overrides may come before, between or after --options
    args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])

    try:
        manifest, overrides = split_positionals(args.positionals)
        cfg = load_with_manifest(args.config, overrides, manifest)
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
        if args.shard:
            part = embed_shard(cfg.text, captions, out_dir, *args.shard, batch_size=args.batch_size, device=device)
            print(f"text embed shard {args.shard[0]}/{args.shard[1]}: {part} ({time.time() - t0:.1f} s)")
            return 0
        if args.merge:
            cache = merge_embedding_shards(cfg.text, captions, out_dir, args.merge, batch_size=args.batch_size)  # .added: the shards' captions
        else:
            cache = embed_captions(cfg.text, captions, out_dir, batch_size=args.batch_size,
                                   progress=not args.no_progress, device=device)
    except (ConfigError, TextEncoderError, EmbeddingCacheError, DeviceError, OSError) as e:
        code = no_room(e, "text.cache_dir")  # a full disk or quota: its own line and exit code
        if code is not None:
            return code
        print(f"error: {e}", file=sys.stderr)
        return 2
    unique = len(set(captions))
    print(f"text embed: {unique} unique captions ({n_manifest} from manifests, plus sample prompts and \"\"): "
          f"{cache.added} newly encoded, {unique - cache.added} already cached, {time.time() - t0:.1f} s")
    print(f"encoder {cache.key} ({cache.dim}-d{', with tokens' if cache.has_tokens else ''}); "
          f"cache {cache.path} holds {len(cache)} captions, {cache.nbytes() / 2**20:,.1f} MiB"
          + (f" (tokens at their real lengths, {int(cache.lengths.sum()) / max(len(cache), 1):.1f} a caption on "
             f"average; padded to {cache.token_length} they would take {cache.padded_nbytes() / 2**20:,.1f} MiB)"
             if cache.has_tokens else ""))
    return 0
